"""Reading a store so that damage is an error naming the array, the chunk and the fix.

Capture arrays end every chunk with a crc32c of its compressed bytes and are written whole
(zero chunks too; capture/writer.py). `CheckedStore` wraps the zarr store every read goes
through: a chunk whose checksum does not match, a truncated chunk of an older store (its
blosc header says how long it must be), or a missing chunk of a complete capture raises
DamagedStoreError before any decompressor sees the bytes, so nothing reads as zeros and
nothing crashes inside a codec. `chunk_problem` is the same check, used by `stratascope verify`.
"""

from __future__ import annotations

import json
import struct

import zarr
from zarr.storage import WrapperStore

from .errors import DamagedStoreError

FIX = ("run `stratascope verify {path}` to list every damaged chunk, then capture again with --overwrite "
       "(or restore the store from a copy)")


def split_chunk_key(key: str) -> tuple[str, tuple[int, ...]] | None:
    """'readout/unembed/c/3/0' -> ('readout/unembed', (3, 0)); None for metadata keys."""
    head, sep, tail = key.rpartition("/c/") if "/c/" in key else ("", "", "")
    if not sep and key.startswith("c/"):
        head, tail = "", key[2:]
    elif not sep:
        return None
    try:
        return head, tuple(int(p) for p in tail.split("/"))
    except ValueError:
        return None


def codecs_of(metadata: dict) -> list[str]:
    return [c.get("name", "") for c in metadata.get("codecs", [])]


def chunk_problem(data: bytes, codecs: list[str]) -> str | None:
    """Why the stored bytes of one chunk cannot be its data (None if they can)."""
    if codecs and codecs[-1] == "crc32c":
        import google_crc32c

        if len(data) < 4 or struct.unpack("<I", data[-4:])[0] != google_crc32c.value(data[:-4]):
            return "its checksum does not match (the bytes were changed or cut short)"
        return None
    if "blosc" in codecs and codecs[-1] == "blosc":  # stores written before checksums: the header's length
        if len(data) < 16 or struct.unpack("<I", data[12:16])[0] != len(data):
            return "it is shorter or longer than its compressed length says (cut short?)"
    return None


def dense(array: str) -> bool:
    """Arrays of the capture whose every chunk is written (analysis results and the shard
    records write only what they have)."""
    return not array.startswith("analysis/") and array != "shard_complete"


class CheckedStore(WrapperStore):
    """A zarr store that refuses damaged chunks (see the module docstring)."""

    def __init__(self, store, where: str = "", require_all: bool = False):
        super().__init__(store)
        self.where, self.require_all = where, require_all
        self._codecs: dict[str, list[str]] = {}

    def _with_store(self, store):
        return type(self)(store, self.where, self.require_all)

    def __getstate__(self):
        return {"store": self._store, "where": self.where, "require_all": self.require_all}

    def __setstate__(self, state):
        self.__init__(state["store"], state["where"], state["require_all"])

    async def _array_codecs(self, array: str, prototype) -> list[str]:
        if array not in self._codecs:
            raw = await self._store.get(f"{array}/zarr.json" if array else "zarr.json", prototype)
            self._codecs[array] = codecs_of(json.loads(raw.to_bytes())) if raw is not None else []
        return self._codecs[array]

    async def get(self, key, prototype, byte_range=None):
        buf = await self._store.get(key, prototype, byte_range)
        where = split_chunk_key(key)
        if where is None:
            return buf
        array, coords = where
        coords = "/".join(map(str, coords))
        if buf is None:
            if self.require_all and dense(array):
                raise DamagedStoreError(f"{self.where}: chunk {coords} of array '{array}' is missing, though the "
                                        f"capture recorded it written; {FIX.format(path=self.where)}")
            return None
        if byte_range is None:
            problem = chunk_problem(buf.to_bytes(), await self._array_codecs(array, prototype))
            if problem:
                raise DamagedStoreError(f"{self.where}: chunk {coords} of array '{array}' is damaged: {problem}; "
                                        f"{FIX.format(path=self.where)}")
        return buf


def open_checked(path: str, require_all: bool, read_only: bool = True) -> CheckedStore:
    """The CheckedStore over the store at `path` (a directory or an fsspec URL)."""
    path = str(path)
    if "://" in path:
        inner = zarr.storage.FsspecStore.from_url(path, read_only=read_only)
    else:
        inner = zarr.storage.LocalStore(path, read_only=read_only)
    return CheckedStore(inner, path, require_all)
