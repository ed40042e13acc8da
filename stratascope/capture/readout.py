"""The readout group: what the lens and token decoding need later, without the model."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import zarr

from ..models import Adapter, find_components, norm_spec, onloaded, projection_weights
from ..schemas import READOUT, READOUT_PROJECTIONS
from .writer import create_array


def vocab_strings(tokenizer, vocab_size: int) -> list[str]:
    """Each id decoded alone (leading spaces kept), '' for ids the tokenizer does not know."""
    from transformers import PreTrainedTokenizerFast

    n = min(vocab_size, len(tokenizer))
    ids = [[i] for i in range(n)]
    if isinstance(tokenizer, PreTrainedTokenizerFast) and type(tokenizer)._decode is PreTrainedTokenizerFast._decode:
        # what batch_decode runs per id, in one call to the Rust tokenizer (1 s -> 0.07 s for 49k ids)
        strings = tokenizer.backend_tokenizer.decode_batch(ids, skip_special_tokens=False)
    else:
        strings = tokenizer.batch_decode(ids, clean_up_tokenization_spaces=False)
    return strings + [""] * (vocab_size - n)


def tokenizer_json(tokenizer) -> bytes:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    return backend.to_str().encode("utf-8") if backend is not None else b""


def unembed_hash(adapter: Adapter, model: torch.nn.Module) -> str:
    """A fingerprint of the weights: the unembedding (or input embedding for encoders)."""
    module = adapter.unembed if adapter.unembed is not None else model.get_input_embeddings()
    with onloaded(module):
        w = module.weight.detach().float().cpu().contiguous().numpy()
    return hashlib.sha256(memoryview(w).cast("B")).hexdigest()  # no copy of the weights


def _create(group: zarr.Group, name: str, shape: tuple[int, ...], rows: int) -> zarr.Array:
    spec = READOUT[name]
    return create_array(group, name, shape, rows, spec.dtype, spec=spec)


def write_readout(root: zarr.Group, adapter: Adapter, tokenizer, vocab: list[str]) -> None:
    group = root.create_group(READOUT.path)
    V = adapter.vocab_size
    _create(group, "vocab_str", (V,), V)[:] = np.array(vocab, dtype=object)
    blob = np.frombuffer(tokenizer_json(tokenizer), dtype=np.uint8)
    arr = _create(group, "tokenizer_json", (max(1, len(blob)),), max(1, len(blob)))
    if len(blob):
        arr[:] = blob
    attrs = {"lens": adapter.unembed is not None, "norm_type": "none"}
    if adapter.unembed is not None:
        with onloaded(adapter.unembed):  # weights offloaded by --device-map are read in for this
            w = adapter.unembed.weight.detach().float().cpu().numpy()  # (vocab, d_model)
            bias = getattr(adapter.unembed, "bias", None)
            bias = bias.detach().float().cpu() if isinstance(bias, torch.Tensor) else None
        rows = max(1, (8 * 2**20) // (w.shape[1] * 4))
        _create(group, "unembed", w.shape, rows)[:] = w
        if adapter.logits_bias is not None:  # BART's final_logits_bias, added after an LM head without bias
            extra = adapter.logits_bias.detach().float().cpu()
            bias = extra + bias if bias is not None else extra
        if isinstance(bias, torch.Tensor):
            _create(group, "unembed_bias", (V,), V)[:] = bias.numpy()
        attrs.update(has_unembed_bias=isinstance(bias, torch.Tensor), logit_scale=adapter.logit_scale)
        if adapter.final_norm is not None:  # BART and Marian decoders end without one
            spec = norm_spec(adapter.final_norm)
            d = adapter.d_model
            _create(group, "norm_weight", (d,), d)[:] = spec["weight"].numpy()
            if spec["bias"] is not None:
                _create(group, "norm_bias", (d,), d)[:] = spec["bias"].numpy()
            attrs.update(norm_type=spec["type"], norm_eps=spec["eps"], norm_weight_offset=spec["weight_offset"],
                         has_norm_bias=spec["bias"] is not None)
    group.attrs.update(attrs)


_PROJ_DIMS = {v.name: v.dims for v in READOUT_PROJECTIONS}


def components_attrs(adapter: Adapter) -> dict:
    """Root attrs capture.components: what attn_out/mlp_out/z mean for this family and how exact sums are."""
    parts = find_components(adapter)
    return {"pre_norm": parts.pre_norm, "sublayer_norm": parts.sublayer_norm, "exactness": parts.exactness,
            "head_contribution": "z[token, layer, h] @ readout/attn_out_weight[layer, h]",
            "neuron_contribution": "mlp[token, layer, n] * readout/mlp_out_weight[layer, n]"}


def write_projections(group: zarr.Group, adapter: Adapter, layers: list[int]) -> None:
    """The attention and MLP output projections of the captured layers, as (in, out) float32."""
    parts, d, H, dh = find_components(adapter), adapter.d_model, adapter.n_heads, adapter.d_head
    for name, modules, split in (("attn_out", parts.out_proj, (H, dh)), ("mlp_out", adapter.mlp_out, None)):
        pairs = [projection_weights(modules[layer]) for layer in layers]
        weight = torch.stack([w for w, _ in pairs])  # (layer, in, d_model)
        weight = weight.unflatten(1, split) if split else weight
        bias = torch.stack([b if b is not None else torch.zeros(d) for _, b in pairs])
        for array, values, rows in ((f"{name}_weight", weight, 1), (f"{name}_bias", bias, len(layers))):
            create_array(group, array, tuple(values.shape), rows, "float32", _PROJ_DIMS[array])[:] = values.numpy()
