"""The slices each view needs, read lazily from a Run, as plain JSON-able dicts.

Shared by the report (embedded), the app (one endpoint per function) and the notebook views.
Each function reads only the rows of one prompt (and one layer), never a whole array.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import MissingArrayError, OutOfRangeError
from ..store import has_group, open_dataset, subgroups
from .render import token_label

# Attention weights below this are not sent: rows sum to 1, so at most 1/MIN_WEIGHT keys per
# query survive and a long prompt's payload grows linearly, not quadratically, with its length.
MIN_WEIGHT = 0.01

# --- Schema names of other jobs' results, read here (adjust these when those jobs land) -------
LENS_GROUP = "analysis/lens"
LENS_TOPK_IDS = "topk_ids"          # (token, depth, k) int: top-k vocabulary ids of the lens
LENS_TOPK_PROBS = "topk_probs"      # (token, depth, k) float: their probabilities
LENS_TARGET_RANK = "target_rank"    # (token, depth) int: rank of the next token (1 = top); -1 on a last position
LENS_WATCH_RANK = "watch_rank"      # (token, depth, watch) int: ranks of the watched tokens (1 = top)
LENS_WATCH_COORD = "watch"          # coordinate of the watch dim holding the watched words
LENS_RANK_BASE = 1                  # the lens job stores 1-based ranks (1 + entries with a larger logit)
# root arrays attribution_<method> (token, key): row r = attribution of the prediction made at position r
# (of token r+1) over keys 0..r, L2 norms (>= 0); rows that are not targets are NaN.
ATTRIBUTION_PREFIX = "attribution_"
TOKEN_TYPE_IDS = "token_type_ids"   # optional (token,) array: sentence A/B of an encoder input
HEADS_GROUP = "analysis/heads"      # (layer, head): entropy, entropy_norm, first_token, previous_token, self, label
HEADS_SCORES = ("first_token", "previous_token", "self", "entropy_norm", "entropy")
NMF_GROUP = "analysis/nmf"          # token_factor (token, factor) float32 >= 0; factor coordinate
NMF_WEIGHTS = "token_factor"
BIAS_GROUP = "analysis/bias"        # (prompt, depth, pair) log_ratio; occupation (prompt); pair coordinate
BIAS_CORRELATION_GROUP = "analysis/bias_correlation"  # (pair, depth) pearson_r/_p, spearman_rho/_p, n
PROBE_PREFIX = "probe_"             # analysis/probe_<label>: (depth, fold) accuracy or r2, control_*, majority
TUNED_GROUP = "analysis/tuned_lens"  # (lens, depth) kl, cross_entropy, entropy held out; lens = logit, tuned
# ------------------------------------------------------------------------------------------------


def _rounded(values: np.ndarray, decimals: int = 4) -> list:
    """A nested list of rounded floats, None where a value is not finite (JSON has no NaN)."""
    a = np.round(np.asarray(values, dtype=np.float64), decimals)
    return np.where(np.isfinite(a), a, None).tolist()


def _cached(run, key: tuple, make: Callable, size: int = 16):
    """A small per-run LRU of slices: a report asks for the same prompt (and layer) once per head or view."""
    cache = run.__dict__.setdefault("_viewer_cache", {}).setdefault(key[0], {})  # one LRU per kind
    if key in cache:
        cache[key] = cache.pop(key)  # most recently used last
        return cache[key]
    value = make()
    cache[key] = value
    while len(cache) > size:
        cache.pop(next(iter(cache)))
    return value


def _prompt_rows(run, prompt: int) -> tuple[slice, dict]:
    """The row slice of a prompt and its token labels (shared by every view)."""
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
    return sl, info


def tokens(run, prompt: int) -> dict:
    """One prompt: its text and its tokens (raw strings, readable labels, ids, generated flags)."""
    sl, info = _prompt_rows(run, prompt)
    p = info["prompt"]
    info["text"] = str(run.ds["prompt_text"][p].values)
    info["ids"] = [int(i) for i in run.ds["token_id"].isel(token=sl).values]
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


def _vocab(run) -> np.ndarray:
    cached = getattr(run, "_viewer_vocab", None)
    if cached is None:
        cached = run.readout["vocab_str"].values
        run._viewer_vocab = cached
    return cached


def _lens_dataset(run):
    if not has_group(run.path, LENS_GROUP):
        raise MissingArrayError(f"{run.path} has no lens results; run the lens job first (stratascope lens)")
    return open_dataset(run.path, LENS_GROUP)


def _display_ranks(ranks: np.ndarray) -> list:
    """Ranks as shown (1 = top), None where there is none (a negative stored rank)."""
    shown = ranks.astype(np.int64) - LENS_RANK_BASE + 1
    return np.where(ranks < 0, None, shown).tolist()


def lens(run, prompt: int) -> dict:
    """One prompt's logit-lens results: top-k tokens and probabilities, next-token ranks and
    watched-token ranks at every depth (whichever of these the lens job stored)."""
    ds = _lens_dataset(run)
    sl, info = _prompt_rows(run, prompt)
    depth = ds["depth"].values if "depth" in ds.coords else np.arange(ds.sizes.get("depth", 0))
    out = {**info, "depths": [int(d) for d in depth]}
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
    if not has_group(run.path, HEADS_GROUP):
        raise MissingArrayError(f"{run.path} has no head summaries; run `stratascope heads` first")
    ds = open_dataset(run.path, HEADS_GROUP)
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
    if not has_group(run.path, NMF_GROUP):
        raise MissingArrayError(f"{run.path} has no NMF factors; run `stratascope nmf` first")
    return open_dataset(run.path, NMF_GROUP)


def _nmf_top(run, ds) -> list[list[dict]]:
    """Per factor, the corpus's NMF_TOP tokens with the largest weight, streaming over row blocks
    (masked rows skipped); computed once per run object and result."""
    stamp = str(ds.attrs.get("created", ""))
    cached = getattr(run, "_viewer_nmf_top", None)
    if cached and cached[0] == stamp:
        return cached[1]
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
    run._viewer_nmf_top = (stamp, top)
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
    if not has_group(run.path, BIAS_GROUP):
        return []
    return [str(p) for p in open_dataset(run.path, BIAS_GROUP)["pair"].values]


def _bias_statistic(run, ds, corr, occupations: list[str]) -> tuple[str | None, list | None]:
    """The statistic the correlation used, per occupation: stored with the correlation, or (older
    results) the mean of its metadata column over each occupation's prompts."""
    if corr is None or "statistic" not in corr.attrs:
        return None, None
    name = str(corr.attrs["statistic"])
    if "statistic_value" in corr:
        stat = dict(zip((str(o) for o in corr["occupation"].values), corr["statistic_value"].values.astype(float)))
    elif "meta_" + name in run.ds and run.ds["meta_" + name].dtype.kind in "biuf":
        values = run.ds["meta_" + name].isel(prompt=ds["prompt"].values).values.astype(np.float64)
        occ = _strings(ds["occupation"].values)
        stat = {o: float(np.nanmean(values[occ == o])) if np.isfinite(values[occ == o]).any() else np.nan
                for o in occupations}
    else:
        return name, None
    return name, _rounded([stat.get(o, np.nan) for o in occupations], 6)


def bias(run, pair: str) -> dict:
    """The bias probe of one word pair: per occupation (in corpus order) the mean over its prompts of
    log p(female) - log p(male) at every depth, the statistic per occupation, and the stored correlation
    (Pearson, Spearman, n) at every depth when it belongs to this table."""
    if not has_group(run.path, BIAS_GROUP):
        raise MissingArrayError(f"{run.path} has no bias probe; run `stratascope probe bias --run {run.path}` first")
    ds = open_dataset(run.path, BIAS_GROUP)
    pairs = [str(p) for p in ds["pair"].values]
    if pair not in pairs:
        raise OutOfRangeError(f"pair {pair!r} is not in the stored bias probe; it has {', '.join(map(repr, pairs))}")
    i = pairs.index(pair)
    occ = _strings(ds["occupation"].values)
    log_ratio = np.asarray(ds["log_ratio"].isel(pair=i).values, dtype=np.float64)  # prompt, depth (small)
    occupations = list(dict.fromkeys(occ))
    means = np.stack([log_ratio[occ == o].mean(0) for o in occupations])
    corr = open_dataset(run.path, BIAS_CORRELATION_GROUP) if has_group(run.path, BIAS_CORRELATION_GROUP) else None
    if corr is not None:  # a correlation of another table (other pairs, another capture) is not shown
        params = {k: v for k, v in corr.attrs.get("params", {}).items() if k not in ("statistic", "statistic_sha256")}
        if params != ds.attrs.get("params") or corr.attrs.get("source") != ds.attrs.get("source"):
            corr = None
    statistic, values = _bias_statistic(run, ds, corr, occupations)
    depths = [int(d) for d in ds["depth"].values]
    out = {"pairs": pairs, "pair": pair, "female": str(ds["female"].values[i]), "male": str(ds["male"].values[i]),
           "depths": depths, "occupations": occupations, "means": _rounded(means, 5),
           "counts": [int((occ == o).sum()) for o in occupations], "n_templates": int(len(set(ds["template"].values))),
           "statistic": statistic, "statistic_values": values, "correlation": None}
    if corr is not None and pair in [str(p) for p in corr["pair"].values]:
        c = corr.sel(pair=pair).reindex(depth=depths)
        out["correlation"] = {k: _rounded(c[k].values, 6) for k in ("pearson_r", "spearman_rho")}
        for k in ("pearson_p", "spearman_p"):  # p-values keep their magnitude (4e-11 is not 0)
            out["correlation"][k] = [None if not np.isfinite(v) else float(f"{v:.6g}") for v in c[k].values]
        out["correlation"]["n"] = [None if not np.isfinite(n) else int(n) for n in c["n"].values.astype(float)]
    return out


def probe_labels(run) -> list[str]:
    """The labels with a stored linear probe (analysis/probe_<label>)."""
    return [g[len(PROBE_PREFIX):] for g in subgroups(run.path, "analysis") if g.startswith(PROBE_PREFIX)]


def probe(run, label: str) -> dict:
    """A stored linear probe's curve: per depth the mean and sd (over folds, ddof=1) of the accuracy
    (classification) or R² (regression), the control task's mean and the baseline (majority class /
    R² 0 for predicting the mean)."""
    labels = probe_labels(run)
    if label not in labels:
        if not labels:
            raise MissingArrayError(f"{run.path} has no linear probes; run `stratascope probe linear` first")
        raise OutOfRangeError(f"no probe of label {label!r} is stored; this run has {', '.join(map(repr, labels))}")
    ds = open_dataset(run.path, f"analysis/{PROBE_PREFIX}{label}")
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


def tuned_lens(run) -> dict:
    """The stored tuned lens's held-out metrics by depth for both lenses (nats), and how it was trained."""
    if not has_group(run.path, TUNED_GROUP):
        raise MissingArrayError(f"{run.path} has no tuned lens; run `stratascope tuned-lens train {run.path}` first")
    ds = open_dataset(run.path, TUNED_GROUP)
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
    "attention": (attention, {"prompt": int, "layer": int}),
    "lens": (lens, {"prompt": int}),
    "saliency": (saliency, {"prompt": int, "method": str}),
    "qk": (qk, {"prompt": int, "layer": int, "head": int}),
    "heads": (heads, {}),
    "nmf": (nmf, {"prompt": int}),
    "bias": (bias, {"pair": str}),
    "probe": (probe, {"label": str}),
    "tuned_lens": (tuned_lens, {}),
}


def data_key(endpoint: str, params: dict) -> str:
    """The key a report stores a payload under; static/core.js builds the same string."""
    return endpoint + "?" + "&".join(f"{k}={params[k]}" for k in sorted(params))


def call(run, endpoint: str, params: dict) -> dict:
    fn, _ = ENDPOINTS[endpoint]
    return fn(run, **params)


def has_result(run, group: str) -> bool:
    return has_group(run.path, group)


def has_lens(run, name: str) -> bool:
    if not has_group(run.path, LENS_GROUP):
        return False
    return name in open_dataset(run.path, LENS_GROUP)


def meta(run) -> dict:
    """What every page needs first: the store, the model, sizes, layers, methods, which views exist."""
    from .registry import VIEWS

    m = run.attrs["model"]
    views = []
    for view in VIEWS.values():
        reason = view.unavailable(run)
        views.append({"name": view.name, "title": view.title, "description": view.description,
                      "available": reason is None, "reason": reason})
    return {"store": Path(run.path.rstrip("/")).name, "model": {k: m.get(k) for k in ("name", "family", "n_layers",
                                                                                     "n_heads", "causal")},
            "n_prompts": run.n_prompts, "n_tokens": run.n_tokens, "layers": captured_layers(run),
            "methods": attribution_methods(run), "views": views, "min_weight": MIN_WEIGHT,
            "bias_pairs": bias_pairs(run), "probe_labels": probe_labels(run)}

