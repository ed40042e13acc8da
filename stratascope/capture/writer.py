"""Creating the store's arrays, and writing finished shards from a background thread."""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from ..errors import ConfigError, StoreExistsError, StoreNotFoundError
from ..schemas import VariableSpec, root_spec

CHUNK_BYTES = 8 * 2**20  # target uncompressed bytes per chunk
# lz4 with byte shuffle: fast enough that compression keeps pace with the model on two cores.
# Attention too: its key axis, padded to the longest sequence, stays near the unpadded size with lz4
# (benchmarks/attention_bytes.py; zstd-1 stores 16% less there but encodes ~3x slower).
FLOAT_CODEC = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
# Dense activations are stored uncompressed (checksummed all the same): their float mantissas are
# noise, lz4 saves under 2% of their bytes and doubles the CPU a write takes (benchmarks/README.md).
# Attention (zero above the diagonal and past each prompt's end) and the rest keep FLOAT_CODEC.
UNCOMPRESSED = frozenset({"hidden", "mlp", "queries", "keys", "attn_out", "mlp_out", "z"})
# Every chunk ends with a crc32c of its compressed bytes, so damage is found before decompression;
# every chunk is written, also one of zeros, so a missing chunk is damage, never a region of zeros.
CHECKSUM = Crc32cCodec()
DENSE = {"write_empty_chunks": True}


def _fs(path: str):
    import fsspec.core

    try:
        return fsspec.core.url_to_fs(str(path))
    except (ImportError, ValueError) as e:  # an unknown protocol, or s3:// without s3fs
        raise ConfigError(f"--out {path}: {e}") from e


def is_store(path: str | Path) -> bool:
    """True if `path` (a directory or fsspec URL) holds a Zarr group written by stratascope."""
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception:  # anything unreadable is not one of ours
        return False
    return "schema_version" in group.attrs


def prepare_output(path: str, overwrite: bool, resume: bool = False) -> None:
    """Refuse an existing output unless overwrite or resume; never delete something that is not a store."""
    fs, root = _fs(path)
    if not fs.exists(root):
        if resume:
            raise StoreNotFoundError(f"{path} does not exist, so there is nothing to resume; drop --resume")
        return
    if not is_store(path):
        raise StoreExistsError(
            f"{path} exists and is not a stratascope store; choose another --out (nothing was deleted)"
        )
    if not (overwrite or resume):
        raise StoreExistsError(f"{path} already holds a stratascope store; pass --overwrite to replace it "
                               "or --resume to finish an interrupted capture")


def remove_store(path: str) -> None:
    fs, root = _fs(path)
    if fs.exists(root) and is_store(path):
        fs.rm(root, recursive=True)


def token_chunk_rows(row_bytes: list[int], n_rows: int) -> int:
    """One token-chunk length for every array (so shards align for all): a power of two that
    keeps the widest array's chunk near CHUNK_BYTES."""
    widest = max(row_bytes + [1])
    rows = 1
    while rows * 2 * widest <= CHUNK_BYTES and rows < 65536:
        rows *= 2
    return max(1, min(rows, n_rows))


def create_array(group: zarr.Group, name: str, shape: tuple[int, ...], chunk_rows: int, dtype: str,
                 dims: tuple[str, ...] | None = None, shard_rows: int | None = None,
                 spec: VariableSpec | None = None, extra_attrs: dict | None = None) -> zarr.Array:
    """Create one array, its dims and long_name/description attrs from its spec (`spec`, else the
    root array of that name), plus `extra_attrs` (e.g. its TransformerLens hook); with shard_rows,
    Zarr's sharding codec packs that many rows of chunks into one stored object (so a big run is not
    millions of small files)."""
    spec = spec or root_spec(name)
    dims = dims or spec.dims
    attrs = {"attributes": {**spec.attrs(name), **(extra_attrs or {})}} if spec is not None else {}
    chunks = (min(chunk_rows, shape[0]),) + tuple(shape[1:])
    shards = {"shards": (shard_rows,) + tuple(shape[1:])} if shard_rows else {}
    if dtype == "str":
        return group.create_array(name, shape=shape, chunks=chunks, dtype=str, dimension_names=dims,
                                  compressors=[ZstdCodec(), CHECKSUM], config=DENSE, **shards, **attrs)
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
    if len(shape) > 1 and row_bytes > CHUNK_BYTES and not shard_rows:  # a very wide row: split its second axis
        per_item = row_bytes // shape[1]
        chunks = (1, max(1, CHUNK_BYTES // per_item)) + tuple(shape[2:])
    fill = False if dtype == "bool" else 0
    if name in UNCOMPRESSED and not group.path:  # the capture's arrays of those names, at the root
        codecs = [CHECKSUM]
    else:
        codecs = [FLOAT_CODEC if np.dtype(dtype).kind == "f" else ZstdCodec(), CHECKSUM]
    return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, dimension_names=dims,
                              compressors=codecs, fill_value=fill, config=DENSE, **shards, **attrs)


class ShardWriter:
    """Writes finished shards and records them complete while the next shard computes.

    A background thread flushes each shard's rows to the disk, then records the shard complete.
    With rows_here (the model computes on this machine's CPU) the rows themselves are encoded and
    written in the caller's thread: that is CPU work, and on the cores torch is using a thread doing
    it only preempts torch's threads (a preempted thread stalls its partners too), so only the wait
    for the disk is overlapped (benchmarks/README.md, capture). When a GPU computes and the host's
    cores are free, the thread writes the rows too.
    At most three shard buffers live at once: one computing, one queued, one being written."""

    def __init__(self, root: zarr.Group, rows_here: bool = False, max_queue: int = 1, on_written=None):
        self.root, self.rows_here = root, rows_here
        self.on_written = on_written  # on_written(stage) once a stage is written: its buffers may be reused
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="stratascope-writer", daemon=True)
        self._thread.start()

    def put(self, shard, stage: dict[str, np.ndarray]) -> None:
        if self.rows_here:
            if self._error is not None:
                raise self._error
            self._write_rows(shard, stage)
            stage = None
        while True:  # wait for space without blocking Ctrl-C forever
            if self._error is not None:
                raise self._error
            try:
                self._queue.put((shard, stage), timeout=0.5)
                return
            except queue.Full:
                pass

    def close(self) -> None:
        """Write everything queued and wait; re-raise the writer's error if it had one."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Drop what is queued and stop; shards not written stay recorded incomplete."""
        self._error = self._error or KeyboardInterrupt()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _write_rows(self, shard, stage) -> None:
        from .shards import write_rows

        write_rows(self.root, shard, stage)
        if self.on_written:
            self.on_written(stage)

    def _run(self) -> None:
        from .shards import record_complete

        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    shard, stage = item
                    if stage is not None:
                        self._write_rows(shard, stage)
                    record_complete(self.root, shard)
                except BaseException as e:  # handed to the caller's thread
                    self._error = e
