"""The slices each view needs, read lazily from a Run, as plain JSON-able dicts.

Shared by the report (embedded), the app (one endpoint per function) and the notebook views.
Each function reads only the rows of one prompt (and one layer), never a whole array.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import MissingArrayError, OutOfRangeError
from ..store import has_group, open_dataset
from .render import token_label

# Attention weights below this are not sent: rows sum to 1, so at most 1/MIN_WEIGHT keys per
# query survive and a long prompt's payload grows linearly, not quadratically, with its length.
MIN_WEIGHT = 0.01

# --- Schema names of other jobs' results, read here (adjust these when those jobs land) -------
LENS_GROUP = "analysis/lens"
LENS_TOPK_IDS = "topk_ids"          # (token, depth, k) int: top-k vocabulary ids of the lens
LENS_TOPK_PROBS = "topk_probs"      # (token, depth, k) float: their probabilities
LENS_TARGET_RANK = "target_rank"    # (token, depth) int: rank of the next token (0 = top); -1 on a last position
LENS_WATCH_RANK = "watch_rank"      # (token, depth, watch) int: ranks of the watched tokens
LENS_WATCH_COORD = "watch"          # coordinate of the watch dim holding the watched strings (or attrs["watch"])
LENS_RANK_BASE = 0                  # stored ranks count from 0 (the top token); views show 1 for the top
ATTRIBUTION_PREFIX = "attribution_"  # root arrays attribution_<method> (token, key)
TOKEN_TYPE_IDS = "token_type_ids"   # optional (token,) array: sentence A/B of an encoder input
# ------------------------------------------------------------------------------------------------


def _prompt_rows(run, prompt: int) -> tuple[slice, dict]:
    """The row slice of a prompt and its token labels (shared by every view)."""
    sl = run.token_slice(prompt)
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
    """One prompt's attributions: row t attributes the prediction made at token t over keys 0..t,
    scaled by the row's largest magnitude (sent as row_max) so values lie in [-1, 1]."""
    methods = attribution_methods(run)
    if method not in methods:
        if not methods:
            raise MissingArrayError("this run has no attribution arrays; capture with --capture attribution")
        raise OutOfRangeError(f"attribution method {method!r} is not stored; this run has {', '.join(methods)}")
    sl, info = _prompt_rows(run, prompt)
    n = info["n"]
    a = run.ds[ATTRIBUTION_PREFIX + method].isel(token=sl, key=slice(0, n)).values.astype(np.float64)
    a = np.nan_to_num(a)
    row_max = np.abs(a).max(axis=1)
    scaled = np.round(a / np.where(row_max > 0, row_max, 1)[:, None], 3)
    return {**info, "method": method, "methods": methods, "rows": scaled.tolist(), "row_max": row_max.tolist()}


# Endpoint name -> (function, its parameters with their types). The app serves exactly these.
ENDPOINTS: dict[str, tuple[Callable, dict[str, type]]] = {
    "tokens": (tokens, {"prompt": int}),
    "attention": (attention, {"prompt": int, "layer": int}),
    "lens": (lens, {"prompt": int}),
    "saliency": (saliency, {"prompt": int, "method": str}),
}


def data_key(endpoint: str, params: dict) -> str:
    """The key a report stores a payload under; static/core.js builds the same string."""
    return endpoint + "?" + "&".join(f"{k}={params[k]}" for k in sorted(params))


def call(run, endpoint: str, params: dict) -> dict:
    fn, _ = ENDPOINTS[endpoint]
    return fn(run, **params)


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
            "methods": attribution_methods(run), "views": views, "min_weight": MIN_WEIGHT}

