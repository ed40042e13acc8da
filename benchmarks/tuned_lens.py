"""Tuned-lens training throughput against the lens job's, and peak RSS against store size.

    PYTHONPATH=. python benchmarks/tuned_lens.py [--tokens 132] [--out /tmp/tuned-lens-bench]

1. Captures SmolLM2 hidden states for the demo prompts (repeated to about --tokens tokens).
2. Throughput in (token rows x depths) per second: the lens job (`run.lens()`, whole job:
   reading the store, dask, the kernel, writing analysis/lens) over every row, and tuned-lens
   training steps (read the batch from the store, forward and backward through the readout at
   every depth, Adam) over as many rows. Alternated, best of each; the ratio is what is reported.
   Per row and depth the lens does one logits matmul; training does two (x U^T and exp(z) U),
   plus the backward through the norm and the translator.
3. Memory: peak RSS (VmHWM) of a fresh process training (a few steps) and evaluating the
   tuned lens on the store and on a tiled copy 10x larger.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks_corpus import demo_hidden_run

import stratascope as ss
from stratascope.analyze import tuned_lens as tl
from stratascope.analyze.lens import readout_for
from stratascope.testing import tile_store

STEPS_RSS = 4


def peak_rss(path: str) -> float:
    """Peak RSS (MiB) of a fresh process training STEPS_RSS steps and evaluating on `path`."""
    shutil.rmtree(Path(path) / "analysis", ignore_errors=True)
    code = ("import stratascope as ss\n"
            f"ss.open_run({path!r}).tuned_lens(steps={STEPS_RSS}, progress=False)\n"
            "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def train_rate(run, rows: int, batch: int) -> float:
    """Training (rows x depths)/s over about `rows` rows: whole steps, batches read from the store."""
    params = tl.tuned_params(run, steps=max(1, rows // batch), batch_rows=batch, holdout=0.2)
    t = time.perf_counter()
    tl.train(run, params, progress=False)
    return params["steps"] * batch * len(params["depths"]) / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=132)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", default="/tmp/tuned-lens-bench")
    args = parser.parse_args()
    out = Path(args.out)
    run = demo_hidden_run(args.tokens, out)
    D, n = len(run.ds["depth"]), run.n_tokens
    readout_for(run)  # load the readout once, as a long job would
    results = {"tokens": n, "depths": D, "batch_rows": args.batch, "threads": torch.get_num_threads()}
    best = {"lens": 0.0, "train": 0.0}
    for _ in range(3):  # alternate, keep the best of each: the machine is shared
        shutil.rmtree(Path(run.path) / "analysis", ignore_errors=True)
        t = time.perf_counter()
        ss.open_run(run.path).lens(topk=10, progress=False)
        best["lens"] = max(best["lens"], n * D / (time.perf_counter() - t))
        best["train"] = max(best["train"], train_rate(run, n, args.batch))
    results.update({f"{k}_rows_x_depths_per_s": round(v, 1) for k, v in best.items()})
    results["ratio_train_to_lens"] = round(best["train"] / best["lens"], 2)
    rss = {}
    for k in (1, 10):
        path = run.path if k == 1 else str(out / f"x{k}.zarr")
        if k > 1:
            tile_store(run.path, path, k)
        hidden_mib = ss.open_run(path).ds["hidden"].nbytes / 2**20
        rss[f"x{k}"] = {"hidden_mib": round(hidden_mib, 1), "peak_rss_mib": round(peak_rss(path), 1)}
    results["peak_rss"] = rss
    results["rss_ratio_10x_to_1x"] = round(rss["x10"]["peak_rss_mib"] / rss["x1"]["peak_rss_mib"], 2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
