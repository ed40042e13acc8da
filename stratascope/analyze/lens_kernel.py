"""The logit lens for a block of token rows: one pass over the vocabulary in blocks.

For rows x (tokens x depths, normalized) and each vocabulary block U_b, the logits
z = x U_b^T are made once and folded into running statistics, online-softmax style:
max m, sum s = sum exp(z - m), t = sum exp(z - m) z (entropy = lse - t/s), the top-k,
and counts of logits above each row's target / watch logit (rank = 1 + count). KL to the
final depth accumulates sum_v p_final(v) (z_final(v) - z_d(v)) with the final row's own
running max. Nothing of size rows x vocab is ever held, only rows x block.

The target and watch logits are computed first by a small gather-dot; inside the block
that holds the token itself, its own column is excluded from the count, so a token never
outranks itself through rounding. Ties (equal logits) do not raise a rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .readout import Readout

# Rows x vocabulary-block elements per step: big enough to keep the matmul near peak, small
# enough that the block and its exp stay in cache-friendly sizes (2 x 16 MiB in float32).
BLOCK_ELEMENTS = 4 * 2**20


@dataclass
class LensArrays:
    """Lens results for n tokens at D depths (W watch tokens, k top entries), as numpy arrays.

    Ranks are 1-based; rows with no target (the last token of a prompt) have target_rank -1
    and target_prob NaN. kl_final is NaN when no final depth was given. Entropy is in nats.
    """

    topk_ids: np.ndarray  # (n, D, k) int32
    topk_probs: np.ndarray  # (n, D, k) float32
    target_rank: np.ndarray  # (n, D) int32
    target_prob: np.ndarray  # (n, D) float32
    entropy: np.ndarray  # (n, D) float32
    kl_final: np.ndarray  # (n, D) float32, KL(p_final || p_depth)
    watch_rank: np.ndarray  # (n, D, W) int32
    watch_prob: np.ndarray  # (n, D, W) float32

    def as_dict(self) -> dict[str, np.ndarray]:
        return dict(self.__dict__)


def prepare_rows(hidden: torch.Tensor, readout: Readout, norm: str, final_depth: int | None) -> torch.Tensor:
    """Normalize (tokens, D, d_model) residuals for the readout: every depth alike with norm
    'final'; with norm 'none' (Ecco's variant on HF hidden states) only the final depth, whose
    HF hidden state is already normalized, and the rest unembedded raw."""
    if norm == "final":
        return readout.normalize(hidden)
    x = hidden.float().clone()
    if final_depth is not None:
        x[:, final_depth] = readout.normalize(hidden[:, final_depth])
    return x


def lens_rows(hidden, readout: Readout, targets=None, watch_ids=(), topk: int = 10, norm: str = "final",
              final_depth: int | None = None, block_elements: int = BLOCK_ELEMENTS,
              vocab_block: int | None = None) -> LensArrays:
    """The logit lens of `hidden` (tokens, D, d_model) through `readout`.

    targets: (tokens,) ids of the token that came next, -1 where there is none.
    watch_ids: vocabulary ids whose rank and probability are reported at every row.
    final_depth: index along D of the model's output depth (the KL reference; under norm
    'none' the one depth that is still normalized), or None.
    block_elements / vocab_block: the rows x vocabulary-block working size, and (for tests)
    a fixed vocabulary block.
    """
    h = torch.as_tensor(hidden)
    n, D, _ = h.shape
    V = readout.vocab_size
    k = min(topk, V)
    watch = torch.as_tensor(np.asarray(watch_ids, dtype=np.int64).reshape(-1), device=readout.device)
    tgt = torch.full((n,), -1, dtype=torch.long) if targets is None else torch.as_tensor(np.asarray(targets)).long()
    # Tokens per step: keep rows x vocab block near block_elements, with a block of >= 1024 ids.
    vb = vocab_block or min(V, max(1024, block_elements // max(1, min(n * D, 2048))))
    tb = max(1, min(n, block_elements // vb // D))
    parts = [_lens_tokens(h[i:i + tb], tgt[i:i + tb], watch, readout, k, norm, final_depth, vb)
             for i in range(0, n, tb)]
    if not parts:  # no rows (e.g. a chunk of masked rows only)
        W = len(watch)
        return LensArrays(*(np.zeros((0, D) + tail, dtype) for tail, dtype in (
            ((k,), np.int32), ((k,), np.float32), ((), np.int32), ((), np.float32), ((), np.float32),
            ((), np.float32), ((W,), np.int32), ((W,), np.float32))))
    return LensArrays(*(np.concatenate([p[j] for p in parts]) for j in range(8)))


@torch.inference_mode()
def _lens_tokens(h, tgt, watch, readout: Readout, k: int, norm: str, final_depth, vb: int) -> list[np.ndarray]:
    dev = readout.device
    tb, D, d = h.shape
    R, W, V = tb * D, len(watch), readout.vocab_size
    x = prepare_rows(h.to(dev), readout, norm, final_depth).reshape(R, d).to(readout.dtype).contiguous()
    tgt = tgt.to(dev)
    has_tgt = (tgt >= 0).repeat_interleave(D)
    row_tgt = tgt.clamp(min=0).repeat_interleave(D)
    thr = torch.empty((R, 1 + W), dtype=torch.float32, device=dev)  # target, then watch logits
    thr[:, 0] = (x.float() * readout.unembed[row_tgt].float()).sum(-1)
    if readout.unembed_bias is not None:
        thr[:, 0] += readout.unembed_bias[row_tgt]
    if W:
        thr[:, 1:] = readout.logits(x, watch)
    count = torch.zeros((R, 1 + W), dtype=torch.long, device=dev)
    m = torch.full((R,), -torch.inf, device=dev)
    s = torch.zeros(R, device=dev)
    t = torch.zeros(R, device=dev)
    kl = torch.zeros((tb, D), device=dev)
    top_v = torch.full((R, k), -torch.inf, device=dev)
    top_i = torch.zeros((R, k), dtype=torch.long, device=dev)
    z_buf = torch.empty((R, vb), dtype=torch.float32, device=dev)
    e_buf = torch.empty((R, vb), dtype=torch.float32, device=dev)
    ids = torch.cat([row_tgt[:, None], watch[None, :].expand(R, W)], 1)  # (R, 1+W) column owners
    x3 = x.view(tb, D, d).float()
    for v0 in range(0, V, vb):
        v1 = min(V, v0 + vb)
        z, e = z_buf[:, :v1 - v0], e_buf[:, :v1 - v0]
        w = readout.unembed[v0:v1]
        if readout.dtype == torch.float32:
            torch.matmul(x, w.T, out=z)
        else:
            z.copy_(x @ w.T)
        if readout.unembed_bias is not None:
            z += readout.unembed_bias[v0:v1]
        # Ranks: how many logits beat each threshold, not counting the token's own column.
        # (Comparing into a float buffer and summing floats is ~10x faster on CPU than counting
        # a bool tensor, and exact: block sums stay far below 2**24.)
        for c in range(1 + W):
            count[:, c] += torch.gt(z, thr[:, c:c + 1], out=e).sum(-1).long()
        inside = (ids >= v0) & (ids < v1)
        if inside.any():
            r, c = inside.nonzero(as_tuple=True)
            count[r, c] -= (z[r, ids[r, c] - v0] > thr[r, c]).long()
        # Top-k: only rows whose block maximum beats their current k-th best need a merge.
        bmax = z.amax(-1)
        need = (bmax > top_v[:, -1]).nonzero().view(-1)
        if len(need):
            if 2 * len(need) > R:  # gathering most rows costs more than the top-k itself
                need = slice(None)
            bv, bi = z[need].topk(min(k, v1 - v0), dim=-1)
            merged_v, order = torch.cat([top_v[need], bv], 1).topk(k, dim=-1)
            top_i[need] = torch.cat([top_i[need], bi + v0], 1).gather(1, order)
            top_v[need] = merged_v
        # Online softmax statistics: running max, sum of exp, and sum of exp * logit.
        m_new = torch.maximum(m, bmax)
        scale = torch.exp(m - m_new)
        torch.sub(z, m_new[:, None], out=e)
        e.exp_()
        s = s * scale + e.sum(-1)
        ez = z.mul_(e).sum(-1)  # z is not needed after this
        t = t * scale + ez
        if final_depth is not None:
            # sum_v e_final(v) z_d(v) = x_d . (sum_v e_final(v) U_v) + sum_v e_final(v) b_v: a small matmul.
            f = final_depth
            e_f = e.view(tb, D, -1)[:, f]
            mix = (e_f.to(w.dtype) @ w).float()  # (tb, d)
            cross = torch.linalg.vecdot(x3, mix[:, None, :])
            if readout.unembed_bias is not None:
                cross += (e_f @ readout.unembed_bias[v0:v1])[:, None]
            kl = kl * scale.view(tb, D)[:, f:f + 1] + (ez.view(tb, D)[:, f:f + 1] - cross)
        m = m_new
    lse = m + torch.log(s)
    entropy = lse - t / s
    if final_depth is not None:
        lse2 = lse.view(tb, D)
        kl = kl / s.view(tb, D)[:, final_depth:final_depth + 1] - lse2[:, final_depth:final_depth + 1] + lse2
        kl = kl.clamp(min=0)
    else:
        kl = torch.full((tb, D), torch.nan, device=dev)
    rank = (count + 1).to(torch.int32)
    prob = torch.exp(thr - lse[:, None])
    target_rank = torch.where(has_tgt, rank[:, 0], -1)
    target_prob = torch.where(has_tgt, prob[:, 0], torch.nan)
    out = [top_i.to(torch.int32).view(tb, D, k), torch.exp(top_v - lse[:, None]).view(tb, D, k),
           target_rank.view(tb, D), target_prob.view(tb, D), entropy.view(tb, D), kl,
           rank[:, 1:].reshape(tb, D, W), prob[:, 1:].reshape(tb, D, W)]
    return [o.cpu().numpy() for o in out]
