"""models/: capabilities read from the module tree, norms described by what they compute, and the
queries/keys recording registered for the captured model only (the process-wide attention functions,
and every other model, untouched), each checked against transformers itself."""

import importlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import stratascope as ss
from conftest import FAMILIES, PROMPTS, load_reference
from stratascope.capture.hooks import Recorder
from stratascope.errors import UnsupportedModelError
from stratascope.models import find_adapter, load_model, norm_spec
from stratascope.models.attention import IMPLEMENTATION

MODELING = {"gpt2": "gpt2", "llama": "llama", "gpt_neox": "gpt_neox", "bert": "bert"}


def _attention_functions() -> dict:
    """Everything a model of any family may call for attention, by identity."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    found = {f"attention[{k}]": ALL_ATTENTION_FUNCTIONS.get(k) for k in ("eager", "sdpa", "flex_attention")}
    found |= {f"mask[{k}]": ALL_MASK_ATTENTION_FUNCTIONS.get(k) for k in ("eager", "sdpa")}
    found["attention local"] = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    for name in MODELING.values():
        module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        found[f"{name}.eager_attention_forward"] = module.eager_attention_forward
    return found


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] is b[k] or (isinstance(a[k], dict) and a[k] == b[k]) for k in a)


@pytest.mark.parametrize("family", FAMILIES)
def test_capabilities_follow_the_config(tiny_model_dirs, family):
    model, _ = load_reference(tiny_model_dirs[family])
    a = find_adapter(model)
    c = model.config
    assert a.has_token_types == (family == "bert")
    assert a.causal == (family != "bert")
    assert a.rotary == (family in ("llama", "gpt_neox"))
    assert a.kv_heads == getattr(c, "num_key_value_heads", c.num_attention_heads)
    assert a.norm_kind == {"gpt2": "layernorm", "gpt_neox": "layernorm", "llama": "rmsnorm", "bert": None}[family]
    assert a.attention_scale(0) == pytest.approx((c.hidden_size // c.num_attention_heads) ** -0.5)


def _check_norm(norm, kind: str, offset: float):
    spec = norm_spec(norm)
    assert (spec["type"], spec["weight_offset"]) == (kind, offset)
    x = torch.randn(5, norm.weight.numel(), generator=torch.Generator().manual_seed(0)) * 3 + 1
    if kind == "layernorm":
        x_ = x - x.mean(-1, keepdim=True)
    else:
        x_ = x
    by_hand = x_ / torch.sqrt(x_.pow(2).mean(-1, keepdim=True) + spec["eps"]) * (spec["weight"] + offset)
    if spec["bias"] is not None:
        by_hand = by_hand + spec["bias"]
    with torch.no_grad():
        torch.testing.assert_close(by_hand, norm(x), rtol=1e-5, atol=1e-5)


def test_norms_are_described_by_what_they_compute():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(1)
    layer = torch.nn.LayerNorm(12, eps=1e-4)
    llama, gemma = LlamaRMSNorm(12, eps=1e-6), GemmaRMSNorm(12, eps=1e-6)
    with torch.no_grad():
        for norm in (layer, llama, gemma):
            norm.weight.copy_(torch.randn(12, generator=g))
        layer.bias.copy_(torch.randn(12, generator=g))
    _check_norm(layer, "layernorm", 0.0)
    _check_norm(llama, "rmsnorm", 0.0)
    _check_norm(gemma, "rmsnorm", 1.0)  # Gemma scales by 1 + weight

    class Tanh(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(12))

        def forward(self, x):
            return torch.tanh(x) * self.weight

    with pytest.raises(UnsupportedModelError, match="neither a LayerNorm nor an RMSNorm"):
        norm_spec(Tanh())


def test_no_family_names_tested_outside_models():
    """Capture, analysis and viewer ask the adapter's capabilities, never a family string."""
    root = Path(ss.__file__).parent
    offenders = [f"{p.relative_to(root)}:{i}" for p in root.rglob("*.py") if "models" not in p.parts
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if re.search(r"family\s*[!=]=|type\([^)]*\)\.__name__\s*(==|!=|\.startswith|\.endswith)"
                              r"|in type\([^)]*\)\.__name__", line)]
    assert not offenders, offenders


@pytest.mark.parametrize("family", FAMILIES)
def test_qk_recording_is_registered_for_the_captured_model_only(tiny_model_dirs, family):
    """While q/k are recorded, the registry's eager/sdpa entries and the modeling modules' eager
    functions are the same objects as before, another model of the family computes exactly as a
    plain transformers eager forward and is not recorded, and the captured attention equals it too."""
    path = tiny_model_dirs[family]
    loaded = load_model(str(path), device="cpu", attn="eager")
    adapter = find_adapter(loaded.model)
    other, tok = load_reference(path)  # an independent eager model with the same weights
    base = getattr(loaded.model, loaded.model.base_model_prefix, loaded.model)
    short, long = tok(PROMPTS[2], return_tensors="pt"), tok(PROMPTS[1], return_tensors="pt")
    before = _attention_functions()
    with torch.no_grad():
        ref_short = other(**short, output_attentions=True).attentions
        ref_long = other(**long, output_attentions=True).attentions
        layers = list(range(adapter.n_layers))
        with Recorder(adapter, ("attention", "qk"), layers, [0]) as rec:
            assert loaded.model.config._attn_implementation == IMPLEMENTATION
            assert other.config._attn_implementation == "eager"
            assert _same(_attention_functions(), before)
            base(**short)
            during = other(**long, output_attentions=True).attentions  # must not reach the recorder
            stacked = rec.stacked()
    assert loaded.model.config._attn_implementation == "eager"
    assert _same(_attention_functions(), before)
    n = short["input_ids"].shape[1]
    assert stacked["queries"].shape[1] == n and stacked["attention"].shape[1] == n
    for layer in layers:
        torch.testing.assert_close(during[layer], ref_long[layer], rtol=0, atol=0)
        torch.testing.assert_close(stacked["attention"][0, :, layer].transpose(0, 1), ref_short[layer][0],
                                   rtol=1e-6, atol=1e-6)


def test_capture_leaves_the_attention_functions_alone(tiny_model_dirs, tmp_path):
    """A whole qk capture (also one that fails mid-way) leaves the process-wide functions as they were."""
    before = _attention_functions()
    run = ss.capture(model=str(tiny_model_dirs["llama"]), prompts=PROMPTS, out=str(tmp_path / "qk.zarr"),
                     capture="attention,qk", device="cpu", progress=False)
    assert _same(_attention_functions(), before)
    ref, tok = load_reference(tiny_model_dirs["llama"])
    ids = tok(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        att = ref(**ids, output_attentions=True).attentions
    stored = run.ds["attention"].isel(token=run.token_slice(0)).values  # token, layer, head, key
    n = ids["input_ids"].shape[1]
    for layer in range(len(att)):
        np.testing.assert_allclose(stored[:, layer, :, :n], att[layer][0].numpy().transpose(1, 0, 2), atol=1e-6)

    loaded = load_model(str(tiny_model_dirs["llama"]), device="cpu", attn="eager")
    adapter = find_adapter(loaded.model)
    with pytest.raises(ValueError, match="boom"), torch.no_grad():
        with Recorder(adapter, ("qk",), [0], [0]):
            raise ValueError("boom")
    assert loaded.model.config._attn_implementation == "eager"
    assert _same(_attention_functions(), before)
