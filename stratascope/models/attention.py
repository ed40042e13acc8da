"""Recording the queries and keys each attention layer scores, through transformers' attention registry.

A transformers model picks its attention function by name (`config._attn_implementation`)
from the AttentionInterface registry. `record_queries_keys` registers one more name,
IMPLEMENTATION, whose function hands q and k to a callback and then runs the family's own
eager attention function, so no model's rotary or scaling code is re-implemented here. Only
the model being captured is switched to that name, and only while recording: the registry's
"eager" and "sdpa" entries, the modeling modules and every other model stay as they are.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .adapters import Adapter

IMPLEMENTATION = "stratascope_eager"  # the registry name; its masks are eager attention's

# attention module (and its submodules: BERT's inner self-attention is the caller) -> (layer, callback)
_TAPS: weakref.WeakKeyDictionary[nn.Module, tuple[int, Callable]] = weakref.WeakKeyDictionary()


def _family_eager(module: nn.Module) -> Callable | None:
    """The eager attention function of the modeling module that defines `module`'s class."""
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)


def _recording_eager(module, query, key, value, attention_mask, *args, **kwargs):
    """What IMPLEMENTATION runs: q (batch, head, seq, d_head) after rotary, k with its kv heads."""
    tap = _TAPS.get(module)
    if tap is not None:
        layer, put = tap
        put(layer, query, key)
    return _family_eager(module)(module, query, key, value, attention_mask, *args, **kwargs)


def _register() -> None:
    """Add IMPLEMENTATION to the registries (idempotent: the same two entries every time)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(IMPLEMENTATION, _recording_eager)
    AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)  # the masks eager attention is given


@contextmanager
def record_queries_keys(adapter: Adapter, layers: list[int],
                        put: Callable[[int, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """While active, every forward of `adapter.model` calls put(layer, query, key) for each of `layers`.

    query is (batch, head, seq, d_head) as the scores use it (after rotary embeddings); key has the
    model's key/value heads (fewer than the query heads under grouped-query attention).
    """
    model = adapter.model
    for layer in layers:
        attention = adapter.attentions[layer]
        if not any(_family_eager(m) for m in attention.modules()):
            raise UnsupportedModelError(f"{type(attention).__module__} has no eager_attention_forward; "
                                        "--capture qk supports GPT-2, Llama, GPT-NeoX and BERT families")
        if getattr(attention, "reorder_and_upcast_attn", False):  # GPT-2's option bypasses the registry
            raise UnsupportedModelError("--capture qk does not support GPT-2's reorder_and_upcast_attn; "
                                        "load the model with reorder_and_upcast_attn=False")
    taps = {m: (layer, put) for layer in layers for m in adapter.attentions[layer].modules()}
    if any(m in _TAPS for m in taps):
        raise RuntimeError("the queries and keys of this model are already being recorded; one recording at a time")
    _register()
    previous = model.config._attn_implementation
    _TAPS.update(taps)
    try:
        model.set_attn_implementation(IMPLEMENTATION)
        if model.config._attn_implementation != IMPLEMENTATION:
            raise UnsupportedModelError(f"{type(model).__name__} cannot switch its attention function "
                                        "(it does not use transformers' AttentionInterface), so --capture qk "
                                        "cannot record its queries and keys")
        yield
    finally:
        model.set_attn_implementation(previous)
        for m in taps:
            _TAPS.pop(m, None)
