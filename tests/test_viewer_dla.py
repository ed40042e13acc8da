"""The logit attribution views: the bars (one position), the heads heatmap (mean over the result's rows) and
the neurons (top neurons per layer, the tokens they fire most on), their data against numpy on the stored
arrays read with zarr directly, and in headless chromium in the report and the app: pickers, the click to the
head view, no console errors, screenshots."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from test_viewer_browser import Viewer, _trace, axis_visible, browser, label

import stratascope as ss
from stratascope.cli import cli
from stratascope.viewer import data
from stratascope.viewer.registry import VIEWS
from viewer_fixtures import only_result

NEURONS = 4  # --neurons K of the fixture's dla result
PROMPTS = ["The nurse said that she was tired", "<img src=x onerror=\"window.__pwned=1\"> the keys"]


@pytest.fixture(scope="module")
def dla_store(tiny_model_dirs, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("viewer-dla") / "dla.zarr")
    run = ss.capture(model=str(tiny_model_dirs["llama"]), prompts=PROMPTS, out=path, device="cpu",
                     capture="hidden,components,z,mlp,attention", progress=False)
    run.dla(target="next", contrast=" the", positions="all", neurons=NEURONS, progress=False)
    return path


@pytest.fixture(params=["report", "app"])
def dla_target(request, dla_store, tmp_path_factory):
    if request.param == "report":
        out = tmp_path_factory.mktemp("report") / "dla.html"
        res = CliRunner().invoke(cli, ["report", dla_store, "-o", str(out), "--views", "dla"])
        assert res.exit_code == 0, res.output
        yield "report", out.as_uri()
        return
    from stratascope.viewer.app import serve_in_thread

    server, url = serve_in_thread(ss.open_run(dla_store))
    yield "app", url
    server.shutdown()
    server.server_close()


@pytest.mark.browser
def test_dla_view(browser, dla_target, dla_store):
    (name,) = zarr.open_group(dla_store, mode="r", path="analysis/dla").group_keys()  # the one dla result
    g = zarr.open_group(dla_store, mode="r", path=f"analysis/dla/{name}")
    comp, prompt, position = g["by_component"][:], g["prompt"][:], g["position"][:]
    names = [str(c) for c in g["component"][:]]
    logit = g["logit"][:]

    def bars(p: int, pos: int):
        row = np.flatnonzero((prompt == p) & (position == pos))[0]
        want = dict(zip(names, comp[row]))
        np.testing.assert_allclose(_trace(v, ".ss-dla-plot", "attn"), [want[f"attn.{l}"] for l in range(3)], atol=1e-4)
        np.testing.assert_allclose(_trace(v, ".ss-dla-plot", "mlp"), [want[f"mlp.{l}"] for l in range(3)], atol=1e-4)
        np.testing.assert_allclose(_trace(v, ".ss-dla-plot", "embed"), [want["embed"]], atol=1e-4)
        title = v.page.evaluate("() => document.querySelector('.ss-dla-plot').layout.title.text")
        assert f"position {pos}:" in title and f"logit {logit[row]:+.2f}" in title

    v = Viewer(browser, dla_target, "dla", prompt=0)
    last = int(position[prompt == 0].max())
    bars(0, last)  # the last row of the prompt by default
    assert v.count(".ss-position option") == int((prompt == 0).sum())
    assert "the contributions sum to" in v.page.inner_text(".ss-dla-facts")
    v.shot("dla")
    v.choose(".ss-position", 2)
    bars(0, 2)
    v.done()
    v = Viewer(browser, dla_target, "dla", prompt=1)  # a prompt whose text is markup: shown as text
    bars(1, int(position[prompt == 1].max()))
    v.done("dla_prompt1")


def _stored(path: str) -> dict:
    """The dla result and the capture's mlp, prompt_index and token_str, read with zarr directly."""
    g, root = only_result(path, "dla"), zarr.open_group(path, mode="r", use_consolidated=False)
    return {"by_head": g["by_head"][:].astype(np.float64), "neuron_id": g["neuron_id"][:],
            "contribution": g["neuron_contribution"][:].astype(np.float64), "mlp": root["mlp"][:].astype(np.float64),
            "prompt_index": root["prompt_index"][:], "token_str": [str(t) for t in root["token_str"][:]],
            "position": root["position"][:]}


def _neuron_table(s: dict, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per neuron of `layer`: mean |contribution| and mean contribution over every row (0 where the neuron is
    not among the row's top k), and how many rows' top k hold it (numpy, one neuron at a time)."""
    ids, vals = s["neuron_id"][:, layer], s["contribution"][:, layer]
    d_mlp = s["mlp"].shape[-1]
    mean_abs = np.array([np.abs(vals[ids == n]).sum() for n in range(d_mlp)]) / len(ids)
    mean = np.array([vals[ids == n].sum() for n in range(d_mlp)]) / len(ids)
    return mean_abs, mean, np.array([(ids == n).sum() for n in range(d_mlp)])


@pytest.fixture
def small_scans(monkeypatch):
    """Scan blocks of a few rows, so the running sums and the running top tokens cross many blocks."""
    monkeypatch.setattr(data, "DLA_SCAN_ROWS", 5)
    monkeypatch.setattr(data, "MLP_SCAN_BYTES", 1)  # one token chunk at a time


def test_dla_heads_data(dla_store, small_scans):
    s = _stored(dla_store)
    d = data.dla_heads(ss.open_run(dla_store))
    np.testing.assert_allclose(np.array(d["mean"], dtype=float), s["by_head"].mean(0), atol=1e-5)
    np.testing.assert_allclose(np.array(d["sd"], dtype=float), s["by_head"].std(0), atol=1e-5)
    assert d["n_rows"] == len(s["by_head"]) and d["layers"] == [0, 1, 2] and d["heads"] == [0, 1, 2, 3]
    assert d["target"] == "the token that came next − «␣the»" and d["positions"] == "all" and d["n_prompts"] == 2


def test_dla_neurons_data(dla_store, small_scans):
    s = _stored(dla_store)
    run = ss.open_run(dla_store)
    valid = s["prompt_index"] >= 0
    for layer in range(3):
        d = data.dla_neurons(run, layer)
        mean_abs, mean, n_top = _neuron_table(s, layer)
        want = np.argsort(-mean_abs, kind="stable")[:data.DLA_NEURONS]
        want = want[n_top[want] > 0]
        assert [n["neuron"] for n in d["neurons"]] == want.tolist()
        np.testing.assert_allclose([n["mean_abs"] for n in d["neurons"]], mean_abs[want], atol=1e-5)
        np.testing.assert_allclose([n["mean"] for n in d["neurons"]], mean[want], atol=1e-5)
        assert [n["n_top"] for n in d["neurons"]] == n_top[want].tolist()
        for n in d["neurons"]:
            act = np.where(valid, np.abs(s["mlp"][:, layer, n["neuron"]]), -np.inf)
            rows = np.argsort(-act, kind="stable")[:data.DLA_NEURON_TOKENS]
            got = n["tokens"]
            assert [(t["prompt"], t["position"]) for t in got] == [(s["prompt_index"][r], s["position"][r])
                                                                   for r in rows]
            assert [t["token"] for t in got] == [s["token_str"][r] for r in rows]
            np.testing.assert_allclose([t["activation"] for t in got], s["mlp"][rows, layer, n["neuron"]], atol=1e-4)
            for t, r in zip(got, rows):  # up to DLA_CONTEXT tokens before it, from its own prompt
                before = [q for q in range(max(0, r - data.DLA_CONTEXT), r)
                          if s["prompt_index"][q] == s["prompt_index"][r]]
                assert t["context"] == [label(s["token_str"][q]) for q in before] and t["label"] == label(t["token"])
        assert d["n_rows"] == len(s["neuron_id"]) and d["k"] == NEURONS and d["n_tokens"] == int(valid.sum())
    with pytest.raises(ss.errors.OutOfRangeError, match="layer 7 is not in the dla result"):
        data.dla_neurons(run, 7)
    html = run.view.dla_neurons(layer=2).html()  # in Jupyter: the report's page holding that layer
    assert "dla_neurons?layer=2" in html and "dla_neurons?layer=1" not in html


def test_dla_views_unavailable_say_why(tiny_model_dirs, tmp_path):
    path = str(tmp_path / "plain.zarr")
    run = ss.capture(model=str(tiny_model_dirs["llama"]), prompts=PROMPTS[:1], out=path, device="cpu",
                     capture="hidden,components", progress=False)
    assert "run `stratascope dla`" in VIEWS["dla_heads"].unavailable(run)
    run.dla(target="next", positions="all", progress=False)
    assert "capture with --capture z" in VIEWS["dla_heads"].unavailable(run)
    assert "capture with --capture mlp" in VIEWS["dla_neurons"].unavailable(run)
    with pytest.raises(ss.errors.MissingArrayError, match="--capture z"):
        data.dla_heads(run)


@pytest.fixture(params=["report", "app"])
def dla_views_target(request, dla_store, tmp_path_factory):
    if request.param == "report":
        out = tmp_path_factory.mktemp("report") / "dla_views.html"
        res = CliRunner().invoke(cli, ["report", dla_store, "-o", str(out), "--views", "dla_heads,dla_neurons,head"])
        assert res.exit_code == 0, res.output
        yield "report", out.as_uri()
        return
    from stratascope.viewer.app import serve_in_thread

    server, url = serve_in_thread(ss.open_run(dla_store))
    yield "app", url
    server.shutdown()
    server.server_close()


def _inside(v: Viewer, cls: str) -> None:
    """Every text of the chart (title, ticks, colour bar, annotations) lies inside the figure."""
    out = v.page.evaluate("""c => { const gd = document.querySelector(c), f = gd.getBoundingClientRect();
        return [...gd.querySelectorAll('svg text')].filter(t => t.textContent.trim()).map(t => {
            const b = t.getBoundingClientRect();
            return b.left >= f.left - 1 && b.right <= f.right + 1 && b.top >= f.top - 1 && b.bottom <= f.bottom + 1
                ? null : t.textContent; }).filter(x => x); }""", cls)
    assert out == [], f"cut off: {out}"


@pytest.mark.browser
def test_dla_heads_view(browser, dla_views_target, dla_store):
    s = _stored(dla_store)
    v = Viewer(browser, dla_views_target, "dla_heads")
    assert not v.page.is_visible("#ss-prompt")  # corpus-wide
    mean = s["by_head"].mean(0)
    np.testing.assert_allclose(np.array(_trace(v, ".ss-dla-heads", key="z"), dtype=float), mean, atol=1e-4)
    trace = v.page.evaluate("() => { const t = document.querySelector('.ss-dla-heads').data[0]; "
                            "return {zmid: t.zmid, zmin: t.zmin, zmax: t.zmax, bar: t.colorbar.title.text}; }")
    assert trace["zmid"] == 0 and trace["zmin"] == -trace["zmax"] == pytest.approx(-np.abs(mean).max(), abs=1e-4)
    assert "mean contribution" in trace["bar"] and v.count(".ss-dla-heads .colorbar") == 1
    facts = v.page.inner_text(".ss-dla-heads-facts")
    assert f"Mean over {len(s['by_head'])} rows (all positions of 2 prompts)" in facts
    assert "the token that came next − «␣the»" in facts and "Click a head" in facts
    axis_visible(v, ".ss-dla-heads")
    _inside(v, ".ss-dla-heads")
    v.shot("dla_heads")
    # click layer 2, head 1: the head view opens on layer 2 with only head 1 shown
    xy = v.page.evaluate("""() => { const gd = document.querySelector('.ss-dla-heads'), L = gd._fullLayout;
        const r = gd.querySelector('.nsewdrag').getBoundingClientRect();
        return [r.left + L.xaxis.d2p(1), r.top + L.yaxis.d2p(2)]; }""")
    v.page.mouse.click(*xy)
    v.wait()
    assert v.page.get_attribute("#ss-view", "data-view") == "head" and v.page.is_visible("#ss-prompt")
    pressed = v.page.eval_on_selector_all(".ss-head-toggle", "es => es.map(e => e.getAttribute('aria-pressed'))")
    assert pressed == ["false", "true", "false", "false"]
    assert v.page.eval_on_selector("select.ss-layer", "e => e.value") == "2"
    v.done()


@pytest.mark.browser
def test_dla_neurons_view(browser, dla_views_target, dla_store):
    s = _stored(dla_store)
    valid = s["prompt_index"] >= 0

    def check(layer: int):
        mean_abs, mean, _ = _neuron_table(s, layer)
        want = np.argsort(-mean_abs, kind="stable")[:data.DLA_NEURONS]
        want = want[mean_abs[want] > 0]
        assert _trace(v, ".ss-dla-neurons", "mean_abs") == [f"neuron {n}" for n in want]
        np.testing.assert_allclose(_trace(v, ".ss-dla-neurons", "mean_abs", "x"), mean_abs[want], atol=1e-4)
        np.testing.assert_allclose(_trace(v, ".ss-dla-neurons", "mean", "x"), mean[want], atol=1e-4)
        rows = v.page.eval_on_selector_all(".ss-dla-neurons-table tbody tr", "es => es.map(e => e.innerText)")
        assert len(rows) == len(want)
        for text, n in zip(rows, want):  # the neuron's strongest token, by numpy over the whole mlp column
            r = int(np.argmax(np.where(valid, np.abs(s["mlp"][:, layer, n]), -np.inf)))
            a = s["mlp"][r, layer, n]  # shown to three significant digits, as JavaScript writes the number
            assert text.startswith(str(n)) and f"{label(s['token_str'][r])} {'+' if a >= 0 else '-'}"\
                f"{float(f'{abs(a):.3g}')!r}" in text
        assert f"Layer {layer}: the {len(want)} neurons" in v.page.inner_text(".ss-dla-neurons-facts")

    v = Viewer(browser, dla_views_target, "dla_neurons", layer=1)
    assert not v.page.is_visible("#ss-prompt")
    check(1)
    _inside(v, ".ss-dla-neurons")
    v.shot("dla_neurons")
    v.choose("select.ss-layer", 2)
    check(2)
    v.done("dla_neurons_layer2")


FACTS = [("The Eiffel Tower is located in the city of", " Paris"), ("Heathrow airport is in the city of", " London"),
         ("The capital of Japan is the city of", " Tokyo"), ("The Colosseum is located in the city of", " Rome")]


@pytest.mark.real
@pytest.mark.browser
def test_real_smollm2_dla_heads_and_neurons(browser, tmp_path):
    """SmolLM2 through the CLI: capture four fact prompts, `dla --target-column attribute --neurons 10`,
    `report`; the heads heatmap is numpy's mean of the stored by_head over 30 layers × 9 heads, the neurons of
    layer 28 and their strongest tokens are numpy's on the stored arrays."""
    import json

    corpus, store, out = tmp_path / "facts.jsonl", str(tmp_path / "f.zarr"), tmp_path / "f.html"
    corpus.write_text("".join(json.dumps({"text": t, "attribute": a}) + "\n" for t, a in FACTS))
    runner = CliRunner()
    for args in (["capture", "--model", "smollm2", "--corpus", str(corpus), "--out", store, "--device", "cpu",
                  "--capture", "hidden,components,z,mlp,attention"],
                 ["dla", store, "--target-column", "attribute", "--neurons", "10"],
                 ["report", store, "-o", str(out), "--views", "dla_heads,dla_neurons,head"]):
        res = runner.invoke(cli, args)
        assert res.exit_code == 0, res.output
    s = _stored(store)
    target = ("report", out.as_uri())
    v = Viewer(browser, target, "dla_heads")
    z = np.array(_trace(v, ".ss-dla-heads", key="z"), dtype=float)
    assert z.shape == (30, 9)
    np.testing.assert_allclose(z, s["by_head"].mean(0), atol=1e-4)
    assert "Mean over 4 rows (last positions of 4 prompts)" in v.page.inner_text(".ss-dla-heads-facts")
    axis_visible(v, ".ss-dla-heads")
    _inside(v, ".ss-dla-heads")
    v.done("real_smollm2_dla_heads")
    v = Viewer(browser, target, "dla_neurons", layer=28)
    mean_abs, mean, _ = _neuron_table(s, 28)
    want = np.argsort(-mean_abs, kind="stable")[:data.DLA_NEURONS]
    assert _trace(v, ".ss-dla-neurons", "mean_abs") == [f"neuron {n}" for n in want]
    np.testing.assert_allclose(_trace(v, ".ss-dla-neurons", "mean", "x"), mean[want], atol=1e-4)
    _inside(v, ".ss-dla-neurons")
    v.done("real_smollm2_dla_neurons")
