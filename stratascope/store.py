"""The one reader of Zarr: validate a store, then hand out lazy xarray Datasets."""

from __future__ import annotations

from pathlib import Path

import xarray as xr
import zarr

from .errors import IncompleteRunError, StoreNotFoundError
from .schemas import parse_schema_version, token_coords, validate_root


def _open_group(path: str) -> zarr.Group:
    try:
        return zarr.open_group(str(path), mode="r", use_consolidated=False)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError) as e:
        raise StoreNotFoundError(f"{path} is not a stratascope store (no Zarr group there)") from e
    except (ImportError, ValueError) as e:  # an unknown protocol, or s3:// without s3fs
        raise StoreNotFoundError(f"{path} cannot be opened: {e}") from e


def root_attrs(path: str) -> dict:
    """The root attrs of the store at `path`, after checking its schema version."""
    attrs = dict(_open_group(path).attrs)
    parse_schema_version(attrs, str(path))
    return attrs


def open_dataset(path: str, group: str | None = None) -> xr.Dataset:
    """A lazy, dask-backed Dataset of the capture (group None) or of a subgroup such as 'readout'.

    Consolidated metadata is not used: it is for outside readers, and an array added since the
    last consolidation would be missing from it. The capture's token table are coordinates,
    also in stores written before the root `coordinates` attribute (schemas.token_coords)."""
    try:
        ds = xr.open_zarr(str(path), group=group, consolidated=False, zarr_format=3)
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError) as e:
        raise StoreNotFoundError(f"{path} has no group '{group}'") from e
    return token_coords(ds) if group is None else ds


def has_group(path: str, group: str) -> bool:
    try:
        zarr.open_group(str(path), path=group, mode="r", use_consolidated=False)
        return True
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        return False


def subgroups(path: str, group: str) -> list[str]:
    """Names of the groups directly under `group` (e.g. the analysis results), [] if there is none."""
    try:
        return sorted(zarr.open_group(str(path), path=group, mode="r", use_consolidated=False).group_keys())
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        return []


def open_capture(path: str, allow_incomplete: bool = False) -> tuple[dict, xr.Dataset]:
    """Validate the store at `path` and return (root attrs, lazy Dataset)."""
    if "://" not in str(path) and not Path(path).exists():
        raise StoreNotFoundError(f"{path} does not exist; capture a run there first (stratascope capture)")
    attrs = root_attrs(path)
    ds = open_dataset(path)
    validate_root(attrs, {name: (v.dims, str(v.dtype)) for name, v in ds.variables.items()}, str(path))
    if not attrs.get("complete") and not allow_incomplete:
        raise IncompleteRunError(
            f"the capture that wrote {path} did not finish; finish it with the same capture command "
            "plus --resume (or start over with --overwrite)"
        )
    return attrs, ds


def store_bytes(path: str) -> int:
    """Bytes the store takes on disk (or in its fsspec filesystem)."""
    import fsspec.core

    fs, root = fsspec.core.url_to_fs(str(path))
    return int(fs.du(root, total=True))


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
