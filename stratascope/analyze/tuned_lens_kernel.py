"""Readout statistics of many rows in one pass over the vocabulary in blocks, and the KL to the
model's final distribution with its gradient: what training the tuned lens needs, without
ever holding rows x vocab (the same online-softmax walk as lens_kernel.py).

For normalized rows x and logits z = x U^T + c, one pass gives lse = log sum exp z, the mean
logit E_p[z] (entropy = lse - E_p[z]) and, when asked, the expected unembedding E_p[U] (and
E_p[c]). With p_f the final distribution of the same token,

    KL(p_f || p_d) = (E_f[z_f] - lse_f) - (x_d . E_f[U] + E_f[c]) + lse_d
    d KL / d x_d   = E_d[U] - E_f[U]

so the loss and its exact gradient cost two matmuls per vocabulary block (x U_b^T and
exp(z) U_b) and nothing of size rows x vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .readout import Readout

# Rows x vocabulary-block elements per step (as in lens_kernel: 16 MiB per float32 block).
BLOCK_ELEMENTS = 4 * 2**20


@dataclass
class Stats:
    """Per row: log-sum-exp, mean logit, and (if asked) the expected unembedding row and bias."""

    lse: torch.Tensor  # (R,)
    mean_logit: torch.Tensor  # (R,)
    mean_unembed: torch.Tensor | None = None  # (R, d)
    mean_bias: torch.Tensor | None = None  # (R,), only with an unembedding bias

    @property
    def entropy(self) -> torch.Tensor:
        return self.lse - self.mean_logit

    def expand(self, times: int) -> Stats:
        """Each row repeated `times` times in a row (one token's final stats for each of its depths)."""
        def rep(t):
            return None if t is None else t.repeat_interleave(times, 0)

        return Stats(rep(self.lse), rep(self.mean_logit), rep(self.mean_unembed), rep(self.mean_bias))


@torch.no_grad()
def readout_stats(x: torch.Tensor, readout: Readout, with_unembed: bool = False,
                  block_elements: int = BLOCK_ELEMENTS, vocab_block: int | None = None) -> Stats:
    """Stats of normalized rows x (R, d_model) read out through the full vocabulary."""
    x = x.to(readout.device, readout.dtype)
    R, d = x.shape
    V = readout.vocab_size
    vb = vocab_block or min(V, max(256, block_elements // max(1, R)))
    bias = readout.unembed_bias
    m = torch.full((R,), -torch.inf, device=x.device)
    s = torch.zeros(R, device=x.device)
    t = torch.zeros(R, device=x.device)
    g = torch.zeros((R, d), device=x.device) if with_unembed else None
    cb = torch.zeros(R, device=x.device) if with_unembed and bias is not None else None
    for v0 in range(0, V, vb):
        w = readout.unembed[v0:v0 + vb]
        z = (x @ w.T).float()
        if bias is not None:
            z += bias[v0:v0 + vb]
        m_new = torch.maximum(m, z.amax(-1))
        scale = torch.exp(m - m_new)
        e = torch.exp(z - m_new[:, None])
        s = s * scale + e.sum(-1)
        t = t * scale + (e * z).sum(-1)
        if g is not None:  # running sum of exp(z) U_v, rescaled like s
            g = g * scale[:, None] + (e.to(w.dtype) @ w).float()
            if cb is not None:
                cb = cb * scale + e @ bias[v0:v0 + vb]
        m = m_new
    return Stats(m + torch.log(s), t / s, None if g is None else g / s[:, None], None if cb is None else cb / s)


def kl_from_stats(x: torch.Tensor, here: Stats, final: Stats) -> torch.Tensor:
    """KL(p_f || p_d) per row from the stats of rows x (here) and of their final rows (with E_f[U])."""
    cross = (x.float() * final.mean_unembed).sum(-1)
    if final.mean_bias is not None:
        cross = cross + final.mean_bias
    return (final.mean_logit - final.lse) - cross + here.lse


class _KLToFinal(torch.autograd.Function):
    """KL(p_final || p_x) per row, differentiable in x with the exact blockwise gradient."""

    @staticmethod
    def forward(ctx, x, readout, lse_f, mean_logit_f, mean_unembed_f, mean_bias_f):
        final = Stats(lse_f, mean_logit_f, mean_unembed_f, mean_bias_f)
        here = readout_stats(x.detach(), readout, with_unembed=True)
        ctx.save_for_backward(here.mean_unembed - mean_unembed_f)
        return kl_from_stats(x.detach(), here, final)

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad_out[:, None] * grad, None, None, None, None, None


def kl_to_final(x: torch.Tensor, readout: Readout, final: Stats) -> torch.Tensor:
    """KL(p_final || p_x) (R,) for normalized rows x (R, d_model); `final` holds each row's final
    stats with mean_unembed (readout_stats(..., with_unembed=True), expanded to R rows)."""
    return _KLToFinal.apply(x, readout, final.lse, final.mean_logit, final.mean_unembed, final.mean_bias)


def target_logits(x: torch.Tensor, readout: Readout, targets: torch.Tensor) -> torch.Tensor:
    """The logit of each row's target id (R,) (targets clamped to >= 0; mask them afterwards)."""
    ids = targets.clamp(min=0).to(readout.device)
    z = (x.to(readout.device).float() * readout.unembed[ids].float()).sum(-1)
    return z + readout.unembed_bias[ids] if readout.unembed_bias is not None else z
