"""Writing and reusing analysis/<job> groups: a result records the parameters and source it came from."""

from __future__ import annotations

import datetime
import json

import xarray as xr

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
    earlier result of that job, and return it reopened lazily from the store."""
    ds = ds.copy()
    ds.attrs.update({"job": job, "params": _normalize(params), "source": source_fingerprint(run),
                     "created": datetime.datetime.now(datetime.timezone.utc).isoformat()})
    for var in ds.variables.values():
        var.encoding.clear()
    ds.to_zarr(run.path, group=f"analysis/{job}", mode="w", zarr_format=3, consolidated=False)
    return open_dataset(run.path, f"analysis/{job}")
