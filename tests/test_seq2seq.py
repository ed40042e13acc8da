"""Encoder-decoder models (tiny random T5 and BART): both stacks and the cross-attention as stored
equal transformers' own outputs, prompt by prompt; greedy decoding equals model.generate; the decoder
lens at the last depth equals the model's logits; attributions equal autograd written here."""

import numpy as np
import pytest
import torch

import stratascope as ss
from conftest import PROMPTS, load_reference
from stratascope.errors import ConfigError

TARGETS = ["a fox", "London is the city", "1, 1", "on the table", "my name", "she was tired"]
ROWS = [{"text": p, "target": t, "tag": i} for i, (p, t) in enumerate(zip(PROMPTS, TARGETS))]
N_NEW = 4
ALL = "grad_x_input,integrated_gradients,gradient_norm"
STEPS = 8


@pytest.fixture(scope="module", params=["t5", "bart"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def reference(family, tiny_model_dirs):
    return load_reference(tiny_model_dirs[family])


@pytest.fixture(scope="module")
def forced(family, tiny_model_dirs, tmp_path_factory):
    """Teacher-forced captures, batched (padding in every batch; several shards, so masked rows between
    them) and prompt by prompt."""
    root = tmp_path_factory.mktemp("s2s")
    return {b: ss.capture(model=str(tiny_model_dirs[family]), prompts=ROWS, out=str(root / f"b{b}.zarr"),
                          target_column="target", batch_size=b, device="cpu", progress=False,
                          shard_tokens=48 if b > 1 else None) for b in (4, 1)}


def _stacks(model):
    enc, dec = model.get_encoder(), model.get_decoder()
    name = "block" if hasattr(enc, "block") else "layers"
    norms = [getattr(s, "final_layer_norm", None) or getattr(s, "layer_norm", None) for s in (enc, dec)]
    return (getattr(enc, name), norms[0]), (getattr(dec, name), norms[1])


def _mlp_out(block):
    return block.layer[-1].DenseReluDense.wo if hasattr(block, "layer") else block.fc2


def _reference_forward(model, tok, p, decoder_ids):
    src = tok(PROMPTS[p], return_tensors="pt")["input_ids"]
    mlp = {}
    (eb, _), (db, _) = _stacks(model)
    hooks = [_mlp_out(b).register_forward_pre_hook(lambda m, a, k=(s, i): mlp.__setitem__(k, a[0][0]))
             for s, blocks in (("enc", eb), ("dec", db)) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            out = model(input_ids=src, decoder_input_ids=torch.tensor([decoder_ids]), output_attentions=True,
                        output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    return src[0], out, mlp


def _check_run_against_reference(run, model, tok):
    (_, enc_norm), (_, dec_norm) = _stacks(model)
    L = model.config.num_layers if hasattr(model.config, "num_layers") else model.config.encoder_layers
    for p in range(run.n_prompts):
        rows = run.ds.isel(token=run.token_slice(p))
        is_decoder = rows.is_decoder.values
        s = int(run.ds.n_source_tokens.values[p])
        np.testing.assert_array_equal(is_decoder, np.arange(len(is_decoder)) >= s)
        dec_ids = rows.token_id.values[s:].tolist()
        src, out, mlp = _reference_forward(model, tok, p, dec_ids)
        np.testing.assert_array_equal(rows.token_id.values[:s], src.numpy())
        np.testing.assert_array_equal(rows.position.values, np.r_[np.arange(s), np.arange(len(dec_ids))])
        for name, sl, states, attn, norm in (
                ("encoder", slice(0, s), out.encoder_hidden_states, out.encoder_attentions, enc_norm),
                ("decoder", slice(s, None), out.decoder_hidden_states, out.decoder_attentions, dec_norm)):
            n = len(states[0][0])
            hidden = torch.from_numpy(rows.hidden.values[sl])
            for d in range(L):
                torch.testing.assert_close(hidden[:, d], states[d][0], rtol=1e-5, atol=1e-5, msg=f"{name} depth {d}")
            # transformers' last entry is after the stack's final norm (T5, mBART); the store keeps it before
            last = hidden[:, L] if norm is None else norm(hidden[:, L])
            torch.testing.assert_close(last, states[L][0], rtol=1e-5, atol=1e-5)
            for layer in range(L):
                a = rows.attention.values[sl][:, layer]
                torch.testing.assert_close(torch.from_numpy(a[:, :, :n]), attn[layer][0].permute(1, 0, 2),
                                           rtol=1e-5, atol=1e-6)
                assert not a[:, :, n:].any()  # keys past the stack's sequence (padding of the key axis)
                torch.testing.assert_close(torch.from_numpy(rows.mlp.values[sl][:, layer]),
                                           mlp[(name[:3], layer)], rtol=1e-5, atol=1e-5)
        for layer in range(L):
            cross = rows.cross_attention.values[:, layer]
            expected = out.cross_attentions[layer][0].permute(1, 0, 2)
            torch.testing.assert_close(torch.from_numpy(cross[s:, :, :s]), expected, rtol=1e-5, atol=1e-6)
            assert not cross[:s].any() and not cross[:, :, s:].any()


def test_both_stacks_and_cross_attention_equal_transformers(family, forced, reference, tiny_model_dirs):
    model, tok = reference
    for run in forced.values():  # batched with padding, then each prompt alone
        _check_run_against_reference(run, model, tok)
        for p, target in enumerate(TARGETS):  # the decoder: start token, then the target text teacher-forced
            rows = run.ds.isel(token=run.token_slice(p))
            s = int(run.ds.n_source_tokens.values[p])
            expected = [model.config.decoder_start_token_id] + tok(text_target=target)["input_ids"]
            assert rows.token_id.values[s:].tolist() == expected
            assert not rows.is_generated.values.any()
    assert forced[4].attrs["model"]["encoder_decoder"] is True
    assert forced[4].attrs["capture"]["n_shards"] > 1 and (forced[4].ds.prompt_index.values == -1).any()
    assert not forced[4].ds.is_decoder.values[forced[4].ds.prompt_index.values == -1].any()
    tokens = forced[1].tokens(0)
    assert tokens["stack"].tolist() == ["encoder"] * int(forced[1].ds.n_source_tokens[0]) + \
        ["decoder"] * int(forced[1].ds.n_tokens[0] - forced[1].ds.n_source_tokens[0])
    assert forced[4].prompts["target"].tolist() == TARGETS  # the target column is kept as metadata too


def test_greedy_decoding_equals_model_generate(family, tiny_model_dirs, reference, tmp_path):
    model, tok = reference
    run = ss.capture(model=str(tiny_model_dirs[family]), prompts=PROMPTS, out=str(tmp_path / "g.zarr"),
                     generate=N_NEW, batch_size=4, device="cpu", progress=False)
    for p, text in enumerate(PROMPTS):
        src = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected = model.generate(src, do_sample=False, min_new_tokens=N_NEW, max_new_tokens=N_NEW,
                                      forced_bos_token_id=None, forced_eos_token_id=None, num_beams=1)[0]
        rows = run.ds.isel(token=run.token_slice(p))
        s = int(run.ds.n_source_tokens.values[p])
        assert rows.token_id.values[s:].tolist() == expected.tolist()
        np.testing.assert_array_equal(rows.is_generated.values, np.arange(len(rows.token_id)) >= s + 1)
    _check_run_against_reference(run, model, tok)  # the generated decoder text, captured teacher-forced


def test_decoder_lens_last_depth_equals_model_logits(family, forced, reference):
    from stratascope.analyze.readout import load_readout

    model, tok = reference
    run = forced[4]
    readout = load_readout(run)
    L = run.attrs["model"]["n_layers"]
    lens = run.lens(topk=3)
    for p in range(run.n_prompts):
        rows = run.ds.isel(token=run.token_slice(p))
        s = int(run.ds.n_source_tokens.values[p])
        dec_ids = rows.token_id.values[s:].tolist()
        _, out, _ = _reference_forward(model, tok, p, dec_ids)
        h = torch.from_numpy(rows.hidden.values[s:, L])
        logits = readout.logits(readout.normalize(h))
        torch.testing.assert_close(logits, out.logits[0], rtol=1e-4, atol=1e-4)
        got = lens.isel(token=run.token_slice(p))
        assert (got.target_id.values[:s] == -1).all()  # encoder rows: no lens, no target
        np.testing.assert_array_equal(got.target_id.values[s:], dec_ids[1:] + [-1])
        probs = torch.softmax(out.logits[0, :-1], -1)[torch.arange(len(dec_ids) - 1), dec_ids[1:]]
        np.testing.assert_allclose(got.target_prob.values[s:-1, -1], probs.numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(got.topk_ids.values[s:, -1, 0], out.logits[0].argmax(-1).numpy())


@pytest.fixture(scope="module")
def attributed(family, tiny_model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("s2s-attr") / "a.zarr"
    return ss.capture(model=str(tiny_model_dirs[family]), prompts=ROWS[:4], out=str(out), target_column="target",
                      capture=["hidden", "attention", "attribution"], attribution=ALL, ig_steps=STEPS, batch_size=3,
                      device="cpu", progress=False)


def _score(model, src_e, dec_e, r, token):
    logits = model(inputs_embeds=src_e, decoder_inputs_embeds=dec_e).logits[:, r]
    return torch.log_softmax(logits, -1)[:, token]


def test_attributions_equal_autograd(family, attributed, reference):
    model, _ = reference
    run = attributed
    emb_s, emb_d = model.get_encoder().embed_tokens, model.get_decoder().embed_tokens
    x, w = np.polynomial.legendre.leggauss(STEPS)
    alphas, weights = (x + 1) / 2, w / 2
    for p in range(run.n_prompts):
        rows = run.ds.isel(token=run.token_slice(p))
        s = int(run.ds.n_source_tokens.values[p])
        src = torch.tensor(rows.token_id.values[:s])[None]
        dec = torch.tensor(rows.token_id.values[s:])[None]
        n = dec.shape[1]
        assert np.isnan(rows.attribution_grad_x_input.values[:s]).all()  # encoder rows are no targets
        assert np.isnan(rows.attribution_grad_x_input.values[-1]).all()  # nor the decoder's last token
        S, D = emb_s(src).detach(), emb_d(dec).detach()
        for r in range(n - 1):
            token = int(dec[0, r + 1])
            es, ed = S.clone().requires_grad_(True), D[:, :r + 1].clone().requires_grad_(True)
            gs, gd = torch.autograd.grad(_score(model, es, ed, r, token).sum(), (es, ed))
            row = s + r
            gxi = ((gs * S)[0].norm(dim=-1), (gd * D[:, :r + 1])[0].norm(dim=-1))
            for name, src_part, dec_part in (("gradient_norm", gs[0].norm(dim=-1), gd[0].norm(dim=-1)),
                                             ("grad_x_input", *gxi)):
                np.testing.assert_allclose(rows[f"attribution_{name}_source"].values[row, :s], src_part.numpy(),
                                           rtol=1e-4, atol=1e-6)
                prefix = rows[f"attribution_{name}"].values[row]
                np.testing.assert_allclose(prefix[:r + 1], dec_part.numpy(), rtol=1e-4, atol=1e-6)
                assert (prefix[r + 1:] == 0).all()
            ig_s, ig_d = torch.zeros_like(S), torch.zeros_like(D[:, :r + 1])
            for a, wt in zip(alphas, weights):
                es = (float(a) * S).requires_grad_(True)
                ed = (float(a) * D[:, :r + 1]).requires_grad_(True)
                g1, g2 = torch.autograd.grad(_score(model, es, ed, r, token).sum(), (es, ed))
                ig_s, ig_d = ig_s + float(wt) * g1, ig_d + float(wt) * g2
            ig_s, ig_d = ig_s * S, ig_d * D[:, :r + 1]
            np.testing.assert_allclose(rows.attribution_integrated_gradients_source.values[row, :s],
                                       ig_s[0].norm(dim=-1).detach().numpy(), rtol=1e-3, atol=1e-6)
            np.testing.assert_allclose(rows.attribution_integrated_gradients.values[row, :r + 1],
                                       ig_d[0].norm(dim=-1).detach().numpy(), rtol=1e-3, atol=1e-6)
            with torch.no_grad():
                gap = (ig_s.sum() + ig_d.sum()) - (_score(model, S, D[:, :r + 1], r, token)
                                                   - _score(model, 0 * S, 0 * D[:, :r + 1], r, token))
            np.testing.assert_allclose(rows.attribution_integrated_gradients_delta.values[row], float(gap),
                                       rtol=1e-3, atol=1e-5)


def test_encoder_decoder_options_are_checked(tiny_model_dirs, tmp_path):
    t5 = str(tiny_model_dirs["t5"])
    with pytest.raises(ConfigError, match="--target-column COLUMN .* or --generate N"):
        ss.capture(model=t5, prompts=PROMPTS, out=str(tmp_path / "a.zarr"), progress=False)
    with pytest.raises(ConfigError, match="--capture qk is not available for encoder-decoder"):
        ss.capture(model=t5, prompts=ROWS, out=str(tmp_path / "b.zarr"), target_column="target",
                   capture=["qk"], progress=False)
    with pytest.raises(ConfigError, match="not an encoder-decoder model"):
        ss.capture(model=str(tiny_model_dirs["llama"]), prompts=ROWS, out=str(tmp_path / "c.zarr"),
                   target_column="target", progress=False)
    assert not any((tmp_path / n).exists() for n in ("a.zarr", "b.zarr", "c.zarr"))


def test_run_attention_by_stack(family, forced, reference):
    model, tok = reference
    run = forced[4]
    p, layer, head = 1, 2, 3
    s = int(run.ds.n_source_tokens.values[p])
    dec_ids = run.ds.token_id.values[run.token_slice(p)][s:].tolist()
    src, out, _ = _reference_forward(model, tok, p, dec_ids)
    for stack, expected in (("encoder", out.encoder_attentions), ("decoder", out.decoder_attentions),
                            ("cross", out.cross_attentions)):
        frame = run.attention(prompt=p, layer=layer, head=head, stack=stack)
        np.testing.assert_allclose(frame.values, expected[layer][0, head].numpy(), rtol=1e-5, atol=1e-6)
        queries = len(src) if stack == "encoder" else len(dec_ids)
        keys = len(dec_ids) if stack == "decoder" else len(src)
        assert frame.shape == (queries, keys)
    assert run.attention(p, layer, head, "cross").columns[0].startswith("0: ")
    with pytest.raises(ConfigError, match="stack='encoder', 'decoder' or 'cross'"):
        run.attention(prompt=p, layer=layer, head=head)


def test_run_attributions_over_source_and_prefix(family, attributed):
    run = attributed
    frame = run.attributions(0, "grad_x_input")
    s = int(run.ds.n_source_tokens.values[0])
    rows = run.ds.isel(token=run.token_slice(0))
    n_dec = len(rows.token_id) - s
    assert list(frame.columns.get_level_values("stack")) == ["source"] * s + ["target"] * (n_dec - 1)
    assert frame.index.get_level_values("position").tolist() == list(range(1, n_dec))
    np.testing.assert_allclose(frame.sum(axis=1), 1.0)
    raw = run.attributions(0, "grad_x_input", normalize=False)
    r = 2  # the prediction of decoder token 3, made at decoder row 2
    np.testing.assert_allclose(raw.iloc[r, :s], rows.attribution_grad_x_input_source.values[s + r, :s])
    np.testing.assert_allclose(raw.iloc[r, s:], rows.attribution_grad_x_input.values[s + r, :n_dec - 1])
    assert "completeness_gap" in run.attributions(0, "integrated_gradients").attrs
    assert "source" in run.attrs["gradients"]["target_row"] and run.attrs["gradients"]["targets"] == "all"


def test_viewer_payloads_by_stack(family, attributed, reference):
    """The head/model views' payload per stack, the saliency over source + prefix and the decoder-only lens,
    against the stored arrays read with zarr directly."""
    import zarr

    from stratascope.viewer import data, registry

    run = attributed
    root = zarr.open_group(run.path, mode="r")
    p, layer = 1, 1
    lo, n = int(root["token_offset"][p]), int(root["n_tokens"][p])
    s = int(root["n_source_tokens"][p])
    att, cross = root["attention"][lo:lo + n, layer], root["cross_attention"][lo:lo + n, layer]
    for stack, weights in (("encoder", att[:s, :, :s]), ("decoder", att[s:, :, :n - s]), ("cross", cross[s:, :, :s])):
        d = data.attention_stack(run, p, layer, stack)
        assert (d["n"], d["nk"]) == weights.shape[::2]
        for h, head in enumerate(d["heads"]):
            assert len(head["q"]) == int((weights[:, h] >= data.MIN_WEIGHT).sum())
            np.testing.assert_allclose(head["w"], weights[head["q"], h, head["k"]], atol=1e-3)
    assert data.attention_stack(run, p, layer, "cross")["key_tokens"] == list(root["token_str"][lo:lo + s])
    assert registry.meta(run)["stacks"] == ["encoder", "decoder", "cross"]
    sal = data.saliency(run, p, "grad_x_input")
    assert sal["targets"] == list(range(s + 1, n))  # every decoder token after the start token
    t = s + 2  # decoder token 2: shaded over the source and decoder tokens 0, 1
    row = np.r_[root["attribution_grad_x_input_source"][lo + t - 1, :s],
                root["attribution_grad_x_input"][lo + t - 1, :2]]
    np.testing.assert_allclose(sal["rows"][t - 1], row / row.sum(), atol=1e-4)
    run.lens(topk=3)
    lens = data.lens(run, p)
    assert lens["n"] == n - s and lens["tokens"] == list(root["token_str"][lo + s:lo + n])


def test_cli_capture_lens_report_info(tiny_model_dirs, tmp_path):
    import json

    from click.testing import CliRunner

    from stratascope.cli import cli

    corpus = tmp_path / "reviews.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3]))
    out = tmp_path / "bart.zarr"
    runner = CliRunner()
    res = runner.invoke(cli, ["capture", "--model", str(tiny_model_dirs["bart"]), "--corpus", str(corpus), "--out",
                              str(out), "--capture", "hidden,attention,mlp,attribution", "--generate", "3"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["lens", str(out)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["report", str(out), "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 0, res.output
    html = (tmp_path / "r.html").read_text()
    assert all(f"attention_stack?layer=0\\u0026prompt=0\\u0026stack={s}" in html.replace("&", "\\u0026")
               for s in ("encoder", "decoder", "cross"))
    res = runner.invoke(cli, ["info", str(out)])
    assert res.exit_code == 0 and "cross_attention" in res.output, res.output
    run = ss.open_run(str(out))
    source = int(run.ds.n_source_tokens.sum())
    assert f"{run.n_tokens - int((run.ds.prompt_index < 0).sum())} tokens ({source} source (encoder), " in res.output
    res = runner.invoke(cli, ["capture", "--model", str(tiny_model_dirs["bart"]), "--corpus", str(corpus), "--out",
                              str(tmp_path / "x.zarr"), "--target-column", "missing"])
    assert res.exit_code == 1 and "--target-column missing" in res.output and not (tmp_path / "x.zarr").exists()
    run = ss.open_run(str(out))
    assert run.attrs["generation"]["n_new"] == 3
    assert run.generated_text(0) != ""


def test_analyses_that_mix_rows_refuse_encoder_decoder_runs(forced):
    from stratascope.errors import UnsupportedModelError

    run = forced[1]
    for call in (lambda: run.heads(), lambda: run.nmf(factors=2), lambda: run.similarity(),
                 lambda: run.linear_probe("tag")):
        with pytest.raises(UnsupportedModelError, match="encoder-decoder model whose rows come from two stacks"):
            call()
    assert "analysis" not in __import__("zarr").open_group(run.path, mode="r")


@pytest.fixture(scope="module")
def other_family_dirs(tmp_path_factory):
    """Tiny random mBART (pre-norm, final norms), Marian (sinusoidal positions, no final norm) and mT5."""
    import transformers as tf

    from conftest import _seq2seq_tokenizer

    tok = _seq2seq_tokenizer()
    bart = dict(vocab_size=len(tok), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                pad_token_id=0, eos_token_id=1, bos_token_id=2, decoder_start_token_id=1, forced_eos_token_id=None)
    models = {"mbart": tf.MBartForConditionalGeneration(tf.MBartConfig(**bart)),
              "marian": tf.MarianMTModel(tf.MarianConfig(**bart)),
              "mt5": tf.MT5ForConditionalGeneration(tf.MT5Config(
                  vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))}
    dirs = {}
    for name, model in models.items():
        torch.manual_seed(0)
        if hasattr(model, "final_logits_bias"):
            model.final_logits_bias.normal_(0, 0.5)
        dirs[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(dirs[name])
        tok.save_pretrained(dirs[name])
    return dirs


@pytest.mark.parametrize("name", ["mbart", "marian", "mt5"])
def test_other_checkpoint_structures(name, other_family_dirs, tmp_path):
    from stratascope.analyze.readout import load_readout

    run = ss.capture(model=str(other_family_dirs[name]), prompts=ROWS[:3], out=str(tmp_path / "r.zarr"),
                     target_column="target", capture=["hidden", "attention"], batch_size=3, progress=False)
    model, tok = load_reference(other_family_dirs[name])
    readout, L = load_readout(run), run.attrs["model"]["n_layers"]
    for p in range(run.n_prompts):
        rows = run.ds.isel(token=run.token_slice(p))
        s = int(run.ds.n_source_tokens.values[p])
        _, out, _ = _reference_forward(model, tok, p, rows.token_id.values[s:].tolist())
        for layer in range(L):
            torch.testing.assert_close(torch.from_numpy(rows.cross_attention.values[s:, layer, :, :s]),
                                       out.cross_attentions[layer][0].permute(1, 0, 2), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(torch.from_numpy(rows.hidden.values[:s, layer]),
                                       out.encoder_hidden_states[layer][0], rtol=1e-5, atol=1e-5)
        logits = readout.logits(readout.normalize(torch.from_numpy(rows.hidden.values[s:, L])))
        torch.testing.assert_close(logits, out.logits[0], rtol=1e-4, atol=1e-4)


def test_sampling_is_seeded_per_prompt_and_resume_redoes_a_shard(tiny_model_dirs, tmp_path):
    """Sampled decoder tokens depend on (seed, prompt) only, not on the batch; a shard marked unfinished
    is redone by --resume to the same bytes."""
    import zarr

    model = str(tiny_model_dirs["bart"])
    opts = dict(generate=N_NEW, sample=True, seed=3, temperature=1.5, capture=["hidden", "attention"],
                device="cpu", progress=False)
    a = ss.capture(model=model, prompts=PROMPTS, out=str(tmp_path / "a.zarr"), batch_size=4, shard_tokens=48, **opts)
    b = ss.capture(model=model, prompts=PROMPTS, out=str(tmp_path / "b.zarr"), batch_size=1, **opts)
    for p in range(len(PROMPTS)):
        assert a.ds.token_id.values[a.token_slice(p)].tolist() == b.ds.token_id.values[b.token_slice(p)].tolist()
    greedy = ss.capture(model=model, prompts=PROMPTS, out=str(tmp_path / "g.zarr"), **{**opts, "sample": False})
    assert greedy.ds.token_id.values.tolist() != b.ds.token_id.values.tolist()
    plan = ss.capture(model=model, prompts=PROMPTS, out=str(tmp_path / "plan.zarr"), batch_size=4, shard_tokens=48,
                      dry_run=True, **opts)
    assert len(plan.shards) > 2
    rows = slice(plan.shards[1].start, plan.shards[1].stop)
    root = zarr.open_group(a.path, mode="r+")
    names = ("hidden", "attention", "cross_attention", "token_id", "is_decoder")
    before = {n: root[n][:] for n in names}
    root["shard_complete"][1] = False
    for n in names:
        root[n][rows] = 0
    root.attrs["complete"] = False
    ss.capture(model=model, prompts=PROMPTS, out=a.path, batch_size=4, shard_tokens=48, resume=True, **opts)
    root = zarr.open_group(a.path, mode="r")
    assert root["shard_complete"][:].all() and root.attrs["complete"]
    for n, values in before.items():
        np.testing.assert_array_equal(root[n][:], values)


def test_each_stack_is_cut_to_max_length(tiny_model_dirs, tmp_path):
    run = ss.capture(model=str(tiny_model_dirs["t5"]), prompts=ROWS, out=str(tmp_path / "m.zarr"),
                     target_column="target", capture=["hidden"], max_length=5, progress=False)
    model, tok = load_reference(tiny_model_dirs["t5"])
    cut = 0
    for p, row in enumerate(ROWS):
        src, tgt = tok(row["text"])["input_ids"], tok(text_target=row["target"])["input_ids"]
        rows = run.ds.isel(token=run.token_slice(p))
        s = int(run.ds.n_source_tokens.values[p])
        assert rows.token_id.values[:s].tolist() == src[:5]
        assert rows.token_id.values[s:].tolist() == [0] + tgt[:4]
        cut += len(src) > 5 or len(tgt) > 4
    assert run.attrs["capture"]["truncated_prompts"] == cut > 0


def test_per_prompt_lens_calls_count_positions_in_the_decoder(forced, reference):
    model, tok = reference
    run = forced[4]
    p = 2
    s = int(run.ds.n_source_tokens.values[p])
    dec_ids = run.ds.token_id.values[run.token_slice(p)][s:].tolist()
    _, out, _ = _reference_forward(model, tok, p, dec_ids)
    top = run.layer_predictions(prompt=p, position=1, topk=3)
    assert top.token_id.tolist() == out.logits[0, 1].topk(3).indices.tolist()
    ranks = run.rankings(prompt=p)
    assert ranks.shape[1] == len(dec_ids) - 1  # a column per decoder token that came next
    final = (out.logits[0, :-1] > out.logits[0, :-1].gather(1, torch.tensor(dec_ids[1:])[:, None])).sum(1) + 1
    assert ranks.iloc[-1].tolist() == final.tolist()
