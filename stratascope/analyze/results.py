"""Writing and reusing analysis/<job> groups: a result records the parameters and source it came from."""

from __future__ import annotations

import datetime
import json

import xarray as xr

from ..schemas import analysis_spec, check_group, consolidate, describe
from ..store import has_group, open_dataset


def _normalize(params: dict) -> dict:
    """Parameters as they round-trip through JSON attrs, so stored and asked-for compare equal."""
    return json.loads(json.dumps(params, sort_keys=True, default=list))


def source_fingerprint(run) -> dict:
    return {"corpus_sha256": run.attrs["corpus"]["sha256"], "weights_sha256": run.attrs["model"]["weights_sha256"],
            "created": run.attrs["created"]}


def load_result(run, job: str, params: dict) -> xr.Dataset | None:
    """The stored result of `job` if it was computed with exactly these parameters on this capture."""
    group = f"analysis/{job}"
    if not has_group(run.path, group):
        return None
    ds = open_dataset(run.path, group)
    if ds.attrs.get("params") == _normalize(params) and ds.attrs.get("source") == source_fingerprint(run):
        return ds
    return None


def save_result(run, job: str, ds: xr.Dataset, params: dict) -> xr.Dataset:
    """Write `ds` (lazy dask arrays are computed chunk by chunk) to analysis/<job>, replacing any
    earlier result of that job, and return it reopened lazily from the store.

    The result is computed into analysis/_partial_<job> and moved into place only once every
    chunk is written; its params (what load_result matches on) are added last. So an
    interrupted job never replaces the earlier result, nor is it ever reused.
    """
    import fsspec.core
    import zarr

    ds = ds.copy()
    ds.attrs = {k: v for k, v in ds.attrs.items() if k not in ("params", "source")}
    if (spec := analysis_spec(job)) is not None:  # names, dims, dtypes and attrs from schemas/groups.py
        check_group(spec, {n: (v.dims, v.dtype) for n, v in ds.variables.items()}, f"analysis/{job}")
        ds = describe(spec, ds)
    for var in ds.variables.values():
        var.encoding.clear()
    staging, final = f"analysis/_partial_{job}", f"analysis/{job}"
    ds.to_zarr(run.path, group=staging, mode="w", zarr_format=3, consolidated=False)
    zarr.open_group(run.path, path=staging, mode="r+").attrs.update(
        {"job": job, "params": _normalize(params), "source": source_fingerprint(run),
         "created": datetime.datetime.now(datetime.timezone.utc).isoformat()})
    fs, root = fsspec.core.url_to_fs(run.path)
    src, dst = f"{root.rstrip('/')}/{staging}", f"{root.rstrip('/')}/{final}"
    if fs.exists(dst):
        fs.rm(dst, recursive=True)
    fs.mv(src, dst, recursive=True)
    consolidate(run.path)  # kept true after every analysis, so outside readers see this group
    return open_dataset(run.path, final)


def job_progress(enabled: bool):
    """dask's progress bar (counts and rate) around a job's compute, shown after 2 s; a no-op
    context when disabled. (A dask.distributed cluster shows progress on its dashboard.)"""
    import contextlib

    if not enabled:
        return contextlib.nullcontext()
    from dask.diagnostics import ProgressBar

    return ProgressBar(minimum=2.0)
