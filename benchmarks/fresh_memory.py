"""What fresh memory costs a capture: staging into new arrays against reused ones, and writing
chunk files through the page cache against flushing and dropping them (capture/buffers.py,
capture/durable.py).

staging: one shard's worth of SmolLM2-shaped float16 staging arrays (hidden 31×576, attention
         30×9×64, mlp 30×1536; 512 rows) filled from float32 tensors, into new arrays (np.zeros
         each time) and into StageBuffers' reused, re-zeroed ones; --gap seconds pass between
         fills, as a shard's compute does in a capture (a virtual machine whose kernel reports
         free pages to its host gives them back within ~2 s; the next use then faults them in)
writes:  20 shards of those arrays written through zarr, into a plain LocalStore and into the
         capture's StreamingStore (each chunk flushed and dropped from the page cache); the
         CPU seconds of the whole process (zarr's threads included) per GiB

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

from stratascope.capture.buffers import StageBuffers
from stratascope.capture.durable import StreamingStore
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


def writes(store, shards: int = 20) -> float:
    """CPU seconds per GiB of a capture-shaped write of `shards` shards into `store`."""
    group = zarr.open_group(store, mode="w")
    arrays = {n: create_array(group, n, (ROWS * shards, *s), 64, "float16", dims=DIMS[n]) for n, s in SHAPES.items()}
    rng = np.random.default_rng(0)
    data = {n: (rng.standard_normal((ROWS, *s), dtype=np.float32) * 0.1).astype(np.float16) for n, s in SHAPES.items()}
    data["attention"][..., 32:] = 0  # the padded keys, as a capture stores them
    cpu = time.process_time()
    for k in range(shards):
        for n, a in arrays.items():
            a[k * ROWS:(k + 1) * ROWS] = data[n]
        if isinstance(store, StreamingStore):
            store.flush()
    return (time.process_time() - cpu) / (sum(v.nbytes for v in data.values()) * shards / 2**30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gap", type=float, default=3.0)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    try:
        plain, streaming = [], []
        for r in range(args.repeats):  # interleaved: the machine's noise hits both
            plain.append(writes(f"{tmp}/plain{r}.zarr"))
            streaming.append(writes(StreamingStore(f"{tmp}/streaming{r}.zarr")))
        result = {"staging_one_shard": staging(args.repeats * 2, args.gap),
                  "writes_cpu_s_per_gib": {"page_cache": [round(v, 2) for v in plain],
                                           "flushed_and_dropped": [round(v, 2) for v in streaming]},
                  "ratio_page_cache_over_flushed_best": round(min(plain) / min(streaming), 2)}
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
