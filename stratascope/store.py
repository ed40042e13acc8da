"""The one reader of Zarr: validate a store, then hand out lazy xarray Datasets.

`Store` is the handle every analysis and view takes: attrs, the lazy capture Dataset, the
readout and the prompt table, nothing read until asked for. `Run` (run.py) is the
user-facing front over it.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
import zarr

from .checked_store import open_checked
from .errors import IncompleteRunError, MissingArrayError, OutOfRangeError, StoreNotFoundError
from .schemas import META_PREFIX, parse_schema_version, token_coords, validate_root


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


def open_dataset(path: str, group: str | None = None, require_all: bool = False) -> xr.Dataset:
    """A lazy, dask-backed Dataset of the capture (group None) or of a subgroup such as 'readout'.

    Reads go through a CheckedStore: a damaged chunk is an error naming it; with require_all
    (a complete capture whose every chunk was written) so is a missing one. Consolidated
    metadata is not used: it is for outside readers, and an array added since the last
    consolidation would be missing from it. The capture's token table are coordinates, also
    in stores written before the root `coordinates` attribute (schemas.token_coords)."""
    try:
        ds = xr.open_zarr(open_checked(path, require_all), group=group, consolidated=False, zarr_format=3)
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError) as e:
        raise StoreNotFoundError(f"{path} has no group '{group}'") from e
    return token_coords(ds) if group is None else ds


def has_group(path: str, group: str) -> bool:
    try:
        zarr.open_group(str(path), path=group, mode="r", use_consolidated=False)
        return True
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        return False


def group_attrs(path: str, group: str) -> dict:
    """The attrs of one group, read from its own metadata (never a consolidated copy)."""
    return dict(zarr.open_group(str(path), path=group, mode="r", use_consolidated=False).attrs)


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
    ds = open_dataset(path, require_all=every_chunk_written(attrs))
    validate_root(attrs, {name: (v.dims, str(v.dtype)) for name, v in ds.variables.items()}, str(path))
    if not attrs.get("complete") and not allow_incomplete:
        raise IncompleteRunError(
            f"the capture that wrote {path} did not finish; finish it with the same capture command "
            "plus --resume (or start over with --overwrite)"
        )
    return attrs, ds


def every_chunk_written(attrs: dict) -> bool:
    """Whether every chunk of the capture must exist: a complete capture written with that promise."""
    return bool(attrs.get("complete")) and bool(attrs.get("integrity", {}).get("every_chunk_written"))


def store_bytes(path: str) -> int:
    """Bytes the store takes on disk (or in its fsspec filesystem)."""
    import fsspec.core

    fs, root = fsspec.core.url_to_fs(str(path))
    return int(fs.du(root, total=True))


class Store:
    """An opened, validated store. `ds` is the lazy capture Dataset; nothing is read until asked for."""

    def __init__(self, path: str, allow_incomplete: bool = False):
        self.path = str(path)
        self.attrs, self.ds = open_capture(self.path, allow_incomplete=allow_incomplete)

    @property
    def captured(self) -> list[str]:
        return list(self.attrs["capture"]["arrays"])

    @property
    def n_prompts(self) -> int:
        return int(self.ds.sizes["prompt"])

    @property
    def n_tokens(self) -> int:
        return int(self.ds.sizes["token"])

    @cached_property
    def readout(self) -> xr.Dataset:
        return open_dataset(self.path, "readout", require_all=every_chunk_written(self.attrs))

    @cached_property
    def _root(self) -> zarr.Group:
        return zarr.open_group(open_checked(self.path, every_chunk_written(self.attrs)), mode="r",
                               use_consolidated=False)

    def array(self, name: str) -> zarr.Array:
        """The zarr array `name` (e.g. 'hidden', 'readout/unembed') for direct slicing without dask:
        what one-prompt reads use, since a dask graph costs more than the read itself."""
        return self._root[name]

    @cached_property
    def prompts(self) -> pd.DataFrame:
        """One row per prompt: text, token offset and count, and the corpus metadata columns."""
        cols = {"text": self.ds["prompt_text"].values.astype(object),
                "token_offset": self.ds["token_offset"].values, "n_tokens": self.ds["n_tokens"].values}
        order = self.attrs["corpus"].get("metadata_columns", [])  # the corpus's own column order
        names = [META_PREFIX + c for c in order if META_PREFIX + c in self.ds.variables]
        names += [n for n in self.ds.variables if n.startswith(META_PREFIX) and n not in names]
        for name in names:
            values = self.ds[name].values
            cols[name[len(META_PREFIX):]] = values.astype(object) if values.dtype.kind in "TUO" else values
        return pd.DataFrame(cols)

    def require(self, name: str, flag: str | None = None) -> xr.DataArray:
        """The array `name`, or a clear error naming the capture flag that produces it."""
        if name not in self.ds:
            flag = flag or name
            raise MissingArrayError(f"this run has no {name} array; capture with --capture {flag}")
        return self.ds[name]

    def prompt_index(self, prompt: int) -> int:
        n = self.n_prompts
        if not -n <= prompt < n:
            raise OutOfRangeError(f"prompt {prompt} is out of range; this run has prompts 0-{n - 1}")
        return prompt % n

    @cached_property
    def _prompt_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(token_offset, n_tokens) of every prompt, read once: small, and asked for on every view."""
        return np.asarray(self.array("token_offset")[:]), np.asarray(self.array("n_tokens")[:])

    @cached_property
    def depths(self) -> list[int]:
        """The captured depth values (0 = embeddings)."""
        return [int(d) for d in self.ds["depth"].values] if "depth" in self.ds.coords else []

    def token_slice(self, prompt: int) -> slice:
        """The rows of `prompt` in the token dimension."""
        p = self.prompt_index(prompt)
        offsets, lengths = self._prompt_rows
        return slice(int(offsets[p]), int(offsets[p] + lengths[p]))

    def tokens(self, prompt: int) -> pd.DataFrame:
        """The tokens of one prompt: id, text, position, whether generated."""
        rows = self.ds.isel(token=self.token_slice(prompt))
        frame = pd.DataFrame({"token_id": rows["token_id"].values, "token": rows["token_str"].values.astype(object),
                              "position": rows["position"].values, "is_generated": rows["is_generated"].values})
        if "token_type_ids" in rows:  # BERT: sentence A (0) or B (1)
            frame["token_type"] = rows["token_type_ids"].values
        if "is_decoder" in rows:  # encoder-decoder: the source rows, then the decoder's
            frame["stack"] = np.where(rows["is_decoder"].values, "decoder", "encoder")
        return frame

    @cached_property
    def tokenizer(self):
        """The stored tokenizer (the `tokenizers` library, not transformers), or None if none was stored."""
        blob = self.readout["tokenizer_json"].values.astype(np.uint8).tobytes()
        if not blob.strip(b"\x00"):
            return None
        from tokenizers import Tokenizer

        return Tokenizer.from_str(blob.decode("utf-8"))
