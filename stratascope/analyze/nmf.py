"""NMF of MLP neuron activations (tokens x layer.neuron), out of core.

The algorithm is HALS (hierarchical alternating least squares: the coordinate descent of
scikit-learn's `NMF(solver="cd")`), arranged so that one iteration is one pass over the store:

  for each token block c (a dask task):  read A_c, P_c = A_c Hᵀ, update W_c by one HALS
      sweep against HHᵀ, return W_c and the sufficient statistics W_cᵀA_c, W_cᵀW_c, |A_c|²
  tree-sum the statistics in a fixed order (deterministic), then update H by one HALS sweep.

W (tokens x factors) stays in memory, H (factors x features) is global; the matrix A itself
is never held whole. Tasks run on dask's default scheduler, so an active dask.distributed
client picks them up. Inside a task the linear algebra is torch, on --device.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import dask
import dask.array as da
import numpy as np
import torch
import xarray as xr

from ..devices import resolve_device
from ..errors import ConfigError, MissingArrayError, OutOfRangeError
from ..progress import tqdm
from ..ranges import format_ranges
from ..schemas import NMF, NMF_TRANSFORM
from .results import job_progress, load_result, require_result, save_result
from .stacks import single_stack

if TYPE_CHECKING:
    import pandas as pd

NEGATIVE = ("clip", "shift")
DEFAULT_LAYERS = 6  # the first six captured layers unless told otherwise
BLOCK_BYTES = 16 * 2**20  # raw bytes (all stored layers) read per task: memory is a few blocks per thread
TRANSFORM_SWEEPS = 100  # HALS sweeps for the convex W-only problem of nmf_transform


@dataclass(frozen=True)
class Matrix:
    """The lazy (token x layer x neuron) activations to factorize, blocked along tokens."""

    blocks: list  # dask Delayed per token block: float array (rows, layers, neuron)
    valid: list  # dask Delayed per token block: bool (rows,), False on masked rows
    starts: list[int]  # first token row of each block
    sizes: list[int]  # rows of each block
    n_tokens: int
    layers: list[int]
    n_neuron: int

    @property
    def n_features(self) -> int:
        return len(self.layers) * self.n_neuron


# ---------------------------------------------------------------- input


def parse_layers(run, layers) -> list[int]:
    """Model block numbers to factorize; they must be among the captured layers."""
    captured = [int(v) for v in run.ds["layer"].values]
    if layers is None:
        return captured[:DEFAULT_LAYERS]
    from ..ranges import parse_ranges

    n_layers = int(run.attrs["model"]["n_layers"])
    if isinstance(layers, int):
        layers = [layers]
    try:
        chosen = parse_ranges(layers if isinstance(layers, str) else [int(v) for v in layers], n_layers, "layers")
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"--layers {layers!r} is not a list of layer numbers like 0-5") from None
    if not chosen:
        raise ConfigError("--layers is empty; give layers like 0-5")
    missing = [v for v in chosen if v not in captured]
    if missing:
        raise OutOfRangeError(f"--layers: layer {missing[0]} was not captured in this run; it has mlp for layers "
                              f"{format_ranges(captured)}")
    return chosen


def open_matrix(run, layers, chunk_tokens: int | None = None) -> Matrix:
    if "mlp" not in run.ds:
        raise MissingArrayError("this run has no mlp activations; capture with --capture mlp")
    layers = parse_layers(run, layers)
    captured = [int(v) for v in run.ds["layer"].values]
    mlp = run.ds["mlp"].data
    n_tokens, _, n_neuron = mlp.shape
    if chunk_tokens is None:
        store_rows = mlp.chunks[0][0]
        row_bytes = int(np.prod(mlp.shape[1:])) * mlp.dtype.itemsize
        chunk_tokens = max(store_rows, (BLOCK_BYTES // row_bytes) // store_rows * store_rows)
    if int(chunk_tokens) < 1:
        raise ConfigError(f"chunk_tokens {chunk_tokens!r} must be at least 1")
    rows = min(int(chunk_tokens), n_tokens)
    index = [captured.index(v) for v in layers]
    sel = mlp[:, index[0]:index[-1] + 1] if index == list(range(index[0], index[-1] + 1)) else mlp[:, index]
    sel = sel.rechunk((rows, -1, -1))
    valid = (run.ds["prompt_index"].data >= 0).rechunk((rows,))
    sizes = [int(n) for n in sel.chunks[0]]
    starts = [int(s) for s in np.cumsum([0] + sizes[:-1])]
    return Matrix(list(sel.to_delayed().ravel()), list(valid.to_delayed().ravel()), starts, sizes, n_tokens,
                  layers, int(n_neuron))


def _prepare(block: np.ndarray, valid: np.ndarray, negative: str, shift: np.ndarray | None,
             device: str) -> torch.Tensor:
    """The non-negative rows of one block: (valid rows, features) float32 on `device`."""
    a = np.asarray(block).reshape(len(block), -1)
    valid = np.asarray(valid)
    a = a if valid.all() else a[valid]  # no copy in the common case of no masked rows
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)
    if negative == "shift":
        t = t - torch.from_numpy(shift).to(device)
    # clip (a new tensor: the block may be shared); after a shift only a foreign corpus goes below zero
    return torch.clamp(t, min=0)


# ---------------------------------------------------------------- tasks (module level: picklable)


def _summary(block: np.ndarray, valid: np.ndarray) -> tuple:
    """Per block: valid row count, per-feature min and sum, sum of the clipped values."""
    a = np.asarray(block, dtype=np.float32).reshape(len(block), -1)[np.asarray(valid)]
    if not len(a):
        return 0, np.full(a.shape[1], np.inf), np.zeros(a.shape[1]), 0.0
    return len(a), a.min(axis=0).astype(np.float64), a.sum(axis=0, dtype=np.float64), \
        float(np.maximum(a, 0).sum(dtype=np.float64))


def _add_summary(x: tuple, y: tuple) -> tuple:
    return x[0] + y[0], np.minimum(x[1], y[1]), x[2] + y[2], x[3] + y[3]


def _hals_rows(W: torch.Tensor, P: torch.Tensor, G: torch.Tensor, sweeps: int = 1) -> torch.Tensor:
    """HALS sweeps over the columns of W for min |A - W H|² with P = A Hᵀ, G = H Hᵀ (in place)."""
    for _ in range(sweeps):
        for t in range(W.shape[1]):
            if G[t, t] > 0:
                W[:, t] = torch.clamp(W[:, t] + (P[:, t] - W @ G[:, t]) / G[t, t], min=0)
    return W


def _step(block, valid, W_block: np.ndarray, H: np.ndarray, negative: str, shift, device: str,
          with_norm: bool) -> tuple:
    """One HALS update of this block's token weights, and the block's sufficient statistics
    (|A_c|² only when asked: it does not change between passes)."""
    valid = np.asarray(valid)
    A = _prepare(block, valid, negative, shift, device)
    Hd = torch.from_numpy(H).to(device)
    P = (A @ Hd.T.float()).double()
    W = _hals_rows(torch.from_numpy(W_block[valid]).to(device), P, Hd @ Hd.T)
    WtA = (W.T.float() @ A).double()
    out = np.zeros_like(W_block)  # masked rows get no weight
    out[valid] = W.cpu().numpy()
    norm = float(torch.sum(A.square(), dtype=torch.float64)) if with_norm else 0.0
    return out, (WtA.cpu().numpy(), (W.T @ W).cpu().numpy(), norm)


def _project(block, valid, H: np.ndarray, negative: str, shift, device: str, sweeps: int) -> tuple:
    """Token weights of a block for fixed factors H (non-negative least squares by HALS),
    and the block's |A|² and |A - W H|²."""
    valid = np.asarray(valid)
    A = _prepare(block, valid, negative, shift, device)
    Hd = torch.from_numpy(H).to(device)
    P, G = (A @ Hd.T.float()).double(), Hd @ Hd.T
    W = _hals_rows(torch.zeros(P.shape, dtype=torch.float64, device=device), P, G, sweeps)
    norm = float(torch.sum(A.square(), dtype=torch.float64))
    resid = norm - 2 * float(torch.sum(W * P)) + float(torch.sum((W.T @ W) * G))
    out = np.zeros((len(valid), H.shape[0]))
    out[valid] = W.cpu().numpy()
    return out, (norm, resid)


def _add(x: tuple, y: tuple) -> tuple:
    return tuple(a + b for a, b in zip(x, y))


def _tree(nodes: list, combine) -> dask.delayed:
    """Pairwise reduction in a fixed order, so the sum is the same on any scheduler."""
    while len(nodes) > 1:
        nodes = [dask.delayed(combine, pure=True)(*nodes[i:i + 2]) if i + 1 < len(nodes) else nodes[i]
                 for i in range(0, len(nodes), 2)]
    return nodes[0]


def _hals_h(H: np.ndarray, WtA: np.ndarray, WtW: np.ndarray) -> np.ndarray:
    for t in range(H.shape[0]):
        if WtW[t, t] > 0:
            H[t] = np.maximum(H[t] + (WtA[t] - WtW[t] @ H) / WtW[t, t], 0)
    return H


# ---------------------------------------------------------------- the fit


def fit(m: Matrix, factors: int, iterations: int, seed: int, negative: str, device: str = "cpu",
        progress: bool = True) -> dict:
    """Factorize; returns W (tokens x k), H (k x features), objective per iteration, |A|², shift."""
    parts = [dask.delayed(_summary, pure=True)(b, v) for b, v in zip(m.blocks, m.valid)]
    count, fmin, fsum, clip_sum = dask.compute(_tree(parts, _add_summary))[0]
    if count == 0:
        raise ConfigError("every token row of this run is masked (prompt_index < 0); there is nothing to factorize")
    shift = fmin.astype(np.float32) if negative == "shift" else None
    total = clip_sum if negative == "clip" else float(fsum.sum() - count * fmin.sum())
    # scikit-learn's random init: |N(0,1)| scaled so W H has the data's mean.
    rng = np.random.default_rng(seed)
    scale = np.sqrt(max(total, 0.0) / (count * m.n_features) / factors)
    H = scale * np.abs(rng.standard_normal((factors, m.n_features)))
    W = scale * np.abs(rng.standard_normal((m.n_tokens, factors)))
    objective, norm2 = [], 0.0
    bar = tqdm(range(iterations), desc="nmf", unit="it", disable=not progress, dynamic_ncols=True)
    seconds = []
    for it in bar:
        started = time.perf_counter()
        H_node = dask.delayed(H.copy(), pure=True)
        steps = [dask.delayed(_step, nout=2, pure=True)(b, v, W[s:s + n], H_node, negative, shift, device, it == 0)
                 for b, v, s, n in zip(m.blocks, m.valid, m.starts, m.sizes)]
        new_w, (WtA, WtW, norm) = dask.compute([s[0] for s in steps], _tree([s[1] for s in steps], _add))
        norm2 = norm if it == 0 else norm2
        W = np.concatenate(new_w)
        H = _hals_h(H, WtA, WtW)
        # |A - WH|² of the (W, H) just computed, from this pass's statistics (no second pass); the
        # float32 statistics make it accurate to ~1e-3 relative when the fit is near perfect.
        objective.append(max(norm2 - 2 * float(np.sum(WtA * H)) + float(np.sum(WtW * (H @ H.T))), 0.0))
        bar.set_postfix_str(f"relative error {np.sqrt(objective[-1] / norm2):.4f}", refresh=False)
        seconds.append(time.perf_counter() - started)
    bar.close()
    return {"W": W, "H": H, "objective": np.array(objective), "norm2": norm2, "shift": shift,
            "seconds_per_iteration": float(np.median(seconds))}


def _normalized(W: np.ndarray, H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm factor rows of H (W absorbs the scale), factors ordered by their share |W_t||H_t|."""
    hn = np.linalg.norm(H, axis=1)
    size = hn * np.linalg.norm(W, axis=0)
    order = np.argsort(-size, kind="stable")
    hn = np.where(hn > 0, hn, 1.0)
    return (W * hn)[:, order], (H / hn[:, None])[order]


# ---------------------------------------------------------------- jobs


def _check(factors, iterations, seed, negative) -> None:
    if not isinstance(factors, (int, np.integer)) or isinstance(factors, bool) or factors < 1:
        raise ConfigError(f"--factors {factors!r} must be a whole number of at least 1")
    if not isinstance(iterations, (int, np.integer)) or iterations < 1:
        raise ConfigError(f"--iterations {iterations!r} must be a whole number of at least 1")
    if not isinstance(seed, (int, np.integer)):
        raise ConfigError(f"--seed {seed!r} must be a whole number")
    if negative not in NEGATIVE:
        raise ConfigError(f"--negative {negative!r} is not an option; use clip or shift")


def nmf(run, factors: int = 8, layers: Iterable[int] | str | None = None, iterations: int = 200, seed: int = 0,
        negative: str = "clip", device: str = "cpu", chunk_tokens: int | None = None, progress: bool = True,
        recompute: bool = False) -> xr.Dataset:
    """Factorize the run's MLP activations of `layers` into `factors` non-negative factors and store
    them in analysis/nmf; the stored result is reused when asked again with the same parameters."""
    single_stack(run, "nmf")
    _check(factors, iterations, seed, negative)
    device = str(resolve_device(device or "cpu"))
    m = open_matrix(run, layers, chunk_tokens)
    if factors > m.n_features:
        raise ConfigError(f"--factors {factors} exceeds the {m.n_features} features (layer x neuron) chosen")
    params = {"factors": int(factors), "layers": m.layers, "iterations": int(iterations), "seed": int(seed),
              "negative": negative}
    if not recompute and (stored := load_result(run, NMF.job, params)) is not None:
        return stored
    out = fit(m, int(factors), int(iterations), int(seed), negative, device, progress)
    W, H = _normalized(out["W"], out["H"])
    rel = float(np.sqrt(out["objective"][-1] / out["norm2"])) if out["norm2"] > 0 else 0.0
    shift = out["shift"] if out["shift"] is not None else np.zeros(m.n_features, dtype=np.float32)
    ds = _dataset(run, W, {
        "factor_neuron": (("factor", "layer", "neuron"),
                          H.reshape(len(H), len(m.layers), m.n_neuron).astype(np.float32)),
        "shift": (("layer", "neuron"), shift.reshape(len(m.layers), m.n_neuron)),
        "objective": (("iteration",), out["objective"]),
        "relative_error": ((), rel),
    }, m.layers)
    ds.attrs.update(relative_error=rel, algorithm="HALS (streaming, one pass per iteration)", device=device,
                    chunk_tokens=m.sizes[0], negative=negative, seconds_per_iteration=out["seconds_per_iteration"])
    return save_result(run, NMF.job, ds, params)


def _dataset(run, W: np.ndarray, data: dict, layers: list[int]) -> xr.Dataset:
    rows = min(len(W), 65536)  # token chunks of the stored weights, never one giant chunk
    data = {"token_factor": (("token", "factor"), da.from_array(W.astype(np.float32), chunks=(rows, -1))), **data}
    return xr.Dataset(data, coords={"factor": np.arange(W.shape[1]), "layer": np.array(layers, dtype=np.int32)})


def stored_factors(run, job: str = "nmf") -> xr.Dataset:
    """The newest stored factors of `job` (nmf or nmf_transform)."""
    how = "run.nmf() or `stratascope nmf RUN`" if job == "nmf" else "run.nmf_transform(factors_from=...)"
    return require_result(run, job, how)


def nmf_transform(run, factors_from, device: str = "cpu", chunk_tokens: int | None = None,
                  sweeps: int = TRANSFORM_SWEEPS, progress: bool = True, recompute: bool = False) -> xr.Dataset:
    """Weights of this run's tokens on the factors stored by another run's nmf (H fixed), in
    analysis/nmf_transform; the feature shift of the source (for negative='shift') is reused."""
    single_stack(run, "nmf transform")
    device = str(resolve_device(device or "cpu"))
    src = stored_factors(factors_from)
    layers = [int(v) for v in src["layer"].values]
    H = src["factor_neuron"].values.astype(np.float64)
    if "mlp" not in run.ds:
        raise MissingArrayError("this run has no mlp activations; capture with --capture mlp")
    n_neuron = int(run.ds.sizes["neuron"])
    if n_neuron != H.shape[2]:
        raise ConfigError(f"the factors of {factors_from.path} span {H.shape[2]} neurons per layer but this run's "
                          f"mlp has {n_neuron}; project only runs of the same model")
    captured = [int(v) for v in run.ds["layer"].values]
    missing = [v for v in layers if v not in captured]
    if missing:
        raise OutOfRangeError(f"the factors of {factors_from.path} use layer {missing[0]}, which this run did not "
                              f"capture (it has mlp for layers {format_ranges(captured)}); capture those layers")
    negative = src.attrs["params"]["negative"]
    params = {"factors_from": str(factors_from.path), "source_created": src.attrs["created"], "sweeps": int(sweeps)}
    if not recompute and (stored := load_result(run, NMF_TRANSFORM.job, params)) is not None:
        return stored
    m = open_matrix(run, layers, chunk_tokens)
    H = H.reshape(len(H), -1)
    shift = src["shift"].values.reshape(-1).astype(np.float32) if negative == "shift" else None
    H_node = dask.delayed(H, pure=True)
    parts = [dask.delayed(_project, nout=2, pure=True)(b, v, H_node, negative, shift, device, int(sweeps))
             for b, v in zip(m.blocks, m.valid)]
    with job_progress(progress):
        blocks, (norm2, resid) = dask.compute([p[0] for p in parts], _tree([p[1] for p in parts], _add))
    rel = float(np.sqrt(max(resid, 0.0) / norm2)) if norm2 > 0 else 0.0
    ds = _dataset(run, np.concatenate(blocks), {
        "factor_neuron": (("factor", "layer", "neuron"), src["factor_neuron"].values),
        "relative_error": ((), rel)}, layers)
    ds.attrs.update(relative_error=rel, negative=negative, factors_from=str(factors_from.path),
                    source_params=src.attrs["params"], source_run=src.attrs["source"])
    return save_result(run, NMF_TRANSFORM.job, ds, params)


# ---------------------------------------------------------------- reading results


def factor_tokens(run, factor: int, top: int = 20, job: str = "nmf") -> pd.DataFrame:
    """The `top` tokens with the largest weight on `factor`: token text, prompt, position, weight."""
    import pandas as pd

    res = stored_factors(run, job)
    k = int(res.sizes["factor"])
    if not isinstance(factor, (int, np.integer)) or not -k <= factor < k:
        raise OutOfRangeError(f"factor {factor!r} is out of range; this result has factors 0-{k - 1}")
    if not isinstance(top, (int, np.integer)) or top < 1:
        raise ConfigError(f"top {top!r} must be a whole number of at least 1")
    weights = res["token_factor"][:, int(factor) % k].values
    valid = run.ds["prompt_index"].values >= 0
    weights = np.where(valid, weights, -np.inf)
    n = min(int(top), int(valid.sum()))
    cut = np.partition(weights, len(weights) - n)[len(weights) - n]
    idx = np.flatnonzero(weights >= cut)
    idx = idx[np.lexsort((idx, -weights[idx]))][:n]  # by weight, ties by row: deterministic
    idx = idx[weights[idx] > 0]
    rows = run.ds[["token_str", "prompt_index", "position"]].isel(token=np.sort(idx)).to_dataframe()
    rows = rows.set_axis(np.sort(idx)).loc[idx]
    return pd.DataFrame({"token": rows["token_str"].astype(object).to_numpy(),
                         "prompt": rows["prompt_index"].to_numpy(), "position": rows["position"].to_numpy(),
                         "weight": weights[idx]}, index=pd.Index(idx, name="row"))


def factor_activations(run, prompt: int, job: str = "nmf") -> pd.DataFrame:
    """Per position of one prompt, its weight on every factor (for colouring the text), with a token column."""
    import pandas as pd

    res = stored_factors(run, job)
    rows = run.token_slice(prompt)
    w = res["token_factor"][rows].values
    df = pd.DataFrame(w, columns=pd.Index(range(w.shape[1]), name="factor"),
                      index=pd.Index(run.ds["position"][rows].values, name="position"))
    df.insert(0, "token", run.ds["token_str"][rows].values.astype(object))
    return df
