"""The local store a capture writes through: chunk files are flushed to the disk and dropped from
the page cache before their shard is recorded complete.

A capture streams far more bytes than it reads back soon. Written the usual way, each chunk
would sit in the page cache, so the kernel needs new pages for every write and the cache of
everything else on the machine is pushed out. Here each chunk file, once written, is flushed
(fdatasync) and its pages dropped (POSIX_FADV_DONTNEED), so later writes reuse them. Measured on
the 2-core development VM (benchmarks/fresh_memory.py): 1.8-4.1 CPU seconds per GiB of
capture-shaped chunks written through the page cache, 0.9-1.1 flushed and dropped. It also makes the
completion records honest: a shard flagged complete has its chunks on the disk, not only in memory.

Each chunk file is flushed right after it is written, in zarr's writing threads (so the waits
overlap one another), unless `deferred`: then `set` only writes and notes the file and `flush`
flushes every file noted so far, so that a thread of its own can wait for the disk while the
capture computes (ShardWriter with rows_here).
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from pathlib import Path

import zarr
from zarr.storage import LocalStore

_sync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


def _put(path: Path, data, flush: bool) -> None:
    """Write to a temporary file and rename it into place, as zarr's LocalStore does (a reader
    never sees half a chunk); with flush, flushed and dropped from the cache before the rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{uuid.uuid4().hex}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if flush:
                f.flush()
                _flush_fd(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _flush_fd(fd: int) -> None:
    _sync(fd)
    if hasattr(os, "posix_fadvise"):  # the pages are clean now, so they can be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _flush(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # Linux flushes a file's data through any descriptor of it
    try:
        _flush_fd(fd)
    finally:
        os.close(fd)


class StreamingStore(LocalStore):
    """LocalStore whose chunk files are flushed and dropped from the page cache; metadata as zarr writes it."""

    def __init__(self, root, read_only: bool = False, deferred: bool = False, _written: list | None = None,
                 _lock=None):
        super().__init__(root, read_only=read_only)
        self.deferred = deferred
        self._written: list[Path] = [] if _written is None else _written
        self._lock = _lock or threading.Lock()  # zarr writes chunks from several threads

    def with_read_only(self, read_only: bool = False):
        """A copy that notes its writes in the same list (zarr makes copies of the store it is given)."""
        return type(self)(self.root, read_only, self.deferred, self._written, self._lock)

    async def set(self, key: str, value) -> None:
        if key.rpartition("/")[2] == "zarr.json":  # metadata: small, rewritten often
            return await super().set(key, value)
        if not self._is_open:
            await self._open()
        self._check_writable()
        path = self.root / key
        await asyncio.to_thread(_put, path, value.as_buffer_like(), not self.deferred)
        if self.deferred:
            with self._lock:
                self._written.append(path)

    def flush(self) -> None:
        """Flush every chunk file written so far to the disk and drop its pages from the cache."""
        with self._lock:
            paths, self._written = self._written, []
        for path in paths:
            _flush(path)


def open_for_writing(out: str, deferred: bool = False):
    """What zarr.open_group is given to write a capture at `out`: a StreamingStore for a local
    directory, the path itself for an fsspec URL (the remote store manages its own caching)."""
    return out if "://" in str(out) else StreamingStore(str(out), deferred=deferred)


def flush(root: zarr.Group) -> None:
    """Flush what the capture wrote through `root` (nothing to do for a remote store)."""
    if isinstance(root.store, StreamingStore):
        root.store.flush()
