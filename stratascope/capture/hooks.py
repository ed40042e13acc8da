"""Forward hooks that record what the capture stores, removed on exit whatever happens."""

from __future__ import annotations

import torch

from ..models import Adapter


def _first_tensor(x):
    return x[0] if isinstance(x, (tuple, list)) else x


class Recorder:
    """Context manager: while active, each forward fills `self.out` with tensors by (name, index).

    hidden: depth d < L is the input of block d, depth L the output of block L-1 (the
    input of the final norm), so every depth is the un-normalized residual stream.
    attention: the attention module's weights output (eager attention).
    mlp: the input of the MLP output projection.
    """

    def __init__(self, adapter: Adapter, capture: tuple[str, ...], layers: list[int], depths: list[int]):
        self.adapter, self.capture, self.layers, self.depths = adapter, capture, layers, depths
        self.out: dict[tuple[str, int], torch.Tensor] = {}
        self._handles = []

    def _store(self, key):
        def pre(module, args, kwargs):
            self.out[key] = args[0] if args else kwargs["hidden_states"]
        return pre

    def __enter__(self):
        a, reg = self.adapter, self._handles.append
        if "hidden" in self.capture:
            for d in self.depths:
                if d < a.n_layers:
                    reg(a.blocks[d].register_forward_pre_hook(self._store(("hidden", d)), with_kwargs=True))
                else:
                    def post(module, args, output, key=("hidden", d)):
                        self.out[key] = _first_tensor(output)
                    reg(a.blocks[-1].register_forward_hook(post))
        for layer in self.layers:
            if "attention" in self.capture:
                def attn(module, args, output, key=("attention", layer)):
                    weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
                    if weights is None:
                        raise RuntimeError("the attention module returned no weights; load with eager attention")
                    self.out[key] = weights
                reg(a.attentions[layer].register_forward_hook(attn))
            if "mlp" in self.capture:
                reg(a.mlp_out[layer].register_forward_pre_hook(self._store(("mlp", layer)), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.out.clear()

    def stacked(self) -> dict[str, torch.Tensor]:
        """The recorded tensors stacked along a depth/layer axis at dim 2 (batch, seq, depth|layer, ...).

        attention is returned as (batch, query, layer, head, key).
        """
        result = {}
        if "hidden" in self.capture:
            result["hidden"] = torch.stack([self.out[("hidden", d)] for d in self.depths], dim=2)
        if "attention" in self.capture:
            result["attention"] = torch.stack([self.out[("attention", l)] for l in self.layers], dim=1).permute(0, 3, 1, 2, 4)
        if "mlp" in self.capture:
            result["mlp"] = torch.stack([self.out[("mlp", l)] for l in self.layers], dim=2)
        return result
