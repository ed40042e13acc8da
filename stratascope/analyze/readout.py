"""The stored readout (final norm, then unembedding) applied in torch, without the model.

The store keeps the residual before the final norm at every depth, so normalizing every
depth alike and multiplying by the stored unembedding gives, at the last depth, the model's
own logits. The vocabulary is walked in blocks by the callers (see lens.py), so nothing of
size rows x vocab is ever held at once beyond one block.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from ..caching import LRU
from ..devices import resolve_device
from ..errors import ConfigError, MissingArrayError

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Readout:
    """Final norm parameters and unembedding, as stored in a run's readout group."""

    norm_type: str  # 'rmsnorm' | 'layernorm' | 'none'
    eps: float
    norm_weight: torch.Tensor | None  # (d_model,) float32, already including any weight offset
    norm_bias: torch.Tensor | None  # (d_model,)
    unembed: torch.Tensor  # (vocab, d_model), in the matmul dtype, on the device
    unembed_bias: torch.Tensor | None  # (vocab,) float32

    @property
    def vocab_size(self) -> int:
        return int(self.unembed.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.unembed.shape[1])

    @property
    def device(self) -> torch.device:
        return self.unembed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unembed.dtype

    def to(self, device: str | torch.device = "cpu", precision: str = "float32") -> Readout:
        """This readout with the unembedding in `precision` on `device` (norm parameters stay float32)."""
        dev = torch.device(device)
        f32 = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v)
               for k, v in (("norm_weight", self.norm_weight), ("norm_bias", self.norm_bias),
                            ("unembed_bias", self.unembed_bias))}
        return replace(self, unembed=self.unembed.to(dev, PRECISIONS[precision]).contiguous(), **f32)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm of x (..., d_model), in float32, exactly as Hugging Face computes it."""
        x = x.float()
        if self.norm_type == "rmsnorm":  # LlamaRMSNorm: x * rsqrt(mean(x^2) + eps), then * weight
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
            x = x * self.norm_weight
            return x + self.norm_bias if self.norm_bias is not None else x
        if self.norm_type == "layernorm":
            return torch.nn.functional.layer_norm(x, (x.shape[-1],), self.norm_weight, self.norm_bias, self.eps)
        return x

    def logits(self, x: torch.Tensor, ids: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Logits of already-normalized rows x (rows, d_model) for vocabulary ids (all if None), float32."""
        w = self.unembed if ids is None else self.unembed[ids]
        z = (x.to(w.dtype) @ w.T).float()
        if self.unembed_bias is not None:
            z += self.unembed_bias if ids is None else self.unembed_bias[ids]
        return z


def load_readout(run, device: str = "cpu", precision: str = "float32") -> Readout:
    """The readout stored in `run`, on `device`, unembedding in `precision`.

    Raises MissingArrayError for runs whose model has no LM head (encoders such as minilm).
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    device = resolve_device(device)  # before anything is read
    ds = run.readout
    attrs = ds.attrs
    if not attrs.get("lens") or "unembed" not in ds:
        raise MissingArrayError(
            f"{run.path} was captured from {run.attrs['model']['name']}, which has no LM head "
            "(an encoder), so there is nothing to read the residual out into; the lens needs a causal LM run"
        )
    norm_type = attrs.get("norm_type", "none")
    if norm_type not in ("rmsnorm", "layernorm", "none"):
        raise ConfigError(f"{run.path}: unknown stored norm type {norm_type!r}")
    weight = bias = None
    if norm_type != "none":
        weight = torch.from_numpy(np.asarray(ds["norm_weight"].values, dtype=np.float32))
        weight = weight + float(attrs.get("norm_weight_offset", 0.0))  # Gemma-style norms scale by 1 + w
        if attrs.get("has_norm_bias") and "norm_bias" in ds:
            bias = torch.from_numpy(np.asarray(ds["norm_bias"].values, dtype=np.float32))
    unembed_bias = None
    if attrs.get("has_unembed_bias") and "unembed_bias" in ds:
        unembed_bias = torch.from_numpy(np.asarray(ds["unembed_bias"].values, dtype=np.float32))
    unembed = torch.from_numpy(np.asarray(ds["unembed"].values, dtype=np.float32))
    scale = float(attrs.get("logit_scale", 1.0))
    if scale != 1.0:  # the normed residual is scaled before the LM head (T5): folded into the unembedding
        unembed = unembed * scale
    readout = Readout(norm_type, float(attrs.get("norm_eps", 0.0)), weight, bias, unembed, unembed_bias)
    return readout.to(device, precision)


_READOUTS = LRU(2)  # readouts are model-sized: the last two are kept


def readout_for(run, device: str = "cpu", precision: str = "float32") -> Readout:
    """The run's readout on `device` in `precision`, loaded once per process."""
    device = str(resolve_device(device))
    key = (run.path, run.attrs["created"], device, precision)
    return _READOUTS.get(key, lambda: load_readout(run, device=device, precision=precision))
