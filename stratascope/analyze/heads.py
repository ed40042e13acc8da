"""Head summaries: how every attention head behaves over the whole corpus (job `heads`).

Streams over token chunks of the stored `attention` array (dask), never loading it whole.

Which rows count ("scored rows"): rows with prompt_index >= 0 (masked rows are skipped) and
position >= 2. From position 2 on, the first token (key 0), the previous token (key p-1) and
the token itself (key p) are three different keys, so the three scores below never count
the same weight twice; positions 0 and 1 would (at position 0 every causal head attends
only to itself, at position 1 the previous token is the first token). Prompts shorter than
3 tokens contribute no rows.

Per (layer, head), means over the scored rows:
- entropy: -sum_k w log w (nats) over the row's valid keys (keys <= position for causal
  models, every key of the sequence for BERT; stored weights are zero elsewhere);
- entropy_norm: entropy / log(number of valid keys), 0 = one key, 1 = uniform;
- first_token: weight on key 0; previous_token: weight on key p-1; self: weight on key p.

Label, first rule that holds (PATTERN = 0.5, BROAD = 0.8):
1. previous_token >= PATTERN -> "previous-token"
2. first_token >= PATTERN    -> "first-token" (the attention sink / no-op pattern)
3. self >= PATTERN           -> "self"
4. entropy_norm >= BROAD     -> "broad" (spreads its weight over many keys)
5. otherwise                 -> "mixed" (content-dependent, or no single positional pattern)

Deviations, for browsing: each row's profile is (first, previous, self, rest = 1 - the three);
its deviation is the total-variation distance 0.5 * sum |profile - head's mean profile|. For
each head the `top` rows with the largest deviation are kept as (prompt, position, token row).
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr

from ..errors import ConfigError
from ..schemas import HEADS
from .results import job_progress, load_result, save_result
from .stacks import single_stack
from .stored_rows import seq_lengths

JOB = HEADS.job
MIN_POSITION = 2
PATTERN = 0.5
BROAD = 0.8
LABELS = ("previous-token", "first-token", "self", "broad", "mixed")
# The score each label's heads are ranked by in summaries ("mixed": most focused first).
LABEL_SCORE = {"previous-token": "previous_token", "first-token": "first_token", "self": "self",
               "broad": "entropy_norm", "mixed": "entropy_norm"}
RULE = (f"previous-token if previous_token >= {PATTERN}, else first-token if first_token >= {PATTERN}, else self "
        f"if self >= {PATTERN}, else broad if entropy_norm >= {BROAD}, else mixed; means over rows with prompt_index "
        f">= 0 and position >= {MIN_POSITION}")
STATS = ("n_rows", "entropy", "entropy_norm", "first_token", "previous_token", "self")


def _row_scores(w: np.ndarray, pos: np.ndarray, n_keys: np.ndarray) -> dict[str, np.ndarray]:
    """Per-row (token, layer, head) scores of scored rows; w is (token, layer, head, key)."""
    w = w.astype(np.float32)
    t = np.arange(len(pos))
    positive = w > 0
    entropy = -np.where(positive, w * np.log(np.where(positive, w, 1)), 0).sum(-1)
    return {"entropy": entropy, "entropy_norm": entropy / np.log(n_keys)[:, None, None],
            "first_token": w[..., 0], "previous_token": w[t, :, :, pos - 1], "self": w[t, :, :, pos]}


def _scored(pos: np.ndarray, pidx: np.ndarray) -> np.ndarray:
    return (pidx >= 0) & (pos >= MIN_POSITION)


def _n_keys(pos: np.ndarray, pidx: np.ndarray, causal: bool, n_tokens: np.ndarray) -> np.ndarray:
    return pos + 1 if causal else n_tokens[pidx]


def _block_sums(w, pos, pidx, row, *, causal: bool, n_tokens: np.ndarray) -> np.ndarray:
    """(1, layer, head, stat) sums of one token chunk."""
    keep = _scored(pos, pidx)
    out = np.zeros((1,) + w.shape[1:3] + (len(STATS),))
    if keep.any():
        pos, pidx = pos[keep], pidx[keep]
        scores = _row_scores(w[keep], pos, _n_keys(pos, pidx, causal, n_tokens))
        out[0, ..., 0] = keep.sum()
        for i, name in enumerate(STATS[1:], 1):
            out[0, ..., i] = scores[name].sum(0, dtype=np.float64)
    return out


def _profile(scores: dict[str, np.ndarray]) -> np.ndarray:
    first, prev, self_ = scores["first_token"], scores["previous_token"], scores["self"]
    return np.stack([first, prev, self_, 1 - first - prev - self_], axis=-1)


def _block_top(w, pos, pidx, row, mean, *, causal: bool, n_tokens: np.ndarray, top: int) -> np.ndarray:
    """(top, layer, head, 2): the chunk's largest deviations and their token rows (-1 where none).
    mean is the (layer, head, 4) mean profile of the block's layers."""
    out = np.full((top,) + w.shape[1:3] + (2,), -1.0)
    out[..., 0] = -np.inf
    keep = _scored(pos, pidx)
    if keep.any():
        pos, pidx, row = pos[keep], pidx[keep], row[keep]
        tv = 0.5 * np.abs(_profile(_row_scores(w[keep], pos, _n_keys(pos, pidx, causal, n_tokens))) - mean).sum(-1)
        k = min(top, len(row))
        best = np.argsort(-tv, axis=0, kind="stable")[:k]  # (k, layer, head)
        out[:k, ..., 0] = np.take_along_axis(tv, best, axis=0)
        out[:k, ..., 1] = row[best]
    return out


def label_heads(first: np.ndarray, previous: np.ndarray, self_: np.ndarray, entropy_norm: np.ndarray) -> np.ndarray:
    """The dominant-pattern label of each head; the rule is in the module docstring."""
    return np.select([previous >= PATTERN, first >= PATTERN, self_ >= PATTERN, entropy_norm >= BROAD],
                     list(LABELS[:4]), default=LABELS[4]).astype(str)


def _blockwise(fn, att, rows, new: int, out_rows: int, *extra, **kwargs):
    """fn over each token chunk (and layer chunk) of attention with its rows' position, prompt_index and
    row number; `extra` are (array, index) pairs such as the mean profile blocked by layer."""
    pos, pidx, row = rows
    return da.blockwise(fn, "tlhs", att, "tlhk", pos, "t", pidx, "t", row, "t", *extra, new_axes={"s": new},
                        adjust_chunks={"t": out_rows}, concatenate=True, dtype=np.float64, meta=np.empty((0,) * 4),
                        **kwargs)


def summarize_heads(run, top: int = 5, recompute: bool = False, progress: bool = True) -> xr.Dataset:
    """Compute (or reuse) analysis/heads for `run` and return it lazily from the store."""
    single_stack(run, "the heads summary")
    if not isinstance(top, int) or isinstance(top, bool) or top < 1:
        raise ConfigError(f"--top {top!r} must be a whole number of at least 1")
    params = {"top": top, "min_position": MIN_POSITION, "pattern": PATTERN, "broad": BROAD}
    if not recompute and (stored := load_result(run, JOB, params)) is not None:
        return stored
    att = run.require("attention").data
    att = att.rechunk({1: att.chunks[1], 2: -1, 3: -1})
    tchunks = att.chunks[0]
    rows = tuple(run.ds[n].data.rechunk(tchunks) for n in ("position", "prompt_index")) + (
        da.arange(att.shape[0], chunks=tchunks, dtype=np.int64),)
    causal = bool(run.attrs["model"]["causal"])
    n_tokens = seq_lengths(run)  # one int per prompt: its keys (a capture may store only some rows)
    common = {"causal": causal, "n_tokens": n_tokens}
    with job_progress(progress):
        sums = _blockwise(_block_sums, att, rows, len(STATS), 1, **common).sum(axis=0).compute()
    count = sums[..., 0]
    if not count.any():
        raise ConfigError(f"no prompt of {run.path} has {MIN_POSITION + 1} or more tokens; head summaries "
                          "score positions >= 2 only: capture longer prompts")
    means = {name: sums[..., i] / count for i, name in enumerate(STATS) if i}
    mean_profile = _profile(means)
    with job_progress(progress):
        mean = da.from_array(mean_profile, chunks=(att.chunks[1], -1, -1))
        tops = _blockwise(_block_top, att, rows, 2, top, mean, "lhp", top=top, **common).compute()
    best = np.argsort(-tops[..., 0], axis=0, kind="stable")[:top]
    deviation = np.take_along_axis(tops[..., 0], best, axis=0)
    token_row = np.take_along_axis(tops[..., 1], best, axis=0).astype(np.int64)
    token_row[~np.isfinite(deviation)] = -1
    flat = np.clip(token_row.ravel(), 0, None)
    lookup = {n: run.ds[n].data.vindex[flat].compute().reshape(token_row.shape) for n in ("prompt_index", "position")}
    for values in lookup.values():
        values[token_row < 0] = -1
    dims, rdims = ("layer", "head"), ("rank", "layer", "head")
    ds = xr.Dataset(
        {**{name: (dims, means[name]) for name in STATS[1:]},
         "n_rows": (dims, count.astype(np.int64)),
         "label": (dims, label_heads(means["first_token"], means["previous_token"], means["self"],
                                     means["entropy_norm"]).astype(object)),
         "top_prompt": (rdims, lookup["prompt_index"].astype(np.int32)),
         "top_position": (rdims, lookup["position"].astype(np.int32)),
         "top_token": (rdims, token_row),
         "top_deviation": (rdims, np.where(token_row >= 0, deviation, np.nan))},
        coords={"layer": run.ds["layer"].values, "head": np.arange(att.shape[2]), "rank": np.arange(top)})
    ds.attrs["rule"] = RULE
    return save_result(run, JOB, ds.transpose("layer", "head", "rank"), params)


def heads_frame(ds: xr.Dataset) -> pd.DataFrame:
    """One row per (layer, head): the scores, the label and where the head deviates most."""
    frame = ds[["entropy", "entropy_norm", "first_token", "previous_token", "self", "label", "n_rows"]] \
        .to_dataframe().reset_index()
    frame["label"] = frame["label"].astype(str)
    prompts, positions = ds["top_prompt"].values, ds["top_position"].values  # layer, head, rank
    L, H = prompts.shape[:2]
    frame["top_prompts"] = [[int(v) for v in prompts[l, h] if v >= 0] for l in range(L) for h in range(H)]
    frame["top_positions"] = [[int(v) for v in positions[l, h] if v >= 0] for l in range(L) for h in range(H)]
    return frame


def summary_lines(frame: pd.DataFrame, per_label: int = 3) -> list[str]:
    """What `stratascope heads` prints: heads per label, and the clearest heads of each label."""
    lines = [f"{len(frame)} heads ({frame.layer.nunique()} layers x {frame['head'].nunique()} heads), "
             f"scored over {int(frame.n_rows.iloc[0])} token rows (positions >= {MIN_POSITION})"]
    for label in LABELS:
        group = frame[frame.label == label]
        score = LABEL_SCORE[label]
        best = group.sort_values(score, ascending=label == "mixed").head(per_label)
        shown = ", ".join(f"L{r.layer}H{r.head} ({score} {getattr(r, score):.2f})" for r in best.itertuples())
        lines.append(f"{label:<15}{len(group):>5}" + (f"   e.g. {shown}" if shown else ""))
    return lines
