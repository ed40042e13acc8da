"""Generation in the capture equals transformers' own generate, prompt by prompt; sampling is reproducible."""

import numpy as np
import pytest
import torch

import stratascope as ss
from conftest import PROMPTS, load_reference
from stratascope.errors import ConfigError, UnsupportedModelError

N_NEW = 5


def _reference_greedy(model, tok, text, n):
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():  # eos_token_id=None: never stop early, as the capture does
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             eos_token_id=None, pad_token_id=0)
    return ids[0].tolist(), out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_greedy_equals_hf_generate_per_prompt(family, tiny_model_dirs, tmp_path):
    # batch_size 4 over prompts of different lengths: the batched, left-padded path is exercised
    run = ss.capture(model=str(tiny_model_dirs[family]), prompts=PROMPTS, out=str(tmp_path / "g.zarr"),
                     generate=N_NEW, capture=["hidden"], batch_size=4, device="cpu", progress=False)
    model, tok = load_reference(tiny_model_dirs[family])
    L = model.config.num_hidden_layers
    for p, text in enumerate(PROMPTS):
        prompt, generated = _reference_greedy(model, tok, text, N_NEW)
        rows = run.ds.isel(token=run.token_slice(p))
        np.testing.assert_array_equal(rows.token_id.values, prompt + generated)
        np.testing.assert_array_equal(rows.is_generated.values, [False] * len(prompt) + [True] * N_NEW)
        np.testing.assert_array_equal(rows.position.values, np.arange(len(prompt) + N_NEW))
        with torch.no_grad():  # generated tokens are captured like prompt tokens
            hs = model(input_ids=torch.tensor([prompt + generated]), output_hidden_states=True).hidden_states
        for d in range(L):
            np.testing.assert_allclose(rows.hidden.values[:, d], hs[d][0].numpy(), atol=1e-5, rtol=1e-4)
        assert run.generated_text(p) == tok.decode(generated)
    assert int(run.ds.n_tokens.values.sum()) == run.n_tokens
    assert run.attrs["generation"]["n_new"] == N_NEW and run.attrs["generation"]["strategy"] == "greedy"


def _sampled(tiny_model_dirs, out, seed, batch_size, temperature=1.0):
    run = ss.capture(model=str(tiny_model_dirs["llama"]), prompts=PROMPTS, out=str(out), generate=N_NEW, sample=True,
                     seed=seed, temperature=temperature, capture=["mlp"], batch_size=batch_size, device="cpu",
                     progress=False)
    gen = run.ds.is_generated.values
    return run.ds.token_id.values[gen].reshape(len(PROMPTS), N_NEW)


def test_sampling_is_reproducible(tiny_model_dirs, tmp_path):
    first = _sampled(tiny_model_dirs, tmp_path / "a.zarr", seed=7, batch_size=4)
    again = _sampled(tiny_model_dirs, tmp_path / "b.zarr", seed=7, batch_size=4)
    np.testing.assert_array_equal(first, again)
    # each prompt has its own generator: the batch it shares does not change its tokens
    np.testing.assert_array_equal(first, _sampled(tiny_model_dirs, tmp_path / "c.zarr", seed=7, batch_size=1))
    other = _sampled(tiny_model_dirs, tmp_path / "d.zarr", seed=8, batch_size=4)
    assert (first != other).any()
    run = ss.open_run(str(tmp_path / "a.zarr"))
    assert run.attrs["generation"]["strategy"] == "sample" and run.attrs["generation"]["seed"] == 7


def test_low_temperature_sampling_is_greedy(tiny_model_dirs, tmp_path):
    cold = _sampled(tiny_model_dirs, tmp_path / "cold.zarr", seed=1, batch_size=4, temperature=1e-4)
    model, tok = load_reference(tiny_model_dirs["llama"])
    greedy = [_reference_greedy(model, tok, text, N_NEW)[1] for text in PROMPTS]
    np.testing.assert_array_equal(cold, greedy)


def test_generation_errors(tiny_model_dirs, tmp_path):
    with pytest.raises(UnsupportedModelError, match="--generate needs a causal language model"):
        ss.capture(model=str(tiny_model_dirs["bert"]), prompts=PROMPTS[:2], out=str(tmp_path / "b.zarr"),
                   generate=2, capture=["hidden"], device="cpu", progress=False)
    with pytest.raises(ConfigError, match="--temperature"):
        ss.capture(model=str(tiny_model_dirs["gpt2"]), prompts=PROMPTS[:2], out=str(tmp_path / "t.zarr"),
                   generate=2, sample=True, temperature=0, device="cpu", progress=False)
    with pytest.raises(ConfigError, match="--generate"):
        ss.capture(model=str(tiny_model_dirs["gpt2"]), prompts=PROMPTS[:2], out=str(tmp_path / "n.zarr"),
                   generate=-1, device="cpu", progress=False)
    with pytest.raises(ConfigError, match="no room for the prompt"):
        ss.capture(model=str(tiny_model_dirs["gpt2"]), prompts=PROMPTS[:2], out=str(tmp_path / "m.zarr"),
                   generate=8, max_length=8, device="cpu", progress=False)


@pytest.mark.real
def test_smollm2_generation_and_attributions(tmp_path):
    from stratascope.models import load_model

    text = "Heathrow airport is located in"
    run = ss.capture(model="smollm2", prompts=[text], generate=5, capture=["hidden", "attribution"],
                     attribution="grad_x_input,integrated_gradients,gradient_norm", ig_steps=4,
                     out=str(tmp_path / "g.zarr"), device="cpu", progress=False)
    loaded = load_model("smollm2", device="cpu")
    prompt, generated = _reference_greedy(loaded.model, loaded.tokenizer, text, 5)
    rows = run.ds.isel(token=run.token_slice(0))
    np.testing.assert_array_equal(rows.token_id.values, prompt + generated)
    assert run.generated_text(0) == loaded.tokenizer.decode(generated)
    for method in ("grad_x_input", "integrated_gradients", "gradient_norm"):
        raw = run.attributions(0, method, normalize=False)
        frame = run.attributions(0, method)
        assert frame.shape == (5, len(prompt) + 4)
        assert np.isfinite(raw.values).all() and (raw.values >= 0).all()
        assert (raw.values.sum(axis=1) > 0).all()
        np.testing.assert_allclose(frame.sum(axis=1).values, 1.0, rtol=1e-6)
