"""Capture throughput on 1 and 2 local dask workers (1 thread each), same corpus, one process.

ratio = tokens/s with 2 workers / tokens/s with 1 worker   (target >= 1.8 on 2 cores)

Measured two ways: "steady" on a cluster already started and warmed (models loaded on its
workers), which is what a long capture sees, and "cold" including the cluster's start and
the model loads, which is what a short one sees. The steady runs alternate 1 and 2 workers
--repeats times (machine noise hits both); each also reports the CPU seconds of this process
(the client: model load for the sizes and the readout, store creation, the scheduler) and of
the worker processes, which say where the cores went.

Run: PYTHONPATH=. .venv/bin/python benchmarks/scale.py [--prompts 512] [--repeats 2] [--model smollm2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import psutil
from benchmarks_corpus import corpus

import stratascope as ss

OPTIONS = dict(capture=("hidden", "mlp"), dtype="float16", device="cpu", progress=False, overwrite=True)


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def timed(model, texts, out, shard_tokens, **where) -> tuple[float, int]:
    start = time.perf_counter()
    run = ss.capture(model=model, prompts=texts, out=out, shard_tokens=shard_tokens, **OPTIONS, **where)
    return run.attrs["corpus"]["n_tokens"] / (time.perf_counter() - start), run.attrs["capture"]["n_shards"]


def steady(model, texts, tmp: Path, workers: int, shard_tokens: int) -> dict:
    from stratascope.cluster import dask_client

    with dask_client(workers=workers) as client:  # the cluster `--workers N` starts
        where = {"scheduler": client.scheduler.address}
        timed(model, texts[: 8 * workers], str(tmp / "warm.zarr"), 64, **where)  # every worker loads the model
        me = psutil.Process()
        kids = me.children(recursive=True)
        client0, kids0 = _cpu(me), sum(_cpu(k) for k in kids)
        rate, shards = timed(model, texts, str(tmp / f"s{workers}.zarr"), shard_tokens, **where)
        return {"tokens_per_s": rate, "shards": shards, "client_cpu_s": _cpu(me) - client0,
                "workers_cpu_s": sum(_cpu(k) for k in kids) - kids0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--shard-tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-cold", action="store_true")
    args = ap.parse_args()
    texts = corpus(args.prompts)
    tmp = Path(tempfile.mkdtemp())
    try:
        timed(args.model, texts[:8], str(tmp / "warm.zarr"), args.shard_tokens)  # model cache, imports
        result = {"model": args.model, "prompts": len(texts), "shard_tokens": args.shard_tokens, "steady": []}
        for _ in range(args.repeats):
            one, two = (steady(args.model, texts, tmp, w, args.shard_tokens) for w in (1, 2))
            result["steady"].append({"1_worker": one, "2_workers": two,
                                     "ratio": two["tokens_per_s"] / one["tokens_per_s"], "loadavg": os.getloadavg()})
        ratios = [r["ratio"] for r in result["steady"]]
        result["steady_ratio_range"] = [min(ratios), max(ratios)]
        if not args.no_cold:
            cold = {w: timed(args.model, texts, str(tmp / "c.zarr"), args.shard_tokens, workers=w)[0] for w in (1, 2)}
            result.update(cold_1_worker_tokens_per_s=cold[1], cold_2_worker_tokens_per_s=cold[2],
                          cold_ratio=cold[2] / cold[1])
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
