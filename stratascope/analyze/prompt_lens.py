"""The lens of a few rows, now: numpy on zarr slices, for the one-prompt calls.

`layer_predictions`, `rankings`, `rankings_watch` read one prompt's rows: a dask graph and a
torch import would cost more than the computation (tens of milliseconds in numpy). So these
calls read the zarr arrays directly (Store.array), keep the run's readout in memory once per
Run object, and apply it here in numpy: the same final norm and unembedding as
analyze/readout.py, float32 throughout, the vocabulary walked in blocks of rows.

Corpus jobs use the torch kernel (lens_kernel.py), which also runs on a GPU.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import ConfigError, MissingArrayError
from .lens_inputs import (
    _check,
    _plan_depths,
    _position_row,
    captured_depths,
    next_ids_range,
    require_hidden,
    watch_ids,
)
from .stacks import lens_slice
from .stored_rows import require_every_position

ROW_BLOCK = 64  # rows x depths whose full-vocabulary logits are held at once (64 x 49152 float32 = 12 MiB)
_LOCK = threading.Lock()


@dataclass(frozen=True)
class ReadoutArrays:
    """The stored readout as numpy arrays: final norm (type, eps, weight incl. offset, bias) and unembedding."""

    norm_type: str
    eps: float
    norm_weight: np.ndarray | None
    norm_bias: np.ndarray | None
    unembed: np.ndarray  # (vocab, d_model) float32
    unembed_bias: np.ndarray | None

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """The final norm of x (..., d_model) in float32, as Hugging Face computes it."""
        x = np.asarray(x, dtype=np.float32)
        if self.norm_type == "rmsnorm":
            x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(self.eps))
            x = x * self.norm_weight
        elif self.norm_type == "layernorm":
            mean = x.mean(-1, keepdims=True)
            var = ((x - mean) ** 2).mean(-1, keepdims=True)
            x = (x - mean) / np.sqrt(var + np.float32(self.eps)) * self.norm_weight
        else:
            return x
        return x + self.norm_bias if self.norm_bias is not None else x

    def logits(self, x: np.ndarray, ids=None) -> np.ndarray:
        w = self.unembed if ids is None else self.unembed[ids]
        z = x @ w.T
        if self.unembed_bias is not None:
            z += self.unembed_bias if ids is None else self.unembed_bias[ids]
        return z


def read_readout(run) -> ReadoutArrays:
    """The readout stored in `run` (no torch); MissingArrayError for encoders, which have no LM head."""
    attrs = run.readout.attrs
    if not attrs.get("lens") or "unembed" not in run.readout:
        raise MissingArrayError(
            f"{run.path} was captured from {run.attrs['model']['name']}, which has no LM head "
            "(an encoder), so there is nothing to read the residual out into; the lens needs a causal LM run")
    norm_type = attrs.get("norm_type", "none")
    if norm_type not in ("rmsnorm", "layernorm", "none"):
        raise ConfigError(f"{run.path}: unknown stored norm type {norm_type!r}")

    def read(name):
        return np.asarray(run.array(f"readout/{name}")[...], dtype=np.float32)

    weight = bias = unembed_bias = None
    if norm_type != "none":
        weight = read("norm_weight") + np.float32(attrs.get("norm_weight_offset", 0.0))  # Gemma-style 1 + w
        if attrs.get("has_norm_bias") and "norm_bias" in run.readout:
            bias = read("norm_bias")
    if attrs.get("has_unembed_bias") and "unembed_bias" in run.readout:
        unembed_bias = read("unembed_bias")
    unembed = read("unembed") * np.float32(attrs.get("logit_scale", 1.0))  # T5's rescaling before the LM head
    return ReadoutArrays(norm_type, float(attrs.get("norm_eps", 0.0)), weight, bias, unembed, unembed_bias)


def readout_arrays(run) -> ReadoutArrays:
    """The run's readout, read once per Run object (model-sized: kept on the object, not per call)."""
    with _LOCK:
        cached = run.__dict__.get("_readout_arrays")
        if cached is None:
            cached = run.__dict__["_readout_arrays"] = read_readout(run)
    return cached


@dataclass(frozen=True)
class RowLens:
    topk_ids: np.ndarray  # (n, D, k) int64
    topk_probs: np.ndarray  # (n, D, k) float32
    target_rank: np.ndarray  # (n, D) int64; -1 where there is no target
    watch_rank: np.ndarray  # (n, D, W) int64


def lens_of_rows(readout: ReadoutArrays, hidden: np.ndarray, norm: str, final_index: int | None,
                 targets: np.ndarray | None = None, watch=(), topk: int = 10) -> RowLens:
    """The lens of `hidden` (n, D, d_model): top-k and probabilities, ranks (1-based: 1 + entries
    with a strictly larger logit) of each row's target and of the watched ids, at every depth.
    norm 'final' normalizes every depth; 'none' only `final_index` (Ecco's variant)."""
    n, D, d = hidden.shape
    x = np.asarray(hidden, dtype=np.float32)
    if norm == "final":
        x = readout.normalize(x)
    elif final_index is not None:
        x = x.copy()
        x[:, final_index] = readout.normalize(x[:, final_index])
    flat = x.reshape(n * D, d)
    tgt = np.repeat(np.full(n, -1) if targets is None else np.asarray(targets), D)
    watch = np.asarray(watch, dtype=np.int64)
    V = readout.unembed.shape[0]
    k = min(topk, V)  # 0: no top-k (rank-only calls)
    top_ids = np.empty((n * D, k), np.int64)
    top_probs = np.empty((n * D, k), np.float32)
    ranks = np.full(n * D, -1, np.int64)
    wranks = np.empty((n * D, len(watch)), np.int64)
    for s in range(0, n * D, ROW_BLOCK):
        z = readout.logits(flat[s:s + ROW_BLOCK])  # rows, V
        if k:
            if k == 1:
                top = z.argmax(1)[:, None]
            else:
                idx = np.argpartition(-z, k - 1, axis=1)[:, :k]
                top = np.take_along_axis(idx, np.argsort(-np.take_along_axis(z, idx, 1), axis=1, kind="stable"), 1)
            m = z.max(1, keepdims=True)
            logsum = np.log(np.exp(z - m).sum(1, keepdims=True)) + m
            top_ids[s:s + len(z)] = top
            top_probs[s:s + len(z)] = np.exp(np.take_along_axis(z, top, 1) - logsum)
        t = tgt[s:s + len(z)]
        has = t >= 0
        if has.any():
            own = z[has, t[has]][:, None]
            ranks[s:s + len(z)][has] = 1 + (z[has] > own).sum(1)
        if len(watch):
            wranks[s:s + len(z)] = 1 + (z[:, None, :] > z[:, watch][:, :, None]).sum(2)
    return RowLens(top_ids.reshape(n, D, k), top_probs.reshape(n, D, k), ranks.reshape(n, D),
                   wranks.reshape(n, D, len(watch)))


# ---------------------------------------------------------------- the one-prompt calls


def _rows_lens(run, start: int, stop: int, depth_values: list[int], norm: str, watch=(), topk: int = 10,
               with_targets: bool = True, lens="logit") -> RowLens:
    """The lens of token rows start..stop-1 at `depth_values`, read straight from zarr; `lens`
    'tuned' / 'tuned:RUN' translates each depth first (analyze/tuned_lens.py)."""
    require_hidden(run)
    idx, final = _plan_depths(run, depth_values)
    hidden = run.array("hidden")
    h = np.asarray(hidden.get_orthogonal_selection((slice(start, stop), idx)), dtype=np.float32)
    if str(lens) != "logit":
        h = _translated(run, h, [captured_depths(run)[i] for i in idx], norm, lens)
    targets = None
    if with_targets:
        targets = next_ids_range(run, start, stop)
    got = lens_of_rows(readout_arrays(run), h, norm, final, targets, watch, topk)
    D = len(depth_values)  # depth L may have been appended as the KL reference: not returned
    return RowLens(got.topk_ids[:, :D], got.topk_probs[:, :D], got.target_rank[:, :D], got.watch_rank[:, :D])


def _translated(run, h: np.ndarray, depths: list[int], norm: str, lens) -> np.ndarray:
    """h + A h + b at each depth, with the tuned lens's translators (the identity at depth L)."""
    from .lens import lens_translator

    weight, bias = (t.numpy() for t in lens_translator(run, lens, depths, norm))
    return h + np.einsum("nkj,kij->nki", h, weight) + bias


def layer_predictions(run, prompt: int = 0, position: int = -1, depth: int | None = None, topk: int = 10,
                      norm: str = "final", lens="logit") -> pd.DataFrame:
    """The top-k tokens the lens reads out at one depth (default: the last captured) for one position."""
    _check(norm, "float32", topk)
    depths = captured_depths(run)
    depth = depths[-1] if depth is None else depth
    if depth not in depths:
        from ..errors import OutOfRangeError
        from ..ranges import format_ranges

        raise OutOfRangeError(f"depth {depth} is out of range; this run holds depths {format_ranges(depths)}")
    row = _position_row(run, prompt, position)
    got = _rows_lens(run, row, row + 1, [depth], norm, topk=topk, with_targets=False, lens=lens)
    ids = got.topk_ids[0, 0]
    vocab = np.asarray(run.array("readout/vocab_str").get_coordinate_selection(ids))
    return pd.DataFrame({"rank": np.arange(1, len(ids) + 1), "token": vocab.astype(object), "token_id": ids,
                         "prob": got.topk_probs[0, 0]})


def rankings(run, prompt: int = 0, norm: str = "final", lens="logit") -> pd.DataFrame:
    """Depth x position: the rank of the token that actually came next (Ecco's rankings). The last
    position has no next token, so it is not a column; columns are labelled with the tokens."""
    _check(norm, "float32", 1)
    require_every_position(run, "rankings (depth x position of one prompt)")
    rows = lens_slice(run, prompt)
    depths = captured_depths(run)
    got = _rows_lens(run, rows.start, rows.stop, depths, norm, topk=0, lens=lens)
    tokens = np.asarray(run.array("token_str")[rows.start:rows.stop]).astype(object)
    n = len(tokens) - 1
    columns = pd.MultiIndex.from_arrays([np.arange(n), tokens[1:]], names=["position", "next token"])
    df = pd.DataFrame(got.target_rank[:n].T, index=pd.Index(depths, name="depth"), columns=columns)
    df.attrs.update(tokens=list(tokens[:n]), next_tokens=list(tokens[1:]))
    return df


def rankings_watch(run, prompt: int = 0, watch=(" he", " she"), position: int = -1,
                   norm: str = "final", lens="logit") -> pd.DataFrame:
    """Depth x watch token: the rank of each watched token at one position (Ecco's rankings_watch)."""
    _check(norm, "float32", 1)
    labels, ids = watch_ids(run, watch)
    if not ids:
        raise ConfigError("give at least one watch word")
    row = _position_row(run, prompt, position)
    depths = captured_depths(run)
    got = _rows_lens(run, row, row + 1, depths, norm, watch=ids, topk=0, with_targets=False, lens=lens)
    return pd.DataFrame(got.watch_rank[0], index=pd.Index(depths, name="depth"),
                        columns=pd.Index(labels, name="watch"))
