"""Similarity: peak RSS against store size (CKA streams; SVCCA reads a bounded sample).

    python benchmarks/similarity.py [--prompts 64] [--reps 10] [--out /tmp/similarity-bench]

1. Captures SmolLM2 hidden states (float32) of --prompts benchmark prompts.
2. Tiles the store --reps times (stratascope.testing.tile_store: the same tokens repeated).
3. In a fresh process per store: depth x depth linear CKA of every 3rd depth (11 depths, 66
   pairs) with a 64 MiB accumulator budget (so 3 passes over the store), and SVCCA of the same
   depths on at most 2048 rows; peak RSS (VmHWM) and wall time of each.
CKA of a store tiled k times equals the original's (the same rows k times): checked.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from benchmarks_corpus import tiled_hidden_run

import stratascope as ss

DEPTHS = "0,3,6,9,12,15,18,21,24,27,30"
JOBS = {"cka": dict(method="cka", depths=DEPTHS, memory_mib=64),
        "svcca": dict(method="svcca", depths=DEPTHS, max_rows=2048)}


def measure(path: str, job: str) -> dict:
    """Peak RSS and time of a fresh process computing `job` on `path` (recomputed, not reused)."""
    code = ("import time, json, stratascope as ss\n"
            "t = time.perf_counter()\n"
            f"ds = ss.open_run({path!r}).similarity(progress=False, recompute=True, **{JOBS[job]!r})\n"
            "s = time.perf_counter() - t\n"
            "rss = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024\n"
            "print(json.dumps({'s': s, 'rss': rss, 'passes': ds.attrs['passes'], 'rows': ds.attrs['n_rows'],"
            " 'm': ds['similarity'].values.tolist()}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", default="/tmp/similarity-bench")
    args = parser.parse_args()
    small, big = tiled_hidden_run(args.out, args.prompts, args.reps)
    results = {}
    for name, path in (("x1", small), (f"x{args.reps}", big)):
        hidden = ss.open_run(path).ds["hidden"]
        results[name] = {"tokens": int(hidden.sizes["token"]), "hidden_mib": round(hidden.nbytes / 2**20, 1)}
        for job in JOBS:
            r = measure(path, job)
            results[name][job] = {"peak_rss_mib": round(r["rss"], 1), "seconds": round(r["s"], 1),
                                  "passes": r["passes"], "rows": r["rows"]}
            results[name][job + "_matrix"] = r["m"]
    a, b = (np.array(results[k].pop("cka_matrix")) for k in ("x1", f"x{args.reps}"))
    results["cka_tiled_equals_original_max_abs_diff"] = float(np.abs(a - b).max())
    for k in ("x1", f"x{args.reps}"):
        results[k].pop("svcca_matrix")
    for job in JOBS:
        results[f"{job}_peak_rss_ratio"] = round(results[f"x{args.reps}"][job]["peak_rss_mib"] /
                                                 results["x1"][job]["peak_rss_mib"], 3)
    shutil.rmtree(big, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
