"""One-prompt lens calls: warm latency, and a fresh process's time to print one table.

    python benchmarks/one_prompt.py [--out /tmp/one-prompt-bench] [--repeats 7]

1. Captures SmolLM2 hidden states for the demo prompts (if the store is not there yet).
2. Warm: per call, median of --repeats, of layer_predictions (one row, one depth),
   rankings_watch (one row, every depth, two words), rank_of for one prompt, and rankings
   (every row of a prompt at every depth: rows x depths x vocab logits); beside each, the
   same rows through the corpus job's torch path (lens_tokens), measured alternately.
3. Cold: a fresh `python -c` that imports stratascope, opens the run and prints one
   layer_predictions table, against a fresh process that only imports the package's own
   dependencies (numpy, pandas, xarray, zarr, dask.array, tokenizers); best of 3 each, alternating.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import stratascope as ss
from stratascope.workflows.demo import demo_corpus

DEPS = "import numpy, pandas, xarray, zarr, dask.array, tokenizers"


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fresh(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                   cwd=Path(__file__).resolve().parents[1])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/one-prompt-bench")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    path = Path(args.out) / "h.zarr"
    if not path.exists():
        ss.capture(model="smollm2", corpus=demo_corpus(), out=str(path), capture="hidden", progress=False)
    run = ss.open_run(str(path))
    from stratascope.analyze.lens import lens_tokens

    run.layer_predictions(prompt=0)  # warm: the readout is read once per Run
    lens_tokens(run, [0], None, topk=1)
    rows = run.token_slice(1)
    calls = {
        "layer_predictions": (lambda: run.layer_predictions(prompt=1, position=-1),
                              lambda: lens_tokens(run, [rows.stop - 1], [30], topk=10)),
        "rankings_watch": (lambda: run.rankings_watch(prompt=1, watch=[" he", " she"]),
                           lambda: lens_tokens(run, [rows.stop - 1], None, watch=[" he", " she"], topk=1)),
        "rankings": (lambda: run.rankings(prompt=1), lambda: lens_tokens(run, rows, None, topk=1)),
    }
    out = {"prompt_tokens": rows.stop - rows.start, "depths": run.ds.sizes["depth"],
           "vocab": int(run.attrs["model"]["vocab_size"]), "warm_ms": {}}
    for name, (numpy_call, torch_call) in calls.items():
        a = [timed(numpy_call, 1) for _ in range(args.repeats)]
        b = [timed(torch_call, 1) for _ in range(args.repeats)]
        out["warm_ms"][name] = {"numpy_on_zarr": round(1000 * statistics.median(a), 1),
                                "torch_lens_tokens": round(1000 * statistics.median(b), 1)}
    batch = timed(lambda: run.rank_of(targets=[" the"] * run.n_prompts, position=-1), args.repeats)
    out["warm_ms"]["rank_of_per_prompt_batched"] = round(1000 * batch / run.n_prompts, 1)
    code = (f"import stratascope as ss; r = ss.open_run({str(path)!r}); "
            "print(r.layer_predictions(prompt=0, position=-1))")
    cold, deps = [], []
    for _ in range(3):
        cold.append(fresh(code))
        deps.append(fresh(DEPS))
    out["cold_s"] = {"open_and_print_layer_predictions": round(min(cold), 2),
                     "import_dependencies": round(min(deps), 2), "ratio": round(min(cold) / min(deps), 2)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
