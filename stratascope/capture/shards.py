"""Shards: runs of whole prompts whose rows start and end on chunk boundaries.

No two shards ever share a chunk, so shards can be written by different processes or
machines at once. A shard's end is padded with masked rows (prompt_index -1) up to the
next boundary. The layout depends only on the corpus and the capture options, never on the
number of workers, so every way of running a capture writes the same store.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

import numpy as np
import zarr

from ..errors import DiskSpaceError
from ..schemas import VARIABLES
from .durable import flush, write_whole_chunks


@dataclass(frozen=True)
class Shard:
    index: int
    lo: int  # first prompt
    hi: int  # one past the last prompt
    start: int  # first row in the token dimension
    stop: int  # one past the last row (padding included)


def plan_shards(lengths: np.ndarray, unit: int, target_rows: int) -> tuple[list[Shard], np.ndarray, int]:
    """Cut prompts into shards of about target_rows rows, each but the last padded to a multiple of unit.

    Returns the shards, each prompt's first row, and the total row count.
    """
    target = max(unit, target_rows // unit * unit)
    shards, offsets = [], np.zeros(len(lengths), dtype=np.int64)
    row = lo = filled = 0
    for i, n in enumerate(lengths):
        if i > lo and filled + n > target:
            stop = row + -(-filled // unit) * unit
            shards.append(Shard(len(shards), lo, i, row, stop))
            row, lo, filled = stop, i, 0
        offsets[i] = row + filled
        filled += int(n)
    stop = row + filled  # nothing follows the last shard, so it needs no padding
    shards.append(Shard(len(shards), lo, len(lengths), row, stop))
    return shards, offsets, stop


def create_records(root: zarr.Group, n_shards: int) -> None:
    """One completion flag per shard, each in its own chunk so writers never share one."""
    spec = VARIABLES["shard_complete"]
    root.create_array(spec.name, shape=(n_shards,), chunks=(1,), dtype=spec.dtype, fill_value=False,
                      dimension_names=spec.dims, attributes=spec.attrs())


def completed(root: zarr.Group) -> np.ndarray:
    return root["shard_complete"][:]


def write_rows(root: zarr.Group, shard: Shard, stage: dict[str, np.ndarray]) -> None:
    """Write every array's rows of the shard; every chunk, zeros too (a missing chunk is then damage)."""
    name = None
    try:
        for name, values in stage.items():
            array = root[name]
            done = write_whole_chunks(array, shard.start, values)
            if done < len(values):
                array.with_config({"write_empty_chunks": True})[shard.start + done:shard.stop] = values[done:]
    except OSError as e:
        _raise_if_full(e, f"'{name}' of shard {shard.index}")
        raise


def record_complete(root: zarr.Group, shard: Shard) -> None:
    """Flush the rows written so far to the disk, then, and only then, record the shard complete."""
    try:
        flush(root)
        root["shard_complete"][shard.index] = True
        flush(root)
    except OSError as e:
        _raise_if_full(e, f"shard {shard.index}")
        raise


def write_shard(root: zarr.Group, shard: Shard, stage: dict[str, np.ndarray]) -> None:
    write_rows(root, shard, stage)
    record_complete(root, shard)


def _raise_if_full(e: OSError, what: str) -> None:
    if e.errno == errno.ENOSPC:
        raise DiskSpaceError(f"no space left on the disk while writing {what}; free space and run the same "
                             "command with --resume (every shard recorded complete is kept)") from None
