"""Forward hooks that record what the capture stores, removed on exit whatever happens."""

from __future__ import annotations

from contextlib import ExitStack

import torch

from ..models import Adapter, find_components


def _first_tensor(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def stack(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    """torch.stack; blocks placed on several devices (--device-map) are stacked on the host."""
    if len({t.device for t in tensors}) > 1:
        tensors = [t.cpu() for t in tensors]
    return torch.stack(tensors, dim=dim)


class Recorder:
    """Context manager: while active, each forward fills `self.out` with tensors by (name, index).

    hidden: depth d < L is the input of block d, depth L the output of block L-1 (the
    input of the final norm), so every depth is the un-normalized residual stream.
    attention: the attention module's weights output (eager attention); for an encoder-decoder
    model's decoder also cross_attention, the weights of each block's attention over the source.
    mlp: the input of the MLP output projection.
    queries/keys (capture 'qk'): what the model's eager attention function receives, i.e. after
    rotary embeddings; keys repeated to every query head under grouped-query attention. They are
    recorded through an attention function registered for this model only (models.attention).
    """

    def __init__(self, adapter: Adapter, capture: tuple[str, ...], layers: list[int], depths: list[int]):
        self.adapter, self.capture, self.layers, self.depths = adapter, capture, layers, depths
        self.out: dict[tuple[str, int], torch.Tensor] = {}
        self.paused = False  # set while other forwards (the gradient passes) run through the model
        self._handles = []
        self._contexts = ExitStack()  # the queries/keys recording, when captured

    def _put(self, key, tensor: torch.Tensor) -> None:
        if not self.paused:
            self.out[key] = tensor

    def _store(self, key):
        def pre(module, args, kwargs):
            self._put(key, args[0] if args else kwargs["hidden_states"])
        return pre

    def __enter__(self):
        a, reg = self.adapter, self._handles.append
        if "hidden" in self.capture:
            for d in self.depths:
                if d < a.n_layers:
                    reg(a.blocks[d].register_forward_pre_hook(self._store(("hidden", d)), with_kwargs=True))
                else:
                    def post(module, args, output, key=("hidden", d)):
                        self._put(key, _first_tensor(output))
                    reg(a.blocks[-1].register_forward_hook(post))
        for layer in self.layers:
            if "attention" in self.capture:
                def attn(module, args, output, name="attention", layer=layer):
                    index = a.attn_weights_index
                    weights = output[index] if isinstance(output, tuple) and len(output) > 1 else None
                    if weights is None:
                        raise RuntimeError("the attention module returned no weights; load with eager attention")
                    self._put((name, layer), weights)
                reg(a.attentions[layer].register_forward_hook(attn))
                if a.cross_attentions:  # encoder-decoder: the decoder block's attention over the source
                    reg(a.cross_attentions[layer].register_forward_hook(
                        lambda m, args, out, f=attn, layer=layer: f(m, args, out, "cross_attention", layer)))
            if "mlp" in self.capture:
                reg(a.mlp_out[layer].register_forward_pre_hook(self._store(("mlp", layer)), with_kwargs=True))
        if "qk" in self.capture:
            from ..models.attention import record_queries_keys

            try:
                self._contexts.enter_context(record_queries_keys(a, self.layers, self._put_qk))
            except BaseException:
                self.__exit__()
                raise
        self._hook_components()
        return self

    def _put_qk(self, layer: int, query: torch.Tensor, key: torch.Tensor) -> None:
        """query (batch, head, seq, d_head); key may have fewer (kv) heads: repeated as repeat_kv does."""
        groups = query.shape[1] // key.shape[1]
        self._put(("queries", layer), query)
        self._put(("keys", layer), key.repeat_interleave(groups, dim=1) if groups > 1 else key)

    def _hook_components(self) -> None:
        """components: the outputs of the modules whose result each block adds to the residual;
        z: the input of each attention output projection, split by head."""
        if not {"components", "z"} & set(self.capture):
            return
        parts, reg = find_components(self.adapter), self._handles.append
        for layer in self.layers:
            if "components" in self.capture:
                for name, module in (("attn_out", parts.attn_add[layer]), ("mlp_out", parts.mlp_add[layer])):
                    def post(module, args, output, key=(name, layer)):
                        self._put(key, _first_tensor(output))
                    reg(module.register_forward_hook(post))
            if "z" in self.capture:
                reg(parts.out_proj[layer].register_forward_pre_hook(self._store(("z", layer)), with_kwargs=True))

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._contexts.close()
        self.out.clear()

    def views(self) -> dict[str, list[torch.Tensor]]:
        """The recorded tensors per array, one per depth/layer, each laid out (batch, seq, ...) as
        stored (attention (batch, query, head, key)); views of what the model computed, no copies."""
        result = {}
        if "hidden" in self.capture:
            result["hidden"] = [self.out[("hidden", d)] for d in self.depths]
        if "attention" in self.capture:  # (batch, head, query, key) -> (batch, query, head, key)
            result["attention"] = [self.out[("attention", l)].transpose(1, 2) for l in self.layers]
            if self.adapter.cross_attentions:  # (batch, decoder query, head, source key)
                result["cross_attention"] = [self.out[("cross_attention", l)].transpose(1, 2) for l in self.layers]
        if "mlp" in self.capture:
            result["mlp"] = [self.out[("mlp", l)] for l in self.layers]
        if "qk" in self.capture:
            if ("queries", self.layers[0]) not in self.out:
                raise RuntimeError("the attention modules did not call the recording attention function; "
                                   "--capture qk needs attention through transformers' AttentionInterface")
            for name in ("queries", "keys"):  # (batch, head, seq, d_head) -> (batch, seq, head, d_head)
                result[name] = [self.out[(name, l)].transpose(1, 2) for l in self.layers]
        h = self.adapter.n_heads
        for name in ("attn_out", "mlp_out", "z"):  # (batch, seq, d_model); z (batch, seq, head, d_head)
            if ("components" if name != "z" else "z") in self.capture:
                per_layer = [self.out[(name, l)] for l in self.layers]
                result[name] = [t.unflatten(-1, (h, t.shape[-1] // h)) for t in per_layer] if name == "z" else per_layer
        return result

    def stacked(self) -> dict[str, torch.Tensor]:
        """The recorded tensors stacked along a depth/layer axis at dim 2 (batch, seq, depth|layer, ...).

        attention is returned as (batch, query, layer, head, key).
        """
        return {name: stack(tensors, dim=2) for name, tensors in self.views().items()}


def qk_attrs(adapter: Adapter, layers: list[int]) -> dict:
    """Root attrs capture.qk: how to turn the stored queries and keys back into attention weights."""
    scales = [adapter.attention_scale(l) for l in layers]
    return {
        "after_rotary": adapter.rotary,
        "scale": scales[0] if len(set(scales)) == 1 else None,
        "scales": scales,  # per captured layer (GPT-2 can scale by inverse layer index)
        "gqa_expanded": adapter.kv_heads < adapter.n_heads,
        "kv_heads": adapter.kv_heads,
        "mask": "causal" if adapter.causal else "none (every key of the sequence)",
        "recipe": ("attention[q, h] = softmax(queries[q, h] . keys[k, h] * scale + mask) "
                   "over the keys k of q's sequence"),
    }
