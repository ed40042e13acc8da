"""Export any stored analysis/<job> Dataset as one tidy table (parquet or csv), streamed in chunks.

Rows: the longest dims tuple that at least half of the job's variables share (for the lens,
token x depth). Variables with fewer dims repeat along the others; a variable with extra
dims (top-k entries, watch tokens) becomes one column per label, named `var[label]`. Rows
along `token` also get the capture's prompt_index, position, token_id and token_str.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from ..errors import ConfigError, MissingArrayError
from ..store import open_dataset
from .results import result_groups, stored_results

FORMATS = ("parquet", "csv")
ROWS_PER_PIECE = 2**18  # table rows per written piece: bounded memory whatever the job's size
TOKEN_COLUMNS = ("prompt_index", "position", "token_id", "token_str")


def open_job(run, job: str) -> xr.Dataset:
    """The result `job` or `job/name` (default: the job's newest result)."""
    job, _, name = job.partition("/")
    groups = result_groups(run, job) if re.fullmatch(r"[A-Za-z0-9_]+", job) else []
    if name:
        groups = [g for g in groups if g.rsplit("/", 1)[-1] == name]
    if not groups:
        stored = [f"{r['job']}/{r['name']}" if r["name"] else r["job"] for r in stored_results(run)]
        none = "none yet (run an analysis such as stratascope lens first)"
        raise MissingArrayError(f"{run.path} has no analysis/{job}{'/' + name if name else ''} result; stored "
                                f"results: {', '.join(stored) or none}")
    return open_dataset(run.path, groups[0])


def row_dims(ds: xr.Dataset) -> tuple[str, ...]:
    """The longest dims tuple (of some variable) contained in at least half of the variables."""
    dim_sets = [v.dims for v in ds.data_vars.values() if v.dims]
    if not dim_sets:
        raise ConfigError("the result has no data variables to export")
    shared = [d for d in dim_sets if 2 * sum(set(d) <= set(o) for o in dim_sets) >= len(dim_sets)]
    if not shared:  # no common layout: the rows of the largest variable
        return max(ds.data_vars.values(), key=lambda v: v.size).dims
    return max(shared, key=len)


def tables(run, ds: xr.Dataset, rows_per_piece: int = ROWS_PER_PIECE) -> Iterator[tuple[int, pd.DataFrame]]:
    """The tidy table of `ds` in pieces along its first row dim: (entries of that dim, piece)."""
    dims = row_dims(ds)
    lead, rest = dims[0], dims[1:]
    placed = [n for n, v in ds.data_vars.items() if set(v.dims) <= set(dims) or set(dims) <= set(v.dims)]
    skipped = sorted(set(ds.data_vars) - set(placed))
    if skipped:
        warnings.warn(f"not exported (their dims fit no row of the table): {', '.join(skipped)}", stacklevel=2)
    inner = int(np.prod([ds.sizes[d] for d in rest], dtype=np.int64))
    step = max(1, rows_per_piece // max(inner, 1))
    n = ds.sizes[lead]
    for start in range(0, n, step):
        piece = ds[placed].isel({lead: slice(start, min(n, start + step))}).load()
        yield piece.sizes[lead], _frame(run, piece, dims, start)


def _labels(ds: xr.Dataset, dim: str) -> np.ndarray:
    return ds[dim].values if dim in ds.coords else np.arange(ds.sizes[dim])


def _frame(run, piece: xr.Dataset, dims: tuple[str, ...], start: int) -> pd.DataFrame:
    shape = tuple(piece.sizes[d] for d in dims)
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    cols: dict[str, np.ndarray] = {}
    for d, g in zip(dims, grids):
        labels = np.arange(start, start + shape[0]) if d == dims[0] and d not in piece.coords else _labels(piece, d)
        cols[d] = np.asarray(labels)[g.ravel()]
    if dims[0] == "token":
        table = run.ds[list(TOKEN_COLUMNS)].isel(token=slice(start, start + shape[0])).load()
        for name in TOKEN_COLUMNS:
            values = table[name].values
            cols[name] = (values.astype(object) if values.dtype.kind in "TUO" else values)[grids[0].ravel()]
    for name, coord in piece.coords.items():  # where each row is (a study's token, prompt, position, words)
        if coord.dims == (dims[0],) and name != dims[0]:
            values = coord.values
            cols[name] = (values.astype(object) if values.dtype.kind in "TUO" else values)[grids[0].ravel()]
    for name, var in sorted(piece.data_vars.items()):
        extra = [d for d in var.dims if d not in dims]
        values = var.transpose(*[d for d in dims if d in var.dims], *extra).values
        at = tuple(g.ravel() for d, g in zip(dims, grids) if d in var.dims)  # variables repeat along missing dims
        if not extra:
            cols[name] = values[at]
            continue
        for combo in np.ndindex(*[var.sizes[d] for d in extra]):
            label = ",".join(str(_labels(piece, d)[i]) for d, i in zip(extra, combo))
            cols[f"{name}[{label}]"] = values[(*at, *combo)]
    frame = pd.DataFrame(cols)
    if dims[0] == "token":  # masked padding rows between shards are not tokens
        frame = frame[frame["prompt_index"] >= 0].reset_index(drop=True)
    _tokens_as_text(run, frame)
    prompt = "prompt_index" if "prompt_index" in frame else "prompt" if "prompt" in frame else None
    if prompt is not None:  # every prompt metadata column, and the prompt's text
        meta = run.prompts.drop(columns=["token_offset", "n_tokens"])
        frame = frame.join(meta.rename(columns={c: f"meta_{c}" for c in meta.columns if c in frame}), on=prompt)
    return frame


def _tokens_as_text(run, frame: pd.DataFrame) -> None:
    """Beside every column of vocabulary ids (top-k, targets, watched), the tokens as text."""
    vocab = None
    for name in [c for c in frame.columns if re.fullmatch(r"(topk_ids|target_id|contrast_id)(\[.*\])?", c)]:
        vocab = run.readout["vocab_str"].values if vocab is None else vocab
        ids = frame[name].to_numpy()
        text = np.where(ids >= 0, vocab[np.clip(ids, 0, len(vocab) - 1)].astype(object), "")
        frame[name.replace("_ids", "_token").replace("_id", "_token")] = text


def export_result(run, job: str, out: str, fmt: str | None = None, progress: bool = True) -> int:
    """Write analysis/<job> of `run` to `out` as parquet or csv; returns the number of rows written."""
    fmt = fmt or Path(out).suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not one of {', '.join(FORMATS)} (or give -o a .parquet/.csv name)")
    if not Path(out).resolve().parent.is_dir():
        raise ConfigError(f"-o {out}: the folder {Path(out).resolve().parent} does not exist")
    ds = open_job(run, job)
    partial = f"{out}.partial"
    written, writer = 0, None
    from ..progress import tqdm

    lead = row_dims(ds)[0]
    bar = tqdm(total=ds.sizes[lead], unit=lead, desc=f"export {job}", disable=not progress, mininterval=1.0)
    try:
        for n_lead, frame in tables(run, ds):
            if fmt == "csv":
                frame.to_csv(partial, mode="w" if writer is None else "a", header=writer is None, index=False)
                writer = True
            else:
                import pyarrow as pa
                import pyarrow.parquet as pq

                batch = pa.Table.from_pandas(frame, preserve_index=False)
                writer = writer or pq.ParquetWriter(partial, batch.schema)
                writer.write_table(batch)
            written += len(frame)
            bar.update(n_lead)
        if fmt == "parquet" and writer is not None:
            writer.close()
        os.replace(partial, out)
    finally:
        bar.close()
        if os.path.exists(partial):
            os.remove(partial)
    return written
