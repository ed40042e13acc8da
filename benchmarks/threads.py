"""What a fixed torch thread count costs: in-process capture tokens/s at --threads 1 against
torch's own count (this machine: 2), interleaved, best of --repeats, and whether the stored
bytes differ between the two.

Run: python benchmarks/threads.py [--prompts 96] [--repeats 3] [--model smollm2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmarks_corpus import corpus

import stratascope as ss


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    texts, own = corpus(args.prompts), torch.get_num_threads()
    tmp = Path(tempfile.mkdtemp())
    speed = {1: [], own: []}
    try:
        for _ in range(args.repeats):
            for n in speed:
                run = ss.capture(model=args.model, prompts=texts, out=str(tmp / f"t{n}.zarr"), overwrite=True,
                                 capture=("hidden", "attention", "mlp"), threads=n, device="cpu", progress=False)
                speed[n].append(run.attrs["timing"]["tokens_per_s"])
        same = all(np.array_equal(ss.open_run(tmp / "t1.zarr").ds[a].values,
                                  ss.open_run(tmp / f"t{own}.zarr").ds[a].values)
                   for a in ("hidden", "attention", "mlp"))
        result = {"model": args.model, "prompts": len(texts), "tokens": run.n_tokens, "torch": torch.__version__,
                  "own_threads": own, "tokens_per_s": {str(n): max(v) for n, v in speed.items()},
                  "one_thread_over_own": max(speed[1]) / max(speed[own]), "bit_identical": same}
        print(json.dumps(result, indent=2))
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
