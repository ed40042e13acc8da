"""Where each family keeps its blocks, attention, MLP output projection, final norm and unembedding,
and what the rest of the package may ask about a model (capabilities, not family names).

Adapters are found by inspecting the loaded module tree (which attributes exist), never by
model name, so any checkpoint of a known family works. This is the only module that knows
families: capture and analysis ask an Adapter (causal? token types? rotary? which norm?).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .offload import onloaded

# Candidate attribute paths inside one block, first match wins.
_ATTENTION = ("self_attn", "attn", "attention")
_MLP_OUT = ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.fc2", "output.dense")
_FINAL_NORM = ("norm", "ln_f", "final_layer_norm", "final_layernorm")
_FAMILY_BY_MLP = {
    "mlp.down_proj": "llama",
    "mlp.c_proj": "gpt2",
    "mlp.dense_4h_to_h": "gpt_neox",
    "mlp.fc2": "phi",
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
    """The parts of one loaded model that capture hooks and the readout need, and its capabilities."""

    model: nn.Module = field(repr=False)
    family: str  # recorded in the store for people to read; code asks the capabilities below
    causal: bool  # each position sees only earlier ones; an LM head reads the last depth out
    has_token_types: bool  # takes token_type_ids (BERT's sentence A/B segments)
    rotary: bool  # q and k are rotated by position before the scores (the recorded q/k are after it)
    post_norm: bool  # each block normalizes its output (BERT); pre-norm decoders add to an unnormalized stream
    kv_heads: int  # key/value heads (fewer than n_heads under grouped-query attention)
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
    # Which element of the attention module's output tuple holds the weights (T5's returns
    # (output, position_bias, weights)).
    attn_weights_index: int = 1
    # Encoder-decoder models (T5, BART families): this Adapter describes the decoder (the stack with
    # the LM head); `encoder` the encoder stack, `cross_attentions` each decoder block's attention over
    # the encoder output. The readout multiplies the decoder's normed output by logit_scale before the
    # LM head (T5 with tied embeddings: d_model**-0.5) and adds logits_bias after it (BART's final_logits_bias).
    encoder: Adapter | None = field(default=None, repr=False)
    cross_attentions: list[nn.Module] | None = field(default=None, repr=False)
    logit_scale: float = 1.0
    logits_bias: torch.Tensor | None = field(default=None, repr=False)
    decoder_start_token_id: int | None = None

    @property
    def encoder_decoder(self) -> bool:
        return self.encoder is not None

    def sizes(self) -> dict:
        return {k: getattr(self, k) for k in ("n_layers", "n_heads", "d_model", "d_mlp", "d_head", "vocab_size")}

    @property
    def norm_kind(self) -> str | None:
        """'layernorm' or 'rmsnorm' for the final norm, None for models without one (encoders)."""
        return None if self.final_norm is None else norm_spec(self.final_norm)["type"]

    def attention_scale(self, layer: int) -> float:
        """The factor the model multiplies q·k by in `layer`: its attention's `scaling` (BERT: the inner
        self-attention's), else 1/sqrt(d_head)."""
        for module in self.attentions[layer].modules():
            if isinstance(getattr(module, "scaling", None), (int, float)):
                return float(module.scaling)
        return self.d_head ** -0.5


def find_adapter(model: nn.Module) -> Adapter:
    """Locate the parts of `model`, or raise UnsupportedModelError naming what was not found."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return _encoder_decoder_adapter(model)
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
    from transformers.pytorch_utils import Conv1D  # lazily, as the loaders import transformers

    d_mlp = weight.shape[0] if isinstance(mlp_mod, Conv1D) else weight.shape[1]
    n_heads = config.num_attention_heads
    return Adapter(
        model=model,
        family=family,
        causal=causal,
        has_token_types=_get(base, "embeddings.token_type_embeddings") is not None,
        rotary=any(name.endswith("rotary_emb") for name, _ in model.named_modules()),
        post_norm=family == "bert",
        kv_heads=int(getattr(config, "num_key_value_heads", None) or n_heads),
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


# ---------------------------------------------------------------- encoder-decoder models
# Inside one block of an encoder or decoder stack, first match wins: T5 (T5Block.layer[i]), then the
# BART family (BART, mBART, Marian, Pegasus share BartEncoderLayer's attribute names).
_ED_BLOCKS = ("block", "layers")
_ED_SELF = ("layer.0.SelfAttention", "self_attn")
_ED_CROSS = ("layer.1.EncDecAttention", "encoder_attn")
_ED_MLP_OUT = ("layer.2.DenseReluDense.wo", "layer.1.DenseReluDense.wo", "fc2")
_ED_FINAL_NORM = ("final_layer_norm", "layer_norm")  # T5; mBART (BART and Marian have none)
_ED_FAMILY = {"layer.0.SelfAttention": "t5", "self_attn": "bart"}


def _stack_parts(stack: nn.Module, cross: bool, what: str):
    """(blocks, self-attention path, cross-attention path, MLP output path, final norm) of one stack."""
    _, blocks = _first(stack, _ED_BLOCKS)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise UnsupportedModelError(f"{type(stack).__name__}: found no list of blocks in the {what} "
                                    f"(looked for {', '.join(_ED_BLOCKS)})")
    first = blocks[0]
    found = {name: _first(first, paths)[0] for name, paths in
             (("self-attention", _ED_SELF), ("MLP output projection", _ED_MLP_OUT))
             + ((("cross-attention", _ED_CROSS),) if cross else ())}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise UnsupportedModelError(f"{type(first).__name__}: found no {' and no '.join(missing)} in a {what} block; "
                                    "supported encoder-decoder families are T5 (T5, Flan-T5, mT5) and BART (BART, "
                                    "mBART, Marian)")
    _, norm = _first(stack, _ED_FINAL_NORM)
    return list(blocks), found, norm


def _encoder_decoder_adapter(model: nn.Module) -> Adapter:
    """The decoder's Adapter with the encoder's beside it, for T5- and BART-structured models."""
    config = model.config
    if not (hasattr(model, "get_encoder") and hasattr(model, "get_decoder")) or model.get_output_embeddings() is None:
        raise UnsupportedModelError(f"{type(model).__name__} is an encoder-decoder model without an LM head; load "
                                    "its ...ForConditionalGeneration / ...MTModel class (a local directory or hub id "
                                    "of a T5 or BART family checkpoint)")
    stacks = {}
    for what, stack in (("encoder", model.get_encoder()), ("decoder", model.get_decoder())):
        stacks[what] = _stack_parts(stack, what == "decoder", what)
    (eb, ef, en), (db, df, dn) = stacks["encoder"], stacks["decoder"]
    family = _ED_FAMILY[df["self-attention"]]
    mlp_mod = _get(db[0], df["MLP output projection"])
    emlp = _get(eb[0], ef["MLP output projection"])
    d_model = int(config.d_model)
    n_heads = int(getattr(config, "num_heads", None) or config.decoder_attention_heads)
    enc_heads = int(getattr(config, "num_heads", None) or config.encoder_attention_heads)
    mismatch = [f"{name} ({a} vs {b})" for name, a, b in
                (("blocks", len(eb), len(db)), ("heads", enc_heads, n_heads),
                 ("MLP width", emlp.weight.shape[1], mlp_mod.weight.shape[1])) if a != b]
    if mismatch:
        raise UnsupportedModelError(f"{type(model).__name__}: the encoder and decoder differ in {', '.join(mismatch)}; "
                                    "stratascope stores both stacks along one layer axis and needs them equal")
    d_head = int(getattr(config, "d_kv", None) or d_model // n_heads)
    index = -1 if family == "t5" else 1
    bias = getattr(model, "final_logits_bias", None)  # BART family: added to the LM head's output
    bias = bias.detach().reshape(-1) if isinstance(bias, torch.Tensor) else None
    scale = _logit_scale(model, d_model, bias)

    def stack_adapter(blocks, paths, norm, causal, **extra):
        return Adapter(model=model, family=family, causal=causal, has_token_types=False, rotary=False,
                       post_norm=family == "bart" and norm is None,  # BART, Marian: layer norm after each residual add
                       kv_heads=n_heads, blocks=blocks, attentions=[_get(b, paths["self-attention"]) for b in blocks],
                       mlp_out=[_get(b, paths["MLP output projection"]) for b in blocks], final_norm=norm,
                       n_layers=len(blocks), n_heads=n_heads, d_model=d_model, d_mlp=int(mlp_mod.weight.shape[1]),
                       d_head=d_head, vocab_size=int(config.vocab_size), attn_weights_index=index, **extra)

    encoder = stack_adapter(eb, ef, en, False, unembed=None)
    return stack_adapter(db, df, dn, True, unembed=model.get_output_embeddings(), encoder=encoder,
                         cross_attentions=[_get(b, df["cross-attention"]) for b in db], logit_scale=scale,
                         logits_bias=bias,
                         decoder_start_token_id=getattr(config, "decoder_start_token_id", None))


def _logit_scale(model: nn.Module, d_model: int, bias: torch.Tensor | None) -> float:
    """What the model multiplies the decoder's output by before its LM head: T5 checkpoints with tied
    embeddings rescale by d_model**-0.5, mT5 and the BART family do not (and transformers releases have
    moved the switch between config fields), so one tiny forward is compared with both forms."""
    was_training, found = model.training, {}
    model.eval()
    try:
        with torch.no_grad():
            dev = next(model.parameters()).device
            ids = torch.tensor([[1, 2, 3]], device=dev)
            hook = model.get_decoder().register_forward_hook(lambda m, a, out: found.__setitem__("h", out[0]))
            try:
                logits = model(input_ids=ids, decoder_input_ids=ids, use_cache=False).logits.float()
            finally:
                hook.remove()
            head = model.get_output_embeddings()
            for scale in (1.0, d_model ** -0.5):
                expected = head(found["h"] * scale).float() + (bias.float() if bias is not None else 0.0)
                if torch.allclose(logits, expected, rtol=1e-4, atol=1e-4):
                    return scale
    finally:
        model.train(was_training)
    raise UnsupportedModelError(f"{type(model).__name__}: its logits are neither the LM head of the decoder output nor "
                                "of the output scaled by d_model**-0.5; the lens cannot reproduce them")


def norm_spec(norm: nn.Module) -> dict:
    """Describe a final norm so the readout can apply it without the model.

    Returns a dict with type ('layernorm' or 'rmsnorm'), eps, weight, bias (or None) and
    weight_offset (1.0 for norms that scale by 1 + weight, as Gemma's do).
    """
    with onloaded(norm):
        weight = norm.weight.detach().float().cpu()
        bias = getattr(norm, "bias", None)
        bias = bias.detach().float().cpu() if isinstance(bias, torch.Tensor) else None
        eps = next((float(v) for v in (getattr(norm, a, None) for a in ("eps", "variance_epsilon"))
                    if isinstance(v, (int, float))), 1e-5)
        kind, offset = _norm_form(norm, eps, weight, bias)
    return {"type": kind, "eps": eps, "weight": weight, "bias": bias, "weight_offset": offset}


def _norm_form(norm: nn.Module, eps: float, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[str, float]:
    """(type, weight offset) of a norm. torch's own classes are known by isinstance; transformers
    defines one RMSNorm class per family with no common base, so for the others the module is run
    on a probe input and its output compared with each form the readout can apply."""
    if isinstance(norm, nn.LayerNorm):
        return "layernorm", 0.0
    if isinstance(norm, getattr(nn, "RMSNorm", ())):
        return "rmsnorm", 0.0
    d = weight.numel()
    x = torch.linspace(-1.0, 3.0, 2 * d).reshape(2, d) * torch.tensor([1.0, -0.5])[:, None]
    probe = copy.deepcopy(norm)  # a float32 copy on the CPU: a bfloat16 norm's own rounding would hide its form
    if hasattr(probe, "_hf_hook"):  # placed by --device-map: the copy runs where it is, without accelerate's hook
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(probe)
    with torch.no_grad():
        y = probe.to("cpu", torch.float32)(x).float()
    centred = x - x.mean(-1, keepdim=True)
    shapes = {
        ("layernorm", 0.0): centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + eps),
        ("rmsnorm", 0.0): x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps),
    }
    shapes[("rmsnorm", 1.0)] = shapes[("rmsnorm", 0.0)]
    for (kind, offset), normed in shapes.items():
        expected = normed * (weight + offset) + (bias if bias is not None else 0.0)
        if torch.allclose(y, expected, rtol=1e-4, atol=1e-5):
            return kind, offset
    raise UnsupportedModelError(f"final norm {type(norm).__name__} computes neither a LayerNorm nor an RMSNorm "
                                "(scaled by weight or by 1 + weight)")


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
    from transformers.pytorch_utils import Conv1D

    with onloaded(module):
        w = module.weight.detach().float().cpu()
        w = w if isinstance(module, Conv1D) else w.T  # nn.Linear stores (out, in)
        bias = getattr(module, "bias", None)
        return w.contiguous(), (bias.detach().float().cpu() if isinstance(bias, torch.Tensor) else None)
