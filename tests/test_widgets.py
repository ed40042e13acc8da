"""The notebook widgets (stratascope/viewer/widget.py): every registered view as a widget output of a
notebook executed by a real Jupyter kernel (nbclient), the kernel's answers to the browser's requests
against the raw arrays, the bytes a widget of a 1M-token store sends, and w.save().
In JupyterLab itself: tests/test_widgets_browser.py."""

from __future__ import annotations

import json
import os
import re
import tracemalloc
from pathlib import Path

import nbformat
import numpy as np
import pytest
import zarr

import stratascope as ss
from stratascope.errors import ConfigError, OutOfRangeError
from stratascope.viewer import data
from stratascope.viewer.registry import VIEWS
from stratascope.viewer.report import build_report
from stratascope.viewer.synthetic import comm_bytes, write_large_store
from viewer_fixtures import PROBE_LABELS, probe_store, viewer_store

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
STATE_MIME = "application/vnd.jupyter.widget-state+json"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dla_similarity_store(tiny_model_dirs, tmp_path_factory) -> str:
    """A tiny llama capture with a dla result that kept neurons (per-head too) and a similarity result."""
    path = str(tmp_path_factory.mktemp("widgets") / "dla.zarr")
    run = ss.capture(model=str(tiny_model_dirs["llama"]), prompts=["The nurse said that she was tired",
                                                                    "The keys to the cabinet are on the table"],
                     out=path, device="cpu", capture="hidden,components,z,mlp,attention", progress=False)
    run.dla(target="next", positions="all", neurons=4, progress=False)
    run.similarity(progress=False)
    return path


def every_view(viewer_store, probe_store, dla_similarity_store) -> list[tuple[str, str, dict]]:
    """(store, view, arguments) covering every view of the registry across the three test stores."""
    v, p, d = viewer_store.path, probe_store.path, dla_similarity_store
    return [(v, "tokens", {"prompt": 1}), (v, "head", {"prompt": 0, "layer": 1}), (v, "model", {"prompt": 0}),
            (v, "layer_predictions", {"prompt": 0}), (v, "rankings", {"prompt": 0}), (v, "rankings_watch", {}),
            (v, "saliency", {"prompt": 0, "method": "grad_x_input"}), (v, "neuron", {"layer": 0, "head": 1}),
            (v, "heads_map", {}), (v, "nmf", {"prompt": 0}), (p, "bias", {}), (p, "probe", {"label": PROBE_LABELS[1]}),
            (p, "tuned_lens", {}), (d, "dla", {"prompt": 0}), (d, "dla_heads", {}), (d, "dla_neurons", {"layer": 1}),
            (d, "similarity", {})]


def test_every_view_is_a_widget_in_a_real_kernel(viewer_store, probe_store, dla_similarity_store, tmp_path):
    from nbclient import NotebookClient

    views = every_view(viewer_store, probe_store, dla_similarity_store)
    assert {name for _, name, _ in views} == set(VIEWS)  # a new view needs a line here
    cells = ["import stratascope as ss"]
    cells += [f"ss.open_run({path!r}).view.{name}({', '.join(f'{k}={v!r}' for k, v in kw.items())})"
              for path, name, kw in views]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env={**os.environ, "PYTHONPATH": str(REPO)})  # the kernel imports this checkout
    models = nb.metadata["widgets"][STATE_MIME]["state"]  # every widget model the kernel opened, as stored
    for cell, (_, name, kw) in zip(nb.cells[1:], views):
        (out,) = [o for o in cell.outputs if o.output_type == "execute_result"]
        assert WIDGET_MIME in out.data, (name, cell.outputs)
        state = models[out.data[WIDGET_MIME]["model_id"]]["state"]
        assert state["_model_module"] == "anywidget" and state["state"]["view"] == name
        assert all(state["state"][k] == v for k, v in kw.items() if k != "prompt"), (name, state["state"])
        assert [v["name"] for v in state["meta"]["views"]] == [name] and state["meta"]["views"][0]["available"]
        esm = state["_esm"]  # offline: an ES module that imports nothing, needs no require.js, has the renderer
        assert "export default { render }" in esm and f"S.views.{name} = " in esm
        assert not re.search(r"^\s*import\b|\bimport\s*\(\s*[\"'`]https?:|\brequirejs\b|require\.config", esm,
                             re.M), name
        assert ("window.Plotly = Plotly" in esm) == VIEWS[name].plotly
        # The fallback for front ends without widgets: the report's page of this view, in an iframe.
        assert out.data["text/html"].startswith("<iframe srcdoc=") and f"&quot;view&quot;:&quot;{name}&quot;" in \
            out.data["text/html"]


def request(w, endpoint: str, **params) -> dict:
    """What the browser does on an interaction: a custom message to the widget's comm, and the reply."""
    replies = []
    send = w.send
    w.send = lambda content, buffers=None: replies.append(content) or send(content, buffers)
    try:
        w._handle_msg({"content": {"data": {"method": "custom", "content": {
            "type": "get", "id": "t:1", "endpoint": endpoint, "params": params}}}, "buffers": []})
    finally:
        w.send = send
    (reply,) = replies
    assert reply["id"] == "t:1"
    return reply


def test_kernel_answers_requests_with_the_raw_slices(viewer_store):
    run = ss.open_run(viewer_store.path)
    w = run.view.head(prompt=4, layer=0)
    for layer in (1, 2):  # the user picks another layer: the kernel sends that layer's lines only
        reply = request(w, "attention", prompt=4, layer=layer)
        att = viewer_store.att(4, layer)  # read with zarr directly
        assert reply["type"] == "data" and reply["data"]["layer"] == layer
        for h, head in enumerate(reply["data"]["heads"]):
            q, k = np.nonzero(att[:, h, :] >= data.MIN_WEIGHT)
            assert head["q"] == q.tolist() and head["k"] == k.tolist()
            np.testing.assert_allclose(head["w"], att[q, h, k], atol=5e-4)
    # Bad requests get one sentence each, the same as the app's (its parser), and nothing else happens.
    assert request(w, "attention", prompt=4, layer=9)["error"] == "layer 9 was not captured; this run has layers 0-2"
    assert "out of range" in request(w, "attention", prompt=-1, layer=0)["error"]
    assert request(w, "attention", prompt=4)["error"] == "attention needs exactly one layer parameter"
    assert request(w, "nope")["error"].startswith("no endpoint 'nope'")
    assert "unknown parameter" in request(w, "tokens", prompt=0, path="/etc/passwd")["error"]


def test_a_widget_of_a_large_store_sends_only_the_slices_it_shows(tmp_path):
    """1M tokens (attention 1 GiB as float32): the widget's state, its fallback page and the two slices
    a user looks at, counted in bytes as sent; the same on a 38,400-token store (600 prompts: a number box
    as for the 1M store, no prompt list)."""
    sizes = {}
    for n_tokens in (1_000_000, 38_400):
        path = str(tmp_path / f"s{n_tokens}.zarr")
        write_large_store(path, n_tokens=n_tokens)
        tracemalloc.start()
        with comm_bytes() as sent:
            w = ss.open_run(path).view.head(prompt=3, layer=0)
            fallback = len(json.dumps(w._repr_mimebundle_()[0]).encode())  # the display message's data
            for layer in (0, 1):
                request(w, "attention", prompt=3, layer=layer)
            w._handle_msg({"content": {"data": {"method": "update", "state": {"state": {**w.state, "layer": 1}},
                                                "buffer_paths": []}}, "buffers": []})
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert w.state["layer"] == 1  # the kernel knows what the user picked
        kinds = [k for k, _ in sent]
        assert kinds.count("comm_open") == 2 and kinds.count("comm_msg") >= 2  # the widget and its Layout
        sizes[n_tokens] = {"messages": sum(b for _, b in sent), "fallback": fallback, "peak": peak}
    g = zarr.open_group(str(tmp_path / "s1000000.zarr"), mode="r")
    store_bytes = int(np.prod(g["attention"].shape)) * 4
    big, small = sizes[1_000_000], sizes[38_400]
    total = big["messages"] + big["fallback"]
    assert store_bytes > 1e9 and total < 300_000, sizes  # measured 2026-12-01: see benchmarks/README.md
    # Nothing grows with the store: only the digits of its sizes in the meta differ.
    assert abs(big["messages"] - small["messages"]) < 64 and abs(big["fallback"] - small["fallback"]) < 256, sizes
    assert big["peak"] < 64 << 20, sizes  # bounded memory: a few chunks, never the 1 GiB array


def test_save_html_svg_and_clear_errors(viewer_store, tmp_path):
    run = ss.open_run(viewer_store.path)
    w = run.view.head(prompt=1, layer=2)
    page = w.save(tmp_path / "head.html").read_text()
    assert '"attention?layer=2\\u0026prompt=1"' in page and '"attention?layer=0\\u0026prompt=1"' not in page
    w._handle_msg({"content": {"data": {"method": "update", "state": {"state": {**w.state, "layer": 0}},
                                        "buffer_paths": []}}, "buffers": []})  # the user picks layer 0
    assert '"attention?layer=0\\u0026prompt=1"' in w.html() and '"layer":0' in w.html()
    with pytest.raises(ConfigError, match=r"head.svg.*drawn by the browser.*not been drawn in a notebook front end"):
        w.save(tmp_path / "head.svg")  # no front end has drawn it (the browser test saves one)
    with pytest.raises(ConfigError, match=r"\.png.*ending in \.html.*or \.svg"):
        w.save(tmp_path / "head.png")
    w._handle_msg({"content": {"data": {"method": "custom", "content": {"type": "svg", "svg": "<svg/>", "state": {}}}},
                   "buffers": []})  # what widget.js sends after each draw
    assert w.save(tmp_path / "head.svg").read_text() == "<svg/>"
    tokens = run.view.tokens(prompt=0)
    tokens._handle_msg({"content": {"data": {"method": "custom", "content": {"type": "svg", "svg": None}}},
                        "buffers": []})
    with pytest.raises(ConfigError, match="the prompts & tokens is HTML text, not a drawing; save it as .html"):
        tokens.save(tmp_path / "tokens.svg")
    assert "text/html" not in run.view.head(prompt=0, fallback=False)._repr_mimebundle_()[0]
    with pytest.raises(ConfigError, match=r"run.view.dla\(\): cannot show .*run `stratascope dla`"):
        run.view.dla(prompt=0)
    with pytest.raises(OutOfRangeError, match=r"run.view.head\(layer=7\): .* layers 0-2; pick one of them"):
        run.view.head(prompt=0, layer=7)
    with pytest.raises(OutOfRangeError, match="prompt 9"):
        run.view.head(prompt=9)
    # A renderer that calls another view's helpers brings that file along (widget module and report alike).
    assert "S.rankHeatmap = " in run.view.rankings_watch(prompt=0)._esm
    assert "S.rankHeatmap = " in build_report(run, views=["rankings_watch"], progress=False)


@pytest.mark.real
def test_real_smollm2_widget_answers_the_model_attention(tmp_path):
    """SmolLM2 end to end: capture attention, the head-view widget's reply for the layer a user picks
    against a direct transformers forward (eager attention) of the same prompt."""
    import torch

    from stratascope.models import load_model

    text = "Heathrow airport is located in the city of"
    run = ss.capture(model="smollm2", prompts=["The capital of France is", text], out=str(tmp_path / "s.zarr"),
                     capture=("attention",), layers=[0, 29], device="cpu", progress=False)
    w = run.view.head(prompt=1, layer=0)
    assert w.meta["layers"] == [0, 29] and w.meta["model"]["n_heads"] == 9
    reply = request(w, "attention", prompt=1, layer=29)["data"]
    loaded = load_model("smollm2", device="cpu")
    loaded.model.set_attn_implementation("eager")  # sdpa returns no weights
    ids = loaded.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        ref = loaded.model(**ids, output_attentions=True).attentions[29][0].numpy()  # head, query, key
    assert reply["n"] == ids["input_ids"].shape[1] and reply["n_heads"] == 9
    for h, head in enumerate(reply["heads"]):
        got = dict(zip(zip(head["q"], head["k"]), head["w"]))
        clear = {(int(q), int(k)) for q, k in zip(*np.nonzero(ref[h] >= data.MIN_WEIGHT + 1e-3))}
        below = {(int(q), int(k)) for q, k in zip(*np.nonzero(ref[h] < data.MIN_WEIGHT - 1e-3))}
        assert clear <= set(got) and not (below & set(got)), h
        np.testing.assert_allclose([got[qk] for qk in clear], [ref[h][qk] for qk in clear], atol=2e-3)
