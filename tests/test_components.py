"""--capture components,z: stored residual additions equal sublayer outputs hooked here, on the test's own
model, and the residual decomposes into them (pre-norm families)."""

import numpy as np
import pytest
import torch

import stratascope as ss
from conftest import FAMILIES, PROMPTS, load_reference

# Where this test itself finds each family's sublayers and the attention output projection.
SUBLAYERS = {
    "gpt2": lambda b: (b.attn, b.mlp, b.attn.c_proj),
    "llama": lambda b: (b.self_attn, b.mlp, b.self_attn.o_proj),
    "gpt_neox": lambda b: (b.attention, b.mlp, b.attention.dense),
    "bert": lambda b: (b.attention.output.dense, b.output.dense, b.attention.output.dense),
}
BLOCKS = {"gpt2": lambda m: m.transformer.h, "llama": lambda m: m.model.layers,
          "gpt_neox": lambda m: m.gpt_neox.layers, "bert": lambda m: m.encoder.layer}


@pytest.fixture(scope="module", params=FAMILIES)
def captured(request, tiny_model_dirs, tmp_path_factory):
    family = request.param
    out = tmp_path_factory.mktemp("comp") / f"{family}.zarr"
    run = ss.capture(model=str(tiny_model_dirs[family]), prompts=PROMPTS, out=str(out), batch_size=4, device="cpu",
                     capture="hidden,components,z,mlp", progress=False)
    model, tok = load_reference(tiny_model_dirs[family], attn="sdpa")
    return family, run, model, tok


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _reference(family, model, tok, text):
    """Per layer: the attention and MLP sublayer outputs, and the input of the attention output projection."""
    got = {"attn": {}, "mlp": {}, "z": {}}
    hooks = []
    for i, block in enumerate(BLOCKS[family](model)):
        attn, mlp, proj = SUBLAYERS[family](block)
        hooks += [attn.register_forward_hook(lambda m, a, o, i=i: got["attn"].__setitem__(i, _first(o))),
                  mlp.register_forward_hook(lambda m, a, o, i=i: got["mlp"].__setitem__(i, _first(o))),
                  proj.register_forward_pre_hook(lambda m, a, i=i: got["z"].__setitem__(i, a[0]))]
    try:
        with torch.no_grad():
            model(**tok(text, return_tensors="pt"))
    finally:
        for h in hooks:
            h.remove()
    return got


def test_components_equal_hooked_sublayer_outputs(captured):
    family, run, model, tok = captured
    L = model.config.num_hidden_layers
    for p, text in enumerate(PROMPTS):
        ref = _reference(family, model, tok, text)
        rows = run.ds.isel(token=run.token_slice(p))
        for layer in range(L):
            np.testing.assert_allclose(rows["attn_out"].values[:, layer], ref["attn"][layer][0].numpy(), atol=1e-5)
            np.testing.assert_allclose(rows["mlp_out"].values[:, layer], ref["mlp"][layer][0].numpy(), atol=1e-5)
            z = ref["z"][layer][0].numpy()  # (seq, heads * d_head)
            np.testing.assert_allclose(rows["z"].values[:, layer].reshape(z.shape), z, atol=1e-5)


def test_residual_is_embedding_plus_components(captured):
    family, run, model, _ = captured
    if family == "bert":
        assert run.attrs["capture"]["components"]["pre_norm"] is False
        return
    ds = run.ds
    hidden = ds["hidden"].values.astype(np.float64)
    adds = (ds["attn_out"].values + ds["mlp_out"].values).astype(np.float64)  # (token, layer, d_model)
    for depth in range(model.config.num_hidden_layers + 1):
        np.testing.assert_allclose(hidden[:, 0] + adds[:, :depth].sum(1), hidden[:, depth], atol=2e-5)


def test_heads_through_stored_projection_sum_to_attention_output(captured):
    family, run, model, _ = captured
    w = run.readout["attn_out_weight"].values  # (layer, head, d_head, d_model)
    b = run.readout["attn_out_bias"].values
    z = run.ds["z"].values  # (token, layer, head, d_head)
    heads = np.einsum("tlhe,lhed->tlhd", z.astype(np.float64), w)
    expect = run.ds["attn_out"].values
    np.testing.assert_allclose(heads.sum(2) + b, expect, atol=2e-5)
    # and neurons through the stored MLP projection sum to the MLP output
    neurons = np.einsum("tln,lnd->tld", run.ds["mlp"].values.astype(np.float64), run.readout["mlp_out_weight"].values)
    np.testing.assert_allclose(neurons + run.readout["mlp_out_bias"].values, run.ds["mlp_out"].values, atol=2e-5)
    # the stored projection is the test model's own (independent of the (in, out) layout chosen)
    proj = SUBLAYERS[family](BLOCKS[family](model)[1])[2]
    weight = proj.weight.detach().numpy()
    weight = weight if family == "gpt2" else weight.T
    np.testing.assert_allclose(w[1].reshape(weight.shape), weight, atol=0)


def test_dry_run_sizes_components_and_z(tiny_model_dirs, tmp_path):
    plan = ss.capture(model=str(tiny_model_dirs["llama"]), prompts=PROMPTS, out=str(tmp_path / "x.zarr"),
                      capture="components,z", device="cpu", dry_run=True, progress=False)
    n = plan.n_rows
    assert plan.shapes["attn_out"] == plan.shapes["mlp_out"] == (n, 3, 32)
    assert plan.shapes["z"] == (n, 3, 4, 8)
    assert plan.bytes_per_array()["z"] == n * 3 * 32 * 4
    assert plan.readout_bytes > 0 and "z" in plan.summary(str(tmp_path))


def test_post_sublayer_norm_family_decomposes_after_its_norms(tmp_path):
    """Gemma 2 normalizes each sublayer's output before the add: attn_out/mlp_out are taken after those
    norms (hooked here on the model's own modules), so the residual still decomposes; heads are flagged linearised."""
    import transformers as tf

    from conftest import _bpe_tokenizer

    tok = _bpe_tokenizer()
    torch.manual_seed(0)
    config = tf.Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                             bos_token_id=0, eos_token_id=0, pad_token_id=0, final_logit_softcapping=None)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path / "gemma2")
    tok.save_pretrained(tmp_path / "gemma2")
    run = ss.capture(model=str(tmp_path / "gemma2"), prompts=PROMPTS[:3], out=str(tmp_path / "g.zarr"), device="cpu",
                     capture="hidden,components,attention", progress=False)  # attention: Gemma 2 loads eager only
    assert run.attrs["capture"]["components"]["sublayer_norm"] is True
    assert "linearised" in run.attrs["capture"]["components"]["exactness"]
    got = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, k=(name, i): got.__setitem__(k, o[0]))
             for i, b in enumerate(model.model.layers)
             for name, m in (("attn", b.post_attention_layernorm), ("mlp", b.post_feedforward_layernorm))]
    try:
        with torch.no_grad():
            model(**tok(PROMPTS[0], return_tensors="pt"))
    finally:
        for h in hooks:
            h.remove()
    rows = run.ds.isel(token=run.token_slice(0))
    for layer in range(3):
        np.testing.assert_allclose(rows["attn_out"].values[:, layer], got[("attn", layer)].numpy(), atol=1e-5)
        np.testing.assert_allclose(rows["mlp_out"].values[:, layer], got[("mlp", layer)].numpy(), atol=1e-5)
    hidden = run.ds["hidden"].values.astype(np.float64)
    adds = (run.ds["attn_out"].values + run.ds["mlp_out"].values).astype(np.float64)
    for depth in range(4):
        np.testing.assert_allclose(hidden[:, 0] + adds[:, :depth].sum(1), hidden[:, depth], atol=2e-5)
