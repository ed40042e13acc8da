"""The xarray/CF conventions a store follows, and the consolidated metadata that makes
`xr.open_zarr(path)` (and `group="analysis/<job>"`) open silently and in one read.

- every array carries `long_name` and `description` attrs from the spec;
- the root attr `coordinates` lists the token table, which xarray then decodes as
  non-dimension coordinates of `token`;
- Zarr v3 consolidated metadata (zarr-python's inline `consolidated_metadata` in the root
  zarr.json) is rewritten whenever a capture or an analysis completes. xarray's default
  (consolidated=None) reads the root's consolidated metadata even for a subgroup, so it is
  rewritten for the whole store, never for one group: a stale copy would hide new groups.
"""

from __future__ import annotations

import warnings

import numpy as np
import xarray as xr
import zarr

from .groups import GroupSpec
from .spec import INDEX_COORDS, TOKEN_COORDS, root_spec


def consolidate(path: str) -> None:
    """Write the whole store's consolidated metadata at its root."""
    with warnings.catch_warnings():  # zarr-python: consolidated metadata is not (yet) in the v3 spec
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(str(path), zarr_format=3)


def describe(spec: GroupSpec, ds: xr.Dataset) -> xr.Dataset:
    """`ds` with long_name/description attrs from `spec` on every array the spec knows."""
    for name, var in ds.variables.items():
        known = spec.get(str(name))
        if known is not None:
            var.attrs.update(known.attrs())
    return ds


def token_coords(ds: xr.Dataset) -> xr.Dataset:
    """The token table as coordinates, also for stores written before the `coordinates` attr;
    and a `head` index coordinate where the store has a head dim but no head array."""
    ds = ds.set_coords([n for n in TOKEN_COORDS if n in ds.data_vars])
    if "head" in ds.dims and "head" not in ds.coords:
        ds = ds.assign_coords(head=np.arange(ds.sizes["head"], dtype=np.int32))
    return ds


def _dims(group) -> set[str]:
    return {d for _, a in group.arrays() for d in (a.metadata.dimension_names or ())}


def upgrade_store(path: str) -> None:
    """Bring a store written by an earlier release up to these conventions in place: array attrs,
    the coordinates attr, a head coordinate, consolidated metadata. The arrays are not rewritten."""
    from .groups import GROUPS, analysis_spec

    root = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    root.attrs["coordinates"] = " ".join(TOKEN_COORDS)
    for name, array in root.arrays():
        spec = root_spec(name)
        if spec is not None and "long_name" not in array.attrs:
            array.attrs.update(spec.attrs())
    heads = [a.shape[a.metadata.dimension_names.index("head")] for _, a in root.arrays()
             if "head" in (a.metadata.dimension_names or ())]
    if heads and "head" not in root:
        head = root.create_array("head", shape=(heads[0],), dtype="int32", dimension_names=("head",),
                                 attributes=INDEX_COORDS[2].attrs())
        head[:] = np.arange(heads[0], dtype=np.int32)
    groups = {"readout": GROUPS[0]}
    for job in (root["analysis"].group_keys() if "analysis" in root else ()):
        if job.startswith("_"):  # staging of running jobs
            continue
        results = [f"analysis/{job}"] if list(root[f"analysis/{job}"].array_keys()) else \
            [f"analysis/{job}/{name}" for name in root[f"analysis/{job}"].group_keys()]  # keyed or first layout
        for where in results:
            groups[where] = analysis_spec(job, _dims(root[where]))
    for where, spec in groups.items():
        if spec is None or where not in root:
            continue
        for name, array in root[where].arrays():
            known = spec.get(name)
            if known is not None and "long_name" not in array.attrs:
                array.attrs.update(known.attrs())
    consolidate(path)
