"""Residual components and direct logit attribution, measured in one process.

capture ratio = capture tokens/s with --capture hidden,components,z / with --capture hidden
               (same prompts, batches and dtype; interleaved runs, best of each)
dla rows/s    = rows attributed per second by the dla job (--positions all --target next, heads
               included), computed from the store alone (the readout load included)

Run: PYTHONPATH=. .venv/bin/python benchmarks/dla.py [--prompts 32] [--repeats 2] [--model smollm2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from benchmarks_corpus import corpus

import stratascope as ss
from stratascope.analyze import lens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    texts = corpus(args.prompts)
    tmp = Path(tempfile.mkdtemp())
    speeds: dict[str, list[float]] = {"hidden": [], "hidden,components,z": []}
    try:
        for _ in range(args.repeats):  # interleaved, best of each: the machine is noisy
            for what in speeds:
                run = ss.capture(model=args.model, prompts=texts, out=str(tmp / f"{len(what)}.zarr"), overwrite=True,
                                 capture=what, dtype=args.dtype, batch_size=args.batch_size, device="cpu",
                                 progress=False)
                speeds[what].append(run.attrs["timing"]["tokens_per_s"])
        times = []
        for i in range(args.repeats):
            lens._READOUTS.clear()  # each timing loads the readout, as a fresh process would
            start = time.perf_counter()
            res = run.dla(target="next", positions="all", contrast=" the" if i % 2 else None, progress=False)
            times.append(time.perf_counter() - start)
        rows = int(res.ds.sizes["row"])
        result = {"model": args.model, "prompts": len(texts), "tokens": run.n_tokens, "dtype": args.dtype,
                  "torch_threads": torch.get_num_threads(),
                  "capture_hidden_tokens_per_s": max(speeds["hidden"]),
                  "capture_components_z_tokens_per_s": max(speeds["hidden,components,z"]),
                  "capture_ratio": max(speeds["hidden,components,z"]) / max(speeds["hidden"]),
                  "dla_rows": rows, "dla_seconds": min(times), "dla_rows_per_s": rows / min(times),
                  "max_abs_gap": float(abs(res.ds["gap"]).max())}
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
