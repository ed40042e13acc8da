"""Representation similarity between depths (or layers), within one run or between two runs.

Methods, each on row-matched matrices X (n × d_a) and Y (n × d_b) of one depth each:

- `cka`: linear CKA (Kornblith et al. 2019), ‖Yᶜᵀ Xᶜ‖²_F / (‖Xᶜᵀ Xᶜ‖_F ‖Yᶜᵀ Yᶜ‖_F) with Xᶜ, Yᶜ
  column-centred. Exact, streamed over the rows: per depth pair the cross-moment Σ xᵀy and per
  depth Σ x are accumulated in float64 block by block (rows shifted by the first block's mean
  so the centring later subtracts nothing large), then Cᵢⱼ = Σ xᵢᵀxⱼ − sᵢsⱼᵀ/n. Memory: each
  depth pair held costs 8·d_a·d_b bytes (SmolLM2 hidden: 2.65 MB; all 31·32/2 = 496 pairs of
  one run: 1.3 GB), so the pairs are packed into passes of at most `memory_mib` (default 512
  MiB: 3 passes over the store for SmolLM2's 31 depths) plus one block of rows (32 MiB of
  float32 per run, and its float64 copy). Nothing grows with the number of rows.
  (The unbiased minibatch estimator of Nguyen et al. 2021 needs less memory but is only an
  estimate whose value depends on the batch size; the accumulated moments give the
  full-batch value.)
- `svcca` (Raghu et al. 2017): per depth keep the top singular directions of Xᶜ that explain
  `variance` (0.99) of its variance, then CCA between the two kept subspaces; the mean of
  the min(k_a, k_b) canonical correlations.
- `pwcca` (Morcos et al. 2018): CCA between Xᶜ and Yᶜ (directions with a singular value below
  1e-6 of the largest are dropped as numerical noise); the mean of the canonical
  correlations ρᵢ weighted by αᵢ = Σⱼ |⟨hᵢ, xⱼ⟩|, hᵢ the unit canonical variates of the side
  with fewer neurons (the row's on a tie) and xⱼ its centred neuron columns. Not symmetric.

CCA needs full covariances and an SVD per depth, so `svcca`/`pwcca` run on a deterministic
sample of at most `max_rows` rows (default 8192; seeded) gathered into a scratch file: RAM
≈ 4 · 8 · max_rows · d bytes at a time (8192 × 576: 150 MB), disk ≈ max_rows · depths · d ·
12 bytes per run. With fewer rows than about twice a depth's dimension the canonical
correlations are biased towards 1 (a warning says so). `cka` uses every row unless
`max_rows` is given.

Rows (see similarity_rows): `positions="all"` every token (from `min_position` on: a model
whose first token carries a massive activation, an attention sink, has its covariance
dominated by that one row per prompt (SmolLM2: over 100× the norm of the others), so use
min_position=1 there); `"last"` / `"mean"` one row per prompt. The result lands in
analysis/similarity, keyed by its parameters (and the other
run's fingerprint), and is reused when asked again.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import xarray as xr

from ..errors import ConfigError, OutOfRangeError
from ..progress import tqdm
from ..ranges import format_ranges, parse_ranges
from .lens import _release_freed_memory
from .results import load_result, save_result, source_fingerprint
from .similarity_rows import PromptPairs, TokenPairs, check_tokenized_alike
from .stacks import single_stack
from .stored_rows import require_every_position

JOB = "similarity"
METHODS = ("cka", "svcca", "pwcca")
ARRAYS = {"hidden": "depth", "mlp": "layer"}  # array -> the axis compared
POSITIONS = ("all", "last", "mean")
CCA_MAX_ROWS = 8192
SVCCA_VARIANCE = 0.99
RANK_RTOL = 1e-6
MEMORY_MIB = 512


# ---------------------------------------------------------------- linear CKA, streamed

def _passes(pairs, dims, budget: int) -> list[list]:
    """Pack the pairs, in order, into passes whose float64 accumulators fit `budget` bytes."""
    out, cur, used = [], [], 0
    for f, g in pairs:
        size = 8 * dims[f] * dims[g]
        if cur and used + size > budget:
            out.append(cur)
            cur, used = [], 0
        cur.append((f, g))
        used += size
    return out + ([cur] if cur else [])


def cka_hsic(source, pairs, device: str = "cpu", memory_mib: float = MEMORY_MIB, progress: bool = False):
    """‖Cᵢⱼ‖²_F of the centred cross-covariance for every pair ((side, k), (side, k)) of features
    (side = run, k = index among its selected depths), streamed over `source`'s row blocks.
    Returns ({pair: value}, number of passes)."""
    import torch

    first = next(iter(source.blocks()))
    shift = [torch.from_numpy(x.astype(np.float64).mean(0)).to(device) for x in first]  # (D_s, d_s)
    dims = {(s, k): int(x.shape[2]) for s, x in enumerate(first) for k in range(x.shape[1])}
    del first
    passes = _passes(pairs, dims, int(memory_mib * 2**20))
    out, n = {}, 0
    bar = tqdm(total=len(passes) * source.n_blocks, desc="cka", unit="block", disable=None if progress else True,
               mininterval=0.5)
    for todo in passes:
        feats = sorted({f for pair in todo for f in pair})
        acc = {pair: torch.zeros(dims[pair[0]], dims[pair[1]], dtype=torch.float64, device=device) for pair in todo}
        sums = {f: torch.zeros(dims[f], dtype=torch.float64, device=device) for f in feats}
        n = 0
        for block in source.blocks():
            xs = [(torch.from_numpy(x).to(device, torch.float64) - shift[s]).transpose(0, 1).contiguous()
                  for s, x in enumerate(block)]  # (depth, rows, d) per side
            for s, k in feats:
                sums[(s, k)] += xs[s][k].sum(0)
            for (f, g), a in acc.items():
                a.addmm_(xs[f[0]][f[1]].T, xs[g[0]][g[1]])
            n += len(block[0])
            del xs
            _release_freed_memory()
            bar.update()
        for (f, g), a in acc.items():
            c = a - torch.outer(sums[f], sums[g]) / n
            out[(f, g)] = float((c * c).sum())
        del acc
    bar.close()
    return out, len(passes)


def cka_matrix(source, n_a: int, n_b: int | None, device: str = "cpu", memory_mib: float = MEMORY_MIB,
               progress: bool = False) -> tuple[np.ndarray, int]:
    """Linear CKA of every depth pair: (n_a × n_a) within one run (n_b None), else (n_a × n_b)."""
    if n_b is None:
        pairs = [((0, i), (0, j)) for i in range(n_a) for j in range(i, n_a)]
    else:
        pairs = ([((0, i), (1, j)) for i in range(n_a) for j in range(n_b)] +
                 [((0, i), (0, i)) for i in range(n_a)] + [((1, j), (1, j)) for j in range(n_b)])
    h, passes = cka_hsic(source, pairs, device, memory_mib, progress)
    side_b = 0 if n_b is None else 1
    m = np.full((n_a, n_a if n_b is None else n_b), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                key = ((0, min(i, j)), (0, max(i, j))) if n_b is None else ((0, i), (1, j))
                m[i, j] = h[key] / np.sqrt(h[((0, i), (0, i))] * h[((side_b, j), (side_b, j))])
    return m, passes


# ---------------------------------------------------------------- SVCCA and PWCCA on a row sample

class _Basis:
    """A centred depth matrix X = U diag(s) Vᵀ (rank r): U kept on disk, M = diag(s) Vᵀ (r × d)."""

    def __init__(self, x: np.ndarray, path: Path, variance: float):
        x = x.astype(np.float64)
        x -= x.mean(0)
        u, s, vt = np.linalg.svd(x, full_matrices=False)
        r = int((s > s[0] * RANK_RTOL).sum()) if len(s) and s[0] > 0 else 0
        np.save(path, u[:, :r])
        self.path, self.d, self.r = path, x.shape[1], r
        self.m = s[:r, None] * vt[:r]
        share = np.cumsum(s[:r] ** 2) / max(float((s[:r] ** 2).sum()), 1e-300)
        self.k = int(np.searchsorted(share, variance - 1e-12) + 1) if r else 0  # smallest k reaching `variance`

    def u(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="r")


def svcca(a: _Basis, b: _Basis, ua=None, ub=None) -> float:
    if not a.k or not b.k:
        return float("nan")
    ua = a.u() if ua is None else ua
    ub = b.u() if ub is None else ub
    rho = np.linalg.svd(ua[:, :a.k].T @ ub[:, :b.k], compute_uv=False)
    return float(np.clip(rho[:min(a.k, b.k)], 0, 1).mean())


def pwcca(a: _Basis, b: _Basis, ua=None, ub=None) -> float:
    if not a.r or not b.r:
        return float("nan")
    ua = a.u() if ua is None else ua
    ub = b.u() if ub is None else ub
    p, rho, qt = np.linalg.svd(ua.T @ ub, full_matrices=False)
    m = min(a.r, b.r)
    rho = np.clip(rho[:m], 0, 1)
    # h_i = U p_i (unit canonical variates); <h_i, x_j> = p_iᵀ M[:, j]
    alpha = np.abs(p[:, :m].T @ a.m).sum(1) if a.d <= b.d else np.abs(qt[:m] @ b.m).sum(1)
    return float((alpha * rho).sum() / alpha.sum())


def cca_matrix(source, method: str, variance: float = SVCCA_VARIANCE, progress: bool = False,
               symmetric: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
    """SVCCA or PWCCA of every depth pair of `source`'s rows (all of them: sample before).
    Returns the matrix and, per side, each depth's kept dimensions (svcca) or rank (pwcca)."""
    with tempfile.TemporaryDirectory(prefix="stratascope-cca-") as tmp:
        tmp = Path(tmp)
        blocks = iter(source.blocks())
        first = next(blocks)
        rows = [np.lib.format.open_memmap(tmp / f"rows{s}.npy", mode="w+", dtype=np.float32,
                                          shape=(source.n,) + x.shape[1:]) for s, x in enumerate(first)]
        lo = 0
        for block in [first, *blocks]:
            for r, x in zip(rows, block):
                r[lo:lo + len(x)] = x
            lo += len(block[0])
        bases = []
        steps = sum(r.shape[1] for r in rows)
        with tqdm(total=steps, desc=f"{method} bases", unit="depth", disable=None if progress else True) as bar:
            for s, r in enumerate(rows):
                side = []
                for k in range(r.shape[1]):
                    side.append(_Basis(np.asarray(r[:, k]), tmp / f"u{s}_{k}.npy", variance))
                    bar.update()
                bases.append(side)
        del rows
        a, b = bases[0], bases[-1]  # one run: its depths against themselves
        widest = max(x.r for x in a + b)
        if source.n < 2 * widest:
            warnings.warn(f"{method}: {source.n} rows for up to {widest} dimensions; canonical correlations are "
                          "biased towards 1 with fewer rows than about twice the dimension: raise max_rows",
                          stacklevel=3)
        fn = svcca if method == "svcca" else pwcca
        m = np.full((len(a), len(b)), np.nan)
        with tqdm(total=m.size, desc=method, unit="pair", disable=None if progress else True) as bar:
            for i, x in enumerate(a):
                ua = np.asarray(x.u())
                for j, y in enumerate(b):
                    if symmetric and j < i:
                        m[i, j] = m[j, i]
                    else:
                        m[i, j] = fn(x, y, ua, None)
                    bar.update()
        dims = [np.array([x.k if method == "svcca" else x.r for x in side]) for side in (a, b)]
    return m, dims


# ---------------------------------------------------------------- in-memory matrices

class ArrayPairs:
    """Row-matched in-memory arrays (n, depth, d), one per side, read in blocks of `block_rows`."""

    def __init__(self, *arrays: np.ndarray, block_rows: int = 4096):
        self.arrays = [np.asarray(a, dtype=np.float32) for a in arrays]
        self.arrays = [a[:, None] if a.ndim == 2 else a for a in self.arrays]
        self.n, self.step = len(self.arrays[0]), block_rows

    @property
    def n_blocks(self) -> int:
        return -(-self.n // self.step)

    def blocks(self):
        for lo in range(0, self.n, self.step):
            yield [a[lo:lo + self.step] for a in self.arrays]

    def close(self) -> None:
        pass


def compare_arrays(x: np.ndarray, y: np.ndarray | None = None, method: str = "cka", *,
                   variance: float = SVCCA_VARIANCE, block_rows: int = 4096) -> np.ndarray:
    """The similarity of in-memory matrices (n, d) or (n, depth, d), row-matched: (depth_x × depth_y),
    or depth × depth of x alone. For small studies and checks; the stored job is `similarity`."""
    _check_method(method)
    source = ArrayPairs(*([x] if y is None else [x, y]), block_rows=block_rows)
    d_a = source.arrays[0].shape[1]
    if method == "cka":
        return cka_matrix(source, d_a, None if y is None else source.arrays[1].shape[1])[0]
    return cca_matrix(source, method, variance, symmetric=y is None and method == "svcca")[0]


# ---------------------------------------------------------------- the stored job

def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"--method {method!r} is not known; use {', '.join(METHODS)}")


def _select(run, array: str, depths, what: str) -> tuple[np.ndarray, list[int]]:
    """Indices into `array`'s second axis and the depth (or layer) numbers they hold."""
    axis = ARRAYS[array]
    have = [int(v) for v in run.ds[axis].values]
    chosen = parse_ranges(depths, max(have) + 1, what)
    if chosen is None:
        return np.arange(len(have)), have
    missing = [v for v in chosen if v not in have]
    if missing:
        raise OutOfRangeError(f"--{what}: {axis} {missing[0]} was not captured in {run.path}; it holds {axis}s "
                              f"{format_ranges(have)}")
    return np.searchsorted(have, chosen), chosen


def similarity(run, other=None, method: str = "cka", array: str = "hidden", positions: str = "all", depths=None,
               other_depths=None, max_rows: int | None = None, min_position: int = 0,
               variance: float = SVCCA_VARIANCE,
               device: str = "cpu", memory_mib: float = MEMORY_MIB, progress: bool = True,
               recompute: bool = False) -> xr.Dataset:
    """Depth × depth similarity of `run` (or depth of `run` × depth of `other`), stored in
    analysis/similarity; see the module docstring."""
    single_stack(run, "similarity")
    from ..devices import resolve_device

    _check_method(method)
    if array not in ARRAYS:
        raise ConfigError(f"--array {array!r} is not supported; use {' or '.join(ARRAYS)}")
    if positions not in POSITIONS:
        raise ConfigError(f"--positions {positions!r} is not known; use all, last or mean")
    if max_rows is not None and int(max_rows) < 3:
        raise ConfigError(f"--max-rows {max_rows} is too small; similarities need at least 3 rows")
    if min_position < 0 or (min_position and positions != "all"):
        raise ConfigError(f"--min-position {min_position}: a position of at least 0, and only with --positions all")
    if not 0 < variance <= 1:
        raise ConfigError(f"variance {variance} must be a share in (0, 1], e.g. 0.99")
    device = resolve_device(device)
    runs = [run] if other is None else [run, other]
    for r in runs:
        r.require(array, array)
        require_every_position(r, "similarity (rows matched by prompt and position)")
    picked = [_select(run, array, depths, "depths"),
              *([_select(other, array, depths if other_depths is None else other_depths,
                         "depths" if other_depths is None else "other-depths")] if other is not None else [])]
    if max_rows is None and method != "cka":
        max_rows = CCA_MAX_ROWS
    params = {"method": method, "array": array, "positions": positions, "min_position": int(min_position),
              "depths": picked[0][1],
              "max_rows": None if max_rows is None else int(max_rows),
              "variance": float(variance) if method == "svcca" else None,
              "other": None if other is None else {**source_fingerprint(other), "depths": picked[1][1]}}
    if not recompute and (stored := load_result(run, JOB, params)) is not None:
        return stored
    if other is not None and positions == "all":
        check_tokenized_alike(run, other)
    indices = [p[0] for p in picked]
    if positions == "all":
        source = TokenPairs(runs, [r.ds[array].data for r in runs], indices, max_rows, int(min_position))
        rows_note = ("every token" if other is None else "every token, matched by prompt and position") + (
            f", from position {min_position} on" if min_position else "")
    else:
        source = PromptPairs(runs, array, indices, positions, max_rows, progress)
        what = "the last prompt token" if positions == "last" else "the mean over its prompt tokens"
        rows_note = f"one row per prompt: {what}" + ("" if other is None else ", prompts matched by text")
    if source.n < 3:
        source.close()
        raise ConfigError(f"only {source.n} rows to compare; similarities need at least 3 "
                          "(use --positions all, or a lower --min-position)")
    try:
        if method == "cka":
            m, passes = cka_matrix(source, len(indices[0]), None if other is None else len(indices[1]), device,
                                   memory_mib, progress)
            extra = {}
        else:
            m, dims = cca_matrix(source, method, variance, progress, symmetric=other is None and method == "svcca")
            passes = 1
            extra = {"dims_a": dims[0], "dims_b": dims[1]}
    finally:
        source.close()
    return save_result(run, JOB, _to_dataset(run, other, m, extra, picked, params, source.n, rows_note, passes),
                       params)


def _to_dataset(run, other, m, extra, picked, params, n_rows, rows_note, passes) -> xr.Dataset:
    axis = ARRAYS[params["array"]]
    a, b = f"{axis}_a", f"{axis}_b"
    values_b = picked[0][1] if other is None else picked[1][1]
    data = {"similarity": ((a, b), m)}
    if extra:
        data["dims_a"] = ((a,), extra["dims_a"].astype(np.int32))
        data["dims_b"] = ((b,), extra["dims_b"].astype(np.int32))
    ds = xr.Dataset(data, coords={a: np.asarray(picked[0][1], dtype=np.int32),
                                  b: np.asarray(values_b, dtype=np.int32)})
    method = params["method"]
    ds.attrs.update({
        "method": method, "array": params["array"], "axis": axis, "positions": params["positions"],
        "n_rows": int(n_rows), "rows": rows_note, "run_a": run.path, "run_b": run.path if other is None else other.path,
        "model_a": run.attrs["model"]["name"], "model_b": (other or run).attrs["model"]["name"],
        "passes": int(passes),
        "definition": {"cka": "linear CKA, exact (accumulated float64 cross-covariances)",
                       "svcca": f"SVCCA: mean canonical correlation of the top singular directions keeping "
                                f"{params['variance']} of the variance (dims_a/dims_b: kept dimensions)",
                       "pwcca": "PWCCA: canonical correlations weighted by the projection weight of the side with "
                                "fewer neurons (dims_a/dims_b: numerical rank)"}[method]})
    return ds


def summary_lines(ds: xr.Dataset) -> list[str]:
    """What `stratascope similarity` prints: what was compared, then the matrix (2 decimals)."""
    a = ds.attrs
    sim = ds["similarity"]
    da, db = sim.dims
    against = "its own" if a["run_a"] == a["run_b"] else a["run_b"]
    lines = [f"{a['method']} of {a['array']} ({a['definition']}): {a['run_a']} {a['axis']}s (rows) x "
             f"{against} {a['axis']}s (columns), {a['n_rows']} rows ({a['rows']})"]
    head = f"{a['axis']:>6} " + " ".join(f"{int(v):>5}" for v in ds[db].values)
    lines.append(head)
    for v, row in zip(ds[da].values, sim.values):
        lines.append(f"{int(v):>6} " + " ".join("  nan" if not np.isfinite(x) else f"{x:5.2f}" for x in row))
    return lines
