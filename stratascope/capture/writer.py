"""Creating the store's arrays and writing token rows through a background thread.

Blocks of rows arrive in token order. The writer keeps the rows of a not-yet-full chunk
back until the next block completes it, so every chunk is compressed and written once.
"""

from __future__ import annotations

import queue
import shutil
import threading
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from ..errors import StoreExistsError
from ..schemas import VARIABLES

CHUNK_BYTES = 8 * 2**20  # target uncompressed bytes per chunk
# lz4 with byte shuffle: fast enough that compression keeps pace with the model on two cores.
FLOAT_CODEC = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


def is_store(path: str | Path) -> bool:
    """True if `path` holds a Zarr group written by stratascope."""
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception:  # noqa: BLE001 - anything unreadable is not one of ours
        return False
    return "schema_version" in group.attrs


def prepare_output(path: str, overwrite: bool) -> None:
    """Refuse an existing output unless overwrite; never delete something that is not a store."""
    p = Path(path)
    if "://" in path or not p.exists():
        return
    if not is_store(p):
        raise StoreExistsError(
            f"{path} exists and is not a stratascope store; choose another --out (nothing was deleted)"
        )
    if not overwrite:
        raise StoreExistsError(f"{path} already holds a stratascope store; pass --overwrite to replace it")


def remove_store(path: str) -> None:
    p = Path(path)
    if p.exists() and is_store(p):
        shutil.rmtree(p)


def token_chunk_rows(row_bytes: list[int], n_rows: int) -> int:
    """One token-chunk length for every array (so shards align for all): a power of two that
    keeps the widest array's chunk near CHUNK_BYTES."""
    widest = max(row_bytes + [1])
    rows = 1
    while rows * 2 * widest <= CHUNK_BYTES and rows < 65536:
        rows *= 2
    return max(1, min(rows, n_rows))


def create_array(group: zarr.Group, name: str, shape: tuple[int, ...], chunk_rows: int, dtype: str,
                 dims: tuple[str, ...] | None = None) -> zarr.Array:
    dims = dims or VARIABLES[name].dims
    chunks = (min(chunk_rows, shape[0]),) + tuple(shape[1:])
    if dtype == "str":
        return group.create_array(name, shape=shape, chunks=chunks, dtype=str, dimension_names=dims)
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
    if len(shape) > 1 and row_bytes > CHUNK_BYTES:  # a very wide row: split its second axis too
        per_item = row_bytes // shape[1]
        chunks = (1, max(1, CHUNK_BYTES // per_item)) + tuple(shape[2:])
    fill = False if dtype == "bool" else 0
    codecs = [FLOAT_CODEC] if np.dtype(dtype).kind == "f" else "auto"
    return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, dimension_names=dims,
                              compressors=codecs, fill_value=fill)


class ChunkWriter:
    """Writes contiguous row blocks to token-dimension arrays from a background thread."""

    def __init__(self, arrays: dict[str, zarr.Array], chunk_rows: int, n_rows: int, max_queue: int = 2):
        self.arrays, self.chunk_rows, self.n_rows = arrays, chunk_rows, n_rows
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._error: BaseException | None = None
        self._expected = 0  # next row the caller must send
        self._carry_start, self._carry = 0, None
        self._thread = threading.Thread(target=self._run, name="stratascope-writer", daemon=True)
        self._thread.start()

    def put(self, start: int, block: dict[str, np.ndarray]) -> None:
        if self._error is not None:
            raise self._error
        if start != self._expected:
            raise ValueError(f"writer expected rows from {self._expected}, got {start}")
        self._expected = start + len(next(iter(block.values())))
        while True:  # wait for space without blocking Ctrl-C forever
            try:
                self._queue.put((start, block), timeout=0.5)
                return
            except queue.Full:
                if self._error is not None:
                    raise self._error

    def close(self) -> None:
        """Flush everything and wait; re-raise the writer's error if it had one."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Stop after the block in hand; what is not written stays at the fill value."""
        self._error = self._error or KeyboardInterrupt()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                if self._error is not None:
                    continue
                self._write(*item)
            if self._carry is not None and self._error is None:
                self._flush(self._carry_start, self._carry, len(next(iter(self._carry.values()))))
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            self._error = e

    def _write(self, start: int, block: dict[str, np.ndarray]) -> None:
        if self._carry is not None:
            block = {k: np.concatenate([self._carry[k], v]) for k, v in block.items()}
            start = self._carry_start
        end = start + len(next(iter(block.values())))
        cut = end if end == self.n_rows else (end // self.chunk_rows) * self.chunk_rows
        if cut > start:
            self._flush(start, block, cut - start)
        rest = end - max(cut, start)
        self._carry = {k: v[len(v) - rest:] for k, v in block.items()} if rest else None
        self._carry_start = max(cut, start)

    def _flush(self, start: int, block: dict[str, np.ndarray], n: int) -> None:
        for name, values in block.items():
            self.arrays[name][start:start + n] = values[:n]
