"""Streaming NMF vs scikit-learn's in-memory NMF: time per iteration and peak RSS.

    python benchmarks/nmf.py [--tokens 8000] [--iterations 5] [--workdir /tmp/nmf-bench]

Writes synthetic stores of N and 10N tokens (2 layers x 1536 neurons, SmolLM2's MLP width,
non-negative rank-16 structure + noise), then measures each configuration in a fresh
process so peak RSS (ru_maxrss) belongs to that configuration alone:
  stratascope: run.nmf(factors=8), streaming over the store (one pass per iteration);
  scikit-learn: NMF(n_components=8, solver="cd", init="random") on the matrix loaded into RAM.
The RSS of the imports alone (torch, dask, sklearn) is reported as the baseline.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's stratascope

LAYERS, NEURONS, FACTORS = 2, 1536, 8


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_store(path: Path, n_tokens: int) -> None:
    import numpy as np

    from stratascope.testing import synthetic_mlp_store

    if path.exists():
        return
    basis = np.random.default_rng(0).exponential(size=(16, LAYERS * NEURONS)).astype(np.float32)

    def rows(start: int, stop: int):
        rng = np.random.default_rng(start)  # rows depend on their position only
        w = rng.exponential(size=(stop - start, 16)).astype(np.float32)
        return w @ basis + rng.standard_normal((stop - start, LAYERS * NEURONS), dtype=np.float32)

    synthetic_mlp_store(str(path), n_tokens, LAYERS, NEURONS, rows, chunk_rows=512)


def measure(kind: str, store: str, iterations: int) -> dict:
    """Runs in its own process."""
    import numpy as np

    import stratascope as ss
    import stratascope.analyze.nmf  # torch and dask count in the baseline of both

    if kind == "sklearn":
        from sklearn.decomposition import NMF
    base = peak_mib()
    run = ss.open_run(store)
    t0 = time.perf_counter()
    if kind == "stratascope":
        res = run.nmf(factors=FACTORS, layers=[0, 1], iterations=iterations, progress=False, recompute=True)
        err, load = float(res["relative_error"]), 0.0
        per_iteration = res.attrs["seconds_per_iteration"]  # median pass (the first one warms up)
    else:
        a = np.maximum(run.ds["mlp"].values.reshape(run.n_tokens, -1), 0)
        load = time.perf_counter() - t0
        model = NMF(n_components=FACTORS, solver="cd", init="random", max_iter=iterations, tol=0, random_state=0)
        w = model.fit_transform(a)
        err = float(np.linalg.norm(a - w @ model.components_) / np.linalg.norm(a))
    total = time.perf_counter() - t0
    per_iteration = per_iteration if kind == "stratascope" else (total - load) / iterations
    return {"kind": kind, "tokens": run.n_tokens, "seconds_per_iteration": per_iteration, "total_seconds": total,
            "load_seconds": load, "peak_rss_mib": peak_mib(), "import_rss_mib": base, "relative_error": err}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=8000)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--workdir", default="/tmp/nmf-bench")
    parser.add_argument("--one", nargs=2, metavar=("KIND", "STORE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], args.iterations)))
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for n in (args.tokens, 10 * args.tokens):
        store = work / f"mlp_{n}.zarr"
        make_store(store, n)
        for kind in ("stratascope", "sklearn"):
            out = subprocess.run([sys.executable, __file__, "--one", kind, str(store), "--iterations",
                                  str(args.iterations)], check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
            r = results[-1]
            print(f"{kind:<12} tokens {n:>7}  {r['seconds_per_iteration']:7.3f} s/iteration  "
                  f"peak RSS {r['peak_rss_mib']:7.0f} MiB (imports {r['import_rss_mib']:.0f})  "
                  f"relative error {r['relative_error']:.4f}" + (f"  (+{r['load_seconds']:.1f} s to load the matrix)"
                                                                  if r["load_seconds"] else ""), flush=True)
    by = {(r["kind"], r["tokens"]): r for r in results}
    small, big = args.tokens, 10 * args.tokens
    for kind in ("stratascope", "sklearn"):
        a, b = by[(kind, small)], by[(kind, big)]
        growth = (b['peak_rss_mib'] - b['import_rss_mib']) / max(1.0, a['peak_rss_mib'] - a['import_rss_mib'])
        print(f"{kind}: peak RSS above imports grows x{growth:.2f} "
              f"for x10 tokens")
    for n in (small, big):
        s, k = by[("stratascope", n)], by[("sklearn", n)]
        print(f"tokens {n}: time per iteration stratascope/sklearn = "
              f"{s['seconds_per_iteration'] / k['seconds_per_iteration']:.2f}, peak RSS above imports "
              f"stratascope/sklearn = "
              f"{(s['peak_rss_mib'] - s['import_rss_mib']) / (k['peak_rss_mib'] - k['import_rss_mib']):.2f}")


if __name__ == "__main__":
    main()
