"""The viewer without a browser: escaping, data slices against raw zarr arrays, the app's answers
to good and bad requests, the CLI, no torch import, and a large store opening at once."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import time
from urllib.parse import urlsplit

import numpy as np
import pytest
from click.testing import CliRunner

import stratascope as ss
from stratascope.cli import cli
from stratascope.viewer import data, render
from viewer_fixtures import XSS_IMG, XSS_SCRIPT, viewer_app, viewer_store  # noqa: F401 - fixtures


def test_json_for_html_cannot_close_script():
    text = render.json_for_html({"a": "</script><script>x()</script>", "b": "a&b\u2028"})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"a": "</script><script>x()</script>", "b": "a&b\u2028"}


def test_header_and_labels_escape():
    meta = {"store": XSS_IMG, "model": {"name": XSS_SCRIPT, "n_layers": 1, "n_heads": 1}, "n_prompts": 1,
            "n_tokens": 1, "included_note": "<b>x</b>"}
    out = render.header(meta)
    assert "<img" not in out and "<script" not in out and "<b>" not in out and "&lt;img" in out
    assert render.token_label(" the\n") == "␣the↵" and render.token_label("") == "∅"


def test_attention_slice_equals_raw_array(viewer_store):
    run = ss.open_run(viewer_store.path)
    for p, layer in ((0, 0), (4, 2)):
        d = data.attention(run, p, layer)
        raw = viewer_store.att(p, layer)
        assert d["n"] == viewer_store.n(p) and len(d["labels"]) == d["n"]
        for h, head in enumerate(d["heads"]):
            q, k = np.nonzero(raw[:, h] >= data.MIN_WEIGHT)
            assert head["q"] == q.tolist() and head["k"] == k.tolist()
            np.testing.assert_allclose(head["w"], raw[q, h, k], atol=5e-4)
        # linear, not quadratic: at most 1/MIN_WEIGHT keys per query
        assert max(len(head["q"]) for head in d["heads"]) <= d["n"] / data.MIN_WEIGHT


def test_lens_and_saliency_slices(viewer_store):
    run = ss.open_run(viewer_store.path)
    s, p = viewer_store, 1
    rows = s.rows(p)
    d = data.lens(run, p)
    assert d["topk_labels"][0][0][0] == XSS_IMG.replace(" ", "␣")
    np.testing.assert_allclose(d["topk_probs"], s.topk_probs[rows], atol=1e-4)
    ranks = s.target_rank[rows].T
    assert d["target_rank"] == [[None if r < 0 else int(r) + 1 for r in row] for row in ranks]
    sal = data.saliency(run, p, "grad_x_input")
    a = s.attribution["grad_x_input"][rows, : s.n(p)]
    np.testing.assert_allclose(np.array(sal["rows"]) * np.array(sal["row_max"])[:, None], a, atol=2e-3 * np.abs(a).max())


def _get(url: str, path: str) -> tuple[int, str, bytes]:
    """A raw GET (http.client sends the path exactly as written, dot segments included)."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request("GET", path)
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, r.getheader("Content-Type", ""), body


@pytest.mark.parametrize("path", [
    "/../../etc/passwd", "/static/../../etc/passwd", "/static/%2e%2e/%2e%2e/etc/passwd",
    "/static/..%2f..%2fetc%2fpasswd", "/%2e%2e/%2e%2e/etc/passwd", "/api/../../etc/passwd", "//etc/passwd",
    "/static/core.js/../../../etc/passwd", "/static/%2Fetc%2Fpasswd", "/api/..%2f..%2fetc%2fpasswd",
    "/static/viewer.css%00.js", "/api/attention/../../etc/passwd?prompt=0&layer=0"])
def test_app_path_traversal_is_404_json(viewer_app, path):
    status, kind, body = _get(viewer_app, path)
    assert 400 <= status < 500 and kind == "application/json"
    assert "error" in json.loads(body) and b"root:" not in body


@pytest.mark.parametrize("query,status", [
    ("/api/attention?prompt=99&layer=0", 404), ("/api/attention?prompt=0&layer=7", 404),
    ("/api/attention?prompt=-100&layer=0", 404), ("/api/attention?prompt=abc&layer=0", 400),
    ("/api/attention?prompt=0", 400), ("/api/attention?prompt=0&layer=0&x=1", 400),
    ("/api/attention?prompt=0&prompt=1&layer=0", 400), ("/api/attention?prompt=1e3&layer=0", 400),
    ("/api/attention?prompt=100000000000000000000&layer=0", 400), ("/api/tokens?prompt=5", 404),
    ("/api/saliency?prompt=0&method=nope", 404), ("/api/nope?prompt=0", 404), ("/api/", 404)])
def test_app_bad_requests_are_4xx_json(viewer_app, query, status):
    got, kind, body = _get(viewer_app, query)
    assert got == status and kind == "application/json"
    assert "Traceback" not in body.decode() and json.loads(body)["error"]


def test_app_serves_page_and_slices(viewer_app, viewer_store):
    status, kind, body = _get(viewer_app, "/")
    assert status == 200 and kind.startswith("text/html") and b"<img src=x" not in body
    status, _, body = _get(viewer_app, "/api/tokens?prompt=2")
    assert status == 200 and json.loads(body)["text"] == XSS_SCRIPT
    status, _, body = _get(viewer_app, "/static/plotly.min.js")
    assert status == 200 and len(body) > 1_000_000


def test_cli_report_and_bad_input(viewer_store, tmp_path):
    out = tmp_path / "r.html"
    res = CliRunner().invoke(cli, ["report", viewer_store.path, "-o", str(out), "--prompts", "0-1", "--layers", "1"])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == str(out)
    html = out.read_text()
    assert "prompts 0-1 of 5 and layers 1 of 3" in html and "https://" not in html.split("<script")[0]
    assert '"attention?layer=1\\u0026prompt=0"' in html and '"attention?layer=0\\u0026prompt=0"' not in html
    for args, words in ((["--prompts", "0-9"], "prompts"), (["--layers", "5"], "layers"), (["--views", "bogus"], "view")):
        res = CliRunner().invoke(cli, ["report", viewer_store.path, "-o", str(out), *args])
        assert res.exit_code == 1 and words in res.output and "Traceback" not in res.output


def test_viewer_never_imports_torch(viewer_store, tmp_path):
    code = (f"import sys; import stratascope as ss; from stratascope.viewer import app, report; "
            f"run = ss.open_run({viewer_store.path!r}); report.write_report(run, {str(tmp_path / 'r.html')!r}); "
            f"app.ViewerApp(run).respond('/api/attention?prompt=0&layer=0'); run.view.head(prompt=0)._repr_html_(); "
            f"print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_notebook_view_is_the_report_page_in_an_iframe(viewer_store):
    run = ss.open_run(viewer_store.path)
    view = run.view.head(prompt=1, layer=2)
    html = view._repr_html_()
    assert html.startswith("<iframe srcdoc=") and "<img src=x" not in html
    page = view.html()
    assert '"attention?layer=2\\u0026prompt=1"' in page and '"view":"head"' in page
    with pytest.raises(AttributeError):
        run.view.nonexistent


def test_large_store_opens_at_once(tmp_path):
    from stratascope.viewer.app import serve_in_thread
    from stratascope.viewer.synthetic import write_large_store

    path = str(tmp_path / "big.zarr")
    write_large_store(path, n_tokens=1_000_000)
    t0 = time.perf_counter()
    server, url = serve_in_thread(ss.open_run(path))
    try:
        status, _, _ = _get(url, "/")
        status2, _, body = _get(url, "/api/attention?prompt=0&layer=0")
        elapsed = time.perf_counter() - t0
        assert status == status2 == 200
        assert len(json.loads(body)["heads"][0]["q"]) == 64 * 65 // 2  # causal uniform rows, all >= 1/64
        assert elapsed < 10, f"first view took {elapsed:.1f}s"
        assert _get(url, "/api/tokens?prompt=15624")[0] == 200 and _get(url, "/api/tokens?prompt=15625")[0] == 404
    finally:
        server.shutdown()
        server.server_close()


def test_cli_view_serves_on_loopback(viewer_store):
    """`stratascope view` in its own process: prints its URL, answers the page and a slice, stops on SIGINT."""
    import os
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "stratascope", "view", viewer_store.path, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[1])})
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line).group(0)
        assert _get(url, "/")[0] == 200 and _get(url, "/api/attention?prompt=0&layer=1")[0] == 200
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and "Traceback" not in err
