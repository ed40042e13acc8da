"""Queries/keys capture, head summaries and the head/neuron views, each against an independent computation:
a direct transformers forward, or plain numpy over the stored attention written out in the test."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

import stratascope as ss
from conftest import FAMILIES, PROMPTS, load_reference
from stratascope.capture import writer
from stratascope.cli import cli
from stratascope.errors import ConfigError, MissingArrayError, OutOfRangeError


def _capture(tiny_model_dirs, family, out, **kwargs):
    kwargs = {"capture": "attention,qk", "batch_size": 4, "device": "cpu", "progress": False, **kwargs}
    return ss.capture(model=str(tiny_model_dirs[family]), out=str(out), **kwargs)


@pytest.fixture(scope="module")
def runs(tiny_model_dirs, tmp_path_factory):
    """attention + qk captures of every tiny family."""
    root = tmp_path_factory.mktemp("qk")
    return {f: _capture(tiny_model_dirs, f, root / f"{f}.zarr", prompts=PROMPTS) for f in FAMILIES}


@pytest.fixture(scope="module", params=["split-layers", "padded-shards"])
def small_chunks(request, tiny_model_dirs, tmp_path_factory):
    """llama stores the job must stream over in many blocks: one-token chunks with the layer axis split,
    or two-token chunks in shards padded with masked rows (prompt_index -1)."""
    split = request.param == "split-layers"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(writer, "CHUNK_BYTES", 512 if split else 4096)
        run = _capture(tiny_model_dirs, "llama", tmp_path_factory.mktemp("small") / "llama.zarr", prompts=PROMPTS,
                       capture="attention", shard_tokens=None if split else 8)
    chunks = run.ds["attention"].data.chunks
    assert len(chunks[0]) > 10 and (len(chunks[1]) > 1) == split
    assert (run.ds["prompt_index"].values < 0).any() != split
    return run


def _softmax(scores):
    e = np.exp(scores - scores.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_queries_keys_reproduce_reference_attention(runs, family):
    """softmax(q·kᵀ·scale + mask) from the stored q and k equals a direct transformers forward's attentions."""
    run = runs[family]
    model, tok = load_reference(run.attrs["model"]["source"])
    info = run.attrs["capture"]["qk"]
    assert info["after_rotary"] == (family in ("llama", "gpt_neox"))
    assert info["gqa_expanded"] == (family == "llama") and info["kv_heads"] == (2 if family == "llama" else 4)
    assert info["scale"] == pytest.approx(8 ** -0.5)  # d_head 8
    assert run.ds["keys"].sizes["head"] == 4 and run.ds["queries"].dtype == np.float32
    for p, text in enumerate(PROMPTS):
        ids = tok(text, return_tensors="pt")
        with torch.no_grad():
            ref = model(**ids, output_attentions=True).attentions
        rows = run.ds.isel(token=run.token_slice(p))
        q, k = rows["queries"].values.astype(np.float64), rows["keys"].values.astype(np.float64)
        n = q.shape[0]
        scores = np.einsum("qlhd,klhd->lhqk", q, k) * info["scale"]
        if family != "bert":
            scores = np.where(np.tril(np.ones((n, n), dtype=bool)), scores, -np.inf)
        for layer in range(len(ref)):
            np.testing.assert_allclose(_softmax(scores[layer]), ref[layer][0].numpy(), atol=1e-6)
        if family == "llama":  # repeat_kv: query heads 0,1 share kv head 0 and heads 2,3 kv head 1
            np.testing.assert_array_equal(k[:, :, 0], k[:, :, 1])
            np.testing.assert_array_equal(k[:, :, 2], k[:, :, 3])
            assert not np.allclose(k[:, :, 0], k[:, :, 2])


def test_queries_are_after_rotary(runs):
    """For rotary models the stored queries differ from the plain q projection by position (and equal it at 0)."""
    run = runs["llama"]
    model, tok = load_reference(run.attrs["model"]["source"])
    ids = tok(PROMPTS[1], return_tensors="pt")
    with torch.no_grad():
        h = model(**ids, output_hidden_states=True).hidden_states[0][0]
        block = model.model.layers[0]
        plain = block.self_attn.q_proj(block.input_layernorm(h)).view(h.shape[0], 4, 8).numpy()
    stored = run.ds["queries"].isel(token=run.token_slice(1), layer=0).values
    np.testing.assert_allclose(stored[0], plain[0], atol=1e-6)  # rotation by angle 0
    assert not np.allclose(stored[3], plain[3], atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(stored, axis=-1), np.linalg.norm(plain, axis=-1), rtol=1e-5)


def test_bert_pairs_keep_token_type_ids(tiny_model_dirs, tmp_path):
    records = [{"text": "The nurse said that", "text_pair": "she was tired."},
               {"text": "What is your name?", "text_pair": None},
               {"text": "The keys to the cabinet", "text_pair": "are on the table."}]
    run = _capture(tiny_model_dirs, "bert", tmp_path / "pairs.zarr", prompts=records, shard_tokens=16)
    model, tok = load_reference(tiny_model_dirs["bert"])
    for p, rec in enumerate(records):
        args = (rec["text"], rec["text_pair"]) if rec["text_pair"] else (rec["text"],)
        enc = tok(*args, return_tensors="pt", return_token_type_ids=True)
        rows = run.ds.isel(token=run.token_slice(p))
        np.testing.assert_array_equal(rows["token_id"].values, enc["input_ids"][0].numpy())
        np.testing.assert_array_equal(rows["token_type_ids"].values, enc["token_type_ids"][0].numpy())
        with torch.no_grad():
            ref = model(**enc, output_attentions=True).attentions
        n = len(enc["input_ids"][0])  # the forward saw the segments: type embeddings change every layer's weights
        for layer, weights in enumerate(ref):
            np.testing.assert_allclose(rows["attention"].values[:, layer, :, :n], weights[0].numpy().transpose(1, 0, 2),
                                       atol=1e-6)
    assert run.tokens(0)["token_type"].tolist().count(1) > 1 and not run.tokens(1)["token_type"].any()
    assert run.prompts["text_pair"].iloc[2] == "are on the table."


def _direct_summary(run):
    """Per (layer, head) means over rows with prompt_index >= 0 and position >= 2, prompt by prompt, with loops."""
    att = run.ds["attention"].values.astype(np.float64)
    pidx, pos = run.ds["prompt_index"].values, run.ds["position"].values
    n_tokens = run.ds["n_tokens"].values
    causal = run.attrs["model"]["causal"]
    rows = {"entropy": [], "entropy_norm": [], "first_token": [], "previous_token": [], "self": [], "where": []}
    for t in range(len(pidx)):
        if pidx[t] < 0 or pos[t] < 2:
            continue
        p = pos[t]
        valid = att[t, :, :, :p + 1] if causal else att[t, :, :, :n_tokens[pidx[t]]]
        ent = np.zeros(valid.shape[:2])
        for l in range(valid.shape[0]):
            for h in range(valid.shape[1]):
                w = valid[l, h][valid[l, h] > 0]
                ent[l, h] = -(w * np.log(w)).sum()
        rows["entropy"].append(ent)
        rows["entropy_norm"].append(ent / np.log(valid.shape[-1]))
        rows["first_token"].append(att[t, :, :, 0])
        rows["previous_token"].append(att[t, :, :, p - 1])
        rows["self"].append(att[t, :, :, p])
        rows["where"].append((pidx[t], p))
    where = rows.pop("where")
    return {k: np.array(v) for k, v in rows.items()}, where


def _expected_label(first, prev, self_, ent_norm):
    if prev >= 0.5:
        return "previous-token"
    if first >= 0.5:
        return "first-token"
    if self_ >= 0.5:
        return "self"
    return "broad" if ent_norm >= 0.8 else "mixed"


def _check_summary(run, frame, top):
    rows, where = _direct_summary(run)
    means = {k: v.mean(axis=0) for k, v in rows.items()}
    assert len(frame) == means["entropy"].size
    for r in frame.itertuples():
        l, h = list(run.ds["layer"].values).index(r.layer), r.head
        for name in means:
            assert getattr(r, name) == pytest.approx(means[name][l, h], rel=1e-5, abs=1e-6), name
        assert r.n_rows == len(where)
        assert r.label == _expected_label(*(means[n][l, h] for n in ("first_token", "previous_token", "self",
                                                                       "entropy_norm")))
        prof = np.stack([rows["first_token"][:, l, h], rows["previous_token"][:, l, h], rows["self"][:, l, h]], 1)
        prof = np.concatenate([prof, 1 - prof.sum(1, keepdims=True)], 1)
        tv = 0.5 * np.abs(prof - prof.mean(0)).sum(1)
        found = [where.index((p, q)) for p, q in zip(r.top_prompts, r.top_positions)]
        assert len(found) == min(top, len(where))
        np.testing.assert_allclose(tv[found], np.sort(tv)[::-1][:len(found)], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_head_summaries_equal_direct_numpy(runs, family):
    run = runs[family]
    _check_summary(run, run.heads(top=3), 3)


def test_head_summaries_stream_many_chunks_and_skip_masked_rows(small_chunks, tmp_path):
    path = tmp_path / "masked.zarr"
    shutil.copytree(small_chunks.path, path)
    run = ss.open_run(str(path))
    rows = run.token_slice(1)  # prompt 1's rows become masked padding with garbage attention
    zarr.open_array(str(path / "prompt_index"))[rows] = -1
    garbage = np.zeros((rows.stop - rows.start,) + run.ds["attention"].shape[1:], dtype=np.float32)
    garbage[..., 1] = 1.0
    zarr.open_array(str(path / "attention"))[rows] = garbage
    run = ss.open_run(str(path))
    frame = run.heads(top=4)
    assert not any(1 in r for r in frame.top_prompts)
    _check_summary(run, frame, 4)


def _synthetic(run, path):
    """A copy of `run` whose attention holds hand-built patterns in layer 0 and 1."""
    shutil.copytree(run.path, path)
    att = zarr.open_array(str(path / "attention"))
    a = att[:]
    pos = run.ds["position"].values
    a[:, :2] = 0
    for t, p in enumerate(pos):
        a[t, 0, 0, max(p - 1, 0)] = 1  # previous token (position 0: itself)
        a[t, 0, 1, 0] = 1  # first token
        a[t, 0, 2, p] = 1  # itself
        a[t, 0, 3, :p + 1] = 1 / (p + 1)  # uniform over the valid keys
        if p >= 2:
            a[t, 1, 0, [0, p - 1, p]] = [0.49, 0.49, 0.02]  # no single pattern, focused
        else:
            a[t, 1, 0, 0] = 1
    odd = int(run.ds["token_offset"][3]) + 3  # prompt 3, position 3 looks at the first token instead
    a[odd, 0, 0] = 0
    a[odd, 0, 0, 0] = 1
    att[:] = a
    return ss.open_run(str(path))


def test_hand_built_patterns_get_their_labels(runs, tmp_path):
    run = runs["gpt2"]
    frame = _synthetic(run, tmp_path / "synthetic.zarr").heads(top=2).set_index(["layer", "head"])
    assert frame.loc[(0, 0), "label"] == "previous-token" and frame.loc[(0, 0), "previous_token"] > 0.9
    assert frame.loc[(0, 1), "label"] == "first-token" and frame.loc[(0, 1), "first_token"] == pytest.approx(1)
    assert frame.loc[(0, 2), "label"] == "self"
    assert frame.loc[(0, 3), "label"] == "broad"
    assert frame.loc[(1, 0), "label"] == "mixed"
    assert (frame.loc[(0, 0), "top_prompts"][0], frame.loc[(0, 0), "top_positions"][0]) == (3, 3)


def test_attention_and_qk_views(runs):
    run = runs["llama"]
    frame = run.attention(prompt=1, layer=2, head=3)
    n = run.tokens(1).shape[0]
    assert frame.shape == (n, n) and frame.index.is_unique
    assert frame.index[0].startswith("0: ") and list(frame.columns) == list(frame.index)
    stored = run.ds["attention"].isel(token=run.token_slice(1), layer=2, head=3).values[:, :n]
    np.testing.assert_array_equal(frame.to_numpy(), stored)
    view = run.qk(prompt=1, layer=2, head=3)
    np.testing.assert_allclose(view.weights.to_numpy(), stored, atol=1e-6)
    assert np.isneginf(view.scores.to_numpy()[0, 1:]).all()
    np.testing.assert_allclose(view.terms(4).sum(axis=1).to_numpy()[:5] * view.scale,
                               view.scores.to_numpy()[4, :5], rtol=1e-6)


def test_views_and_job_errors(tiny_model_dirs, runs, tmp_path):
    run = runs["gpt2"]
    bare = _capture(tiny_model_dirs, "gpt2", tmp_path / "bare.zarr", prompts=PROMPTS, capture="hidden")
    with pytest.raises(MissingArrayError, match=r"^this run has no attention array; capture with --capture attention$"):
        bare.heads()
    with pytest.raises(MissingArrayError, match="--capture qk"):
        _capture(tiny_model_dirs, "gpt2", tmp_path / "att.zarr", prompts=PROMPTS, capture="attention").qk(0, 0, 0)
    result = CliRunner().invoke(cli, ["heads", bare.path])
    assert result.exit_code == 1 and "--capture attention" in result.output
    with pytest.raises(OutOfRangeError, match="layer 7 is out of range; this run holds layers 0-2"):
        run.attention(0, 7, 0)
    with pytest.raises(OutOfRangeError, match="head 4 is out of range; this model has heads 0-3"):
        run.qk(0, 0, 4)
    with pytest.raises(OutOfRangeError, match="prompt 6 is out of range"):
        run.attention(6, 0, 0)
    with pytest.raises(ConfigError, match="--top"):
        run.heads(top=0)
    some = _capture(tiny_model_dirs, "gpt2", tmp_path / "some.zarr", prompts=PROMPTS, layers="1-2")
    with pytest.raises(OutOfRangeError, match="layer 0 was not captured; this run holds layers 1-2"):
        some.attention(0, 0, 0)
    assert some.heads()["layer"].tolist() == [1] * 4 + [2] * 4


def test_cli_heads_writes_and_reuses(runs):
    run = runs["gpt_neox"]
    result = CliRunner().invoke(cli, ["heads", run.path, "--top", "2"])
    assert result.exit_code == 0, result.output
    assert "12 heads (3 layers x 4 heads)" in result.output and "analysis/heads" in result.output
    counts = {line.split()[0]: int(line.split()[1]) for line in result.output.splitlines()[2:]}
    assert sum(counts.values()) == 12 and set(counts) == {"previous-token", "first-token", "self", "broad", "mixed"}
    first = ss.open_run(run.path).heads(top=2)
    from stratascope.analyze.results import latest_result
    created = latest_result(run, "heads").attrs["created"]
    CliRunner().invoke(cli, ["heads", run.path, "--top", "2"])
    assert latest_result(run, "heads").attrs["created"] == created
    assert first.label.value_counts().to_dict() == {k: v for k, v in counts.items() if v}


def test_heads_job_never_imports_transformers(runs):
    run = runs["gpt2"]
    code = ("import sys; from stratascope.cli import cli\n"
            f"cli(['heads', {run.path!r}, '--recompute'], standalone_mode=False)\n"
            "import stratascope as ss; r = ss.open_run(" + repr(run.path) + "); r.attention(0, 0, 0); r.qk(0, 0, 0)\n"
            "assert 'transformers' not in sys.modules, 'transformers was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.mark.real
def test_smollm2_heads_over_demo_corpus(tmp_path):
    from stratascope.workflows.demo import demo_corpus

    run = ss.capture(model="smollm2", corpus=demo_corpus(), out=str(tmp_path / "demo.zarr"),
                     capture="attention,qk", progress=False)
    frame = run.heads()
    assert len(frame) == 30 * 9 and set(frame.layer) == set(range(30)) and set(frame["head"]) == set(range(9))
    assert (frame.label == "first-token").any()
    assert frame[["entropy", "first_token", "previous_token", "self"]].notna().all().all()
    info = run.attrs["capture"]["qk"]
    assert info["after_rotary"] and info["gqa_expanded"] and info["kv_heads"] == 3
    for layer, head in ((0, 0), (15, 4), (29, 8)):  # stored q and k reproduce the stored attention
        view = run.qk(prompt=0, layer=layer, head=head)
        np.testing.assert_allclose(view.weights.to_numpy(), run.attention(0, layer, head).to_numpy(), atol=1e-5)
    result = CliRunner().invoke(cli, ["heads", run.path])
    assert result.exit_code == 0 and "first-token" in result.output


def test_qk_and_segments_on_a_dask_worker(runs, tiny_model_dirs, tmp_path):
    """Shards captured on a worker process hold the same queries, keys and token types as in-process."""
    local = runs["bert"]
    remote = _capture(tiny_model_dirs, "bert", tmp_path / "bert.zarr", prompts=PROMPTS, workers=1)
    for name in ("queries", "keys", "attention", "token_type_ids"):
        np.testing.assert_array_equal(remote.ds[name].values, local.ds[name].values, err_msg=name)
    assert remote.attrs["capture"]["qk"] == local.attrs["capture"]["qk"]
