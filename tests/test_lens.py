"""The lens against a direct computation: the model's own final norm and lm_head applied to
transformers' output_hidden_states, full-vocabulary softmax and ranks by plain torch."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import stratascope as ss
from conftest import PROMPTS, load_reference
from stratascope.errors import ConfigError, MissingArrayError, OutOfRangeError

WATCH = [" the", " was", " said"]  # single tokens in the tiny vocabulary


def _final_norm(family, model):
    return {"gpt2": lambda: model.transformer.ln_f, "llama": lambda: model.model.norm}[family]()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def captured(request, tiny_model_dirs, tmp_path_factory):
    family = request.param
    out = tmp_path_factory.mktemp("lens") / f"{family}.zarr"
    run = ss.capture(model=str(tiny_model_dirs[family]), prompts=PROMPTS, out=str(out), capture=("hidden",),
                     batch_size=4, device="cpu", progress=False)
    model, tok = load_reference(tiny_model_dirs[family])
    return family, run, model, tok


def _direct(family, model, tok, text, norm="final"):
    """Per depth: full-vocabulary logits (positions, vocab), by the model's own modules."""
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        out = model(**ids, output_hidden_states=True)
        hs = out.hidden_states
        L = len(hs) - 1
        head = model.get_output_embeddings()
        norm_mod = _final_norm(family, model)
        logits = [head(norm_mod(hs[d][0]) if norm == "final" else hs[d][0]) for d in range(L)]
        logits.append(head(hs[L][0]))  # HF's last hidden state is already normalized
    return ids["input_ids"][0], torch.stack(logits), out.logits[0]


def _rank(logits, target):
    return 1 + (logits > logits[..., target, None]).sum(-1)


@pytest.mark.parametrize("norm", ["final", "none"])
def test_lens_equals_direct_computation(captured, norm):
    family, run, model, tok = captured
    k = 5
    ds = run.lens(topk=k, watch=WATCH, norm=norm, progress=False)
    assert ds.attrs["params"]["norm"] == norm
    watch_ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in WATCH]
    assert list(ds.watch_id.values) == watch_ids
    for p, text in enumerate(PROMPTS):
        ids, logits, model_logits = _direct(family, model, tok, text, norm)  # (D, n, V)
        rows = ds.isel(token=run.token_slice(p)).load()
        n = len(ids)
        probs = torch.softmax(logits, -1)
        top = torch.topk(logits, k, dim=-1)
        np.testing.assert_array_equal(rows.topk_ids.values, top.indices.permute(1, 0, 2).numpy())
        np.testing.assert_allclose(rows.topk_probs.values, probs.gather(-1, top.indices).permute(1, 0, 2).numpy(),
                                   atol=1e-5, rtol=1e-4)
        # the token that came next, and the last position that has none
        np.testing.assert_array_equal(rows.target_id.values[:-1], ids[1:].numpy())
        assert rows.target_id.values[-1] == -1 and (rows.target_rank.values[-1] == -1).all()
        assert np.isnan(rows.target_prob.values[-1]).all()
        nxt = ids[1:]
        target_logit = logits[:, :-1].gather(-1, nxt[None, :, None].expand(len(logits), -1, 1))
        want_rank = (1 + (logits[:, :-1] > target_logit).sum(-1)).T
        np.testing.assert_array_equal(rows.target_rank.values[:-1], want_rank.numpy())
        want_prob = probs[:, :-1].gather(-1, nxt[None, :, None].expand(len(logits), -1, 1))[..., 0].T
        np.testing.assert_allclose(rows.target_prob.values[:-1], want_prob.numpy(), atol=1e-5, rtol=1e-4)
        for j, w in enumerate(watch_ids):
            np.testing.assert_array_equal(rows.watch_rank.values[:, :, j], _rank(logits, w).T.numpy())
            np.testing.assert_allclose(rows.watch_prob.values[:, :, j], probs[..., w].T.numpy(), atol=1e-5, rtol=1e-4)
        logp = torch.log_softmax(logits, -1)
        entropy = -(probs * logp).sum(-1).T
        np.testing.assert_allclose(rows.entropy.values, entropy.numpy(), atol=1e-4, rtol=1e-4)
        kl = (probs[-1] * (logp[-1] - logp)).sum(-1).T
        np.testing.assert_allclose(rows.kl_final.values, kl.numpy(), atol=1e-4, rtol=1e-4)
        # the last depth is the model: its top-1 is the model's argmax for every token
        np.testing.assert_array_equal(rows.topk_ids.values[:, -1, 0], model_logits.argmax(-1).numpy())
        assert rows.sizes["token"] == n


def test_reuse_and_recompute(captured):
    family, run, *_ = captured
    first = run.lens(topk=3, watch=[" was"], progress=False)
    again = run.lens(topk=3, watch=[" was"], progress=False)
    assert again.attrs["created"] == first.attrs["created"]  # read back, not recomputed
    other = run.lens(topk=4, watch=[" was"], depths="1-2", progress=False)
    assert other.attrs["created"] != first.attrs["created"]
    assert other.sizes["k"] == 4 and list(other.depth.values) == [1, 2]


def test_depth_subset_matches_full(captured):
    family, run, *_ = captured
    full = run.lens(topk=3, watch=[" was"], progress=False).load()
    sub = run.lens(topk=3, watch=[" was"], depths=[2, 0], progress=False).load()
    for name in ("topk_ids", "target_rank", "watch_rank", "kl_final"):
        np.testing.assert_array_equal(sub[name].values, full[name].sel(depth=[2, 0]).values)


def test_ecco_views_match_direct(captured):
    family, run, model, tok = captured
    p = 3
    ids, logits, _ = _direct(family, model, tok, PROMPTS[p])
    L = logits.shape[0] - 1
    pred = run.layer_predictions(prompt=p, position=-1, depth=1, topk=4)
    top = torch.topk(torch.softmax(logits[1, -1], -1), 4)
    assert list(pred["token_id"]) == top.indices.tolist()
    np.testing.assert_allclose(pred["prob"].values, top.values.numpy(), atol=1e-5)
    assert list(pred["token"]) == [tok.decode([i]) for i in top.indices.tolist()]
    ranks = run.rankings(prompt=p)
    assert ranks.shape == (L + 1, len(ids) - 1)
    for d in range(L + 1):
        np.testing.assert_array_equal(ranks.loc[d].values,
                                      (1 + (logits[d, :-1] > logits[d, :-1].gather(-1, ids[1:, None])).sum(-1)).numpy())
    watch = run.rankings_watch(prompt=p, watch=[" was", " said"], position=2)
    assert watch.shape == (L + 1, 2) and list(watch.columns) == [" was", " said"]
    for j, w in enumerate([" was", " said"]):
        wid = tok(w, add_special_tokens=False)["input_ids"][0]
        np.testing.assert_array_equal(watch.iloc[:, j].values, _rank(logits[:, 2], wid).numpy())


def test_multi_token_watch_word_warns(captured):
    family, run, model, tok = captured
    word = " zyxwvut"
    pieces = tok(word, add_special_tokens=False)["input_ids"]
    assert len(pieces) > 1
    with pytest.warns(UserWarning, match="first token"):
        table = run.rankings_watch(prompt=0, watch=[word])
    logits = _direct(family, model, tok, PROMPTS[0])[1]
    np.testing.assert_array_equal(table.iloc[:, 0].values, _rank(logits[:, -1], pieces[0]).numpy())


def test_watch_words_sharing_a_first_token_keep_a_column_each(captured):
    """' zyxwvut' and ' zyxabc' both start with ' z...': two columns (each equal to the direct rank
    of that first token), with a warning that they share it; the CLI takes ids too."""
    family, run, model, tok = captured
    words = [" zyxwvut", " zyxwvuq"]
    firsts = [tok(w, add_special_tokens=False)["input_ids"][0] for w in words]
    assert firsts[0] == firsts[1]
    with pytest.warns(UserWarning, match="share their first token"):
        table = run.rankings_watch(prompt=0, watch=words + [firsts[0]])
    assert table.shape[1] == 3
    logits = _direct(family, model, tok, PROMPTS[0])[1]
    for j in range(3):
        np.testing.assert_array_equal(table.iloc[:, j].values, _rank(logits[:, -1], firsts[0]).numpy())


def test_errors(captured, tiny_model_dirs, tmp_path):
    family, run, *_ = captured
    with pytest.raises(OutOfRangeError, match="depth 9 is out of range"):
        run.layer_predictions(prompt=0, depth=9)
    with pytest.raises(OutOfRangeError, match="position 50 is out of range"):
        run.layer_predictions(prompt=0, position=50)
    with pytest.raises(OutOfRangeError, match="prompt 99 is out of range"):
        run.rankings(prompt=99)
    with pytest.raises(ConfigError):
        run.lens(norm="bogus", progress=False)
    no_hidden = ss.capture(model=str(tiny_model_dirs[family]), prompts=PROMPTS[:2], out=str(tmp_path / "a.zarr"),
                           capture=("attention",), device="cpu", progress=False)
    with pytest.raises(MissingArrayError, match="this run has no hidden states; capture with --capture hidden"):
        no_hidden.lens(progress=False)
    encoder = ss.capture(model=str(tiny_model_dirs["bert"]), prompts=PROMPTS[:2], out=str(tmp_path / "b.zarr"),
                         capture=("hidden",), device="cpu", progress=False)
    with pytest.raises(MissingArrayError, match="no LM head"):
        encoder.lens(progress=False)


def test_job_never_imports_transformers(captured):
    family, run, *_ = captured
    code = ("import sys, stratascope as ss\n"
            f"run = ss.open_run({run.path!r})\n"
            "ds = run.lens(topk=2, watch=[' was'], depths=[0, 1], progress=False)\n"
            "run.rankings_watch(prompt=0, watch=[' said'])\n"
            "assert int(ds.target_rank.max()) >= 1\n"
            "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=".")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.real
def test_real_smollm2(tmp_path):
    run = ss.capture(model="smollm2", prompts=["Heathrow airport is located in the city of", "The keys to the cabinet"],
                     out=str(tmp_path / "real.zarr"), capture=("hidden",), device="cpu", progress=False)
    pred = run.layer_predictions(prompt=0, position=-1, topk=5)
    assert pred["token"].iloc[0] == " London"
    watch = run.rankings_watch(prompt=0, watch=[" London"])
    assert watch.iloc[-1, 0] == 1
    table = run.rankings_watch(prompt=1, watch=[" is", " are"])
    assert table.shape == (31, 2) and (table.values >= 1).all()
    ds = run.lens(topk=3, watch=[" London"], progress=False)
    last = run.token_slice(0).stop - 1
    assert int(ds.watch_rank[last, -1, 0]) == 1
    assert int(ds.topk_ids[last, -1, 0]) == int(pred["token_id"].iloc[0])


def test_bfloat16_is_recorded_and_close(captured):
    family, run, *_ = captured
    exact = run.lens(topk=3, progress=False).load()
    fast = run.lens(topk=3, precision="bfloat16", progress=False).load()
    assert fast.attrs["params"]["precision"] == "bfloat16" and "approximate" in fast.attrs["precision_note"]
    has_next = exact.target_rank.values > 0
    assert ((fast.target_rank.values > 0) == has_next).all()
    # bfloat16 keeps ~3 significant digits: probabilities agree loosely, ranks need not be exact
    np.testing.assert_allclose(fast.target_prob.values[has_next], exact.target_prob.values[has_next], atol=0.02)


def test_layer_subset_without_final_depth(tiny_model_dirs, tmp_path):
    run = ss.capture(model=str(tiny_model_dirs["llama"]), prompts=PROMPTS[:3], out=str(tmp_path / "sub.zarr"),
                     capture=("hidden",), layers="0-1", device="cpu", progress=False)
    assert [int(d) for d in run.ds.depth.values] == [0, 1, 2]  # depth 3 (the model's output) not captured
    ds = run.lens(topk=2, progress=False).load()
    assert np.isnan(ds.kl_final.values).all() and "not captured" in ds.attrs["kl_final"]
    model, tok = load_reference(tiny_model_dirs["llama"])
    ids, logits, _ = _direct("llama", model, tok, PROMPTS[0])
    rows = ds.isel(token=run.token_slice(0))
    np.testing.assert_array_equal(rows.topk_ids.values, torch.topk(logits[:3], 2, dim=-1).indices.permute(1, 0, 2))
    with pytest.raises(OutOfRangeError, match="depth 3 is out of range; this run holds depths 0-2"):
        run.layer_predictions(prompt=0, depth=3)


def test_empty_rows_give_empty_arrays(captured):
    family, run, *_ = captured
    from stratascope.analyze.lens import readout_for
    from stratascope.analyze.lens_kernel import lens_rows

    out = lens_rows(torch.zeros((0, 4, 32)), readout_for(run), np.zeros(0, dtype=np.int64), [1, 2], 3)
    assert out.topk_ids.shape == (0, 4, 3) and out.watch_rank.shape == (0, 4, 2)


@pytest.mark.parametrize("norm", ["final", "none"])
def test_vocabulary_blocks_change_nothing(captured, norm):
    """Small uneven vocabulary blocks (several per row, targets and watch ids in different
    blocks) give the same ranks and top-k as the whole vocabulary at once."""
    family, run, *_ = captured
    from stratascope.analyze.lens import readout_for
    from stratascope.analyze.lens_kernel import lens_rows

    h = torch.from_numpy(run.ds.hidden.values)
    targets = np.r_[run.ds.token_id.values[1:], -1]
    watch = [0, 5, 150, 299]
    whole = lens_rows(h, readout_for(run), targets, watch, 7, norm, 3, vocab_block=300)
    for block in (37, 64):
        parts = lens_rows(h, readout_for(run), targets, watch, 7, norm, 3, block_elements=2000, vocab_block=block)
        for name in ("topk_ids", "target_rank", "watch_rank"):
            np.testing.assert_array_equal(getattr(parts, name), getattr(whole, name), err_msg=name)
        for name in ("topk_probs", "target_prob", "watch_prob", "entropy", "kl_final"):
            np.testing.assert_allclose(getattr(parts, name), getattr(whole, name), atol=1e-5, rtol=1e-4,
                                       err_msg=name)
