"""Every view in headless chromium (Debian's package, driven by Playwright), in the report and the
app: expected elements and counts against the raw arrays, interactions, no console errors, no
script from store text ever running, and a screenshot per view in test-artifacts/."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from stratascope.viewer import data
from viewer_fixtures import WATCH, XSS_IMG, XSS_SCRIPT, viewer_app, viewer_store  # noqa: F401 - fixtures

pytestmark = pytest.mark.browser
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
VIEWS = ("tokens", "head", "model", "layer_predictions", "rankings", "rankings_watch", "saliency")


def label(s: str) -> str:
    return s.replace(" ", "␣").replace("\n", "↵") or "∅"


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM):
        pytest.fail("chromium is missing: apt-get install -y chromium (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def report_url(viewer_store, tmp_path_factory) -> str:
    from click.testing import CliRunner

    from stratascope.cli import cli

    out = tmp_path_factory.mktemp("report") / "report.html"
    res = CliRunner().invoke(cli, ["report", viewer_store.path, "-o", str(out), "--prompts", "0-4"])
    assert res.exit_code == 0, res.output
    return out.as_uri()


@pytest.fixture(params=["report", "app"])
def target(request, report_url, viewer_app) -> tuple[str, str]:
    return request.param, (report_url if request.param == "report" else viewer_app)


class Viewer:
    """A page on one view, collecting console errors; `done` screenshots and checks them."""

    def __init__(self, browser, target, view: str, **state):
        self.kind, base = target
        self.view = view
        self.page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.errors.append("dialog: " + d.message), d.dismiss()))
        frag = "&".join(f"{k}={v}" for k, v in {"view": view, **state}.items())
        self.page.goto(base + "#" + frag)
        self.wait()

    def wait(self):
        self.page.wait_for_selector("#ss-view[data-ready]", timeout=20000)
        assert self.page.get_attribute("#ss-view", "data-ready") == "1", self.page.inner_text("#ss-view")

    def count(self, selector: str) -> int:
        return self.page.evaluate("s => document.querySelectorAll(s).length", selector)

    def text(self) -> str:
        return self.page.evaluate("() => document.getElementById('ss-view').textContent")

    def choose(self, selector: str, value) -> None:
        self.page.select_option(selector, str(value))
        self.wait()

    def done(self, shot: str | None = None) -> None:
        if shot:
            ARTIFACTS.mkdir(exist_ok=True)
            self.page.screenshot(path=str(ARTIFACTS / f"{shot}_{self.kind}.png"), full_page=True)
        assert self.page.evaluate("window.__pwned") is None
        assert self.count("#ss-view img, #ss-view script, #ss-view iframe") == 0
        assert self.errors == []
        self.page.close()


def lines_expected(att: np.ndarray, heads=None, q=None, keep=None) -> int:
    """Lines the head view should draw: (head, query, key) with weight >= MIN_WEIGHT."""
    mask = att >= data.MIN_WEIGHT  # query, head, key
    if heads is not None:
        mask = mask[:, heads]
    if q is not None:
        mask = mask[q]
    if keep is not None:
        mask = mask & keep
    return int(mask.sum())


def test_tokens_view(browser, target, viewer_store):
    v = Viewer(browser, target, "tokens")
    s = viewer_store
    assert v.count(".ss-prompt") == 5
    for p in range(5):
        assert v.count(f'.ss-prompt[data-prompt="{p}"] .ss-chip') == s.n(p)
    assert v.page.inner_text('.ss-prompt[data-prompt="1"] .ss-text') == XSS_IMG
    assert v.page.inner_text('.ss-prompt[data-prompt="2"] .ss-text') == XSS_SCRIPT
    chips = v.page.eval_on_selector_all('.ss-prompt[data-prompt="0"] .ss-chip', "es => es.map(e => e.textContent)")
    assert chips == [label(t) for t in s.token_str[s.rows(0)]] and chips[1] == "␣quick"
    assert v.page.get_attribute(".ss-current", "data-prompt") == "0"
    v.choose("#ss-prompt", 3)
    assert v.page.get_attribute(".ss-current", "data-prompt") == "3"
    v.done("tokens")


def test_head_view(browser, target, viewer_store):
    s, p = viewer_store, 0
    v = Viewer(browser, target, "head", prompt=p, layer=0)
    att = s.att(p, 0)
    assert v.count(".ss-tok-q") == v.count(".ss-tok-k") == s.n(p)
    assert v.count(".ss-line") == lines_expected(att) > 0
    v.page.hover('.ss-tok-q[data-i="3"]')  # hover filter: only the lines from token 3
    assert v.count(".ss-line") == lines_expected(att, q=3)
    assert set(v.page.eval_on_selector_all(".ss-line", "es => es.map(e => e.dataset.q)")) == {"3"}
    v.page.mouse.move(1, 1)
    assert v.count(".ss-line") == lines_expected(att)
    v.page.click('.ss-head-toggle[data-head="0"]')  # head toggle
    assert v.count(".ss-line") == lines_expected(att, heads=[1, 2, 3])
    seg = s.segments[s.rows(p)]  # sentence B -> A only (causal: A never sees B)
    v.choose(".ss-segment", "BA")
    keep = (seg[:, None, None] == 1) & (seg[None, None, :] == 0)
    assert v.count(".ss-line") == lines_expected(att, heads=[1, 2, 3], keep=keep) > 0
    v.choose(".ss-layer", 2)  # layer selector: redrawn from layer 2, head 0 stays hidden
    assert v.count(".ss-line") == lines_expected(s.att(p, 2), heads=[1, 2, 3])
    assert v.page.get_attribute('.ss-head-toggle[data-head="0"]', "aria-pressed") == "false"
    v.done("head")


def test_head_view_long_prompt_scrolls(browser, target, viewer_store):
    v = Viewer(browser, target, "head", prompt=4, layer=1)
    assert v.count(".ss-tok-q") == viewer_store.n(4) == 100
    box = v.page.evaluate("() => { const e = document.querySelector('.ss-scroll'); return [e.clientHeight, e.scrollHeight]; }")
    assert box[1] > box[0]  # the tall drawing scrolls inside its box; rows keep their height
    v.done("head_long")


def test_model_view(browser, target, viewer_store):
    s, p = viewer_store, 3
    v = Viewer(browser, target, "model", prompt=p)
    assert v.count(".ss-thumb") == 3 * 4
    v.page.click('.ss-thumb[data-layer="1"][data-head="2"]')
    assert v.page.get_attribute(".ss-detail", "data-head") == "2"
    assert v.count(".ss-detail .ss-line") == lines_expected(s.att(p, 1), heads=[2])
    assert v.count(".ss-detail .ss-tok-q") == s.n(p)
    v.done("model")


def _plot(v: "Viewer", cls: str = ".ss-heat") -> dict:
    return v.page.evaluate("c => { const d = document.querySelector(c).data[0]; return {z: d.z, text: d.text}; }", cls)


def ptext(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def test_layer_predictions_view(browser, target, viewer_store):
    s, p = viewer_store, 1
    rows = s.rows(p)
    v = Viewer(browser, target, "layer_predictions", prompt=p)
    last = s.n(p) - 1
    plot = _plot(v)
    np.testing.assert_allclose(plot["z"], s.topk_probs[rows][last], atol=1e-4)
    shown = v.page.evaluate("() => document.querySelector('.ss-heat').data[0].customdata")
    assert shown == [[ptext(label(str(s.vocab[i]))) for i in d] for d in s.topk_ids[rows][last]]
    assert "<img␣src=x" in v.text()  # the payload shows as text in the chart
    v.choose(".ss-position", 2)
    np.testing.assert_allclose(_plot(v)["z"], s.topk_probs[rows][2], atol=1e-4)
    v.done("layer_predictions")


def test_rankings_view(browser, target, viewer_store):
    s, p = viewer_store, 0
    v = Viewer(browser, target, "rankings", prompt=p)
    ranks = s.target_rank[s.rows(p)].T  # depth, token
    assert _plot(v)["text"] == [["" if r < 0 else str(r + 1) for r in row] for row in ranks]
    v.choose("#ss-prompt", 3)
    assert _plot(v)["text"] == [["" if r < 0 else str(r + 1) for r in row] for row in s.target_rank[s.rows(3)].T]
    v.done("rankings")


def test_rankings_watch_view(browser, target, viewer_store):
    s, p = viewer_store, 3
    v = Viewer(browser, target, "rankings_watch", prompt=p, position=2)
    w = s.watch_rank[s.rows(p)]
    assert _plot(v)["text"] == [[str(r + 1) for r in row] for row in w[2]]
    ticks = v.page.evaluate("() => document.querySelector('.ss-heat').layout.xaxis.ticktext")
    assert ticks == [ptext(label(x)) for x in WATCH]
    assert "<script>window.__pwned=1</script>" in v.text()
    v.choose(".ss-position", 5)
    assert _plot(v)["text"] == [[str(r + 1) for r in row] for row in w[5]]
    v.done("rankings_watch")


def test_saliency_view(browser, target, viewer_store):
    s, p = viewer_store, 3
    v = Viewer(browser, target, "saliency", prompt=p)
    n = s.n(p)
    assert v.count(".ss-sal-tok") == n
    a = s.attribution["grad_x_input"][s.rows(p), :n]

    def shown(t):
        values = v.page.eval_on_selector_all(".ss-sal-box", "es => es.map(e => e.dataset.value)")
        expect = np.round(a[t, : t + 1] / np.abs(a[t]).max(), 3)
        np.testing.assert_allclose([float(x) for x in values[: t + 1]], expect, atol=1.5e-3)
        assert all(x == "" for x in values[t + 1:])

    shown(n - 1)
    v.page.click('.ss-sal-tok[data-i="4"]')  # click: that token's prediction becomes the target
    v.wait()
    assert v.page.get_attribute(".ss-sal-svg", "data-target") == "4"
    shown(4)
    v.choose(".ss-method", "integrated_gradients")
    assert v.page.get_attribute(".ss-sal-svg", "data-target") == "4"
    v.done("saliency")


@pytest.mark.parametrize("view", VIEWS)
def test_xss_prompt_shows_as_text(browser, target, view):
    for p, needle in ((1, "<img␣src=x"), (2, "<script>window.")):
        v = Viewer(browser, target, view, prompt=p, layer=0)
        if view == "model":
            v.page.click('.ss-thumb[data-layer="0"][data-head="0"]')
        if view == "rankings_watch":
            needle = "<script>window.__pwned=1</script>"
        assert needle in v.text()
        v.done()


def test_save_buttons_write_files(browser, report_url):
    v = Viewer(browser, ("report", report_url), "head", prompt=0, layer=0)
    with v.page.expect_download() as dl:
        v.page.click(".ss-save-svg")
    svg = Path(dl.value.path()).read_text()
    assert dl.value.suggested_filename.endswith(".svg") and svg.startswith("<svg") and "ss-line" in svg
    with v.page.expect_download() as dl:
        v.page.click(".ss-save-png")
    assert Path(dl.value.path()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    v.done()
    v = Viewer(browser, ("report", report_url), "rankings", prompt=0)
    with v.page.expect_download() as dl:
        v.page.click(".ss-save-svg")
    assert re.search(r"<svg", Path(dl.value.path()).read_text()[:500])
    v.done()


@pytest.mark.real
def test_real_smollm2_report_head_view(browser, tmp_path):
    """SmolLM2 end to end: capture attention, `stratascope report` through the CLI, the head view's
    lines equal the captured weights above the threshold."""
    import zarr
    from click.testing import CliRunner

    import stratascope as ss
    from stratascope.cli import cli

    store = str(tmp_path / "smol.zarr")
    ss.capture(model="smollm2", prompts=["The capital of France is", XSS_IMG], out=store, capture=("attention",),
               layers=[0, 5, 29], device="cpu", progress=False)
    out = tmp_path / "smol.html"
    res = CliRunner().invoke(cli, ["report", store, "-o", str(out), "--layers", "5,29"])
    assert res.exit_code == 0 and res.output.strip() == str(out), res.output
    g = zarr.open_group(store, mode="r")
    n = int(g["n_tokens"][0])
    layer_index = list(g["layer"][:]).index(29)
    att = g["attention"][:n, layer_index, :, :n]
    v = Viewer(browser, ("report", out.as_uri()), "head", prompt=0, layer=29)
    assert v.count(".ss-head-toggle") == 9 and v.count(".ss-tok-q") == n
    assert v.count(".ss-line") == lines_expected(att)
    v.done("real_smollm2_head")
    v = Viewer(browser, ("report", out.as_uri()), "model", prompt=1)
    assert v.count(".ss-thumb") == 2 * 9
    v.done()
