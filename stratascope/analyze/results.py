"""Analysis results: analysis/<job>/<name>, one group per set of parameters, never replaced by another.

A result's name is derived from its parameters (a short hash), so a lens with other depths
lands beside the earlier one instead of over it; the same parameters on the same capture
find and reuse it. Each result records the parameters and the capture (source) it came from.

Writing is staged: a result is computed into analysis/_staging/<unique> and moved into place
only once every chunk and its attrs are written. An interrupted job never replaces anything
and is never reused; leftovers of dead jobs are removed by the next job that writes.

Stores written before keyed results hold one result directly at analysis/<job>; it is still
read, and moved under its name the first time that job writes again.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import uuid

import numpy as np
import xarray as xr

from ..errors import ConfigError, MissingArrayError
from ..locks import alive, hold
from ..progress import dask_progress
from ..schemas import analysis_spec, check_group, consolidate, describe
from ..store import group_attrs, has_group, open_dataset, subgroups

ROOT = "analysis"
STAGING = f"{ROOT}/_staging"
_SEP = "__"  # staging names: <unique>__<pid>__<host>__<job>


def _normalize(params: dict) -> dict:
    """Parameters as they round-trip through JSON attrs, so stored and asked-for compare equal."""
    return json.loads(json.dumps(params, sort_keys=True, default=list))


def result_name(params: dict) -> str:
    """The name a result with these parameters is stored under."""
    return hashlib.sha256(json.dumps(_normalize(params), sort_keys=True).encode()).hexdigest()[:10]


def source_fingerprint(run) -> dict:
    """What a result was computed from. A capture still being written also counts its finished
    shards, so a result computed from it is never reused once more of the store is written."""
    source = {"corpus_sha256": run.attrs["corpus"]["sha256"], "weights_sha256": run.attrs["model"]["weights_sha256"],
              "created": run.attrs["created"]}
    if not run.attrs.get("complete") and "shard_complete" in run.ds:
        source["incomplete_shards_done"] = int(np.asarray(run.array("shard_complete")[:]).sum())
    return source


def _attrs(run, group: str) -> dict:
    return group_attrs(run.path, group)


def _is_result(run, group: str) -> bool:
    return "params" in _attrs(run, group)


def result_groups(run, job: str) -> list[str]:
    """The groups holding results of `job`, newest first."""
    base = f"{ROOT}/{job}"
    if not has_group(run.path, base):
        return []
    if _is_result(run, base):  # a store from before keyed results: one result at analysis/<job>
        return [base]
    groups = [f"{base}/{name}" for name in subgroups(run.path, base)]
    groups = [g for g in groups if _is_result(run, g)]
    return sorted(groups, key=lambda g: _attrs(run, g).get("created", ""), reverse=True)


def jobs(run) -> list[str]:
    """The jobs with at least one stored result."""
    return [j for j in subgroups(run.path, ROOT) if not j.startswith("_") and result_groups(run, j)]


def load_result(run, job: str, params: dict) -> xr.Dataset | None:
    """The stored result of `job` computed with exactly these parameters on this capture, or None."""
    wanted, source = _normalize(params), source_fingerprint(run)
    for group in result_groups(run, job):
        attrs = _attrs(run, group)
        if attrs.get("params") == wanted and attrs.get("source") == source:
            return open_dataset(run.path, group)
    return None


def latest_result(run, job: str, where=None) -> xr.Dataset | None:
    """The newest stored result of `job` (whatever its parameters, or those whose parameters pass
    `where`), or None: what views and exports show when no parameters are asked for."""
    groups = [g for g in result_groups(run, job) if where is None or where(_attrs(run, g).get("params", {}))]
    return open_dataset(run.path, groups[0]) if groups else None


def require_result(run, job: str, how: str, where=None) -> xr.Dataset:
    """The newest result of `job` (passing `where`), or one sentence saying how to compute it."""
    ds = latest_result(run, job, where)
    if ds is None:
        raise MissingArrayError(f"{run.path} has no analysis/{job} result; compute it first with {how}")
    return ds


def stored_results(run) -> list[dict]:
    """Every stored result: job, name, parameters, when it was created, and its group."""
    rows = []
    for job in jobs(run):
        for group in result_groups(run, job):
            attrs = _attrs(run, group)
            rows.append({"job": job, "name": group.rsplit("/", 1)[-1] if group.count("/") > 1 else "",
                         "group": group, "params": attrs.get("params", {}), "created": attrs.get("created", ""),
                         "current": attrs.get("source") == source_fingerprint(run)})
    return rows


def forget_result(run, job: str, name: str | None = None) -> list[str]:
    """Remove the result `name` of `job` (every result of the job if name is None); returns the
    groups removed. An unknown job or name is an error naming what is stored."""
    groups = result_groups(run, job)
    if name:
        groups = [g for g in groups if g.rsplit("/", 1)[-1] == name]
    if not groups:
        stored = ", ".join(f"{r['job']}/{r['name']}" if r["name"] else r["job"] for r in stored_results(run))
        what = f"{job}/{name}" if name else job
        raise ConfigError(f"{run.path} has no analysis result {what}; stored: {stored or 'none'}")
    fs, root = _fs(run)
    for group in groups:
        fs.rm(f"{root}/{group}", recursive=True)
    _consolidate(run)
    return groups


def save_result(run, job: str, ds: xr.Dataset, params: dict) -> xr.Dataset:
    """Write `ds` (lazy dask arrays are computed chunk by chunk) as the result of `job` with these
    parameters, and return it reopened lazily from the store. Results with other parameters stay."""
    with hold(run.path, f"{job}-{result_name(params)}"):  # one writer of this result at a time
        return _save(run, job, ds, params)


def _save(run, job: str, ds: xr.Dataset, params: dict) -> xr.Dataset:
    import zarr

    _clean_staging(run)
    ds = ds.copy()
    ds.attrs = {k: v for k, v in ds.attrs.items() if k not in ("params", "source")}
    if (spec := analysis_spec(job, ds.dims)) is not None:  # names, dims, dtypes and attrs from schemas/groups.py
        check_group(spec, {n: (v.dims, v.dtype) for n, v in ds.variables.items()}, f"analysis/{job}")
        ds = describe(spec, ds)
    from zarr.codecs import Crc32cCodec, ZstdCodec

    for var in ds.variables.values():  # every chunk of a result ends with a checksum, as the capture's do
        var.encoding = {"compressors": (ZstdCodec(), Crc32cCodec())} if var.ndim else {}
    # the writer is in the staging name, so a dead job's leftovers are known before anything is written
    staging = f"{STAGING}/{_SEP.join([uuid.uuid4().hex[:12], str(os.getpid()), socket.gethostname(), job])}"
    zarr.open_group(run.path, path=STAGING, mode="a")
    ds.to_zarr(run.path, group=staging, mode="w", zarr_format=3, consolidated=False)
    zarr.open_group(run.path, path=staging, mode="r+").attrs.update(
        {"job": job, "params": _normalize(params), "source": source_fingerprint(run),
         "created": datetime.datetime.now(datetime.UTC).isoformat()})
    final = f"{ROOT}/{job}/{result_name(params)}"
    _adopt_legacy(run, job)
    zarr.open_group(run.path, path=f"{ROOT}/{job}", mode="a")
    _move_into_place(run, staging, final)
    _consolidate(run)
    return open_dataset(run.path, final)


# ---------------------------------------------------------------- moving groups


def _fs(run):
    import fsspec.core

    fs, root = fsspec.core.url_to_fs(run.path)
    return fs, root.rstrip("/")


def _move_into_place(run, staging: str, final: str) -> None:
    """Put the complete staging group at `final`. A result already there (the same parameters,
    recomputed) is set aside first and removed only after the new one is in place."""
    fs, root = _fs(run)
    src, dst = f"{root}/{staging}", f"{root}/{final}"
    old = None
    if fs.exists(dst):
        old = f"{root}/{STAGING}/replaced-{uuid.uuid4().hex[:12]}"
        _rename(fs, dst, old)
    _rename(fs, src, dst)
    if old:
        fs.rm(old, recursive=True)


def _rename(fs, src: str, dst: str) -> None:
    from fsspec.implementations.local import LocalFileSystem

    if getattr(fs, "protocol", None) in ("file", ("file", "local")) or isinstance(fs, LocalFileSystem):
        os.rename(src, dst)  # one atomic step on a local filesystem
    else:
        fs.mv(src, dst, recursive=True)


def _adopt_legacy(run, job: str) -> None:
    """A pre-keyed result at analysis/<job> moves to analysis/<job>/<its name>."""
    import zarr

    base = f"{ROOT}/{job}"
    if not has_group(run.path, base) or not _is_result(run, base):
        return
    fs, root = _fs(run)
    aside = f"{STAGING}/legacy-{job}-{uuid.uuid4().hex[:8]}"
    _rename(fs, f"{root}/{base}", f"{root}/{aside}")
    zarr.open_group(run.path, path=base, mode="a")
    _rename(fs, f"{root}/{aside}", f"{root}/{base}/{result_name(_attrs(run, aside)['params'])}")


def _clean_staging(run) -> None:
    """Remove staging groups of jobs that died on this host (their process is gone)."""
    fs, root = _fs(run)
    for name in subgroups(run.path, STAGING):
        parts = name.split(_SEP)
        if len(parts) == 4 and parts[2] == socket.gethostname() and parts[1].isdigit() and not alive(int(parts[1])):
            fs.rm(f"{root}/{STAGING}/{name}", recursive=True)


def _consolidate(run) -> None:
    """Keep the store's consolidated metadata true after results change (see store.consolidate)."""
    consolidate(run.path)


def job_progress(enabled: bool, desc: str = "analysis"):
    """The progress bar of a job's dask compute (stratascope.progress.dask_progress)."""
    return dask_progress(enabled, desc)
