"""dla: contributions equal an einsum over the test model's own sublayer outputs (hooked here), and they add
up to the model's logit (difference) from a direct transformers forward."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_components import BLOCKS, SUBLAYERS

import stratascope as ss
from conftest import PROMPTS, load_reference
from stratascope.cli import cli
from stratascope.errors import ConfigError, MissingArrayError, MissingMetadataError

ANSWERS = [" jumps", " London", " 1", " on", " name", " she"]
FINAL_NORM = {"gpt2": lambda m: m.transformer.ln_f, "llama": lambda m: m.model.norm,
              "gpt_neox": lambda m: m.gpt_neox.final_layer_norm}
MLP_OUT = {"gpt2": lambda b: b.mlp.c_proj, "llama": lambda b: b.mlp.down_proj,
           "gpt_neox": lambda b: b.mlp.dense_4h_to_h}


@pytest.fixture(scope="module", params=["gpt2", "llama", "gpt_neox"])
def captured(request, tiny_model_dirs, tmp_path_factory):
    family = request.param
    tmp = tmp_path_factory.mktemp("dla")
    corpus = tmp / "facts.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "answer": a, "foil": f}) + "\n"
                              for t, a, f in zip(PROMPTS, ANSWERS, ANSWERS[1:] + ANSWERS[:1])))
    run = ss.capture(model=str(tiny_model_dirs[family]), corpus=str(corpus), out=str(tmp / "r.zarr"), batch_size=4,
                     device="cpu", capture="hidden,components,z,mlp", shard_tokens=16, progress=False)
    assert run.ds["hidden"].data.numblocks[0] > 3  # the job streams several token chunks, with padding rows
    model, tok = load_reference(tiny_model_dirs[family], attn="sdpa")
    return family, run, model, tok


def _proj(module, family):
    w = module.weight.detach().double()
    return w if family == "gpt2" else w.T  # (in, out)


def _forward(family, model, tok, text):
    """Everything the reference needs for one prompt, from hooks written here."""
    got = {"attn": {}, "mlp": {}, "z": {}, "act": {}}
    hooks = []
    for i, block in enumerate(BLOCKS[family](model)):
        attn, mlp, proj = SUBLAYERS[family](block)
        hooks += [attn.register_forward_hook(lambda m, a, o, i=i: got["attn"].__setitem__(i, o[0][0])),
                  mlp.register_forward_hook(lambda m, a, o, i=i: got["mlp"].__setitem__(i, o[0])),
                  proj.register_forward_pre_hook(lambda m, a, i=i: got["z"].__setitem__(i, a[0][0])),
                  MLP_OUT[family](block).register_forward_pre_hook(
                      lambda m, a, i=i: got["act"].__setitem__(i, a[0][0]))]
    hooks.append(FINAL_NORM[family](model).register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0][0])))
    try:
        with torch.no_grad():
            out = model(**tok(text, return_tensors="pt"), output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    got["embed"], got["logits"] = out.hidden_states[0][0], out.logits[0].double()
    return got


def _reference(family, model, got, pos, target, contrast):
    """Frozen-scale DLA of one position by einsum: (row contributions, heads, neuron contributions)."""
    norm = FINAL_NORM[family](model)
    w, U = norm.weight.detach().double(), model.get_output_embeddings().weight.detach().double()
    u = U[target] - (U[contrast] if contrast is not None else 0)
    x = got["x"][pos].double()
    layernorm = isinstance(norm, torch.nn.LayerNorm)
    eps = norm.eps if layernorm else norm.variance_epsilon
    scale = 1 / torch.sqrt((x.var(unbiased=False) if layernorm else x.pow(2).mean()) + eps)
    centre = (lambda c: c - c.mean(-1, keepdim=True)) if layernorm else (lambda c: c)
    L = len(got["attn"])
    comps = torch.stack([got["embed"][pos]] + [got["attn"][l][pos] for l in range(L)]
                        + [got["mlp"][l][pos] for l in range(L)]).double()
    contrib = torch.einsum("cd,d,d->c", centre(comps), w * scale, u)
    blocks = BLOCKS[family](model)
    n_heads = model.config.num_attention_heads
    heads = torch.stack([torch.einsum("he,hed,d,d->h", got["z"][l][pos].double().view(n_heads, -1),
                                      centre(_proj(SUBLAYERS[family](blocks[l])[2], family)).reshape(
                                          model.config.num_attention_heads, -1, len(w)), w * scale, u)
                         for l in range(L)])
    neurons = torch.stack([got["act"][l][pos].double()
                           * (centre(_proj(MLP_OUT[family](blocks[l]), family)) @ (w * scale * u))
                           for l in range(L)])
    return contrib, heads, neurons


def test_contributions_equal_einsum_and_sum_to_model_logit_difference(captured):
    family, run, model, tok = captured
    res = run.dla(target="next", contrast=" the", positions="all", neurons=3, progress=False)
    contrast = tok(" the", add_special_tokens=False)["input_ids"][0]
    comp, heads = res.by_component, res.by_head
    assert list(comp.columns[:2]) == ["embed", "attn.0"] and comp.columns[-1] == "bias"
    checked = 0
    for p, text in enumerate(PROMPTS):
        got = _forward(family, model, tok, text)
        ids = tok(text)["input_ids"]
        for pos in range(len(ids) - 1):  # every position with a next token
            target = ids[pos + 1]
            want, want_heads, want_neurons = _reference(family, model, got, pos, target, contrast)
            row = comp.loc[(p, pos)]
            np.testing.assert_allclose(row.drop("bias").values, want.numpy(), atol=2e-4)
            logit = got["logits"][pos, target] - got["logits"][pos, contrast]
            np.testing.assert_allclose(row.sum(), float(logit), atol=2e-4)  # the decomposition is exact
            i = np.flatnonzero((res.ds["prompt"].values == p) & (res.ds["position"].values == pos))[0]
            np.testing.assert_allclose(heads.values[i], want_heads.numpy(), atol=2e-4)
            assert abs(float(res.ds["gap"][i])) < 1e-4
            top = res.top_neurons(layer=1, k=3).loc[(p, pos)]
            expect = want_neurons[1][top["neuron"].to_numpy().copy()].numpy()
            np.testing.assert_allclose(top["contribution"].values, expect, atol=2e-4)
            assert set(top["neuron"]) == set(torch.topk(want_neurons[1].abs(), 3).indices.tolist())
            checked += 1
    assert checked == len(res.ds["row"]) == sum(len(tok(t)["input_ids"]) - 1 for t in PROMPTS)


def test_targets_top_word_and_column(captured):
    family, run, model, tok = captured
    last = [_forward(family, model, tok, t)["logits"][-1] for t in PROMPTS]
    top = run.dla(target="top", progress=False)
    assert list(top.rows["target_id"]) == [int(lg.argmax()) for lg in last]
    np.testing.assert_allclose(top.by_component.sum(axis=1).values, [float(lg.max()) for lg in last], atol=2e-4)
    word = run.dla(target=" London", progress=False)
    london = tok(" London", add_special_tokens=False)["input_ids"][0]
    np.testing.assert_allclose(word.rows["logit"].values, [float(lg[london]) for lg in last], atol=2e-4)
    col = run.dla(target_column="answer", progress=False)
    want = [tok(a, add_special_tokens=False)["input_ids"][0] for a in ANSWERS]
    assert list(col.rows["target_id"]) == want
    np.testing.assert_allclose(col.rows["total"].values, [float(lg[t]) for lg, t in zip(last, want)], atol=2e-4)
    foil = [tok(a, add_special_tokens=False)["input_ids"][0] for a in ANSWERS[1:] + ANSWERS[:1]]
    diff = run.dla(target_column="answer", contrast_column="foil", progress=False)
    np.testing.assert_allclose(diff.by_component.sum(axis=1).values,
                               [float(lg[t] - lg[f]) for lg, t, f in zip(last, want, foil)], atol=2e-4)
    assert list(diff.rows["contrast_id"]) == foil
    first = run.dla(target="top", positions="first", progress=False)  # positions as for the lens
    assert set(first.ds["position"].values) == {0} and len(first.ds["row"]) == len(PROMPTS)
    # results with other parameters are kept beside each other; the same parameters reuse the stored one
    for kept, kwargs in ((word, {"target": " London"}), (col, {"target_column": "answer"})):
        assert run.dla(progress=False, **kwargs).ds.attrs["created"] == kept.ds.attrs["created"]


def test_bad_input_is_one_sentence(captured, tiny_model_dirs, tmp_path):
    family, run, _, _ = captured
    if family != "llama":
        pytest.skip("input checks do not depend on the family")
    with pytest.raises(ConfigError, match="no next token"):
        run.dla(target="next", positions="last", progress=False)
    with pytest.raises(MissingMetadataError, match="answer"):
        run.dla(target_column="nope", progress=False)
    with pytest.raises(ConfigError, match="--target or --target-column, not both"):
        run.dla(target="top", target_column="answer", progress=False)
    with pytest.raises(MissingArrayError, match="--neurons"):
        run.dla(target="top", progress=False).top_neurons(0)
    plain = ss.capture(model=str(tiny_model_dirs["llama"]), prompts=PROMPTS, out=str(tmp_path / "h.zarr"),
                       capture="hidden", device="cpu", progress=False)
    with pytest.raises(MissingArrayError, match="--capture components"):
        plain.dla(target="top", progress=False)
    bert = ss.capture(model=str(tiny_model_dirs["bert"]), prompts=PROMPTS, out=str(tmp_path / "b.zarr"),
                      capture="hidden,components,z", device="cpu", progress=False)
    assert "attn_out" in bert.ds  # the capture works; the attribution is refused
    with pytest.raises(ConfigError, match="post-norm"):
        bert.dla(target="top", progress=False)


def test_cli_dla(captured):
    family, run, _, _ = captured
    if family != "gpt2":
        pytest.skip("one family is enough for the command line")
    out = CliRunner().invoke(cli, ["dla", run.path, "--target", "top", "--contrast", " the", "--neurons", "2"])
    assert out.exit_code == 0, out.output
    assert "dla of 6 rows" in out.output and "prompt 0 pos" in out.output
    bad = CliRunner().invoke(cli, ["dla", run.path, "--target-column", "missing"])
    assert bad.exit_code == 1 and "not a prompt metadata column" in bad.output


def test_dla_job_never_imports_transformers(captured):
    family, run, *_ = captured
    if family != "llama":
        pytest.skip("one family is enough")
    code = ("import sys, stratascope as ss\n"
            f"res = ss.open_run({run.path!r}).dla(target='top', contrast=' the', neurons=2, progress=False)\n"
            "assert res.by_head.shape[1:] == (3, 4)\n"
            "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=".")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.real
def test_real_smollm2_fact_recall(tmp_path):
    corpus = tmp_path / "facts.jsonl"
    corpus.write_text(json.dumps({"text": "The Eiffel Tower is located in the city of", "attribute": " Paris"}) + "\n")
    run = ss.capture(model="smollm2", corpus=str(corpus), out=str(tmp_path / "f.zarr"), device="cpu",
                     capture="hidden,components,z,mlp", progress=False)
    res = run.dla(target_column="attribute", contrast=" the", neurons=5, progress=False)
    row = res.rows.iloc[0]
    assert row["target"] == " Paris" and abs(row["gap"]) < 1e-3
    assert row["logit"] > 0  # " Paris" beats " the"
    comp = res.by_component.iloc[0]
    assert int(comp.drop(["embed", "bias"]).idxmax().split(".")[1]) >= 15  # late blocks write the answer
