"""Capture throughput on 1 and 2 local dask workers (1 thread each), same corpus, one process.

ratio = tokens/s with 2 workers / tokens/s with 1 worker   (target >= 1.7 on 2 cores)

Measured two ways: "steady" on a cluster already started and warmed (models loaded on its
workers), which is what a long capture sees, and "cold" including the cluster's start and
the model loads, which is what a short one sees.

Run: .venv/bin/python benchmarks/scale.py [--prompts 512] [--model smollm2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks_corpus import corpus

import stratascope as ss

OPTIONS = dict(capture=("hidden", "mlp"), dtype="float16", device="cpu", progress=False, overwrite=True)


def timed(model, texts, out, shard_tokens, **where) -> float:
    start = time.perf_counter()
    run = ss.capture(model=model, prompts=texts, out=out, shard_tokens=shard_tokens, **OPTIONS, **where)
    return run.attrs["corpus"]["n_tokens"] / (time.perf_counter() - start)


def steady(model, texts, tmp: Path, workers: int, shard_tokens: int) -> float:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster):
        where = {"scheduler": cluster.scheduler_address}
        timed(model, texts[: 8 * workers], str(tmp / "warm.zarr"), 64, **where)  # every worker loads the model
        return timed(model, texts, str(tmp / f"s{workers}.zarr"), shard_tokens, **where)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--shard-tokens", type=int, default=512)
    args = ap.parse_args()
    texts = corpus(args.prompts)
    tmp = Path(tempfile.mkdtemp())
    try:
        timed(args.model, texts[:8], str(tmp / "warm.zarr"), args.shard_tokens)  # model cache, imports
        result = {"model": args.model, "prompts": len(texts), "shard_tokens": args.shard_tokens}
        for workers in (1, 2):
            result[f"steady_{workers}_worker_tokens_per_s"] = steady(args.model, texts, tmp, workers,
                                                                     args.shard_tokens)
        for workers in (1, 2):
            result[f"cold_{workers}_worker_tokens_per_s"] = timed(args.model, texts, str(tmp / "c.zarr"),
                                                                  args.shard_tokens, workers=workers)
        result["steady_ratio"] = result["steady_2_worker_tokens_per_s"] / result["steady_1_worker_tokens_per_s"]
        result["cold_ratio"] = result["cold_2_worker_tokens_per_s"] / result["cold_1_worker_tokens_per_s"]
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
