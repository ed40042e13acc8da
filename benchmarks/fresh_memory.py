"""What fresh memory costs a capture: staging into new arrays against reused ones, and writing
chunk files through the page cache against flushing and dropping them (capture/buffers.py,
capture/durable.py).

staging: one shard's worth of SmolLM2-shaped float16 staging arrays (hidden 31×576, attention
         30×9×64, mlp 30×1536; 512 rows) filled from float32 tensors, into new arrays (np.zeros
         each time) and into StageBuffers' reused, re-zeroed ones; --gap seconds pass between
         fills, as a shard's compute does in a capture (a virtual machine whose kernel reports
         free pages to its host gives them back within ~2 s; the next use then faults them in)
writes:  8 shards of those arrays, --gap seconds apart, written through zarr into a plain
         LocalStore; through zarr into the capture's StreamingStore with O_DIRECT off (each chunk
         file written through the page cache, flushed and dropped); and by the capture's own
         write_rows (uncompressed chunks written directly from the staging buffers, every chunk
         file with O_DIRECT); the CPU seconds of the whole process (zarr's threads included) per
         GiB, the gaps left out

Run: PYTHONPATH=. .venv/bin/python benchmarks/fresh_memory.py [--repeats 3] [--gap 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time

import numpy as np
import torch
import zarr

from stratascope.capture import durable
from stratascope.capture.buffers import StageBuffers
from stratascope.capture.durable import StreamingStore, flush
from stratascope.capture.shards import Shard, write_rows
from stratascope.capture.writer import create_array

ROWS = 512
SHAPES = {"hidden": (31, 576), "attention": (30, 9, 64), "mlp": (30, 1536)}
DIMS = {"hidden": ("token", "depth", "d_model"), "attention": ("token", "layer", "head", "key"),
        "mlp": ("token", "layer", "neuron")}


def fill(stage: dict[str, np.ndarray], sources: dict[str, torch.Tensor]) -> None:
    for name, src in sources.items():
        torch.from_numpy(stage[name]).copy_(src)


def staging(repeats: int, gap: float) -> dict:
    sources = {n: torch.randn(ROWS, *s) for n, s in SHAPES.items()}
    buffers = StageBuffers({n: (ROWS, *s) for n, s in SHAPES.items()}, dict.fromkeys(SHAPES, "float16"), ROWS)
    new, reused = [], []
    for _ in range(repeats):
        time.sleep(gap)
        start = time.perf_counter()
        fill({n: np.zeros((ROWS, *s), dtype=np.float16) for n, s in SHAPES.items()}, sources)
        new.append(time.perf_counter() - start)
        start = time.perf_counter()
        stage = buffers.take(ROWS)
        fill(stage, sources)
        buffers.give(stage)
        reused.append(time.perf_counter() - start)
        time.sleep(gap)
    return {"gap_s": gap, "new_arrays_ms": [round(v * 1e3, 1) for v in new],
            "reused_ms": [round(v * 1e3, 1) for v in reused],
            "ratio_new_over_reused_median": round(float(np.median(new) / np.median(reused)), 1)}


def writes(how: str, path: str, gap: float, shards: int = 8) -> float:
    """CPU seconds per GiB of a capture-shaped write of `shards` shards, `gap` seconds apart:
    "page_cache" zarr into its LocalStore; "flushed" zarr into the StreamingStore with O_DIRECT
    off (each chunk written through the page cache, flushed and dropped); "capture" the
    capture's own write_rows from staging buffers (uncompressed chunks written directly, every
    chunk file with O_DIRECT) and its flush."""
    store = path if how == "page_cache" else StreamingStore(path, deferred=True)
    group = zarr.open_group(store, mode="w")
    arrays = {n: create_array(group, n, (ROWS * shards, *s), 64, "float16", dims=DIMS[n]) for n, s in SHAPES.items()}
    rng = np.random.default_rng(0)
    stage = StageBuffers({n: (ROWS, *s) for n, s in SHAPES.items()}, dict.fromkeys(SHAPES, "float16"), ROWS).take(ROWS)
    for n, s in SHAPES.items():
        stage[n][:] = rng.standard_normal((ROWS, *s), dtype=np.float32) * 0.1
    stage["attention"][..., 32:] = 0  # the padded keys, as a capture stores them
    direct, durable._O_DIRECT = durable._O_DIRECT, 0 if how == "flushed" else durable._O_DIRECT
    cpu = 0.0
    try:
        for k in range(shards):
            time.sleep(gap)
            start = time.process_time()
            if how == "capture":
                write_rows(group, Shard(k, 0, 1, k * ROWS, (k + 1) * ROWS), stage)
            else:
                for n, a in arrays.items():
                    a[k * ROWS:(k + 1) * ROWS] = stage[n]
            flush(group)
            cpu += time.process_time() - start
    finally:
        durable._O_DIRECT = direct
    return cpu / (sum(v.nbytes for v in stage.values()) * shards / 2**30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gap", type=float, default=3.0)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    try:
        ways = ("page_cache", "flushed", "capture")
        cpu = {how: [] for how in ways}
        for r in range(args.repeats):  # interleaved: the machine's noise hits every way alike
            for how in ways:
                cpu[how].append(writes(how, f"{tmp}/{how}{r}.zarr", args.gap))
        result = {"staging_one_shard": staging(args.repeats * 2, args.gap),
                  "writes_cpu_s_per_gib": {how: [round(v, 2) for v in cpu[how]] for how in ways},
                  "ratio_page_cache_over_capture_best": round(min(cpu["page_cache"]) / min(cpu["capture"]), 2)}
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
