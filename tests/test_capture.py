"""Stored arrays equal a direct transformers forward, prompt by prompt (independent computation)."""

import numpy as np
import pytest
import torch

import stratascope as ss
from conftest import FAMILIES, PROMPTS, load_reference


@pytest.fixture(scope="module", params=FAMILIES)
def captured(request, tiny_model_dirs, tmp_path_factory):
    family = request.param
    out = tmp_path_factory.mktemp("cap") / f"{family}.zarr"
    run = ss.capture(model=str(tiny_model_dirs[family]), prompts=PROMPTS, out=str(out), batch_size=4,
                     device="cpu", progress=False)
    model, tok = load_reference(tiny_model_dirs[family])
    return family, run, model, tok


def _each_prompt(run, model, tok, prompts, max_length: int | None = None):
    """Per prompt: its stored rows, its token ids and transformers' own forward of it alone (hidden
    states and attentions), the ids cut as --max-length cuts them."""
    for p, text in enumerate(prompts):
        ids = {k: v[:, :max_length] for k, v in tok(text, return_tensors="pt").items()}
        with torch.no_grad():
            out = model(**ids, output_hidden_states=True, output_attentions=True)
        yield run.ds.isel(token=run.token_slice(p)), ids, out


def _mlp_by_hand(family, block, x):
    """The MLP hidden activation from the block's own weights (input of the output projection)."""
    if family == "llama":
        m = block.mlp
        return torch.nn.functional.silu(x @ m.gate_proj.weight.T) * (x @ m.up_proj.weight.T)
    if family == "gpt2":
        m = block.mlp
        h = x @ m.c_fc.weight + m.c_fc.bias  # Conv1D stores (in, out)
        return 0.5 * h * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (h + 0.044715 * h**3)))
    if family == "gpt_neox":
        m = block.mlp
        return torch.nn.functional.gelu(x @ m.dense_h_to_4h.weight.T + m.dense_h_to_4h.bias)
    m = block.intermediate
    return torch.nn.functional.gelu(x @ m.dense.weight.T + m.dense.bias)


def _blocks(family, model):
    return {"gpt2": lambda: model.transformer.h, "llama": lambda: model.model.layers,
            "gpt_neox": lambda: model.gpt_neox.layers, "bert": lambda: model.encoder.layer}[family]()


def _mlp_first_linear(family, block):
    return {"gpt2": lambda b: b.mlp.c_fc, "llama": lambda b: b.mlp.gate_proj,
            "gpt_neox": lambda b: b.mlp.dense_h_to_4h, "bert": lambda b: b.intermediate.dense}[family](block)


def test_hidden_attention_mlp_match_direct_forward(captured):
    family, run, model, tok = captured
    blocks = _blocks(family, model)
    mlp_inputs = {}
    hooks = [_mlp_first_linear(family, block).register_forward_pre_hook(
        lambda mod, args, i=i: mlp_inputs.__setitem__(i, args[0])) for i, block in enumerate(blocks)]
    L = len(blocks)
    try:
        for rows, ids, out in _each_prompt(run, model, tok, PROMPTS):
            n = ids["input_ids"].shape[1]
            assert rows.sizes["token"] == n
            np.testing.assert_array_equal(rows.token_id.values, ids["input_ids"][0].numpy())
            hidden = rows.hidden.values
            for d in range(L):
                np.testing.assert_allclose(hidden[:, d], out.hidden_states[d][0].numpy(), atol=1e-5, rtol=1e-4)
            if family == "bert":
                np.testing.assert_allclose(hidden[:, L], out.hidden_states[L][0].numpy(), atol=1e-5, rtol=1e-4)
            else:  # depth L is the input of the final norm, whose output is HF's last entry
                norm = {"gpt2": lambda: model.transformer.ln_f, "llama": lambda: model.model.norm,
                        "gpt_neox": lambda: model.gpt_neox.final_layer_norm}[family]()
                with torch.no_grad():
                    normed = norm(torch.from_numpy(hidden[:, L]))
                np.testing.assert_allclose(normed.numpy(), out.hidden_states[L][0].numpy(), atol=1e-5, rtol=1e-4)
            att = rows.attention.values  # token, layer, head, key
            for layer in range(L):
                ref = out.attentions[layer][0].numpy()  # head, query, key
                np.testing.assert_allclose(att[:, layer, :, :n], ref.transpose(1, 0, 2), atol=1e-6)
                assert not att[:, layer, :, n:].any()
                with torch.no_grad():
                    by_hand = _mlp_by_hand(family, blocks[layer], mlp_inputs[layer][0])
                np.testing.assert_allclose(rows.mlp.values[:, layer], by_hand.numpy(), atol=1e-5, rtol=1e-4)
    finally:
        for h in hooks:
            h.remove()


def test_batched_equals_single_prompt(captured, tmp_path):
    family, run, *_ = captured
    single = ss.capture(model=run.attrs["model"]["source"], prompts=PROMPTS, out=str(tmp_path / "one.zarr"),
                        batch_size=1, device="cpu", progress=False)
    for name in ("hidden", "attention", "mlp"):
        np.testing.assert_allclose(run.ds[name].values, single.ds[name].values, atol=1e-5, rtol=1e-4)


def test_same_settings_bit_identical(captured, tmp_path):
    family, run, *_ = captured
    again = ss.capture(model=run.attrs["model"]["source"], prompts=PROMPTS, out=str(tmp_path / "again.zarr"),
                       batch_size=4, device="cpu", progress=False)
    for name in ("hidden", "attention", "mlp", "token_id", "position", "prompt_index"):
        assert np.array_equal(run.ds[name].values, again.ds[name].values), name


LONG = " ".join(PROMPTS * 20)  # cut to --max-length tokens: the key axis spans it, every short row is padded


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_attention_with_one_long_prompt_matches_direct_forward(family, tiny_model_dirs, tmp_path):
    """Short prompts plus one prompt of 120 tokens: every prompt's stored attention is transformers'
    output_attentions, zeros beyond its own keys (the key axis spans the long prompt)."""
    path = tiny_model_dirs[family]
    run = ss.capture(model=str(path), prompts=PROMPTS + [LONG], out=str(tmp_path / "long.zarr"), max_length=120,
                     capture="attention", batch_size=4, device="cpu", progress=False)
    model, tok = load_reference(path)
    assert run.ds.sizes["key"] == 120
    for rows, ids, out in _each_prompt(run, model, tok, PROMPTS + [LONG], max_length=120):
        n = ids["input_ids"].shape[1]
        att = rows["attention"].values
        assert att.shape[0] == n
        for layer, ref in enumerate(out.attentions):
            np.testing.assert_allclose(att[:, layer, :, :n], ref[0].numpy().transpose(1, 0, 2), atol=1e-6)
        assert not att[:, :, :, n:].any()


def test_float16_capture_is_the_forward_rounded(tiny_model_dirs, tmp_path):
    """float16 storage holds the direct forward's values rounded to float16 (numpy's rounding), attention's
    keys past each prompt's end stay zero, and dense activations are stored raw but checksummed."""
    import zarr

    path = tiny_model_dirs["llama"]
    run = ss.capture(model=str(path), prompts=PROMPTS, out=str(tmp_path / "h.zarr"), batch_size=3, dtype="float16",
                     device="cpu", progress=False)
    model, tok = load_reference(path)
    for rows, ids, out in _each_prompt(run, model, tok, PROMPTS):
        n = ids["input_ids"].shape[1]
        assert rows.hidden.dtype == np.float16 and rows.attention.dtype == np.float16
        for d in range(len(out.attentions)):
            want = out.hidden_states[d][0].numpy().astype(np.float16)
            np.testing.assert_allclose(rows.hidden.values[:, d].astype(np.float32), want.astype(np.float32),
                                       rtol=2e-3, atol=1e-4)
            att = rows.attention.values[:, d]
            np.testing.assert_allclose(att[:, :, :n].astype(np.float32),
                                       out.attentions[d][0].numpy().transpose(1, 0, 2).astype(np.float16), atol=1e-3)
            assert not att[:, :, n:].any()
    group = zarr.open_group(str(tmp_path / "h.zarr"), mode="r")
    names = {a: [type(c).__name__ for c in group[a].metadata.codecs] for a in ("hidden", "mlp", "attention")}
    assert names["hidden"] == names["mlp"] == ["BytesCodec", "Crc32cCodec"]
    assert names["attention"] == ["BytesCodec", "BloscCodec", "Crc32cCodec"]


def test_vocabulary_strings_are_each_id_decoded(captured):
    """readout/vocab_str[i] is what the tokenizer's own decode gives for the id i alone."""
    family, run, model, tok = captured
    vocab = run.readout.vocab_str.values
    n = min(len(vocab), len(tok))
    assert [str(v) for v in vocab[:n]] == [tok.decode([i], clean_up_tokenization_spaces=False) for i in range(n)]


def test_reused_staging_buffers_leave_no_stale_rows(tiny_model_dirs, tmp_path, monkeypatch):
    """The long prompt's shard comes first, then shards of short prompts staged into the same
    (reused) buffers: each short prompt's attention beyond its own keys, and every padding row,
    is zero, and its values are still transformers' own."""
    from stratascope.capture.buffers import StageBuffers

    taken, real_take = [], StageBuffers.take

    def take(self, rows):
        stage = real_take(self, rows)
        taken.append(id(stage["attention"].base))
        return stage

    monkeypatch.setattr(StageBuffers, "take", take)
    path = tiny_model_dirs["llama"]
    prompts = [LONG] + PROMPTS * 3
    run = ss.capture(model=str(path), prompts=prompts, out=str(tmp_path / "reuse.zarr"), max_length=120,
                     capture="hidden,attention", batch_size=2, shard_tokens=16, device="cpu", progress=False)
    assert len(taken) == run.attrs["capture"]["n_shards"] > len(set(taken))  # buffers were reused
    model, tok = load_reference(path)
    for rows, ids, out in _each_prompt(run, model, tok, prompts, max_length=120):
        n = ids["input_ids"].shape[1]
        att = rows["attention"].values
        for layer, ref in enumerate(out.attentions):
            np.testing.assert_allclose(att[:, layer, :, :n], ref[0].numpy().transpose(1, 0, 2), atol=1e-6)
        assert not att[:, :, :, n:].any()
        np.testing.assert_allclose(rows["hidden"].values[:, 0], out.hidden_states[0][0].numpy(), atol=1e-5)
    padding = run.ds["prompt_index"].values < 0
    assert padding.any()
    import zarr

    raw = zarr.open_group(run.path, mode="r")
    for name in ("hidden", "attention"):
        assert not raw[name][:][padding].any(), name
