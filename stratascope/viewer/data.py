"""The slices each view needs, read lazily from a Run, as plain JSON-able dicts.

Shared by the report (embedded), the app (one endpoint per function) and the notebook views.
Each function reads only the rows of one prompt (and one layer), never a whole array.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..analyze.results import jobs, latest_result, require_result, result_groups
from ..analyze.stored_rows import require_every_position
from ..caching import LRU
from ..errors import MissingArrayError, OutOfRangeError
from ..schemas import (
    ATTRIBUTION_PREFIX,
    BIAS,
    BIAS_CORRELATION,
    DLA,
    HEADS,
    LENS,
    META_PREFIX,
    NMF,
    PROBE,
    STACKS,
    VARIABLES,
)
from ..store import open_dataset
from .render import token_label

# Attention weights below this are not sent: rows sum to 1, so at most 1/MIN_WEIGHT keys per
# query survive and a long prompt's payload grows linearly, not quadratically, with its length.
MIN_WEIGHT = 0.01

# --- The names read here, from the schema (schemas/groups.py; a rename there fails at import) -----
# Results live at analysis/<job>/<name>; the views show each job's newest result.
LENS_JOB = LENS.job
LENS_TOPK_IDS = LENS["topk_ids"].name          # (token, depth, k) int: top-k vocabulary ids of the lens
LENS_TOPK_PROBS = LENS["topk_probs"].name      # (token, depth, k) float: their probabilities
LENS_TARGET_RANK = LENS["target_rank"].name    # (token, depth) int: rank of the next token; -1 on a last position
LENS_WATCH_RANK = LENS["watch_rank"].name      # (token, depth, watch) int: ranks of the watched tokens
LENS_WATCH_COORD = LENS["watch"].name          # coordinate of the watch dim holding the watched words
LENS_RANK_BASE = 1                             # the lens job stores 1-based ranks (1 + entries with a larger logit)
# root arrays attribution_<method> (token, key): row r = attribution of the prediction made at position r
# (of token r+1) over keys 0..r, L2 norms (>= 0); rows that are not targets are NaN.
TOKEN_TYPE_IDS = VARIABLES["token_type_ids"].name  # optional (token,) array: sentence A/B of an encoder input
# encoder-decoder runs: a prompt's first n_source_tokens rows are the source (is_decoder false), the rest the
# decoder; cross_attention (token, layer, head, source) holds a decoder row's weights over the source
N_SOURCE = VARIABLES["n_source_tokens"].name
IS_DECODER = VARIABLES["is_decoder"].name
CROSS_ATTENTION = VARIABLES["cross_attention"].name
ATTENTION_STACKS = STACKS
HEADS_JOB = HEADS.job
HEADS_SCORES = tuple(HEADS[n].name for n in ("first_token", "previous_token", "self", "entropy_norm", "entropy"))
NMF_JOB = NMF.job
NMF_WEIGHTS = NMF["token_factor"].name         # (token, factor) float32 >= 0
BIAS_JOB = BIAS.job                            # (prompt, depth, pair) log_ratio; occupation (prompt)
BIAS_CORRELATION_JOB = BIAS_CORRELATION.job    # (pair, depth) pearson_r/_p, spearman_rho/_p, n
PROBE_PREFIX = PROBE.prefix                    # analysis/probe_<label>/<name>
DLA_JOB = DLA.job                              # (row, component) by_component; (row,) prompt, position, logit, gap
DLA_BY_HEAD = DLA["by_head"].name              # (row, layer, head) float32, with --capture z
DLA_NEURON_ID = DLA["neuron_id"].name          # (row, layer, k) int32, with --neurons K
DLA_NEURON_CONTRIBUTION = DLA["neuron_contribution"].name  # (row, layer, k) float32: their contributions
SIMILARITY_JOB = "similarity"                  # (depth_a, depth_b) similarity; dims_a/dims_b
TUNED_JOB = "tuned_lens"                       # (lens, depth) held-out kl, cross_entropy, entropy
# ------------------------------------------------------------------------------------------------


def _rounded(values: np.ndarray, decimals: int = 4) -> list:
    """A nested list of rounded floats, None where a value is not finite (JSON has no NaN)."""
    a = np.round(np.asarray(values, dtype=np.float64), decimals)
    return np.where(np.isfinite(a), a, None).tolist()


def _cached(run, key: tuple, make: Callable, size: int = 16):
    """A small per-run LRU of slices: a report asks for the same prompt (and layer) once per head or view.

    One LRU per kind (key[0]); the app's request threads share them (LRU locks its table, and
    dict.setdefault keeps a single LRU per kind when two threads create it at once)."""
    caches = run.__dict__.setdefault("_viewer_cache", {})
    lru = caches.get(key[0]) or caches.setdefault(key[0], LRU(size))
    return lru.get(key, make)


def _prompt_rows(run, prompt: int) -> tuple[slice, dict]:
    """The row slice of a prompt and its token labels (shared by every view)."""
    require_every_position(run, "a prompt view")
    p = run.prompt_index(prompt)
    sl = _cached(run, ("slice", p), lambda: run.token_slice(p), size=64)
    sl2, info = _cached(run, ("rows", sl.start, sl.stop), lambda: _read_prompt_rows(run, prompt, sl))
    return sl2, dict(info)


def _read_prompt_rows(run, prompt: int, sl: slice) -> tuple[slice, dict]:
    rows = run.ds.isel(token=sl)
    raw = [str(t) for t in rows["token_str"].values]
    info = {"prompt": run.prompt_index(prompt), "n": len(raw), "tokens": raw,
            "labels": [token_label(t) for t in raw],
            "generated": [bool(g) for g in rows["is_generated"].values]}
    if TOKEN_TYPE_IDS in run.ds:
        info["segments"] = [int(s) for s in rows[TOKEN_TYPE_IDS].values]
    if IS_DECODER in run.ds:
        info["is_decoder"] = [bool(s) for s in rows[IS_DECODER].values]
    return sl, info


def encoder_decoder(run) -> bool:
    return N_SOURCE in run.ds


def _stack_rows(run, prompt: int, stack: str) -> tuple[slice, dict]:
    """An encoder-decoder prompt's rows of one stack ('encoder' or 'decoder') and their token info,
    positions counted within the stack."""
    sl, info = _prompt_rows(run, prompt)
    s = sum(not d for d in info["is_decoder"])
    part = slice(0, s) if stack == "encoder" else slice(s, info["n"])
    out = {k: v[part] for k, v in info.items() if isinstance(v, list)}
    out.update(prompt=info["prompt"], n=part.stop - part.start, stack=stack)
    return slice(sl.start + part.start, sl.start + part.stop), out


def metadata_columns(run) -> list[str]:
    """The corpus's per-prompt metadata columns (stored as meta_<name>), in the corpus's order."""
    order = run.attrs.get("corpus", {}).get("metadata_columns", [])
    names = [c for c in order if META_PREFIX + c in run.ds.variables]
    return names + sorted(n[len(META_PREFIX):] for n, v in run.ds.variables.items()
                          if n.startswith(META_PREFIX) and v.dims == ("prompt",) and n[len(META_PREFIX):] not in names)


def _meta_value(v) -> object:
    """A metadata value as JSON: text, a whole number, a rounded float, or None for a missing (NaN) one."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return None if not np.isfinite(v) else round(float(v), 6)
    return str(v)


def prompt_metadata(run, prompts: list[int]) -> list[dict]:
    """Each prompt's metadata as {column: value}, reading only these prompts of each meta_<name>."""
    columns = metadata_columns(run)
    values = {c: run.ds[META_PREFIX + c].isel(prompt=prompts).values for c in columns} if prompts else {}
    return [{c: _meta_value(values[c][i]) for c in columns} for i in range(len(prompts))]


FILTER_VALUES = 500  # the most common values of a metadata column offered by the tokens view's filter


def shown_value(v: object) -> str:
    """A metadata value (as _meta_value gives it) as the tokens view shows it, as JavaScript's String() writes
    numbers, so the app and the browser compare the same text."""
    if v is None:
        return "(missing)"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and abs(v) < 1e21 else repr(v)
    return str(v)


def prompt_filter(run, column: str, value: str) -> dict:
    """The prompts whose metadata `column` shows as `value` ('' = none asked), and the column's
    FILTER_VALUES most common values with their counts; reads one (prompt,) column."""
    columns = metadata_columns(run)
    if column not in columns:
        raise OutOfRangeError(f"no metadata column {column!r}; this run has {', '.join(map(repr, columns)) or 'none'}")
    shown = np.array([shown_value(_meta_value(v)) for v in run.ds[META_PREFIX + column].values], dtype=object)
    names, counts = np.unique(shown, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:FILTER_VALUES]
    return {"column": column, "value": value, "values": [[str(names[i]), int(counts[i])] for i in order],
            "n_values": int(len(names)), "prompts": np.flatnonzero(shown == value).tolist() if value else []}


def tokens(run, prompt: int) -> dict:
    """One prompt: its text, its metadata and its tokens (raw strings, readable labels, ids, generated flags)."""
    sl, info = _prompt_rows(run, prompt)
    p = info["prompt"]
    info["text"] = str(run.ds["prompt_text"][p].values)
    info["ids"] = [int(i) for i in run.ds["token_id"].isel(token=sl).values]
    info["meta"] = prompt_metadata(run, [p])[0]
    return info


def captured_layers(run) -> list[int]:
    return [int(v) for v in run.ds["layer"].values] if "layer" in run.ds.coords else []


def _check_layer(run, layer: int) -> None:
    layers = captured_layers(run)
    if layer not in layers:
        shown = f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else str(layers)
        raise OutOfRangeError(f"layer {layer} was not captured; this run has layers {shown}")


def attention(run, prompt: int, layer: int) -> dict:
    """One prompt at one layer: per head, the (query, key, weight) triples with weight >= MIN_WEIGHT."""
    if encoder_decoder(run):
        raise OutOfRangeError("this run holds an encoder-decoder model: its attention comes per stack "
                              "(attention_stack with stack encoder, decoder or cross)")
    att = run.require("attention")
    _check_layer(run, layer)
    sl, info = _prompt_rows(run, prompt)
    n = info["n"]
    a = np.asarray(att.sel(layer=layer).isel(token=sl, key=slice(0, n)).values, dtype=np.float32)  # q, head, key
    heads = []
    for h in range(a.shape[1]):
        q, k = np.nonzero(a[:, h, :] >= MIN_WEIGHT)
        heads.append({"q": q.tolist(), "k": k.tolist(), "w": np.round(a[q, h, k].astype(float), 3).tolist()})
    return {**info, "layer": layer, "n_heads": a.shape[1], "min_weight": MIN_WEIGHT, "heads": heads}


def attention_stack(run, prompt: int, layer: int, stack: str) -> dict:
    """Encoder-decoder runs, one prompt at one layer: the attention of one stack ('encoder': source x
    source, 'decoder': decoder x decoder, 'cross': decoder query x source key) as per-head (query,
    key, weight) triples with weight >= MIN_WEIGHT; `labels` are the queries, `key_labels` the keys."""
    if not encoder_decoder(run):
        raise OutOfRangeError("this run has one stack; its attention is the attention endpoint (no stack)")
    if stack not in ATTENTION_STACKS:
        raise OutOfRangeError(f"stack {stack[:40]!r} is not one of {', '.join(ATTENTION_STACKS)}")
    att = run.require(CROSS_ATTENTION if stack == "cross" else "attention", "attention")
    _check_layer(run, layer)
    qsl, q_info = _stack_rows(run, prompt, "encoder" if stack == "encoder" else "decoder")
    _, k_info = _stack_rows(run, prompt, "decoder" if stack == "decoder" else "encoder")
    key_dim = att.dims[-1]
    a = np.asarray(att.sel(layer=layer).isel({"token": qsl, key_dim: slice(0, k_info["n"])}).values, dtype=np.float32)
    heads = []
    for h in range(a.shape[1]):
        q, k = np.nonzero(a[:, h, :] >= MIN_WEIGHT)
        heads.append({"q": q.tolist(), "k": k.tolist(), "w": np.round(a[q, h, k].astype(float), 3).tolist()})
    return {**q_info, "stack": stack, "key_labels": k_info["labels"], "key_tokens": k_info["tokens"],
            "key_generated": k_info["generated"], "nk": k_info["n"], "layer": layer, "n_heads": a.shape[1],
            "min_weight": MIN_WEIGHT, "heads": heads}


def _vocab(run) -> np.ndarray:
    return _cached(run, ("vocab",), lambda: run.readout["vocab_str"].values, size=1)


LENS_KINDS = ("logit", "tuned")  # the lens a stored lens result read out through (its params' "lens": tuned)


def _lens_kind(params: dict) -> str:
    return "tuned" if "lens" in params else "logit"


def _lens_dataset(run, lens: str = "logit"):
    """The newest lens result of every token computed with `lens`: logit and tuned never stand in for each other."""
    if lens not in LENS_KINDS:
        raise OutOfRangeError(f"lens {lens[:40]!r} is not one of {', '.join(LENS_KINDS)}")
    how = ("the lens job of every token (stratascope lens)" if lens == "logit"
           else f"`stratascope lens {run.path} --lens tuned`")
    return require_result(run, LENS_JOB, how, where=lambda p: every_token(p) and _lens_kind(p) == lens)


def lens_kinds(run) -> list[str]:
    """The lenses with a stored lens result of every token, logit first (a view toggles between them)."""
    return [kind for kind in LENS_KINDS
            if latest_result(run, LENS_JOB, where=lambda p, k=kind: every_token(p) and _lens_kind(p) == k) is not None]


def every_token(params: dict) -> bool:
    """A lens result of every token (the views' kind), not a study of chosen rows or words."""
    return params.get("positions", "all") == "all" and params.get("target") is None and \
        params.get("target_column") is None


def _display_ranks(ranks: np.ndarray) -> list:
    """Ranks as shown (1 = top), None where there is none (a negative stored rank)."""
    shown = ranks.astype(np.int64) - LENS_RANK_BASE + 1
    return np.where(ranks < 0, None, shown).tolist()


def lens(run, prompt: int, lens: str = "logit") -> dict:
    """One prompt's lens results read out through `lens` ('logit' or 'tuned'): top-k tokens and
    probabilities, next-token ranks and watched-token ranks at every depth (whichever of these the
    lens job stored)."""
    ds = _lens_dataset(run, lens)
    # encoder-decoder runs: the LM head reads the decoder out, so the lens views show its rows only
    sl, info = _stack_rows(run, prompt, "decoder") if encoder_decoder(run) else _prompt_rows(run, prompt)
    depth = ds["depth"].values if "depth" in ds.coords else np.arange(ds.sizes.get("depth", 0))
    out = {**info, "lens": lens, "depths": [int(d) for d in depth],
           "vocab_size": int(run.readout["vocab_str"].shape[0])}
    rows = ds.isel(token=sl)
    if LENS_TOPK_IDS in ds and LENS_TOPK_PROBS in ds:
        ids = rows[LENS_TOPK_IDS].values  # token, depth, k
        vocab = _vocab(run)
        out["topk_labels"] = [[[token_label(str(vocab[i])) if 0 <= i < len(vocab) else "?" for i in d] for d in t]
                              for t in ids.tolist()]
        out["topk_probs"] = np.round(rows[LENS_TOPK_PROBS].values.astype(float), 4).tolist()
    if LENS_TARGET_RANK in ds:
        out["target_rank"] = _display_ranks(rows[LENS_TARGET_RANK].values.T)  # depth, token
    if LENS_WATCH_RANK in ds:
        watch_dim = ds[LENS_WATCH_RANK].dims[-1]
        watch = ds[LENS_WATCH_COORD].values if LENS_WATCH_COORD in ds.coords else ds.attrs.get("watch", [])
        words = [str(w) for w in watch] or [str(i) for i in range(ds.sizes[watch_dim])]
        out["watch"] = [token_label(w) for w in words]
        out["watch_rank"] = _display_ranks(rows[LENS_WATCH_RANK].values)  # token, depth, watch
    return out


def attribution_methods(run) -> list[str]:
    return sorted(name[len(ATTRIBUTION_PREFIX):] for name, v in run.ds.data_vars.items()
                  if name.startswith(ATTRIBUTION_PREFIX) and "key" in v.dims)  # not the (token,) IG delta


def saliency(run, prompt: int, method: str) -> dict:
    """One prompt's attributions, as Ecco shows them: `targets` are the positions t of predicted tokens
    whose stored row t-1 is a target row (not NaN); rows[t-1] is that row over keys 0..t-1 scaled to
    sum to 1 (sum of |values|, sent as row_sum so the stored values can be recovered); None elsewhere."""
    methods = attribution_methods(run)
    if method not in methods:
        if not methods:
            raise MissingArrayError("this run has no attribution arrays; capture with --capture attribution")
        raise OutOfRangeError(f"attribution method {method!r} is not stored; this run has {', '.join(methods)}")
    sl, info = _prompt_rows(run, prompt)
    n = info["n"]
    if encoder_decoder(run):
        a = _seq2seq_saliency_rows(run, sl, info, method)
    else:
        a = run.ds[ATTRIBUTION_PREFIX + method].isel(token=sl, key=slice(0, n)).values.astype(np.float64)
    is_target = ~np.isnan(a[:, 0])
    is_target[n - 1:] = False  # the last token predicts nothing inside the sequence
    rows, sums = [], []
    for r in range(n):
        if not is_target[r]:
            rows.append(None)
            sums.append(None)
            continue
        row = np.nan_to_num(a[r, : r + 1])
        total = float(np.abs(row).sum())
        rows.append(np.round(row / (total if total > 0 else 1.0), 4).tolist())
        sums.append(total)
    out = {**info, "method": method, "methods": methods, "rows": rows, "row_sum": sums,
           "targets": [int(r) + 1 for r in np.flatnonzero(is_target)]}
    delta = ATTRIBUTION_PREFIX + method + "_delta"
    if delta in run.ds:
        d = run.ds[delta].isel(token=sl).values.astype(np.float64)
        out["delta"] = [float(d[r]) if is_target[r] and np.isfinite(d[r]) else None for r in range(n)]
    return out


def _seq2seq_saliency_rows(run, sl: slice, info: dict, method: str) -> np.ndarray:
    """An encoder-decoder prompt's attributions in the causal layout over its rows (source, then
    decoder): decoder row s+r holds the source attributions, then those of the decoder prefix 0..r,
    so the saliency view shades source and prefix together; encoder rows are NaN (no targets)."""
    n, s = info["n"], sum(not d for d in info["is_decoder"])
    prefix = run.ds[ATTRIBUTION_PREFIX + method].isel(token=slice(sl.start + s, sl.stop), key=slice(0, n - s)).values
    source = run.ds[ATTRIBUTION_PREFIX + method + "_source"].isel(token=slice(sl.start + s, sl.stop),
                                                                  source=slice(0, s)).values
    a = np.full((n, n), np.nan)
    a[s:, :s], a[s:, s:] = source, prefix
    return a


def _check_head(run, array, head: int) -> None:
    n_heads = int(array.sizes["head"])
    if not 0 <= head < n_heads:
        raise OutOfRangeError(f"head {head} is out of range; this model has heads 0-{n_heads - 1}")


def qk(run, prompt: int, layer: int, head: int) -> dict:
    """One head on one prompt for the neuron view: queries and keys (token x d_head, as the scores use
    them), the scale and mask; the browser forms q×k, q·k·scale and the softmax for the chosen query."""
    queries, keys = run.require("queries", "qk"), run.require("keys", "qk")
    _check_layer(run, layer)
    _check_head(run, queries, head)
    sl, info = _prompt_rows(run, prompt)
    li = captured_layers(run).index(layer)
    # Every head of the layer is read at once and kept: the report (and a head selector) asks for the next.
    q_all, k_all = _cached(run, ("qk", sl.start, sl.stop, li), lambda: (
        queries.isel(token=sl, layer=li).values, keys.isel(token=sl, layer=li).values), size=4)
    q, k = q_all[:, head].astype(np.float64), k_all[:, head].astype(np.float64)
    qk_attrs = run.attrs["capture"].get("qk") or {}
    scales = qk_attrs.get("scales") or []
    scale = float(scales[li]) if li < len(scales) else float(q.shape[1]) ** -0.5
    return {**info, "layer": layer, "head": head, "n_heads": int(queries.sizes["head"]), "d_head": int(q.shape[1]),
            "scale": scale, "causal": bool(run.attrs["model"].get("causal", True)),
            "q": _rounded(q), "k": _rounded(k)}


def heads(run) -> dict:
    """The heads job's summary (analysis/heads): per (layer, head) its scores and pattern label."""
    ds = require_result(run, HEADS_JOB, "`stratascope heads`")
    from ..analyze.heads import LABELS  # dask/xarray only: no torch

    labels = [[str(x) for x in row] for row in ds["label"].values]
    order = list(LABELS) + sorted({x for row in labels for x in row} - set(LABELS))
    out = {"layers": [int(v) for v in ds["layer"].values], "heads": [int(v) for v in ds["head"].values],
           "labels": labels, "label_names": order, "rule": str(ds.attrs.get("rule", "")),
           "scores": {name: _rounded(ds[name].values) for name in HEADS_SCORES if name in ds}}
    if "n_rows" in ds:
        out["n_rows"] = int(ds["n_rows"].values.max())
    if "top_prompt" in ds:  # (layer, head, rank): where each head deviates most from its mean pattern
        out["top_prompt"] = ds["top_prompt"].values.astype(int).tolist()
        out["top_position"] = ds["top_position"].values.astype(int).tolist()
    return out


NMF_TOP = 12           # top tokens shown per factor
NMF_SCAN_ROWS = 65536  # rows of token_factor read at a time when ranking the whole corpus


def _nmf_dataset(run):
    return require_result(run, NMF_JOB, "`stratascope nmf`")


def _nmf_top(run, ds) -> list[list[dict]]:
    """Per factor, the corpus's NMF_TOP tokens with the largest weight, streaming over row blocks
    (masked rows skipped); computed once per run object and result."""
    stamp = str(ds.attrs.get("created", ""))  # a recomputed result replaces the one cached
    return _cached(run, ("nmf_top", stamp), lambda: _scan_nmf_top(run, ds), size=1)


def _scan_nmf_top(run, ds) -> list[list[dict]]:
    w, pidx = ds[NMF_WEIGHTS], run.ds["prompt_index"]
    n, k = w.shape
    vals, rows = np.empty((0, k)), np.empty((0, k), dtype=np.int64)
    for start in range(0, n, NMF_SCAN_ROWS):
        stop = min(n, start + NMF_SCAN_ROWS)
        block = np.asarray(w[start:stop].values, dtype=np.float64)
        block[pidx[start:stop].values < 0] = -np.inf
        vals = np.concatenate([vals, block])
        rows = np.concatenate([rows, np.broadcast_to(np.arange(start, stop)[:, None], block.shape)])
        order = np.argsort(-vals, axis=0, kind="stable")[:NMF_TOP]
        vals, rows = np.take_along_axis(vals, order, 0), np.take_along_axis(rows, order, 0)
    keep = vals > 0
    wanted = np.unique(rows[keep])
    table = run.ds[["token_str", "prompt_index", "position"]].isel(token=wanted)
    at = {int(r): i for i, r in enumerate(wanted)}
    strs, prompts, positions = (table[c].values for c in ("token_str", "prompt_index", "position"))
    top = [[{"label": token_label(str(strs[at[int(r)]])), "token": str(strs[at[int(r)]]),
             "prompt": int(prompts[at[int(r)]]), "position": int(positions[at[int(r)]]), "weight": round(float(v), 4)}
            for v, r, ok in zip(vals[:, f], rows[:, f], keep[:, f]) if ok] for f in range(k)]
    return top


def nmf(run, prompt: int) -> dict:
    """One prompt's weights on every NMF factor (token x factor), and each factor's top tokens corpus-wide."""
    ds = _nmf_dataset(run)
    sl, info = _prompt_rows(run, prompt)
    w = np.asarray(ds[NMF_WEIGHTS].isel(token=sl).values, dtype=np.float64)
    params = ds.attrs.get("params", {})
    return {**info, "n_factors": int(w.shape[1]), "weights": _rounded(w),
            "layers": [int(v) for v in ds["layer"].values] if "layer" in ds.coords else [],
            "relative_error": _rounded(ds.attrs.get("relative_error", np.nan)),
            "params": {k: params[k] for k in ("factors", "iterations", "negative") if k in params},
            "top": _nmf_top(run, ds)}


def _strings(values) -> np.ndarray:
    """Text from the store (numpy's StringDType does not cast to a fixed-width str array) as an object array."""
    return np.array([str(v) for v in values], dtype=object)


def bias_pairs(run) -> list[str]:
    """The word pairs ('female/male') of the stored bias probe, [] if there is none."""
    ds = latest_result(run, BIAS_JOB)
    return [] if ds is None else [str(p) for p in ds["pair"].values]


def _bias_statistic(run, ds, corr, occupations: list[str]) -> tuple[str | None, list | None]:
    """The statistic the correlation used, per occupation: stored with the correlation, or (older
    results) the mean of its metadata column over each occupation's prompts."""
    if corr is None or "statistic" not in corr.attrs:
        return None, None
    name = str(corr.attrs["statistic"])
    if "statistic_value" in corr:
        stat = dict(zip((str(o) for o in corr["occupation"].values), corr["statistic_value"].values.astype(float)))
    elif META_PREFIX + name in run.ds and run.ds[META_PREFIX + name].dtype.kind in "biuf":
        values = run.ds[META_PREFIX + name].isel(prompt=ds["prompt"].values).values.astype(np.float64)
        occ = _strings(ds["occupation"].values)
        stat = {o: float(np.nanmean(values[occ == o])) if np.isfinite(values[occ == o]).any() else np.nan
                for o in occupations}
    else:
        return name, None
    return name, _rounded([stat.get(o, np.nan) for o in occupations], 6)


def _bias_correlation(run, ds):
    """The newest stored correlation computed from this bias table (same pairs, same capture), or None."""
    for group in result_groups(run, BIAS_CORRELATION_JOB):
        corr = open_dataset(run.path, group)
        params = {k: v for k, v in corr.attrs.get("params", {}).items() if k not in ("statistic", "statistic_sha256")}
        if params == ds.attrs.get("params") and corr.attrs.get("source") == ds.attrs.get("source"):
            return corr
    return None


def bias(run, pair: str) -> dict:
    """The bias probe of one word pair: per occupation (in corpus order) the mean over its prompts of
    log p(female) - log p(male) at every depth, the statistic per occupation, and the stored correlation
    (Pearson, Spearman, n) at every depth when it belongs to this table."""
    ds = require_result(run, BIAS_JOB, f"`stratascope probe bias --run {run.path}`")
    pairs = [str(p) for p in ds["pair"].values]
    if pair not in pairs:
        raise OutOfRangeError(f"pair {pair!r} is not in the stored bias probe; it has {', '.join(map(repr, pairs))}")
    i = pairs.index(pair)
    occ = _strings(ds["occupation"].values)
    log_ratio = np.asarray(ds["log_ratio"].isel(pair=i).values, dtype=np.float64)  # prompt, depth (small)
    occupations = list(dict.fromkeys(occ))
    means = np.stack([log_ratio[occ == o].mean(0) for o in occupations])
    corr = _bias_correlation(run, ds)
    statistic, values = _bias_statistic(run, ds, corr, occupations)
    depths = [int(d) for d in ds["depth"].values]
    out = {"pairs": pairs, "pair": pair, "female": str(ds["female"].values[i]), "male": str(ds["male"].values[i]),
           "depths": depths, "occupations": occupations, "means": _rounded(means, 5),
           "counts": [int((occ == o).sum()) for o in occupations], "n_templates": int(len(set(ds["template"].values))),
           "statistic": statistic, "statistic_values": values, "correlation": None,
           "lens": _lens_kind(ds.attrs.get("params", {}))}  # the newest probe: say which lens it read through
    if corr is not None and pair in [str(p) for p in corr["pair"].values]:
        c = corr.sel(pair=pair).reindex(depth=depths)
        out["correlation"] = {k: _rounded(c[k].values, 6) for k in ("pearson_r", "spearman_rho")}
        for k in ("pearson_p", "spearman_p"):  # p-values keep their magnitude (4e-11 is not 0)
            out["correlation"][k] = [None if not np.isfinite(v) else float(f"{v:.6g}") for v in c[k].values]
        out["correlation"]["n"] = [None if not np.isfinite(n) else int(n) for n in c["n"].values.astype(float)]
    return out


def probe_labels(run) -> list[str]:
    """The labels with a stored linear probe (analysis/probe_<label>)."""
    return [j[len(PROBE_PREFIX):] for j in jobs(run) if j.startswith(PROBE_PREFIX)]


def probe(run, label: str) -> dict:
    """A stored linear probe's curve: per depth the mean and sd (over folds, ddof=1) of the accuracy
    (classification) or R² (regression), the control task's mean and the baseline (majority class /
    R² 0 for predicting the mean)."""
    labels = probe_labels(run)
    if label not in labels:
        if not labels:
            raise MissingArrayError(f"{run.path} has no linear probes; run `stratascope probe linear` first")
        raise OutOfRangeError(f"no probe of label {label!r} is stored; this run has {', '.join(map(repr, labels))}")
    ds = latest_result(run, PROBE_PREFIX + label)
    task = str(ds.attrs["task"])
    metric = "accuracy" if task == "classify" else "r2"
    score = np.asarray(ds[metric].values, dtype=np.float64)  # depth, fold
    out = {"labels": labels, "label": label, "task": task, "level": str(ds.attrs.get("level", "")), "metric": metric,
           "depths": [int(d) for d in ds["depth"].values], "folds": int(score.shape[1]),
           "score": _rounded(score.mean(1)), "score_sd": _rounded(score.std(1, ddof=1) if score.shape[1] > 1
                                                                  else np.full(len(score), np.nan)),
           "control": _rounded(ds["control_" + metric].values.mean(1)) if "control_" + metric in ds else None,
           "baseline": (_rounded(float(ds["majority"].values.mean())) if task == "classify" else 0.0),
           "n_rows": int(ds.attrs.get("n_rows", 0)), "n_groups": int(ds.attrs.get("n_groups", 0)),
           "classes": [str(c) for c in ds.attrs.get("outputs", [])] if task == "classify" else [],
           "params": {k: v for k, v in ds.attrs.get("params", {}).items() if k in ("at", "control", "seed", "task")}}
    if task == "classify" and "macro_f1" in ds:
        out["macro_f1"] = _rounded(ds["macro_f1"].values.mean(1))
    return out


def dla(run, prompt: int) -> dict:
    """The stored direct logit attribution of one prompt's rows: per row the contribution of the embedding,
    each attention and MLP layer and the biases, with the sum and the true logit (difference)."""
    ds = require_result(run, DLA_JOB, "`stratascope dla`")  # the newest dla result
    p = run.prompt_index(prompt)
    rows = np.flatnonzero(ds["prompt"].values == p)
    sub = ds.isel(row=rows)[["by_component", "position", "token", "target_id", "contrast_id", "total", "logit",
                             "gap"]].load()
    vocab = _vocab(run)
    return {"prompt": p, "components": [str(c) for c in ds["component"].values],
            "positions": [int(v) for v in sub["position"].values],
            "labels": [token_label(str(t)) for t in run.ds["token_str"].isel(token=sub["token"].values).values],
            "targets": [token_label(str(vocab[int(t)])) for t in sub["target_id"].values],
            "contrasts": [token_label(str(vocab[int(c)])) if c >= 0 else None for c in sub["contrast_id"].values],
            "values": [_rounded(v) for v in sub["by_component"].values], "total": _rounded(sub["total"].values),
            "logit": _rounded(sub["logit"].values), "gap": [float(g) for g in sub["gap"].values],
            "convention": str(ds.attrs.get("convention", ""))}


DLA_SCAN_ROWS = 16384       # rows of a dla result read at a time for the heads and neurons views
DLA_NEURONS = 10            # neurons shown per layer
DLA_NEURON_TOKENS = 8       # tokens shown per neuron (largest |activation| in the store's mlp)
DLA_CONTEXT = 4             # tokens of context shown before each
MLP_SCAN_BYTES = 64 << 20   # the most of the mlp array read at once


def _sig(v) -> float:
    """Six significant digits: a tiny model's contributions are ~1e-4, a real one's ~1."""
    return float(f"{float(v):.6g}")


def dla_result(run, neurons: bool = False):
    """The newest dla result (with neurons: the newest that kept neurons), or None."""
    return latest_result(run, DLA_JOB, where=(lambda p: p.get("neurons", 0) > 0) if neurons else None)


def _dla_target(params: dict) -> str:
    """What a dla result attributes, in words: 'the token that came next − «␣the»'."""
    word = lambda w: f"«{token_label(str(w))}»"  # noqa: E731
    target = {"next": "the token that came next", "top": "the model's top-1 token"}.get(params.get("target"))
    if params.get("target_column"):
        target = f"the word in column {params['target_column']!r}"
    elif target is None:
        target = word(params.get("target"))
    if params.get("contrast") is not None:
        target += f" − {word(params['contrast'])}"
    elif params.get("contrast_column"):
        target += f" − the word in column {params['contrast_column']!r}"
    return target


def _dla_about(ds) -> dict:
    p = ds.attrs.get("params", {})
    return {"n_rows": int(ds.sizes["row"]), "n_prompts": int(len(np.unique(ds["prompt"].values))),
            "target": _dla_target(p), "positions": str(p.get("positions", ""))}


def dla_heads(run) -> dict:
    """The newest dla result's head contributions, averaged over all its rows: per (layer, head) the mean
    and sd (ddof=0) of z[h] @ W_O[h] through the target's direction, summed over row blocks."""
    ds = require_result(run, DLA_JOB, "`stratascope dla`")
    if DLA_BY_HEAD not in ds:
        raise MissingArrayError("the newest dla result has no per-head contributions; capture with --capture z "
                                "and run `stratascope dla` again")
    return _cached(run, ("dla_heads", str(ds.attrs.get("created", ""))), lambda: _scan_dla_heads(ds), size=1)


def _scan_dla_heads(ds) -> dict:
    heads, n = ds[DLA_BY_HEAD], int(ds.sizes["row"])
    total, squares = np.zeros(heads.shape[1:]), np.zeros(heads.shape[1:])
    for start in range(0, n, DLA_SCAN_ROWS):
        block = np.asarray(heads.isel(row=slice(start, start + DLA_SCAN_ROWS)).values, dtype=np.float64)
        total += block.sum(0)
        squares += (block * block).sum(0)
    mean = total / n if n else np.full(total.shape, np.nan)
    sd = np.sqrt(np.maximum(squares / n - mean * mean, 0)) if n else mean
    return {**_dla_about(ds), "layers": [int(v) for v in ds["layer"].values],
            "heads": [int(v) for v in ds["head"].values], "mean": _rounded(mean, 5), "sd": _rounded(sd, 5),
            "linearised": "linearised" in str(ds.attrs.get("heads", ""))}


def dla_neurons(run, layer: int) -> dict:
    """One layer's DLA_NEURONS neurons with the largest mean |contribution| over the rows of the newest dla
    result that kept neurons (a row where a neuron is not among its top k counts 0: a lower bound), and for
    each the DLA_NEURON_TOKENS tokens of the store where its activation (`mlp`) is largest in absolute value.
    One scan of the result's rows and one of `mlp` serve every layer (cached)."""
    ds = dla_result(run, neurons=True)
    if ds is None:
        require_result(run, DLA_JOB, "`stratascope dla --neurons K`")
        raise MissingArrayError("no dla result kept neurons; run `stratascope dla --neurons K`")
    mlp = run.require("mlp", "mlp")
    layers = [int(v) for v in ds["layer"].values]
    if layer not in layers:
        raise OutOfRangeError(f"layer {layer} is not in the dla result; it has layers 0-{layers[-1]}")
    top = _cached(run, ("dla_neurons", str(ds.attrs.get("created", ""))), lambda: _scan_dla_neurons(run, ds, mlp),
                  size=1)
    li = layers.index(layer)
    return {**_dla_about(ds), "layer": layer, "layers": layers, "k": int(ds.sizes["k"]),
            "n_tokens": top["n_tokens"], "neurons": top["neurons"][li]}


def _neuron_means(ds, d_mlp: int) -> tuple[np.ndarray, ...]:
    """Per (layer, neuron): the sum over rows of |contribution| and of contribution (0 where not in a row's
    top k), and the number of rows whose top k hold it."""
    L = int(ds.sizes["layer"])
    sums = np.zeros((3, L * d_mlp))
    offset = (np.arange(L) * d_mlp)[None, :, None]
    for start in range(0, int(ds.sizes["row"]), DLA_SCAN_ROWS):
        rows = slice(start, start + DLA_SCAN_ROWS)
        ids = np.asarray(ds[DLA_NEURON_ID].isel(row=rows).values, dtype=np.int64) + offset  # row, layer, k
        vals = np.asarray(ds[DLA_NEURON_CONTRIBUTION].isel(row=rows).values, dtype=np.float64)
        for i, w in enumerate((np.abs(vals), vals, np.ones_like(vals))):
            sums[i] += np.bincount(ids.ravel(), w.ravel(), minlength=L * d_mlp)
    return tuple(s.reshape(L, d_mlp) for s in sums)


def _scan_dla_neurons(run, ds, mlp) -> dict:
    n_rows, d_mlp = int(ds.sizes["row"]), int(mlp.sizes[mlp.dims[-1]])
    abs_sum, signed_sum, in_top = _neuron_means(ds, d_mlp)
    order = np.argsort(-abs_sum, axis=1, kind="stable")[:, :DLA_NEURONS]  # layer, N (neurons with some contribution)
    L = order.shape[0]
    captured = captured_layers(run) or list(range(L))  # dla needs every layer captured
    li = np.array([captured.index(int(v)) for v in ds["layer"].values]).repeat(order.shape[1])
    ni = order.ravel()
    # Stream mlp over whole token chunks (each holds every layer), keeping per (layer, neuron) the rows of
    # largest |activation| and their signed values.
    n_tok = int(mlp.shape[0])
    chunk = int(getattr(mlp.data, "chunksize", (1,))[0])
    step = max(1, MLP_SCAN_BYTES // (int(np.prod(mlp.shape[1:])) * mlp.dtype.itemsize))
    step = step // chunk * chunk if step >= chunk else step  # whole chunks where they fit the budget
    pidx = run.ds["prompt_index"]
    best, signed = np.full((0, len(ni)), -np.inf), np.zeros((0, len(ni)))
    where = np.zeros((0, len(ni)), dtype=np.int64)
    n_valid = 0
    for start in range(0, n_tok, step):
        stop = min(n_tok, start + step)
        block = np.asarray(mlp.isel({mlp.dims[0]: slice(start, stop)}).values)[:, li, ni].astype(np.float64)
        valid = pidx[start:stop].values >= 0
        n_valid += int(valid.sum())
        size = np.where(valid[:, None] & np.isfinite(block), np.abs(block), -np.inf)
        best, signed = np.concatenate([best, size]), np.concatenate([signed, block])
        where = np.concatenate([where, np.broadcast_to(np.arange(start, stop)[:, None], block.shape)])
        keep = np.argsort(-best, axis=0, kind="stable")[:DLA_NEURON_TOKENS]
        best, signed, where = (np.take_along_axis(a, keep, 0) for a in (best, signed, where))
    found = np.isfinite(best)
    hits = np.unique(where[found])
    near = np.unique(np.clip(hits[:, None] - np.arange(DLA_CONTEXT + 1)[None, :], 0, None))  # each hit and its context
    table = run.ds[["token_str", "prompt_index", "position"]].isel(token=near)
    strs, prompts, positions = (table[c].values for c in ("token_str", "prompt_index", "position"))
    at = {int(r): i for i, r in enumerate(near)}

    def token(t: int, col: int) -> dict:
        r = int(where[t, col])
        i = at[r]
        context = [token_label(str(strs[at[c]])) for c in range(max(0, r - DLA_CONTEXT), r)
                   if prompts[at[c]] == prompts[i]]
        return {"label": token_label(str(strs[i])), "token": str(strs[i]), "prompt": int(prompts[i]),
                "position": int(positions[i]), "activation": _sig(signed[t, col]), "context": context}

    neurons = [[{"neuron": int(order[l, j]), "mean_abs": _sig(abs_sum[l, order[l, j]] / max(n_rows, 1)),
                 "mean": _sig(signed_sum[l, order[l, j]] / max(n_rows, 1)),
                 "n_top": int(in_top[l, order[l, j]]),
                 "tokens": [token(t, col) for t in range(best.shape[0]) if found[t, col]]}
                for j in range(order.shape[1]) if in_top[l, order[l, j]] > 0
                for col in [l * order.shape[1] + j]] for l in range(L)]
    return {"n_tokens": n_valid, "neurons": neurons}


def similarity(run) -> dict:
    """The stored similarity matrix (analysis/similarity): rows are depths (or layers) of the run,
    columns those of the run it was compared with (itself, or another run)."""
    ds = require_result(run, SIMILARITY_JOB, "`stratascope similarity`")  # the newest one
    a, b = ds["similarity"].dims
    attrs = ds.attrs
    out = {"method": str(attrs["method"]), "array": str(attrs["array"]), "axis": str(attrs["axis"]),
           "positions": str(attrs["positions"]), "rows": str(attrs["rows"]), "n_rows": int(attrs["n_rows"]),
           "definition": str(attrs["definition"]), "run_a": Path(str(attrs["run_a"]).rstrip("/")).name,
           "run_b": Path(str(attrs["run_b"]).rstrip("/")).name, "same_run": attrs["run_a"] == attrs["run_b"],
           "model_a": str(attrs["model_a"]), "model_b": str(attrs["model_b"]),
           "depths_a": [int(v) for v in ds[a].values], "depths_b": [int(v) for v in ds[b].values],
           "values": _rounded(ds["similarity"].values, 6)}
    if "dims_a" in ds:
        out["dims_a"] = ds["dims_a"].values.astype(int).tolist()
        out["dims_b"] = ds["dims_b"].values.astype(int).tolist()
    return out


def tuned_lens(run) -> dict:
    """The stored tuned lens's held-out metrics by depth for both lenses (nats), and how it was trained."""
    ds = require_result(run, TUNED_JOB, f"`stratascope tuned-lens train {run.path}`")  # the newest one
    lenses = [str(v) for v in ds["lens"].values]
    metrics = {m: {lens: _rounded(ds[m].values[i]) for i, lens in enumerate(lenses)}
               for m in ("kl", "cross_entropy", "entropy")}
    a = ds.attrs
    return {"depths": [int(d) for d in ds["depth"].values], **metrics,
            "params": {k: a["params"][k] for k in ("steps", "lr", "batch_rows", "holdout", "seed")},
            "n_train_prompts": int(a["n_train_prompts"]), "n_heldout_prompts": int(a["n_heldout_prompts"]),
            "n_heldout_tokens": int(a["n_heldout_tokens"]), "model": str(a["model"])}


# Endpoint name -> (function, its parameters with their types). The app serves exactly these.
ENDPOINTS: dict[str, tuple[Callable, dict[str, type]]] = {
    "tokens": (tokens, {"prompt": int}),
    "prompt_filter": (prompt_filter, {"column": str, "value": str}),
    "attention": (attention, {"prompt": int, "layer": int}),
    "attention_stack": (attention_stack, {"prompt": int, "layer": int, "stack": str}),
    "lens": (lens, {"prompt": int, "lens": str}),
    "saliency": (saliency, {"prompt": int, "method": str}),
    "qk": (qk, {"prompt": int, "layer": int, "head": int}),
    "heads": (heads, {}),
    "nmf": (nmf, {"prompt": int}),
    "bias": (bias, {"pair": str}),
    "probe": (probe, {"label": str}),
    "dla": (dla, {"prompt": int}),
    "dla_heads": (dla_heads, {}),
    "dla_neurons": (dla_neurons, {"layer": int}),
    "similarity": (similarity, {}),
    "tuned_lens": (tuned_lens, {}),
}


def data_key(endpoint: str, params: dict) -> str:
    """The key a report stores a payload under; static/core.js builds the same string."""
    return endpoint + "?" + "&".join(f"{k}={params[k]}" for k in sorted(params))


def call(run, endpoint: str, params: dict) -> dict:
    fn, _ = ENDPOINTS[endpoint]
    return fn(run, **params)


def has_result(run, job: str) -> bool:
    return bool(result_groups(run, job))


def has_lens(run, name: str) -> bool:
    ds = latest_result(run, LENS_JOB, where=every_token)
    return ds is not None and name in ds
