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
from stratascope.errors import OutOfRangeError
from stratascope.viewer import data, registry, render
from viewer_fixtures import (
    BIAS_OCCUPATIONS,
    BIAS_PAIRS,
    PROBE_LABELS,
    XSS_ALERT,
    XSS_IMG,
    XSS_SCRIPT,
    only_result,
    probe_app,
    probe_store,
    viewer_app,
    viewer_store,
)


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


@pytest.mark.parametrize("token, shown", [
    (" the\n", "␣the↵"), ("", "∅"), ("\t\r", "⇥␍"), ("\u00a0Paris", "⟨U+00A0⟩Paris"),
    ("\u200b\u200c\u200d\ufeff", "⟨U+200B⟩⟨U+200C⟩⟨U+200D⟩⟨U+FEFF⟩"),
    ("\x00\x1b\x7f\x85\x9f", "⟨U+0000⟩⟨U+001B⟩⟨U+007F⟩⟨U+0085⟩⟨U+009F⟩"),
    ("\u3000\u2009\u2028\u2029", "⟨U+3000⟩⟨U+2009⟩⟨U+2028⟩⟨U+2029⟩"), ("\u202eevil", "⟨U+202E⟩evil"),
    ("\ud800", "⟨U+D800⟩"),
    ("é你好😀�", "é你好😀�"), ("a-b_c", "a-b_c")])
def test_token_label_makes_invisible_characters_visible(token, shown):
    assert render.token_label(token) == shown
    # a lone surrogate no longer breaks the page's JSON
    assert json.loads(render.json_for_html(render.token_label(token))) == shown


def test_tokens_slice_has_the_prompt_metadata(probe_store):
    import zarr

    run, g = ss.open_run(probe_store.path), zarr.open_group(probe_store.path, mode="r")
    columns = [c for c in run.prompts.columns if c not in ("text", "token_offset", "n_tokens")]
    assert data.metadata_columns(run) == columns
    assert registry.meta(run)["metadata_columns"] == data.metadata_columns(run)
    for p in (0, 5, 23):
        meta = data.tokens(run, p)["meta"]
        assert meta["occupation"] == str(g["meta_occupation"][p])
        stat = float(g["meta_bls_pct_female"][p])
        assert meta["bls_pct_female"] == (None if np.isnan(stat) else pytest.approx(stat))
    corpus_wide = {v["name"]: v["prompt"] for v in registry.meta(run)["views"]}
    assert not (corpus_wide["bias"] or corpus_wide["probe"] or corpus_wide["heads_map"]) and corpus_wide["tokens"]


def test_prompt_filter_against_numpy(probe_store, probe_app):
    import zarr

    run, g = ss.open_run(probe_store.path), zarr.open_group(probe_store.path, mode="r")
    occupation = np.array([str(x) for x in g["meta_occupation"][:]])
    f = data.prompt_filter(run, "occupation", "nurse")
    assert f["prompts"] == np.flatnonzero(occupation == "nurse").tolist() and len(f["prompts"]) == 3
    names, counts = np.unique(occupation, return_counts=True)
    assert sorted(map(tuple, f["values"])) == sorted(zip(names.tolist(), counts.tolist())) and f["n_values"] == 8
    stat = g["meta_bls_pct_female"][:]
    assert data.prompt_filter(run, "bls_pct_female", "88")["prompts"] == np.flatnonzero(stat == 88.0).tolist()
    assert data.prompt_filter(run, "bls_pct_female", "(missing)")["prompts"] == np.flatnonzero(np.isnan(stat)).tolist()
    status, _, body = _get(probe_app, "/api/prompt_filter?column=nope&value=")
    assert status == 404 and "no metadata column 'nope'" in json.loads(body)["error"]


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
    ranks = s.target_rank[rows].T  # the lens job's ranks are 1-based, -1 on the last token
    assert (ranks[:, -1] == -1).all() and (ranks[:, :-1] >= 1).all()
    assert d["target_rank"] == [[None if r < 0 else int(r) for r in row] for row in ranks]
    assert d["watch_rank"][0][0] == s.watch_rank[rows][0][0].tolist()
    for method in ("grad_x_input", "integrated_gradients"):
        sal = data.saliency(run, p, method)
        a = s.attribution[method][rows, : s.n(p)].astype(np.float64)
        assert sal["targets"] == [t + 1 for t in range(s.n(p)) if not np.isnan(a[t, 0])]
        for t in sal["targets"]:  # row t-1 over keys 0..t-1, scaled to sum to 1 (as Ecco and run.attributions)
            np.testing.assert_allclose(sal["rows"][t - 1], a[t - 1, :t] / a[t - 1, :t].sum(), atol=1e-4)
            np.testing.assert_allclose(sal["row_sum"][t - 1], a[t - 1, :t].sum(), rtol=1e-5)
    assert data.attribution_methods(run) == ["grad_x_input", "integrated_gradients"]  # not the IG delta
    only_last = data.saliency(run, 3, "grad_x_input")  # prompt 3 attributes its last 3 predictions only
    assert only_last["targets"] == [s.n(3) - 3, s.n(3) - 2, s.n(3) - 1]
    assert only_last["rows"][0] is None
    ig = data.saliency(run, 3, "integrated_gradients")
    assert ig["delta"][s.n(3) - 2] == pytest.approx(0.01) and ig["delta"][0] is None


def test_qk_slice_reproduces_the_stored_attention(viewer_store):
    """Queries and keys sent to the neuron view give back the captured attention: softmax(q·kᵀ × scale)
    computed here with numpy over the payload equals the model's own weights."""
    run = ss.open_run(viewer_store.path)
    s = viewer_store
    for p, layer, head in ((0, 0, 0), (3, 2, 3), (1, 1, 2)):
        d = data.qk(run, p, layer, head)
        rows = s.rows(p)
        np.testing.assert_allclose(d["q"], s.queries[rows, layer, head], atol=6e-5)
        np.testing.assert_allclose(d["k"], s.keys[rows, layer, head], atol=6e-5)
        scores = np.array(d["q"]) @ np.array(d["k"]).T * d["scale"]
        scores[np.triu(np.ones_like(scores, dtype=bool), 1)] = -np.inf
        w = np.exp(scores - scores.max(1, keepdims=True))
        w /= w.sum(1, keepdims=True)
        np.testing.assert_allclose(w, s.att(p, layer)[:, head], atol=2e-3)
        assert d["scale"] == s.qk_scales[layer] and d["causal"] and len(d["labels"]) == s.n(p)
    with pytest.raises(OutOfRangeError, match="head 9"):
        data.qk(run, 0, 0, 9)


def test_heads_slice_equals_the_heads_job(viewer_store):
    run = ss.open_run(viewer_store.path)
    d = data.heads(run)
    raw = viewer_store.heads
    assert d["labels"] == [[str(x) for x in row] for row in raw["label"]]
    for name in data.HEADS_SCORES:
        np.testing.assert_allclose(d["scores"][name], raw[name], atol=6e-5)
    assert d["layers"] == [0, 1, 2] and d["heads"] == [0, 1, 2, 3] and "previous-token" in d["rule"]


def test_nmf_slice_and_top_tokens(viewer_store):
    run = ss.open_run(viewer_store.path)
    s, p = viewer_store, 4
    d = data.nmf(run, p)
    np.testing.assert_allclose(d["weights"], s.token_factor[s.rows(p)], atol=6e-5)
    assert d["n_factors"] == 3 and d["layers"] == [0, 1, 2]
    for f in range(3):  # the corpus's largest weights of each factor, by a plain numpy sort
        w = np.where(s.prompt_index >= 0, s.token_factor[:, f], -np.inf)
        order = np.argsort(-w, kind="stable")[: data.NMF_TOP]
        order = order[w[order] > 0]
        assert [(t["prompt"], t["position"]) for t in d["top"][f]] == [
            (int(s.prompt_index[r]), int(s.positions[r])) for r in order]
        np.testing.assert_allclose([t["weight"] for t in d["top"][f]], w[order], atol=6e-5)
        assert [t["token"] for t in d["top"][f]] == [str(s.token_str[r]) for r in order]
    old = data.NMF_SCAN_ROWS
    try:  # streaming in small row blocks gives the same ranking
        data.NMF_SCAN_ROWS = 7
        run2 = ss.open_run(s.path)
        assert data.nmf(run2, p)["top"] == d["top"]
    finally:
        data.NMF_SCAN_ROWS = old


def test_bias_slice_against_numpy_and_scipy(probe_store):
    """Per occupation the mean over its prompts of the stored log-ratio (numpy), the statistic from the
    occupation table, and the stored correlation equal to scipy's on those means."""
    from scipy import stats

    run, s = ss.open_run(probe_store.path), probe_store
    stat = dict(zip(BIAS_OCCUPATIONS["occupation"], BIAS_OCCUPATIONS["bls_pct_female"]))
    assert data.bias_pairs(run) == BIAS_PAIRS and registry.meta(run)["bias_pairs"] == BIAS_PAIRS
    for i, pair in enumerate(BIAS_PAIRS):
        d = data.bias(run, pair)
        assert d["occupations"] == BIAS_OCCUPATIONS["occupation"] and d["counts"] == [3] * 8
        assert (d["female"], d["male"]) == tuple(pair.split("/")) and d["statistic"] == "bls_pct_female"
        means = np.array([s.log_ratio[s.occupation == o, :, i].mean(0) for o in d["occupations"]])
        np.testing.assert_allclose(d["means"], means, atol=1e-5)
        assert d["statistic_values"] == [None if np.isnan(stat[o]) else stat[o] for o in d["occupations"]]
        ok = np.isfinite([stat[o] for o in d["occupations"]])
        x = np.array([stat[o] for o in d["occupations"]])[ok]
        for j in range(1, 4):  # depth 0 reads the same last token for every occupation: undefined there
            r, rho = stats.pearsonr(means[ok, j], x), stats.spearmanr(means[ok, j], x)
            np.testing.assert_allclose(d["correlation"]["pearson_r"][j], r.statistic, atol=1e-5)
            np.testing.assert_allclose(d["correlation"]["spearman_rho"][j], rho.statistic, atol=1e-5)
            np.testing.assert_allclose(d["correlation"]["spearman_p"][j], rho.pvalue, rtol=1e-4)
            assert d["correlation"]["n"][j] == 7
        assert d["correlation"]["pearson_r"][0] is None
    with pytest.raises(OutOfRangeError, match="pair ' he/ she'"):
        data.bias(run, " he/ she")


def test_bias_slice_of_an_older_result_reads_the_statistic_from_metadata(probe_store, tmp_path):
    """A bias_correlation written before it stored the statistic per occupation: the viewer averages the
    prompts' metadata column instead (the same numbers)."""
    import shutil

    import zarr

    path = str(tmp_path / "old.zarr")
    shutil.copytree(probe_store.path, path)
    g = only_result(path, "bias_correlation", mode="r+")
    del g["statistic_value"], g["occupation"]
    run = ss.open_run(path)
    assert data.bias(run, BIAS_PAIRS[0])["statistic_values"] == data.bias(
        ss.open_run(probe_store.path), BIAS_PAIRS[0])["statistic_values"]


def test_probe_slice_against_numpy(probe_store):
    run, s = ss.open_run(probe_store.path), probe_store
    assert data.probe_labels(run) == sorted(PROBE_LABELS) == registry.meta(run)["probe_labels"]
    for label, metric in zip(PROBE_LABELS, ("accuracy", "r2")):
        d, p = data.probe(run, label), s.probes[label]
        assert d["task"] == ("classify" if metric == "accuracy" else "regress") and d["metric"] == metric
        np.testing.assert_allclose(d["score"], p[metric].mean(1), atol=1e-4)
        np.testing.assert_allclose(d["score_sd"], p[metric].std(1, ddof=1), atol=1e-4)
        np.testing.assert_allclose(d["control"], p["control_" + metric].mean(1), atol=1e-4)
        assert d["baseline"] == pytest.approx(p["majority"].mean() if metric == "accuracy" else 0.0, abs=1e-4)
        assert d["depths"] == [0, 1, 2, 3] and d["folds"] == 3 and d["n_rows"] == p["attrs"]["n_rows"]
    with pytest.raises(OutOfRangeError, match="no probe of label 'nope'"):
        data.probe(run, "nope")
    page = run.view.probe(label="bls_pct_female").html()  # notebook: the report page with that state
    assert '"probe?label=bls_pct_female"' in page and '"label":"bls_pct_female"' in page
    page = run.view.bias(pair=BIAS_PAIRS[1], depth=2).html()
    assert '"bias?pair= said/ that"' in page and '"depth":2' in page and XSS_ALERT not in page


@pytest.mark.parametrize("query,status", [
    ("/api/bias?pair=%20he/%20she", 404), ("/api/bias", 400), ("/api/bias?pair=%20was/%20the&x=1", 400),
    ("/api/probe?label=nope", 404), ("/api/probe?label=../../etc/passwd", 404), ("/api/probe", 400),
    ("/api/probe?label=bls_pct_female&label=x", 400)])
def test_app_bias_and_probe_bad_requests(probe_app, query, status):
    got, kind, body = _get(probe_app, query)
    assert got == status and kind == "application/json"
    assert "Traceback" not in body.decode() and json.loads(body)["error"]
    assert _get(probe_app, "/api/bias?pair=%20was/%20the")[0] == 200
    assert _get(probe_app, "/api/probe?label=%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E")[0] == 200


def test_probe_views_never_import_torch(probe_store, tmp_path):
    code = (f"import sys; import stratascope as ss; from stratascope.viewer import app, report; "
            f"run = ss.open_run({probe_store.path!r}); report.write_report(run, {str(tmp_path / 'r.html')!r}); "
            f"a = app.ViewerApp(run); print(a.respond('/api/bias?pair=%20was/%20the')[0], "
            f"a.respond('/api/probe?label=bls_pct_female')[0], 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "200 200 False"


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
    ("/api/saliency?prompt=0&method=nope", 404), ("/api/nope?prompt=0", 404), ("/api/", 404),
    ("/api/saliency?prompt=0&method=integrated_gradients_delta", 404),
    ("/api/qk?prompt=0&layer=0&head=4", 404), ("/api/qk?prompt=0&layer=3&head=0", 404),
    ("/api/qk?prompt=0&layer=0", 400), ("/api/qk?prompt=0&layer=0&head=-1", 404),
    ("/api/heads?prompt=0", 400), ("/api/nmf?prompt=5", 404), ("/api/nmf?prompt=x", 400)])
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
    for args, words in ((["--prompts", "0-9"], "prompts"), (["--layers", "5"], "layers"),
                        (["--views", "bogus"], "view")):
        res = CliRunner().invoke(cli, ["report", viewer_store.path, "-o", str(out), *args])
        assert res.exit_code == 1 and words in res.output and "Traceback" not in res.output


def test_viewer_never_imports_torch(viewer_store, tmp_path):
    code = (f"import sys; import stratascope as ss; from stratascope.viewer import app, report; "
            f"run = ss.open_run({viewer_store.path!r}); report.write_report(run, {str(tmp_path / 'r.html')!r}); "
            f"app.ViewerApp(run).respond('/api/attention?prompt=0&layer=0'); "
            f"run.view.head(prompt=0)._repr_mimebundle_(); "
            f"print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_notebook_view_falls_back_to_the_report_page_in_an_iframe(viewer_store):
    run = ss.open_run(viewer_store.path)
    view = run.view.head(prompt=1, layer=2)
    html = view._repr_mimebundle_()[0]["text/html"]  # for front ends without widgets (tests/test_widgets.py)
    assert html.startswith("<iframe srcdoc=") and "<img src=x" not in html
    page = view.html()
    assert '"attention?layer=2\\u0026prompt=1"' in page and '"view":"head"' in page
    with pytest.raises(AttributeError):
        run.view.nonexistent  # noqa: B018 - the attribute access is what raises


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


def test_report_holds_few_neuron_layers_unless_asked(viewer_store, monkeypatch):
    """q and k of every head are large: without --layers a report holds only `report_layers` layers of
    the neuron view (evenly spread) and says so; --layers holds exactly those asked for."""
    import dataclasses

    from stratascope.viewer import registry, report

    run = ss.open_run(viewer_store.path)
    monkeypatch.setitem(registry.VIEWS, "neuron", dataclasses.replace(registry.VIEWS["neuron"], report_layers=2))
    monkeypatch.setattr(report, "VIEWS", registry.VIEWS)
    html = report.build_report(run, prompts="0", views="neuron", progress=False)
    keys = set(re.findall(r'"(qk\?[^"]+)"', html))
    assert keys == {f"qk?head={h}\\u0026layer={layer}\\u0026prompt=0" for h in range(4) for layer in (0, 2)}
    assert "neuron view holds layers 0,2" in html
    html = report.build_report(run, prompts="0", layers="1", views="neuron", progress=False)
    assert set(re.findall(r'"(qk\?[^"]+)"', html)) == {f"qk?head={h}\\u0026layer=1\\u0026prompt=0" for h in range(4)}
    assert registry.spread(list(range(30)), 3) == [0, 14, 29] and registry.spread([4, 5], 3) == [4, 5]
