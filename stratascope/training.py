"""A stored array as a torch IterableDataset, for training probes and sparse autoencoders from the store.

`StoreDataset` reads whole token chunks of one array (at one depth or layer) straight from Zarr,
through the CheckedStore, so a damaged chunk is an error naming it. With shuffle, the chunk
order is a permutation drawn from (seed, epoch) and rows pass through a shuffle buffer of
`buffer_rows` rows: memory is the buffer plus two chunks (one read ahead in a thread), whatever
the store's size. DataLoader workers take every num_workers-th chunk of that order, so each
selected row comes exactly once per epoch. `set_epoch(n)` draws the next permutation (a
DataLoader without persistent workers copies the dataset to its workers at each epoch, so the
new epoch reaches them).

Rows are those `positions` selects, with the lens's parser (analyze.targets.select_rows);
"all" is applied chunk by chunk from the prompt table, so no list of every row is ever built.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import zarr

from .analyze.targets import select_rows
from .checked_store import open_checked
from .errors import ConfigError, MissingArrayError, OutOfRangeError
from .store import every_chunk_written

DEFAULT_BUFFER_ROWS = 65536


class StoreDataset(torch.utils.data.IterableDataset):
    """Rows of one stored array as tensors (with their token row ids if row_ids); see the module docstring.

    Each item is one row: for hidden at one depth a (d_model,) tensor, in the stored dtype;
    with row_ids an (tensor, row id) pair, the row id being the row in the token dimension
    (run.ds.isel(token=row_id) gives its prompt, position and token). batch_size yields
    ready batches instead (use DataLoader(ds, batch_size=None)), which skips per-row collation.
    """

    def __init__(self, run, name: str, depth: int | None = None, layer: int | None = None, positions: str = "all",
                 shuffle: bool = True, seed: int = 0, row_ids: bool = False,
                 buffer_rows: int = DEFAULT_BUFFER_ROWS, batch_size: int | None = None):
        super().__init__()
        var = run.ds.get(name)
        if var is None or var.ndim < 2 or var.dims[0] != "token":
            rowwise = sorted(n for n, v in run.ds.data_vars.items() if v.dims[:1] == ("token",) and v.ndim > 1)
            if var is None:
                raise MissingArrayError(f"this run has no {name} array; its arrays with a row per token: "
                                        f"{', '.join(rowwise) or 'none'}")
            raise ConfigError(f"{name} is not an array with a row of values per token; choose one of: "
                              f"{', '.join(rowwise)}")
        if buffer_rows < 1 or (batch_size is not None and batch_size < 1):
            raise ConfigError(f"buffer_rows {buffer_rows} and batch_size {batch_size} must be at least 1")
        self.name, self.path = name, run.path
        self.require_all = every_chunk_written(run.attrs)
        self.index = _pick(var, "depth", depth, run.path) if var.dims[1] == "depth" else (
            _pick(var, "layer", layer, run.path) if var.dims[1] == "layer" else None)
        if (depth is not None and var.dims[1] != "depth") or (layer is not None and var.dims[1] != "layer"):
            raise ConfigError(f"{name} has dims {', '.join(var.dims)}; pass depth= only for arrays with a depth "
                              "dim and layer= only for those with a layer dim")
        self.row_shape = tuple(var.shape[1 if self.index is None else 2:])
        self.dtype = np.dtype(var.dtype)
        self.n_rows_total = int(var.shape[0])
        self.chunk_rows = int(run.array(name).chunks[0])
        self.positions = str(positions).strip()
        if self.positions == "all":  # chunk by chunk from the prompt table (see _rows_in)
            self._rows = None
            self._starts = np.asarray(run.array("token_offset")[:], dtype=np.int64)
            self._stops = self._starts + np.asarray(run.array("n_tokens")[:], dtype=np.int64)
            self._n = int((self._stops - self._starts).sum())
        else:
            self._rows = select_rows(run, self.positions)
            self._n = len(self._rows)
        if self._n == 0:
            raise OutOfRangeError(f"positions {positions!r} selects no row of {run.path}")
        self.shuffle, self.seed, self.row_ids = bool(shuffle), int(seed), bool(row_ids)
        self.buffer_rows, self.batch_size = int(buffer_rows), batch_size
        self.epoch = 0
        self.peak_buffer_rows = 0  # the most rows the buffer held (in this process), for checks
        self._array = None

    def __len__(self) -> int:
        return self._n

    def __getstate__(self):  # a zarr handle is opened again in each worker
        return {**self.__dict__, "_array": None}

    def set_epoch(self, epoch: int) -> None:
        """Use the chunk permutation and buffer draws of `epoch` from the next iteration on."""
        self.epoch = int(epoch)

    @property
    def n_chunks(self) -> int:
        return -(-self.n_rows_total // self.chunk_rows)

    def chunk_order(self) -> np.ndarray:
        """Every chunk index once, in this epoch's order (ascending without shuffle)."""
        if not self.shuffle:
            return np.arange(self.n_chunks)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n_chunks)

    def _rows_in(self, chunk: int) -> np.ndarray:
        """The selected token rows within one chunk, ascending."""
        start, stop = chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, self.n_rows_total)
        if self._rows is not None:
            return self._rows[np.searchsorted(self._rows, start):np.searchsorted(self._rows, stop)]
        # "all": the rows of every prompt (token_offset .. + n_tokens), never masked filler between them
        lo, hi = np.searchsorted(self._stops, start, "right"), np.searchsorted(self._starts, stop, "left")
        inside = np.zeros(stop - start + 1, np.int64)
        np.add.at(inside, np.clip(self._starts[lo:hi], start, stop) - start, 1)
        np.add.at(inside, np.clip(self._stops[lo:hi], start, stop) - start, -1)
        return start + np.flatnonzero(np.cumsum(inside[:-1]) > 0)

    def _read(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self._rows_in(chunk)
        if not len(rows):
            return np.zeros((0,) + self.row_shape, self.dtype), rows
        if self._array is None:
            root = zarr.open_group(open_checked(self.path, self.require_all), mode="r", use_consolidated=False)
            self._array = root[self.name]
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        block = self._array[lo:hi] if self.index is None else self._array[lo:hi, self.index]
        return block[rows - lo], rows

    def _my_chunks(self) -> np.ndarray:
        order = self.chunk_order()
        info = torch.utils.data.get_worker_info()
        return order if info is None else order[info.id::info.num_workers]

    def _chunks_read(self):
        """(values, row ids) of this worker's chunks in order, the next one read ahead in a thread so
        that decompression overlaps whatever consumes the rows."""
        chunks = [int(c) for c in self._my_chunks()]
        if not chunks:
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            ahead = pool.submit(self._read, chunks[0])
            for c in chunks[1:]:
                current, ahead = ahead.result(), pool.submit(self._read, c)
                yield current
            yield ahead.result()

    def _blocks(self):
        """(values, row ids) blocks: chunk by chunk, or shuffled through the bounded buffer."""
        if not self.shuffle:
            yield from self._chunks_read()
            return
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, self.epoch, 0 if info is None else info.id + 1])
        size = self.buffer_rows
        buf = np.empty((size,) + self.row_shape, self.dtype)
        ids = np.empty(size, np.int64)
        fill = 0
        for values, rows in self._chunks_read():
            pos = 0
            while pos < len(rows):
                if fill < size:  # fill the buffer first
                    take = min(size - fill, len(rows) - pos)
                    buf[fill:fill + take], ids[fill:fill + take] = values[pos:pos + take], rows[pos:pos + take]
                    fill += take
                else:  # full: each incoming row takes the slot of a row drawn at random, which leaves
                    take = min(size, len(rows) - pos)
                    slots = rng.choice(size, take, replace=False)
                    out, out_ids = buf[slots], ids[slots]
                    buf[slots], ids[slots] = values[pos:pos + take], rows[pos:pos + take]
                    yield out, out_ids
                pos += take
                self.peak_buffer_rows = max(self.peak_buffer_rows, fill)
        order = rng.permutation(fill)
        yield buf[order], ids[order]

    def __iter__(self):
        blocks = self._blocks()
        if self.batch_size is not None:
            blocks = _rebatch(blocks, self.batch_size)
            for values, rows in blocks:
                tensor = torch.from_numpy(values)
                yield (tensor, torch.from_numpy(rows)) if self.row_ids else tensor
            return
        for values, rows in blocks:
            tensor = torch.from_numpy(values)
            if self.row_ids:
                yield from zip(tensor, rows.tolist())
            else:
                yield from tensor


def _pick(var, dim: str, value: int | None, path: str) -> int | None:
    """The index of coordinate value `value` along `dim` (None: keep the whole axis)."""
    if value is None:
        return None
    have = [int(v) for v in var[dim].values]
    if int(value) not in have:
        listed = f"{have[0]}-{have[-1]}" if have == list(range(have[0], have[-1] + 1)) else ", ".join(map(str, have))
        raise OutOfRangeError(f"{dim} {value} was not captured in {path}; its {dim}s: {listed}")
    return have.index(int(value))


def _rebatch(blocks, size: int):
    """Blocks of any length -> blocks of exactly `size` rows (the last may be shorter)."""
    pending, n = [], 0
    for values, rows in blocks:
        pending.append((values, rows))
        n += len(rows)
        if n < size:
            continue
        values, rows = np.concatenate([v for v, _ in pending]), np.concatenate([r for _, r in pending])
        cut = n - n % size
        for start in range(0, cut, size):
            yield values[start:start + size], rows[start:start + size]
        pending, n = [(values[cut:], rows[cut:])], n - cut
    if n:
        yield np.concatenate([v for v, _ in pending]), np.concatenate([r for _, r in pending])
