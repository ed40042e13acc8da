"""The notebook widgets in a real JupyterLab: started by the test on 127.0.0.1 (a free port, a token, a
temporary directory), opened in headless chromium (Debian's package, driven by Playwright), a notebook
run, a layer changed in the head-view widget and the new slice checked against the raw attention array;
no console errors, no request leaves 127.0.0.1, and the server is stopped after."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import nbformat
import pytest

from stratascope.viewer import data
from viewer_fixtures import viewer_store

pytestmark = pytest.mark.browser
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
REPO = Path(__file__).resolve().parent.parent
PROMPT, FIRST, SECOND = 4, 0, 2  # the long prompt: many lines per head, different at each layer
# The other views of the test store, each a widget of its own on the same page (plotly ones among them).
OTHERS = {"tokens": "prompt=1", "model": "prompt=0", "layer_predictions": "prompt=0", "rankings": "prompt=0",
          "rankings_watch": "prompt=0", "saliency": "prompt=0, method='grad_x_input'", "neuron": "layer=0, head=1",
          "heads_map": "", "nmf": "prompt=0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, method: str = "GET", timeout: float = 5) -> int:
    with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=timeout) as r:
        return r.status


@pytest.fixture
def jupyterlab(tmp_path):
    """JupyterLab on 127.0.0.1 serving tmp_path; nothing it offers fetches from outside (no news, no update
    check, the read-only extension manager). Yields (url, token, directory); shut down after."""
    port, token = free_port(), secrets.token_hex(16)
    root, home = tmp_path / "lab", tmp_path / "home"
    root.mkdir()
    news = home / "settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)  # no "would you like news?" prompt over the notebook
    (news / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"), "JUPYTER_RUNTIME_DIR": str(home / "runtime")}
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.extension_manager=readonly",
           "--ServerApp.allow_root=True"]  # CI runs as root
    log = open(tmp_path / "jupyterlab.log", "w")  # closed after the server stops
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if call(f"{url}/api/status?token={token}") == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("JupyterLab did not start: " + (tmp_path / "jupyterlab.log").read_text()[-2000:])
            time.sleep(0.5)
        yield url, token, root
    finally:
        try:
            call(f"{url}/api/shutdown?token={token}", method="POST")  # stops its kernels too
            proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            proc.terminate()
            proc.wait(timeout=30)
        log.close()


def notebook(path: Path, store: str) -> None:
    """Three cells: open the run; the head-view widget; a check the test runs again after the change,
    writing what the kernel knows (the widget's state, its SVG) to head.json."""
    cells = [
        "import json, pathlib\nimport stratascope as ss\n"
        f"run = ss.open_run({store!r})\n\n"
        "def check(w, name):\n"
        "    out = {'state': w.state}\n"
        "    try:\n"
        "        out['svg'] = str(w.save(name + '.svg'))\n"
        "    except Exception as e:\n"
        "        out['error'] = str(e)\n"
        "    pathlib.Path(name + '.json').write_text(json.dumps(out))",
        f"w = run.view.head(prompt={PROMPT}, layer={FIRST})\nw",
        "check(w, 'head')",
    ] + [f"others['{name}'] = run.view.{name}({args})\nothers['{name}']" for name, args in OTHERS.items()]
    cells[0] += "\nothers = {}"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def run_new_cell(page, source: str) -> None:
    """Append a code cell to the open notebook and run it, as a user typing it would."""
    page.evaluate("""source => { const nb = window.jupyterapp.shell.currentWidget.content;
        nb.model.sharedModel.insertCell(nb.model.cells.length, {cell_type: 'code', source: source});
        nb.activeCellIndex = nb.model.cells.length - 1;
        return window.jupyterapp.commands.execute('notebook:run-cell'); }""", source)


def lines_at(store, layer: int) -> int:
    """Lines the head view draws at a layer with every head shown: weights >= MIN_WEIGHT, from the raw array."""
    return int((store.att(PROMPT, layer) >= data.MIN_WEIGHT).sum())


def test_head_widget_in_jupyterlab(viewer_store, jupyterlab):
    if not shutil.which(CHROMIUM):
        pytest.fail("chromium is missing: apt-get install -y chromium (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    url, token, root = jupyterlab
    notebook(root / "widgets.ipynb", viewer_store.path)
    assert lines_at(viewer_store, FIRST) != lines_at(viewer_store, SECOND)  # the change is visible
    errors, outside, hosts = [], [], set()

    def route(r):
        host = urlsplit(r.request.url).hostname
        hosts.add(host)
        if host != "127.0.0.1":
            outside.append(r.request.url)
            r.abort()
        else:
            r.continue_()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("websocket", lambda ws: hosts.add(urlsplit(ws.url).hostname) or (
            outside.append(ws.url) if urlsplit(ws.url).hostname != "127.0.0.1" else None))
        page.route("**/*", route)
        page.goto(f"{url}/lab/tree/widgets.ipynb?token={token}")
        page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget && "
                               "window.jupyterapp.shell.currentWidget.sessionContext && "
                               "window.jupyterapp.shell.currentWidget.sessionContext.session && "
                               "window.jupyterapp.shell.currentWidget.sessionContext.session.kernel", timeout=90000)
        page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.ready")
        page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
        box = ".ss-widget .ss-view[data-view=head]"
        page.wait_for_selector(f"{box}[data-ready]", timeout=90000)
        assert page.get_attribute(box, "data-ready") == "1", page.inner_text(box)
        assert page.locator(f"{box} .ss-line").count() == lines_at(viewer_store, FIRST)
        page.wait_for_selector(f"{box}[data-drawn]", timeout=30000)  # the first drawing went to the kernel
        drawn = page.get_attribute(box, "data-drawn")

        page.select_option(".ss-widget select.ss-layer", str(SECOND))  # the browser asks the kernel for layer 2
        want = lines_at(viewer_store, SECOND)
        page.wait_for_function(f"() => document.querySelector('{box}').getAttribute('data-ready') === '1' && "
                               f"document.querySelectorAll('{box} .ss-line').length === {want}", timeout=30000)
        for h in range(viewer_store.att(PROMPT, SECOND).shape[1]):  # every head's lines, from the raw array
            assert page.locator(f"{box} .ss-line[data-h='{h}']").count() == int(
                (viewer_store.att(PROMPT, SECOND)[:, h, :] >= data.MIN_WEIGHT).sum())
        page.wait_for_function(f"() => document.querySelector('{box}').getAttribute('data-drawn') !== '{drawn}'",
                               timeout=30000)  # and the drawing of layer 2
        ARTIFACTS.mkdir(exist_ok=True)
        page.locator(".ss-widget").first.screenshot(path=str(ARTIFACTS / "widget_head_jupyterlab.png"))
        page.screenshot(path=str(ARTIFACTS / "widget_jupyterlab_page.png"))

        for name in OTHERS:  # every other view drew in its own widget
            other = f".ss-widget .ss-view[data-view={name}]"
            page.wait_for_selector(f"{other}[data-ready]", timeout=60000)
            assert page.get_attribute(other, "data-ready") == "1", (name, page.inner_text(other))
        assert page.locator(".ss-widget .ss-view[data-view=layer_predictions] .js-plotly-plot").count() == 2
        assert page.locator(".ss-widget .ss-view[data-view=model] .ss-thumb").count() == 3 * 4  # layers × heads
        page.locator(".ss-widget:has(.ss-view[data-view=layer_predictions])").screenshot(
            path=str(ARTIFACTS / "widget_layer_predictions_jupyterlab.png"))

        # The kernel knows the new state and writes the drawing on show (run the check cell again).
        (root / "head.json").unlink(missing_ok=True)
        page.evaluate("() => { const nb = window.jupyterapp.shell.currentWidget.content; nb.activeCellIndex = 2; "
                      "return window.jupyterapp.commands.execute('notebook:run-cell'); }")
        deadline = time.monotonic() + 30
        while not (root / "head.json").exists() and time.monotonic() < deadline:
            time.sleep(0.3)
        out = json.loads((root / "head.json").read_text())
        assert out["state"]["layer"] == SECOND and out["state"]["prompt"] == PROMPT, out
        svg = (root / "head.svg").read_text()
        assert svg.startswith("<svg") and svg.count('class="ss-line"') == lines_at(viewer_store, SECOND)
        run_new_cell(page, "check(others['layer_predictions'], 'lp')")
        deadline = time.monotonic() + 30
        while not (root / "lp.json").exists() and time.monotonic() < deadline:
            time.sleep(0.3)
        out = json.loads((root / "lp.json").read_text())
        assert "error" not in out, out  # a plotly chart saved through Plotly.toImage, as its Save SVG button does
        assert Path(out["svg"]).name == "lp.svg" and (root / "lp.svg").read_text().startswith("<svg")

        # Setting the state from Python redraws the widget: layer 1's lines, fetched from the kernel.
        run_new_cell(page, "w.state = {**w.state, 'layer': 1}")
        want = lines_at(viewer_store, 1)
        page.wait_for_function(f"() => document.querySelector('{box}').getAttribute('data-ready') === '1' && "
                               f"document.querySelectorAll('{box} .ss-line').length === {want}", timeout=30000)
        assert page.input_value(".ss-widget select.ss-layer") == "1"
        browser.close()

    assert outside == [] and hosts == {"127.0.0.1"}, outside
    assert errors == [], errors
