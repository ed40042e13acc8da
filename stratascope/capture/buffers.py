"""Reused staging arrays for a shard's activations.

A newly allocated array costs a page fault on the first write to each 4 KiB page, and a freed
one goes back to the system, so a new buffer per shard paid that toll on every byte staged:
filling one SmolLM2 shard's staging arrays (512 rows of hidden + attention + mlp) took a median
98-128 ms into new arrays and 8-9.5 ms into reused ones (benchmarks/fresh_memory.py, 2-core VM), and
zeroing a reused 150 MB buffer takes 5 ms.
"""

from __future__ import annotations

import threading

import numpy as np


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
        if full is None:  # np.zeros: pages the kernel zeroes on first touch
            full = {n: np.zeros(s, dtype=self.dtypes[n]) for n, s in self.shapes.items()}
        else:
            for a in full.values():
                a.fill(0)  # padding rows and the attention key axis past each prompt must read zero
        return {n: a[:rows] for n, a in full.items()}

    def give(self, stage: dict[str, np.ndarray]) -> None:
        """Return the arrays of `stage` that came from take (any others are left alone)."""
        full = {n: stage[n].base for n in self.shapes if n in stage}
        if len(full) == len(self.shapes) and all(a is not None and a.shape == self.shapes[n] for n, a in full.items()):
            with self._lock:
                self._free.append(full)
