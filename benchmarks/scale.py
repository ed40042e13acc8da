"""Capture throughput on 1 and 2 local dask workers (1 thread each), same corpus, one process.

ratio = tokens/s with 2 workers / tokens/s with 1 worker   (target >= 1.7 on 2 cores)

Run: .venv/bin/python benchmarks/scale.py [--prompts 256] [--model smollm2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import stratascope as ss
from benchmarks_corpus import corpus  # noqa: E402 - sibling module


def timed(model, texts, out, workers, shard_tokens) -> float:
    start = time.perf_counter()
    run = ss.capture(model=model, prompts=texts, out=out, overwrite=True, capture=("hidden", "mlp"), dtype="float16",
                     device="cpu", workers=workers, shard_tokens=shard_tokens, progress=False)
    return run.attrs["corpus"]["n_tokens"] / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--shard-tokens", type=int, default=512)
    args = ap.parse_args()
    texts = corpus(args.prompts)
    tmp = Path(tempfile.mkdtemp())
    try:
        timed(args.model, texts[:8], str(tmp / "warm.zarr"), 1, args.shard_tokens)  # model cache, imports
        one = timed(args.model, texts, str(tmp / "one.zarr"), 1, args.shard_tokens)
        two = timed(args.model, texts, str(tmp / "two.zarr"), 2, args.shard_tokens)
        print(json.dumps({"model": args.model, "prompts": len(texts), "shard_tokens": args.shard_tokens,
                          "one_worker_tokens_per_s": one, "two_workers_tokens_per_s": two,
                          "ratio": two / one}, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
