"""Reused staging arrays for a shard's activations.

A newly allocated array costs a page fault on the first write to each 4 KiB page, and a freed
one goes back to the system, so a new buffer per shard paid that toll on every byte staged:
filling one SmolLM2 shard's staging arrays (512 rows of hidden + attention + mlp) took a median
98-128 ms into new arrays and 8-9.5 ms into reused ones (benchmarks/fresh_memory.py, 2-core VM), and
zeroing a reused 150 MB buffer takes 5 ms. Each array starts on a 4 KiB boundary, so its chunks
can go from it to the disk without the page cache (capture/durable.py).
"""

from __future__ import annotations

import threading

import numpy as np

PAGE = 4096


class StageBuffers:
    """A free list of zeroed arrays, one set per shard in flight, sized for the plan's largest shard.

    `take` hands out views of the first `rows` rows (a new set when none is free, so the number
    alive is bounded by the shards in flight, as before); `give` returns a set once written.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str], max_rows: int):
        self.shapes = {n: (max_rows,) + tuple(s[1:]) for n, s in shapes.items()}
        self.dtypes = dtypes
        self._free: list[dict[str, np.ndarray]] = []
        self._lock = threading.Lock()  # the writer thread gives back while the capture takes

    @classmethod
    def for_plan(cls, plan, names: tuple[str, ...]) -> StageBuffers:
        """Buffers for the arrays `names` that a capture plan (runner.Plan) stores."""
        names = [n for n in names if n in plan.shapes]
        return cls({n: plan.shapes[n] for n in names}, {n: plan.dtypes[n] for n in names},
                   max(s.stop - s.start for s in plan.shards))

    def take(self, rows: int) -> dict[str, np.ndarray]:
        with self._lock:
            full = self._free.pop() if self._free else None
        if full is None:
            full = {n: _aligned_zeros(s, self.dtypes[n]) for n, s in self.shapes.items()}
        else:
            for a in full.values():
                a.fill(0)  # padding rows and the attention key axis past each prompt must read zero
        return {n: a[:rows] for n, a in full.items()}

    def give(self, stage: dict[str, np.ndarray]) -> None:
        """Return the arrays of `stage` that came from take (any others are left alone)."""
        full = {n: _whole(stage.get(n), s, self.dtypes[n]) for n, s in self.shapes.items()}
        if all(a is not None for a in full.values()):
            with self._lock:
                self._free.append(full)


def _aligned_zeros(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """np.zeros whose data starts on a 4 KiB boundary (pages the kernel zeroes on first touch)."""
    return _aligned(np.zeros(_nbytes(shape, dtype) + PAGE, dtype=np.uint8), shape, dtype)


def _aligned(raw: np.ndarray, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    start, size = -raw.ctypes.data % PAGE, _nbytes(shape, dtype)
    return raw[start:start + size].view(dtype).reshape(shape)


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _whole(view: np.ndarray | None, shape: tuple[int, ...], dtype: str) -> np.ndarray | None:
    """The whole array that take cut `view` from, or None if it was not cut from one."""
    raw = getattr(view, "base", None)  # numpy gives every view the array that owns the memory
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.nbytes != _nbytes(shape, dtype) + PAGE:
        return None
    whole = _aligned(raw, shape, dtype)
    return whole if view.ctypes.data == whole.ctypes.data and view.shape[1:] == whole.shape[1:] else None
