"""Only the rows a study needs: which positions of each sequence --positions keeps, and the
token table of those rows (--pool mean: one row per prompt, the mean of the kept rows).

The forward always runs on whole sequences; only what is stored is cut. The token table keeps
each stored row's prompt, position, token id and the id of the token that came next, so the
lens and probes read a selected store as they read a full one.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError
from ..positions import parse_positions


def kept_positions(cfg, seq_lengths: np.ndarray, n_generated: int, labels: dict) -> list[np.ndarray] | None:
    """Each prompt's stored positions (ascending), or None when every row is stored."""
    if not cfg.selects_rows:
        return None
    spec = parse_positions(cfg.positions)
    flags = None
    if spec.kind == "label":
        if spec.label not in labels:
            raise ConfigError(f"--positions {spec.text}: the corpus has no token label {spec.label!r} (its token "
                              f"labels: {', '.join(labels) or 'none'}); give a JSONL list field of that name")
        values = labels[spec.label]
        flags = ~np.isnan(values) if values.dtype.kind == "f" else values.astype(str) != ""
    keep, start = [], 0
    for n in seq_lengths.astype(np.int64):
        n_prompt = int(n) - n_generated
        here = None
        if flags is not None:  # labels cover prompt tokens only; generated tokens carry none
            here = np.concatenate([flags[start:start + n_prompt], np.zeros(n_generated, bool)])
            start += n_prompt
        keep.append(spec.of(int(n), n_generated, here))
    empty = [p for p, k in enumerate(keep) if not len(k)]
    if len(empty) == len(keep):
        raise ConfigError(f"--positions {spec.text} selects no token of any prompt (prompts have "
                          f"{seq_lengths.min()}-{seq_lengths.max()} tokens); choose positions they have")
    if cfg.pool and empty:
        raise ConfigError(f"--positions {spec.text} selects no token of prompt {empty[0]} "
                          f"({int(seq_lengths[empty[0]])} tokens), so --pool {cfg.pool} has nothing to average; "
                          "choose positions every prompt has")
    return keep


def row_counts(keep: list[np.ndarray] | None, seq_lengths: np.ndarray, pool: str | None) -> np.ndarray:
    """Rows stored per prompt."""
    if keep is None:
        return seq_lengths
    if pool:
        return np.ones(len(keep), dtype=np.int64)
    return np.array([len(k) for k in keep], dtype=np.int64)


def select_rows(tensors: dict[str, torch.Tensor], batch, keep: list[np.ndarray], pool: str | None
                ) -> dict[str, torch.Tensor]:
    """The kept rows of a batch's (batch, seq, ...) tensors, prompt after prompt: (rows, ...);
    with pool 'mean' one float32 mean row per prompt. On the tensors' device, before any copy."""
    if not tensors:
        return {}
    b_host = torch.as_tensor(np.concatenate([np.full(len(keep[p]), b) for b, p in enumerate(batch)]))
    p_host = torch.as_tensor(np.concatenate([keep[p] for p in batch]))
    out = {}
    for name, t in tensors.items():  # each on its own device (a model split over devices)
        device = t.device
        b_idx, p_idx = b_host.to(device), p_host.to(device)
        rows = t[b_idx, p_idx]
        if pool == "mean":  # float32 sums, whatever the model computed in
            sums = torch.zeros((len(batch),) + rows.shape[1:], dtype=torch.float32, device=device)
            sums.index_add_(0, b_idx, rows.float())
            counts = torch.as_tensor([len(keep[p]) for p in batch], dtype=torch.float32, device=device)
            rows = sums / counts.view(-1, *([1] * (rows.dim() - 1)))
        out[name] = rows
    return out


def row_table(ids, seq_lengths, offsets, keep, pool, n_generated: int, shard, vocab,
              n_source: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The token table of a shard's rows: token id, position, prompt, whether generated, the next
    token's id; masked filler rows keep -1. A pooled row has its prompt and -1 for the rest.
    Encoder-decoder runs (n_source given): a sequence is its source then its decoder tokens; rows add
    `is_decoder`, positions count within each stack, and no source token has a next token."""
    rows = shard.stop - shard.start
    table = {"token_id": np.full(rows, -1, dtype=np.int32), "position": np.full(rows, -1, dtype=np.int32),
             "prompt_index": np.full(rows, -1, dtype=np.int32), "is_generated": np.zeros(rows, dtype=bool),
             "next_token_id": np.full(rows, -1, dtype=np.int32)}
    if n_source is not None:
        table["is_decoder"] = np.zeros(rows, dtype=bool)
    for p in range(shard.lo, shard.hi):
        o, n = int(offsets[p]) - shard.start, int(seq_lengths[p])
        seq = np.asarray(ids[p], dtype=np.int32)
        nxt = np.append(seq[1:], np.int32(-1))
        src = 0 if n_source is None else int(n_source[p])
        nxt[:src] = -1  # the LM head reads out the decoder only
        if pool:
            table["prompt_index"][o] = p
            continue
        pos = np.arange(n) if keep is None else keep[p]
        k = len(pos)
        table["token_id"][o:o + k] = seq[pos]
        table["position"][o:o + k] = np.where(pos < src, pos, pos - src)
        table["prompt_index"][o:o + k] = p
        table["is_generated"][o:o + k] = pos >= n - n_generated
        table["next_token_id"][o:o + k] = nxt[pos]
        if n_source is not None:
            table["is_decoder"][o:o + k] = pos >= src
    table["token_str"] = np.where(table["token_id"] >= 0, vocab[np.clip(table["token_id"], 0, len(vocab) - 1)], "")
    return table
