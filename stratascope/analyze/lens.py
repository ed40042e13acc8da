"""The lens job: logit lens, next-token rank trajectories and watched tokens, from the store alone.

`lens_tokens` computes the lens for any rows of a run (the building block other analyses
reuse); `run_lens` is the corpus job: dask over the hidden array's token chunks, torch
inside each task (lens_kernel.lens_rows walks the vocabulary in blocks), written to
analysis/lens and reused when asked again with the same parameters.

Conventions: depths are the captured depth values (0 = embeddings, L = input of the final
norm). Ranks are 1-based. A token's target is the token that came next in its sequence
(prompt or generated); the last token of each sequence has none: target_id -1,
target_rank -1, target_prob NaN. kl_final is KL(p_final || p_depth) in nats against the
model's output distribution (depth L, normalized); NaN if depth L was not captured.

lens="tuned" (or "tuned:RUN", translators trained on another run of the same model) reads
every depth below L through the tuned lens's affine translator first (tuned_lens.py); the
result is keyed by that choice, so logit and tuned results never stand in for each other.
"""

from __future__ import annotations

import json

import dask
import dask.array as da
import numpy as np
import torch
import xarray as xr

from ..errors import ConfigError, OutOfRangeError
from ..ranges import format_ranges
from ..schemas import LENS
from .lens_inputs import (  # noqa: F401 - the lens' inputs, also read from here by other analyses
    _check,
    _plan_depths,
    _position_row,
    _tokenizer,
    captured_depths,
    lens_prompt_index,
    next_ids_at,
    next_ids_lazy,
    parse_depths,
    require_hidden,
    targets_of,
    watch_ids,
)
from .lens_kernel import LensArrays, lens_rows
from .readout import Readout, readout_for
from .results import job_progress, load_result, save_result
from .stacks import lens_slice

JOB = LENS.job
_FIELDS = ("topk_ids", "topk_probs", "target_rank", "target_prob", "entropy", "kl_final", "watch_rank", "watch_prob")
_FILL = {"int32": -1, "float32": np.nan}


# ---------------------------------------------------------------- the tuned lens


def lens_translator(run, lens, depths: list[int], norm: str):
    """(weight, bias) tensors translating the residual at each of `depths` (identity at depth L),
    or None for the logit lens."""
    from .tuned_lens import resolve_lens

    tuned = resolve_lens(run, lens)
    if tuned is None:
        return None
    if norm != "final":
        raise ConfigError("--lens tuned reads out through the final norm it was trained with; drop --norm none")
    return tuned.translator(depths, int(run.attrs["model"]["n_layers"]))


def _translate(h: torch.Tensor, translator) -> torch.Tensor:
    if translator is None:
        return h
    from .tuned_lens import translate

    return translate(h, *translator)


# ---------------------------------------------------------------- rows


def lens_tokens(run, rows, depths=None, watch=(), topk: int = 10, norm: str = "final", device: str = "cpu",
                precision: str = "float32", lens="logit") -> LensArrays:
    """The lens of selected token rows of `run` (a slice or an index array), computed now.

    Returns LensArrays with axes (row, depth, k|watch) for the chosen depths, in that order.
    `watch` holds words or ids (see watch_ids); `lens` is 'logit', 'tuned' or 'tuned:RUN'.
    This is the function other analyses build on.
    """
    _check(norm, precision, topk)
    hidden = require_hidden(run)
    readout = readout_for(run, device, precision)
    depths = parse_depths(run, depths)
    idx, final = _plan_depths(run, depths)
    translator = lens_translator(run, lens, [captured_depths(run)[i] for i in idx], norm)
    _, ids = watch_ids(run, watch)
    n = run.n_tokens
    if isinstance(rows, slice):
        rows = np.arange(*rows.indices(n))
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if len(rows) and (rows.min() < 0 or rows.max() >= n):
        raise OutOfRangeError(f"token rows must lie in 0-{n - 1}")
    h = _translate(torch.from_numpy(np.asarray(hidden.isel(token=rows, depth=idx).values, dtype=np.float32)),
                   translator)
    out = lens_rows(h, readout, next_ids_at(run, rows), ids, topk, norm, final)
    return _select_depths(out, len(depths))


def _select_depths(out: LensArrays, n_depths: int) -> LensArrays:
    return LensArrays(*(getattr(out, f)[:, :n_depths] for f in _FIELDS))


# ---------------------------------------------------------------- the job


class _ChunkLens:
    """The dask task: lens of one token chunk; masked rows (prompt_index < 0) are filled, not computed."""

    def __init__(self, readout: Readout, ids: list[int], topk: int, norm: str, final: int | None, n_depths: int,
                 translator=None):
        self.readout, self.ids, self.topk, self.norm = readout, ids, topk, norm
        self.final, self.n_depths, self.translator = final, n_depths, translator

    def __call__(self, h: np.ndarray, target: np.ndarray, prompt_index: np.ndarray) -> tuple[np.ndarray, ...]:
        try:
            return self._lens(h, target, prompt_index)
        finally:
            _release_freed_memory()

    def _lens(self, h: np.ndarray, target: np.ndarray, prompt_index: np.ndarray) -> tuple[np.ndarray, ...]:
        valid = prompt_index >= 0
        hv = _translate(torch.from_numpy(np.ascontiguousarray(h[valid], dtype=np.float32)), self.translator)
        got = _select_depths(lens_rows(hv, self.readout, target[valid], self.ids, self.topk, self.norm,
                                       self.final), self.n_depths)
        if valid.all():
            return tuple(getattr(got, f) for f in _FIELDS)
        outs = []
        for f in _FIELDS:
            part = getattr(got, f)
            full = np.full((len(h),) + part.shape[1:], _FILL[str(part.dtype)], dtype=part.dtype)
            full[valid] = part
            outs.append(full)
        return tuple(outs)


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS after each chunk. glibc raises its mmap threshold
    after large frees, so the chunk-sized temporaries land on the heap and, without this,
    fragmentation makes the peak RSS creep up with the number of chunks (measured: +40 MiB
    for a 10x store); with it the peak stays flat."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _MALLOC_TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to do
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def lens_params(run, topk: int = 10, watch=(), depths=None, norm: str = "final",
                precision: str = "float32", lens="logit") -> dict:
    """The parameters that decide the lens result (the device does not). A tuned lens adds the
    identity of its translators (the logit lens adds nothing, so earlier results still match)."""
    from .tuned_lens import resolve_lens

    _check(norm, precision, topk)
    labels, ids = watch_ids(run, watch)
    params = {"topk": int(topk), "watch": labels, "watch_ids": ids, "depths": parse_depths(run, depths),
              "norm": norm, "precision": precision}
    tuned = resolve_lens(run, lens)
    if tuned is not None:
        params["lens"] = tuned.identity()
    return params


def lens_dataset(run, params: dict, device: str = "cpu") -> xr.Dataset:
    """The lens of every token as a lazy Dataset (nothing is computed until it is written)."""
    hidden = require_hidden(run)
    readout = readout_for(run, device, params["precision"])
    depths, ids, k = params["depths"], params["watch_ids"], min(params["topk"], readout.vocab_size)
    idx, final = _plan_depths(run, depths)
    translator = lens_translator(run, f"tuned:{params['lens']['run']}" if "lens" in params else "logit",
                                 [captured_depths(run)[i] for i in idx], params["norm"])
    hid = hidden.data[:, idx, :]
    target = next_ids_lazy(run).rechunk((hid.chunks[0],))
    pidx = lens_prompt_index(run.ds).rechunk((hid.chunks[0],))
    task = _ChunkLens(readout, ids, k, params["norm"], final, len(depths), translator)
    D, W = len(depths), len(ids)
    token = dask.base.tokenize(run.path, run.attrs["created"], json.dumps(params, sort_keys=True), device)
    shapes = {"topk_ids": (D, k), "topk_probs": (D, k), "target_rank": (D,), "target_prob": (D,),
              "entropy": (D,), "kl_final": (D,), "watch_rank": (D, W), "watch_prob": (D, W)}
    dtypes = {f: np.dtype(LENS[f].dtype) for f in _FIELDS}
    columns: dict[str, list] = {f: [] for f in _FIELDS}
    blocks = zip(hid.to_delayed().ravel(), target.to_delayed().ravel(), pidx.to_delayed().ravel())
    for i, (hb, tb, pb) in enumerate(blocks):
        n = hid.chunks[0][i]
        parts = dask.delayed(task, name=f"lens-fn-{token}", pure=True, nout=len(_FIELDS))(
            hb, tb, pb, dask_key_name=f"lens-{token}-{i}")
        for f, part in zip(_FIELDS, parts):
            columns[f].append(da.from_delayed(part, (n,) + shapes[f], dtype=dtypes[f]))
    data = {f: (LENS[f].dims, da.concatenate(columns[f])) for f in _FIELDS if W or "watch" not in LENS[f].dims}
    data["target_id"] = (LENS["target_id"].dims, target)
    coords = {"depth": np.array(depths, dtype=np.int32), "k": np.arange(k, dtype=np.int32)}
    if W:
        coords.update(watch=np.array(params["watch"], dtype=object), watch_id=("watch", np.array(ids, dtype=np.int32)))
    ds = xr.Dataset(data, coords=coords)
    ds.attrs.update(_describe(run, params, final is not None, device))
    return ds


def _describe(run, params: dict, has_final: bool, device: str) -> dict:
    L = int(run.attrs["model"]["n_layers"])
    variant = ("final norm, then unembedding, at every depth" if params["norm"] == "final" else
               f"Ecco's variant: unembedding of the raw residual at depths < {L}; depth {L} normalized "
               "(as in Hugging Face's last hidden state)")
    return {"norm_variant": variant, "device": device,
            "lens": (f"tuned: translators of {params['lens']['run']}/analysis/tuned_lens applied below depth {L}"
                     if "lens" in params else "logit"),
            "precision_note": ("float32: ranks exact up to ties within rounding" if params["precision"] == "float32"
                               else "bfloat16 matmul: ranks and probabilities are approximate"),
            "rank": "1-based: 1 + number of vocabulary entries with a strictly larger logit",
            "no_next_token": "the last token of each sequence: target_id -1, target_rank -1, target_prob NaN",
            "entropy_unit": "nats",
            "kl_final": (f"KL(p_depth{L} || p_depth) in nats, p_depth{L} the model's output distribution"
                         if has_final else f"NaN: depth {L} was not captured")}


def run_lens(run, topk: int = 10, watch=(), depths=None, norm: str = "final", device: str = "cpu",
             precision: str = "float32", progress: bool = True, lens="logit") -> xr.Dataset:
    """The lens of every token, stored in analysis/lens; reused if it was computed with these parameters."""
    params = lens_params(run, topk, watch, depths, norm, precision, lens)
    require_hidden(run)
    stored = load_result(run, JOB, params)
    if stored is not None:
        return stored
    ds = lens_dataset(run, params, device)
    with dask.config.set(**_local_scheduler()), job_progress(progress):
        return save_result(run, JOB, ds, params)


def _local_scheduler() -> dict:
    """Two local threads (torch runs multi-threaded inside each task), unless a dask.distributed
    client is active (--workers/--scheduler): then the job runs on that cluster."""
    try:
        from distributed import default_client

        default_client()
        return {}
    except (ImportError, ValueError):
        return {"scheduler": "threads", "num_workers": 2}


def summary(run, ds: xr.Dataset, max_prompts: int = 10) -> list[str]:
    """Lines for `stratascope lens`: per prompt, the last position's top-1 at the last depth and
    the depth from which the tokens that came next are ranked first; then corpus totals."""
    depths = [int(d) for d in ds["depth"].values]
    vocab = run.readout["vocab_str"]
    kind = "tuned lens" if "lens" in ds.attrs["params"] else "lens"
    lines = [f"{kind} of {run.n_tokens} tokens at depths {format_ranges(depths)} (norm {ds.attrs['params']['norm']}, "
             f"{ds.attrs['params']['precision']}, top-{ds.sizes['k']}) stored in {run.path}/analysis/lens"]
    for p in range(min(run.n_prompts, max_prompts)):
        rows = ds.isel(token=lens_slice(run, p))[["topk_ids", "topk_probs", "target_rank"]].load()
        top, prob = int(rows.topk_ids[-1, -1, 0]), float(rows.topk_probs[-1, -1, 0])
        ranks = rows.target_rank.values[:-1]  # (positions with a next token, depth)
        first = [depths[int(np.argmax(r == 1))] for r in ranks if (r == 1).any()]
        text = str(run.ds["prompt_text"][p].values)
        text = text if len(text) <= 40 else text[:39] + "…"
        reach = (f"next token ranked 1st from depth {int(np.median(first))} (median over {len(first)} of "
                 f"{len(ranks)} positions)" if first else f"next token never ranked 1st ({len(ranks)} positions)")
        lines.append(f"  {p:>3} {text!r} -> {str(vocab[top].values)!r} ({prob:.2f}); {reach}")
    if run.n_prompts > max_prompts:
        lines.append(f"  ... {run.n_prompts - max_prompts} more prompts")
    last = ds["target_rank"][:, -1].data
    scored, hits = dask.compute((last > 0).sum(), (last == 1).sum(), **_local_scheduler())
    if scored:
        lines.append(f"at depth {depths[-1]} the token that came next is ranked 1st for {int(hits)} of {int(scored)} "
                     f"tokens ({100 * hits / scored:.1f}%)")
    return lines
