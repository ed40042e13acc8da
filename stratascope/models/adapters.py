"""Where each family keeps its blocks, attention, MLP output projection, final norm and unembedding.

Adapters are found by inspecting the loaded module tree (which attributes exist), never by
model name, so any checkpoint of a known family works.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnsupportedModelError

# Candidate attribute paths inside one block, first match wins.
_ATTENTION = ("self_attn", "attn", "attention")
_MLP_OUT = ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.fc2", "output.dense")
_FINAL_NORM = ("norm", "ln_f", "final_layer_norm", "final_layernorm")
_FAMILY_BY_MLP = {
    "mlp.down_proj": "llama",
    "mlp.c_proj": "gpt2",
    "mlp.dense_4h_to_h": "gpt_neox",
    "mlp.fc2": "gpt2",
    "output.dense": "bert",
}


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _first(module: nn.Module, paths: tuple[str, ...]) -> tuple[str, nn.Module] | tuple[None, None]:
    for path in paths:
        found = _get(module, path)
        if isinstance(found, nn.Module):
            return path, found
    return None, None


@dataclass
class Adapter:
    """The parts of one loaded model that capture hooks and the readout needs."""

    family: str
    causal: bool
    blocks: list[nn.Module]
    attentions: list[nn.Module]
    mlp_out: list[nn.Module]
    final_norm: nn.Module | None
    unembed: nn.Module | None
    n_layers: int
    n_heads: int
    d_model: int
    d_mlp: int
    d_head: int
    vocab_size: int

    def sizes(self) -> dict:
        return {k: getattr(self, k) for k in ("n_layers", "n_heads", "d_model", "d_mlp", "d_head", "vocab_size")}


def find_adapter(model: nn.Module) -> Adapter:
    """Locate the parts of `model`, or raise UnsupportedModelError naming what was not found."""
    config = model.config
    n_layers = config.num_hidden_layers
    blocks = next(
        (m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers and len(m) > 0),
        None,
    )
    if blocks is None:
        raise UnsupportedModelError(
            f"{type(model).__name__}: found no list of {n_layers} transformer blocks; "
            "supported families are GPT-2, Llama (SmolLM2, Mistral, Qwen2), GPT-NeoX and BERT"
        )
    first = blocks[0]
    attn_path, _ = _first(first, _ATTENTION)
    mlp_path, mlp_mod = _first(first, _MLP_OUT)
    missing = [what for what, path in (("attention", attn_path), ("MLP output projection", mlp_path)) if path is None]
    if missing:
        raise UnsupportedModelError(
            f"{type(model).__name__}: found no {' and no '.join(missing)} in block {type(first).__name__} "
            f"(looked for {', '.join(_ATTENTION) if attn_path is None else ', '.join(_MLP_OUT)})"
        )
    family = _FAMILY_BY_MLP[mlp_path]
    causal = not getattr(config, "is_encoder_decoder", False) and family != "bert"
    base = getattr(model, model.base_model_prefix, model)
    _, final_norm = _first(base, _FINAL_NORM)
    unembed = model.get_output_embeddings() if causal else None
    if causal and (final_norm is None or unembed is None):
        raise UnsupportedModelError(
            f"{type(model).__name__}: found no {'final norm' if final_norm is None else 'unembedding'}; "
            "the logit lens needs both"
        )
    d_model = config.hidden_size
    weight = mlp_mod.weight
    # nn.Linear stores (out, in); GPT-2's Conv1D stores (in, out). The MLP width is the input side.
    d_mlp = weight.shape[0] if type(mlp_mod).__name__ == "Conv1D" else weight.shape[1]
    n_heads = config.num_attention_heads
    return Adapter(
        family=family,
        causal=causal,
        blocks=list(blocks),
        attentions=[_get(b, attn_path) for b in blocks],
        mlp_out=[_get(b, mlp_path) for b in blocks],
        final_norm=final_norm,
        unembed=unembed,
        n_layers=n_layers,
        n_heads=n_heads,
        d_model=d_model,
        d_mlp=d_mlp,
        d_head=getattr(config, "head_dim", None) or d_model // n_heads,
        vocab_size=config.vocab_size,
    )


def norm_spec(norm: nn.Module) -> dict:
    """Describe a final norm so the readout can apply it without the model.

    Returns a dict with type ('layernorm' or 'rmsnorm'), eps, weight, bias (or None) and
    weight_offset (1.0 for norms that scale by 1 + weight, as Gemma's do).
    """
    name = type(norm).__name__
    weight = norm.weight.detach().float().cpu()
    bias = getattr(norm, "bias", None)
    bias = bias.detach().float().cpu() if isinstance(bias, torch.Tensor) else None
    if isinstance(norm, nn.LayerNorm) or "LayerNorm" in name:
        eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-5)))
        return {"type": "layernorm", "eps": eps, "weight": weight, "bias": bias, "weight_offset": 0.0}
    if "RMSNorm" in name:
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        offset = 1.0 if "Gemma" in name else 0.0
        return {"type": "rmsnorm", "eps": eps, "weight": weight, "bias": bias, "weight_offset": offset}
    raise UnsupportedModelError(f"final norm {name} is neither a LayerNorm nor an RMSNorm")


# ---------------------------------------------------------------- residual components
# Inside an attention module, its output projection (BERT: inside BertAttention's output block).
_ATTN_OUT_PROJ = ("o_proj", "c_proj", "dense", "output.dense")
_MLP = ("mlp", "feed_forward")
# Families that normalize a sublayer's output before the residual add (Gemma 2/3, OLMo 2) have a
# post-MLP norm; in Llama itself `post_attention_layernorm` is the pre-MLP norm, so it alone says nothing.
_POST_MLP_NORM = "post_feedforward_layernorm"


@dataclass
class Components:
    """Where each block's residual additions come from, for --capture components and z.

    attn_add[i] / mlp_add[i]: modules whose forward output is exactly what block i's attention / MLP
    sublayer adds to the residual stream. out_proj[i]: the attention output projection (its input is
    the per-head z). pre_norm: the residual is embedding + every addition (False for post-norm
    encoders, whose additions are the projections' outputs before the add-and-norm). sublayer_norm:
    a norm sits between the output projections and the add, so head and neuron contributions
    through the projections are linearised approximations.
    """

    attn_add: list[nn.Module]
    mlp_add: list[nn.Module]
    out_proj: list[nn.Module]
    pre_norm: bool
    sublayer_norm: bool

    @property
    def exactness(self) -> str:
        if not self.pre_norm:
            return ("post-norm: attn_out/mlp_out are the output projections before the add-and-norm; the "
                    "residual is not their sum")
        if self.sublayer_norm:
            return ("embedding + attn_out + mlp_out equals the residual; attn_out/mlp_out are taken after the "
                    "sublayer norm, so head and neuron contributions through the projections are linearised")
        return ("embedding + attn_out + mlp_out equals the residual; heads (z @ attn_out_weight) sum to attn_out "
                "minus attn_out_bias; neurons (mlp * mlp_out_weight) sum to mlp_out minus mlp_out_bias")


def find_components(adapter: Adapter) -> Components:
    """The residual additions of every block of `adapter`'s model, or UnsupportedModelError."""
    first_attn, first = adapter.attentions[0], adapter.blocks[0]
    proj_path, _ = _first(first_attn, _ATTN_OUT_PROJ)
    if proj_path is None:
        raise UnsupportedModelError(f"found no attention output projection in {type(first_attn).__name__} "
                                    f"(looked for {', '.join(_ATTN_OUT_PROJ)}); --capture components/z cannot be taken")
    out_proj = [_get(a, proj_path) for a in adapter.attentions]
    if adapter.family == "bert":
        return Components(out_proj, list(adapter.mlp_out), out_proj, pre_norm=False, sublayer_norm=False)
    mlp_path, _ = _first(first, _MLP)
    if mlp_path is None:
        raise UnsupportedModelError(f"found no MLP module in block {type(first).__name__} (looked for "
                                    f"{', '.join(_MLP)}); --capture components cannot be taken")
    if isinstance(getattr(first, _POST_MLP_NORM, None), nn.Module):
        return Components([b.post_attention_layernorm for b in adapter.blocks],
                          [getattr(b, _POST_MLP_NORM) for b in adapter.blocks], out_proj,
                          pre_norm=True, sublayer_norm=True)
    return Components(list(adapter.attentions), [_get(b, mlp_path) for b in adapter.blocks], out_proj,
                      pre_norm=True, sublayer_norm=False)


def projection_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight as (in, out), bias or None) of a Linear or GPT-2 Conv1D, float32 on the CPU."""
    w = module.weight.detach().float().cpu()
    w = w if type(module).__name__ == "Conv1D" else w.T  # nn.Linear stores (out, in)
    bias = getattr(module, "bias", None)
    return w.contiguous(), (bias.detach().float().cpu() if isinstance(bias, torch.Tensor) else None)
