"""The local store a capture writes through: chunk files go from memory to the disk without the
page cache, and are on the disk before their shard is recorded complete.

A capture streams far more bytes than it reads back soon. Written the usual way, each chunk
would sit in the page cache: the kernel needs a new page for every 4 KiB written, and the cache
of everything else on the machine is pushed out. Here every chunk file is written with O_DIRECT
where the filesystem has it (the staging buffers start on a block boundary, so an uncompressed
array's chunks are written from where they lie; anything else is copied into one reused aligned
buffer per writing thread), or else through the page cache, flushed (fdatasync) and dropped
(POSIX_FADV_DONTNEED). Measured on the 2-core development VM, CPU seconds per GiB of
capture-shaped chunks written 3 s apart (benchmarks/fresh_memory.py): see benchmarks/README.md,
"Fresh memory". It also makes the completion records honest: a shard flagged complete has its
chunks on the disk, not only in memory.

Each chunk file is flushed right after it is written, unless `deferred`: then `set` only writes and
notes the file and `flush` flushes every file noted so far, so that a thread of its own can wait
for the disk while the capture computes (ShardWriter with rows_here).
"""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import struct
import sys
import threading
import uuid
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.storage import LocalStore

_sync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


def _put(path: Path, parts, flush: bool) -> None:
    """Write the buffers `parts` to a temporary file and rename it into place, as zarr's LocalStore
    does (a reader never sees half a chunk); with flush, flushed and dropped from the cache before
    the rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{uuid.uuid4().hex}.partial")
    try:
        _write_file(tmp, [memoryview(p).cast("B") for p in parts], flush)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_file(path: Path, parts: list[memoryview], flush: bool) -> None:
    """Write `parts` to a new file at `path`, from memory straight to the disk (O_DIRECT) where the
    filesystem allows it: a write through the page cache needs a new cache page for every 4 KiB, which
    on the development VM cost 5-10 CPU seconds per GiB once the pages had been handed back to the
    host (benchmarks/README.md, fresh memory). Filesystems without O_DIRECT get a plain write."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = _open_direct(path, flags)
    try:
        if fd is None:
            fd = os.open(path, flags, 0o644)
            _write_parts(fd, parts)
        else:
            _write_direct(fd, parts)
        if flush:
            _flush_fd(fd)
    finally:
        if fd is not None:
            os.close(fd)


_BLOCK = 4096  # O_DIRECT wants the memory, the length and the file offset on block boundaries
_O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux only
_bounce = threading.local()  # per writing thread: one reused aligned buffer


def _open_direct(path: Path, flags: int) -> int | None:
    if not _O_DIRECT:
        return None
    try:
        return os.open(path, flags | _O_DIRECT, 0o644)
    except OSError as e:
        if e.errno == errno.EINVAL:  # the filesystem has no O_DIRECT
            return None
        raise


def _write_direct(fd: int, parts: list[memoryview]) -> None:
    """The whole blocks of an aligned first part (a capture's staging buffer) are written from where
    they lie; the rest is copied into this thread's aligned buffer, written padded to a whole block
    and the file cut back to its length. Should the filesystem refuse, the file is written plainly."""
    first = parts[0]
    head = first.nbytes // _BLOCK * _BLOCK if np.frombuffer(first, np.uint8).ctypes.data % _BLOCK == 0 else 0
    rest = [first[head:], *parts[1:]]
    size = sum(p.nbytes for p in rest)
    try:
        _write_all(fd, first[:head])
        if size:
            padded = -(-size // _BLOCK) * _BLOCK
            buf = _bounce_buffer(padded)
            at = 0
            for p in rest:
                buf[at:at + p.nbytes] = p
                at += p.nbytes
            buf[at:padded] = bytes(padded - at)
            _write_all(fd, buf[:padded])
            os.ftruncate(fd, head + size)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        _write_parts(fd, parts)


def _bounce_buffer(size: int) -> memoryview:
    """This thread's aligned buffer of at least `size` bytes (mmap memory starts on a page)."""
    buf = getattr(_bounce, "buf", None)
    if buf is None or len(buf) < size:
        _bounce.buf = buf = mmap.mmap(-1, max(size, 2 * len(buf) if buf is not None else 0))
    return memoryview(buf)


def _write_parts(fd: int, parts: list[memoryview]) -> None:
    for part in parts:
        _write_all(fd, part)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data):]


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
        await asyncio.to_thread(self.put, key, [value.as_buffer_like()])

    def put(self, key: str, parts) -> None:
        """Write one stored object made of the buffers `parts` (flushed now, or noted if deferred)."""
        path = self.root / key
        _put(path, parts, not self.deferred)
        if self.deferred:
            with self._lock:
                self._written.append(path)

    def flush(self) -> None:
        """Flush every chunk file written so far to the disk and drop its pages from the cache."""
        with self._lock:
            paths, self._written = self._written, []
        for path in paths:
            _flush(path)


def write_whole_chunks(array: zarr.Array, start: int, values: np.ndarray) -> int:
    """Write the whole chunks among rows start.. of `array` straight to their files, when zarr would
    store each as its raw bytes followed by their crc32c (an uncompressed, unsharded array on a
    StreamingStore, `values` in its byte order): the bytes zarr writes, without zarr's copies of
    them (about a third of zarr's CPU for such a write, benchmarks/README.md, capture). Returns how
    many rows it wrote (0 for any other array); the caller writes the rest through zarr."""
    meta = array.metadata
    codecs = getattr(meta, "codecs", ())
    rows = array.chunks[0]
    if not (isinstance(array.store, StreamingStore) and len(codecs) == 2
            and isinstance(codecs[0], BytesCodec) and isinstance(codecs[1], Crc32cCodec)
            and (codecs[0].endian is None or codecs[0].endian.value == sys.byteorder)
            and values.dtype == array.dtype and values.dtype.isnative and values.flags.c_contiguous
            and tuple(array.chunks[1:]) == tuple(array.shape[1:]) and start % rows == 0):
        return 0
    whole = len(values) // rows
    for i in range(whole):
        block = values[i * rows:(i + 1) * rows]
        crc = struct.pack("<I", google_crc32c.value(block))
        key = f"{array.path}/{meta.encode_chunk_key((start // rows + i,) + (0,) * (array.ndim - 1))}"
        array.store.put(key, [block, crc])  # _put views each part as bytes
    return whole * rows


def open_for_writing(out: str, deferred: bool = False):
    """What zarr.open_group is given to write a capture at `out`: a StreamingStore for a local
    directory, the path itself for an fsspec URL (the remote store manages its own caching)."""
    return out if "://" in str(out) else StreamingStore(str(out), deferred=deferred)


def flush(root: zarr.Group) -> None:
    """Flush what the capture wrote through `root` (nothing to do for a remote store)."""
    if isinstance(root.store, StreamingStore):
        root.store.flush()
