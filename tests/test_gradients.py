"""Stored attributions and hidden-state gradients equal direct autograd, Captum and HF computations."""

import numpy as np
import pytest
import torch

import stratascope as ss
from conftest import PROMPTS, load_reference
from stratascope.errors import ConfigError, MissingArrayError, UnsupportedModelError

N_NEW = 3
STEPS = 16
ALL = "grad_x_input,integrated_gradients,gradient_norm"


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def captured(request, tiny_model_dirs, tmp_path_factory):
    family = request.param
    out = tmp_path_factory.mktemp("grad") / f"{family}.zarr"
    run = ss.capture(model=str(tiny_model_dirs[family]), prompts=PROMPTS[:4], out=str(out), generate=N_NEW,
                     capture=["hidden", "attribution", "grad"], attribution=ALL, ig_steps=STEPS, batch_size=3,
                     device="cpu", progress=False)
    model, _ = load_reference(tiny_model_dirs[family])
    return family, run, model


def _score(model, embeds, r, token):
    """log p(token | x[:r+1]) from the full sequence's embeddings (batch of 1 or more)."""
    logits = model(inputs_embeds=embeds).logits[:, r]
    return torch.log_softmax(logits, dim=-1)[:, token]


def _sequence(run, p):
    rows = run.ds.isel(token=run.token_slice(p))
    return rows, torch.tensor(rows.token_id.values, dtype=torch.long)


def test_targets_are_the_positions_predicting_generated_tokens(captured):
    _, run, _ = captured
    for p in range(run.n_prompts):
        rows, ids = _sequence(run, p)
        n = len(ids)
        is_target = ~np.isnan(rows.attribution_grad_x_input.values[:, 0])
        expected = np.zeros(n, dtype=bool)
        expected[n - N_NEW - 1:n - 1] = True  # generated token t is predicted at t-1
        np.testing.assert_array_equal(is_target, expected)
        np.testing.assert_array_equal(rows.is_generated.values, np.arange(n) >= n - N_NEW)
        assert np.isnan(rows.attribution_integrated_gradients_delta.values[~expected]).all()


def test_gradient_methods_equal_direct_autograd(captured):
    _, run, model = captured
    emb = model.get_input_embeddings()
    for p in range(run.n_prompts):
        rows, ids = _sequence(run, p)
        n = len(ids)
        E = emb(ids).detach()
        for r in range(n - N_NEW - 1, n - 1):
            x = E[None].clone().requires_grad_(True)
            (g,) = torch.autograd.grad(_score(model, x, r, ids[r + 1]).sum(), x)
            g = g[0]
            norm = rows.attribution_gradient_norm.values[r]
            gxi = rows.attribution_grad_x_input.values[r]
            np.testing.assert_allclose(norm[:n], g.norm(dim=-1).numpy(), rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(gxi[:n], (g * E).norm(dim=-1).numpy(), rtol=1e-4, atol=1e-6)
            assert not norm[r + 1:].any() and not gxi[r + 1:].any()  # causal: later keys are 0


def test_integrated_gradients_equal_captum(captured):
    from captum.attr import IntegratedGradients

    _, run, model = captured
    emb = model.get_input_embeddings()
    for p in range(run.n_prompts):
        rows, ids = _sequence(run, p)
        n = len(ids)
        E = emb(ids).detach()[None]
        for r in (n - N_NEW - 1, n - 2):
            ig = IntegratedGradients(lambda x, r=r, ids=ids: _score(model, x, r, ids[r + 1]))
            attr, delta = ig.attribute(E, baselines=torch.zeros_like(E), n_steps=STEPS, method="gausslegendre",
                                       return_convergence_delta=True)
            stored = rows.attribution_integrated_gradients.values[r]
            np.testing.assert_allclose(stored[:n], attr[0].norm(dim=-1).detach().numpy(), rtol=1e-3, atol=1e-5)
            np.testing.assert_allclose(rows.attribution_integrated_gradients_delta.values[r], delta.item(),
                                       rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("method,steps", [("gausslegendre", (2, 16)), ("riemann_trapezoid", (2, 8, 64))])
def test_integrated_gradients_gap_shrinks_with_steps(tiny_model_dirs, tmp_path, method, steps):
    # gpt2: a smooth path. (The tiny llama's RMSNorm, eps 1e-6 on embeddings of norm ~0.02, makes the
    # integrand very steep near the zero baseline: its gap only falls at ~500 steps.)
    gaps = []
    for n in steps:
        run = ss.capture(model=str(tiny_model_dirs["gpt2"]), prompts=PROMPTS[:3], out=str(tmp_path / f"{n}.zarr"),
                         capture=["attribution"], attribution="integrated_gradients", ig_steps=n, ig_method=method,
                         attribute="all", device="cpu", progress=False)
        assert run.attrs["gradients"]["ig_method"] == method
        gaps.append(np.nanmean(np.abs(run.ds.attribution_integrated_gradients_delta.values)))
    assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] < 0.01 * gaps[0], gaps


def test_grad_hidden_equals_autograd_through_hidden_states(captured):
    family, run, model = captured
    L = model.config.num_hidden_layers
    final_norm = model.model.norm if family == "llama" else model.transformer.ln_f
    grabbed = {}
    handle = final_norm.register_forward_pre_hook(lambda mod, args: grabbed.__setitem__("x", args[0]))
    try:
        for p in range(run.n_prompts):
            rows, ids = _sequence(run, p)
            out = model(input_ids=ids[None], output_hidden_states=True)
            ll = torch.log_softmax(out.logits[0, :-1], dim=-1).gather(1, ids[1:, None]).sum()
            grads = torch.autograd.grad(ll, list(out.hidden_states[:L]) + [grabbed["x"]])
            stored = rows.grad_hidden.values  # token, depth, d_model
            for d in range(L + 1):
                np.testing.assert_allclose(stored[:, d], grads[d][0].numpy(), rtol=1e-4, atol=1e-6)
    finally:
        handle.remove()


def test_attributions_frame_and_normalization(captured):
    _, run, _ = captured
    frame = run.attributions(1, "grad_x_input")
    raw = run.attributions(1, "grad_x_input", normalize=False)
    rows, ids = _sequence(run, 1)
    n = len(ids)
    assert list(frame.index.get_level_values("position")) == list(range(n - N_NEW, n))
    assert frame.shape == (N_NEW, n - 1)
    np.testing.assert_allclose(frame.sum(axis=1).values, 1.0, rtol=1e-6)
    np.testing.assert_allclose(raw.values, rows.attribution_grad_x_input.values[n - N_NEW - 1:n - 1, :n - 1], rtol=1e-6)
    assert "completeness_gap" in run.attributions(1, "integrated_gradients").attrs
    with pytest.raises(ConfigError, match="choose from"):
        run.attributions(0, "saliency")


def test_missing_method_names_the_flag(tiny_model_dirs, tmp_path):
    run = ss.capture(model=str(tiny_model_dirs["gpt2"]), prompts=PROMPTS[:2], out=str(tmp_path / "a.zarr"),
                     capture=["attribution"], attribute="all", device="cpu", progress=False)
    assert run.ds.attribution_grad_x_input.shape[0] == run.n_tokens
    with pytest.raises(MissingArrayError, match="--attribution gradient_norm"):
        run.attributions(0, "gradient_norm")


def test_attribution_on_an_encoder_is_refused(tiny_model_dirs, tmp_path):
    out = tmp_path / "bert.zarr"
    with pytest.raises(UnsupportedModelError, match="causal language model with an LM head"):
        ss.capture(model=str(tiny_model_dirs["bert"]), prompts=PROMPTS[:2], out=str(out),
                   capture=["hidden", "attribution"], attribute="all", device="cpu", progress=False)
    assert not out.exists()


def test_attribute_generated_needs_generate(tiny_model_dirs, tmp_path):
    with pytest.raises(ConfigError, match="--generate N"):
        ss.capture(model=str(tiny_model_dirs["gpt2"]), prompts=PROMPTS[:2], out=str(tmp_path / "g.zarr"),
                   capture=["attribution"], attribute="generated", device="cpu", progress=False)
    with pytest.raises(ConfigError, match="--attribution"):
        ss.capture(model=str(tiny_model_dirs["gpt2"]), prompts=PROMPTS[:2], out=str(tmp_path / "g.zarr"),
                   capture=["attribution"], attribution="saliency", device="cpu", progress=False)


def test_cli_flags(tiny_model_dirs, tmp_path):
    from click.testing import CliRunner

    from stratascope.cli import cli

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(PROMPTS[:2]) + "\n")
    out = tmp_path / "cli.zarr"
    result = CliRunner().invoke(cli, ["capture", "--model", str(tiny_model_dirs["llama"]), "--corpus", str(corpus),
                                      "--out", str(out), "--device", "cpu", "--generate", "2", "--capture",
                                      "hidden,attribution", "--attribution", "gradient_norm", "--ig-steps", "4"])
    assert result.exit_code == 0, result.output
    run = ss.open_run(str(out))
    assert run.attrs["generation"]["n_new"] == 2 and run.attrs["gradients"]["targets"] == "generated"
    assert run.attributions(0, "gradient_norm").shape[0] == 2
    bad = CliRunner().invoke(cli, ["capture", "--model", str(tiny_model_dirs["llama"]), "--corpus", str(corpus),
                                   "--out", str(tmp_path / "bad.zarr"), "--capture", "attribution",
                                   "--attribute", "generated"])
    assert bad.exit_code == 1 and "--generate N" in bad.output
