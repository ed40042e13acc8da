"""run.torch_dataset: rows/s through a DataLoader against a plain sequential zarr read of the same array.

    PYTHONPATH=. python benchmarks/dataset.py [--prompts 64] [--reps 16] [--repeats 8] [--depth 12]
        [--out /tmp/dataset-bench]

1. Captures SmolLM2 hidden states (float16) of --prompts benchmark prompts and tiles the store
   --reps times (stratascope.testing.tile_store), so it is larger than the shuffle buffer.
2. Baseline: the same array at the same depth read chunk by chunk in order with zarr directly
   (`zarr.open_group(path)["hidden"][start:stop, depth]`), no shuffle; and the same through the
   CheckedStore (run.array: every chunk's crc32c checked before decompression), as the dataset reads.
3. The dataset, shuffled (seed 0, an 8,192-row buffer), through a DataLoader of
   batch 1,024 with 0 and 2 workers (worker start-up included), in two forms: rows collated by
   the DataLoader, and ready batches (torch_dataset(batch_size=1024), DataLoader(batch_size=None)).
Each configuration runs --repeats times, interleaved; the best time of each is kept.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import zarr
from benchmarks_corpus import tiled_hidden_run

import stratascope as ss

FIRST_BATCH: dict = {}  # seconds to the first batch (worker start-up, buffer fill), of the last repeat
BUFFER = 8192  # rows; smaller than the store, so the buffer fills and rows are drawn from it


def plain_read(path: str, depth_index: int, checked: bool = False) -> int:
    """Every chunk in order at one depth: plain zarr, or through the CheckedStore the dataset reads with."""
    array = ss.open_run(path).array("hidden") if checked else zarr.open_group(path, mode="r",
                                                                               use_consolidated=False)["hidden"]
    step, n, total = array.chunks[0], array.shape[0], 0.0
    for start in range(0, n, step):
        block = torch.from_numpy(array[start:start + step, depth_index])
        total += float(block[:, 0].float().sum())  # touch the rows as a trainer would
    return n


def through_loader(run, depth: int, workers: int, batched: bool) -> int:
    if batched:
        ds = run.torch_dataset("hidden", depth=depth, seed=0, buffer_rows=BUFFER, batch_size=1024)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    else:
        ds = run.torch_dataset("hidden", depth=depth, seed=0, buffer_rows=BUFFER)
        loader = torch.utils.data.DataLoader(ds, batch_size=1024, num_workers=workers)
    rows, total, start = 0, 0.0, time.perf_counter()
    for batch in loader:
        if not rows:
            FIRST_BATCH[(workers, batched)] = time.perf_counter() - start
        rows += len(batch)
        total += float(batch[:, 0].float().sum())
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--reps", type=int, default=16)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--out", default="/tmp/dataset-bench")
    args = parser.parse_args()
    _, path = tiled_hidden_run(args.out, args.prompts, args.reps, dtype="float16")
    run = ss.open_run(path)
    depth_index = run.depths.index(args.depth)
    configs = {"plain_sequential_zarr": lambda: plain_read(path, depth_index),
               "checked_sequential_zarr": lambda: plain_read(path, depth_index, checked=True)}
    for workers in (0, 2):
        configs[f"dataset_rows_workers{workers}"] = lambda w=workers: through_loader(run, args.depth, w, False)
        configs[f"dataset_batches_workers{workers}"] = lambda w=workers: through_loader(run, args.depth, w, True)
    best = {name: float("inf") for name in configs}
    rows = {}
    for _ in range(args.repeats):
        for name, fn in configs.items():
            t = time.perf_counter()
            rows[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t)
    assert len(set(rows.values())) == 1, rows  # every configuration saw every row
    n = rows["plain_sequential_zarr"]
    rate = {name: n / s for name, s in best.items()}
    hidden = run.ds["hidden"]
    result = {
        "tokens": n, "depth": args.depth, "array": "hidden (token x 31 depths x 576, float16)",
        "chunk_rows": int(run.array("hidden").chunks[0]), "store_hidden_mib": round(hidden.nbytes / 2**20, 1),
        "buffer_rows": BUFFER, "batch": 1024, "torch_threads": torch.get_num_threads(),
        "rows_per_s": {k: round(v) for k, v in rate.items()},
        "ratio_to_plain": {k: round(v / rate["plain_sequential_zarr"], 3) for k, v in rate.items()},
        "first_batch_s": {f"{'batches' if b else 'rows'}_workers{w}": round(t, 3) for (w, b), t in FIRST_BATCH.items()},
    }
    shutil.rmtree(path, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
