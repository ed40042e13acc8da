"""The rows a linear probe trains on, read from the store in blocks (bounded memory).

Token-level labels (label_<name>): one row per labelled token, read straight from the hidden
array's token chunks. Prompt-level labels (meta_<name>): one row per labelled prompt, its hidden
state at the last prompt token or the mean over the prompt's tokens, gathered in one streaming
pass into a memory-mapped scratch file so every training epoch reads it cheaply.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..progress import tqdm


def chunk_bounds(dask_array) -> np.ndarray:
    """Row boundaries of the first axis's chunks: [0, c0, c0+c1, ..., n]."""
    return np.concatenate([[0], np.cumsum(dask_array.chunks[0])]).astype(np.int64)


@dataclass
class TokenRows:
    """Rows = selected token indices of `hidden` (sorted); blocks follow hidden's token chunks."""

    hidden: object  # dask array (token, depth, d_model)
    rows: np.ndarray  # sorted token indices
    depth_idx: np.ndarray

    def __post_init__(self):
        edges = chunk_bounds(self.hidden)
        cuts = np.searchsorted(self.rows, edges)
        # keep only chunks holding at least one selected row: (token start, row lo, row hi)
        self.blocks = [(int(edges[i]), int(cuts[i]), int(cuts[i + 1])) for i in range(len(edges) - 1)
                       if cuts[i + 1] > cuts[i]]
        self._edges = edges

    def block_len(self, b: int) -> int:
        return self.blocks[b][2] - self.blocks[b][1]

    def read(self, b: int) -> tuple[slice, np.ndarray]:
        """Block b: (the slice of rows it holds, their features (n, depth, d_model) as float32)."""
        start, lo, hi = self.blocks[b]
        stop = int(self._edges[np.searchsorted(self._edges, start, side="right")])
        x = np.asarray(self.hidden[start:stop].compute())
        return slice(lo, hi), x[self.rows[lo:hi] - start][:, self.depth_idx].astype(np.float32, copy=False)

    def close(self) -> None:
        pass


class PromptRows:
    """Rows = prompts; features gathered once into a scratch memmap (n, depth, d_model) float32."""

    BLOCK_BYTES = 16 * 2**20

    def __init__(self, ds, prompts: np.ndarray, at: str, depth_idx: np.ndarray, progress: bool,
                 array: str = "hidden"):
        hidden = ds[array].data
        n, d = len(prompts), hidden.shape[2]
        self._dir = tempfile.TemporaryDirectory(prefix="stratascope-probe-")
        self.x = np.lib.format.open_memmap(Path(self._dir.name) / "features.npy", mode="w+", dtype=np.float32,
                                           shape=(n, len(depth_idx), d))
        row_bytes = len(depth_idx) * d * 4
        step = max(1, self.BLOCK_BYTES // row_bytes)
        self.blocks = [(lo, min(lo + step, n)) for lo in range(0, n, step)]
        _gather(ds, prompts, at, depth_idx, self.x, progress, array)
        self.x.flush()

    def block_len(self, b: int) -> int:
        return self.blocks[b][1] - self.blocks[b][0]

    def read(self, b: int) -> tuple[slice, np.ndarray]:
        lo, hi = self.blocks[b]
        return slice(lo, hi), np.asarray(self.x[lo:hi])

    def close(self) -> None:
        del self.x
        self._dir.cleanup()


def prompt_token_ranges(ds, prompts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First row and number of prompt (not generated) tokens of each prompt."""
    offset = ds["token_offset"].values[prompts].astype(np.int64)
    n = ds["n_tokens"].values[prompts].astype(np.int64)
    generated = np.zeros(len(n), dtype=np.int64)
    gen = ds["is_generated"].data
    if bool(gen.any().compute()):  # count generated rows per prompt, chunk by chunk
        counts = np.zeros(ds.sizes["prompt"], dtype=np.int64)
        pidx = ds["prompt_index"].data
        for a, b in zip(chunk_bounds(gen)[:-1], chunk_bounds(gen)[1:]):
            g, p = np.asarray(gen[a:b].compute()), np.asarray(pidx[a:b].compute())
            keep = g & (p >= 0)
            counts += np.bincount(p[keep], minlength=len(counts))
        generated = counts[prompts]
    return offset, np.maximum(n - generated, 1)


def _gather(ds, prompts, at, depth_idx, out, progress: bool, array: str = "hidden") -> None:
    """One pass over the token chunks holding the selected prompts: last row, or the mean of rows."""
    hidden, pidx = ds[array].data, ds["prompt_index"].data
    offset, n = prompt_token_ranges(ds, prompts)
    edges = chunk_bounds(hidden)
    first_chunk = np.searchsorted(edges, offset, side="right") - 1
    last_chunk = np.searchsorted(edges, offset + n - 1, side="right") - 1
    if at == "last":
        chunks = np.unique(last_chunk)
    else:
        out[:] = 0
        chunks = np.unique(np.concatenate([np.arange(f, l + 1) for f, l in zip(first_chunk, last_chunk)]))
    for c in tqdm(chunks, desc=f"probe rows ({at})", unit="chunk", disable=not progress, mininterval=0.5):
        a, b = int(edges[c]), int(edges[c + 1])
        x = np.asarray(hidden[a:b].compute())[:, depth_idx]
        if at == "last":
            rows = np.flatnonzero(last_chunk == c)
            out[rows] = x[offset[rows] + n[rows] - 1 - a]
            continue
        p_here = np.asarray(pidx[a:b].compute())
        # prompts are in token order, so those touching chunk c are one contiguous run
        # a chunk holds few prompt boundaries; each prompt's slice is contiguous
        for r in range(np.searchsorted(last_chunk, c), np.searchsorted(first_chunk, c, side="right")):
            lo, hi = max(int(offset[r]), a) - a, min(int(offset[r] + n[r]), b) - a
            sel = x[lo:hi][p_here[lo:hi] == prompts[r]]
            out[r] += (sel.astype(np.float64).sum(axis=0) / n[r]).astype(np.float32)


class ArrayRows:
    """Rows from an in-memory array (n, depth, d_model): for small matrices and tests."""

    def __init__(self, x: np.ndarray, block_rows: int = 4096):
        self.x = np.asarray(x, dtype=np.float32)
        n = len(self.x)
        self.blocks = [(lo, min(lo + block_rows, n)) for lo in range(0, n, block_rows)]

    def block_len(self, b: int) -> int:
        return self.blocks[b][1] - self.blocks[b][0]

    def read(self, b: int) -> tuple[slice, np.ndarray]:
        lo, hi = self.blocks[b]
        return slice(lo, hi), self.x[lo:hi]

    def close(self) -> None:
        pass
