"""The rows a similarity compares, matched between one or two runs and read in blocks.

`--positions all`: one row per stored token, identified by (prompt, position). Within a run
every token row counts (masked padding never does); between two runs the rows are matched by
prompt and position, which needs both runs to have tokenized the same corpus alike (same
prompt texts in the same order, same token ids). `--positions last|mean`: one row per prompt
(its last prompt token, or the mean over its prompt tokens), gathered by probe_rows'
PromptRows into a scratch memmap; between runs prompts are matched by their text.

A row sample (`max_rows`) is drawn once with a fixed seed, so the same store and parameters
always compare the same rows.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .probe_rows import PromptRows, chunk_bounds

SAMPLE_SEED = 0
BLOCK_BYTES = 32 * 2**20  # float32 features read per block and side


def sample_rows(n: int, max_rows: int | None) -> np.ndarray | None:
    """Sorted indices of at most `max_rows` of n rows (seeded), or None for all of them."""
    if max_rows is None or n <= max_rows:
        return None
    return np.sort(np.random.default_rng(SAMPLE_SEED).choice(n, size=max_rows, replace=False))


def read_rows(arr, rows: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Token rows `rows` (sorted) of a dask array (token, depth, d), columns `index` of axis 1, as
    float32 (len(rows), len(index), d). Only the chunks holding those rows are read, neighbouring
    chunks together up to BLOCK_BYTES at a time (a sparse sample touching every chunk must not
    become one read of the whole store)."""
    edges = chunk_bounds(arr)
    chunk = np.searchsorted(edges, rows, side="right") - 1
    out = np.empty((len(rows), len(index), arr.shape[2]), dtype=np.float32)
    span = max(1, BLOCK_BYTES // (int(np.prod(arr.shape[1:])) * arr.dtype.itemsize))  # rows per read
    lo = 0
    while lo < len(rows):
        start = int(edges[chunk[lo]])
        hi = lo + 1
        while hi < len(rows) and chunk[hi] - chunk[hi - 1] <= 1 and edges[chunk[hi] + 1] - start <= span:
            hi += 1
        stop = int(edges[chunk[hi - 1] + 1])
        x = np.asarray(arr[start:stop].compute())
        out[lo:hi] = x[rows[lo:hi] - start][:, index]
        lo = hi
    return out


class TokenPairs:
    """Rows = (prompt, position) of every token of every prompt from position `min_position` on, in
    corpus order, or a sample of them; the same rows in each run (runs checked to be tokenized alike)."""

    def __init__(self, runs, arrays, indices, max_rows: int | None, min_position: int = 0):
        self.arrays, self.indices = arrays, indices
        ds = runs[0].ds
        self.n_tokens = np.maximum(ds["n_tokens"].values.astype(np.int64) - min_position, 0)
        self.offsets = [r.ds["token_offset"].values.astype(np.int64) + min_position for r in runs]
        self.starts = np.concatenate([[0], np.cumsum(self.n_tokens)[:-1]])
        total = int(self.n_tokens.sum())
        self.sample = sample_rows(total, max_rows)
        self.n = total if self.sample is None else len(self.sample)
        width = max(len(i) * a.shape[2] for a, i in zip(arrays, indices)) * 4
        self.step = max(1, BLOCK_BYTES // width)

    def ranks(self):
        """Blocks of row numbers (ranks among all tokens, sorted)."""
        for lo in range(0, self.n, self.step):
            hi = min(lo + self.step, self.n)
            yield np.arange(lo, hi) if self.sample is None else self.sample[lo:hi]

    def token_rows(self, ranks: np.ndarray, side: int) -> np.ndarray:
        p = np.searchsorted(self.starts, ranks, side="right") - 1
        return self.offsets[side][p] + ranks - self.starts[p]

    def blocks(self):
        """Per block of rows: one float32 array (rows, depths, d) per run."""
        for ranks in self.ranks():
            yield [read_rows(a, self.token_rows(ranks, s), i)
                   for s, (a, i) in enumerate(zip(self.arrays, self.indices))]

    @property
    def n_blocks(self) -> int:
        return -(-self.n // self.step)

    def close(self) -> None:
        pass


def check_tokenized_alike(run_a, run_b) -> None:
    """Raise unless both runs hold the same prompts in the same order with the same token ids."""
    hint = ("so tokens cannot be matched by prompt and position; use --positions last or --positions mean "
            "(one row per prompt, matched by prompt text)")
    a, b = run_a.ds, run_b.ds
    if list(run_a.prompts["text"]) != list(run_b.prompts["text"]):
        raise ConfigError(f"{run_a.path} and {run_b.path} do not hold the same prompts in the same order, {hint}")
    n_a, n_b = a["n_tokens"].values, b["n_tokens"].values
    if not np.array_equal(n_a, n_b):
        p = int(np.flatnonzero(n_a != n_b)[0])
        raise ConfigError(f"{run_a.path} and {run_b.path} tokenized prompt {p} into {n_a[p]} and {n_b[p]} tokens, "
                          f"{hint}")
    pairs = TokenPairs([run_a, run_b], [a["token_id"].data[:, None, None], b["token_id"].data[:, None, None]],
                       [np.array([0]), np.array([0])], None)
    pairs.step = 2**20
    for ids_a, ids_b in pairs.blocks():
        if not np.array_equal(ids_a, ids_b):
            raise ConfigError(f"{run_a.path} and {run_b.path} hold different token ids for the same prompts, {hint}")


def match_prompts(run_a, run_b) -> tuple[np.ndarray, np.ndarray]:
    """Prompt indices (a, b) with the same text, in a's order; the k-th copy of a text in a is
    matched with its k-th copy in b."""
    where: dict[str, list[int]] = {}
    for i, text in enumerate(run_b.prompts["text"]):
        where.setdefault(text, []).append(i)
    ia, ib = [], []
    for i, text in enumerate(run_a.prompts["text"]):
        if where.get(text):
            ia.append(i)
            ib.append(where[text].pop(0))
    if not ia:
        raise ConfigError(f"{run_a.path} and {run_b.path} share no prompt text, so no rows can be matched; "
                          "compare runs captured from the same prompts")
    return np.array(ia, dtype=np.int64), np.array(ib, dtype=np.int64)


class PromptPairs:
    """Rows = prompts (last prompt token or mean over prompt tokens), matched by text between runs."""

    def __init__(self, runs, array: str, indices, positions: str, max_rows: int | None, progress: bool):
        if len(runs) == 1:
            prompts = [np.arange(runs[0].n_prompts)]
        else:
            prompts = list(match_prompts(*runs))
        sample = sample_rows(len(prompts[0]), max_rows)
        if sample is not None:
            prompts = [p[sample] for p in prompts]
        self.n = len(prompts[0])
        self.readers, self.order = [], []
        for run, p, idx in zip(runs, prompts, indices):
            uniq = np.unique(p)  # the gatherer wants prompts in token order
            self.readers.append(PromptRows(run.ds, uniq, positions, idx, progress, array=array))
            self.order.append(np.searchsorted(uniq, p))
        self.step = max(1, BLOCK_BYTES // max(r.x.shape[1] * r.x.shape[2] * 4 for r in self.readers))

    @property
    def n_blocks(self) -> int:
        return -(-self.n // self.step)

    def blocks(self):
        for lo in range(0, self.n, self.step):
            yield [np.asarray(r.x[o[lo:lo + self.step]]) for r, o in zip(self.readers, self.order)]

    def close(self) -> None:
        for r in self.readers:
            r.close()
