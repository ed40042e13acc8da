"""Bytes per prompt on disk with and without `--positions last` (and `--pool mean`), demo corpus.

Captures SmolLM2 on the demo prompts (--repeat copies) with the default arrays (hidden,
attention, mlp) and with hidden,mlp, every row vs the last prompt token only. "Activations"
counts the files of the token-dimension arrays (the token table included); readout/ (the
unembedding, a fixed ~110 MiB whatever the corpus) is left out of the per-prompt figure.

Run: PYTHONPATH=. .venv/bin/python benchmarks/positions_bytes.py [--repeat 4] [--dtype float16]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import stratascope as ss
from stratascope.workflows.demo import demo_corpus


def activation_bytes(store: Path) -> int:
    skip = {"readout", "analysis"}
    return sum(f.stat().st_size for d in store.iterdir() if d.is_dir() and d.name not in skip
               for f in d.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=4, help="copies of the 8 demo prompts")
    ap.add_argument("--dtype", default="float16")
    args = ap.parse_args()
    prompts = [json.loads(line)["text"] for line in open(demo_corpus())] * args.repeat
    tmp = Path(tempfile.mkdtemp())
    results = []
    for capture in ("hidden,attention,mlp", "hidden,mlp"):
        row = {"capture": capture}
        for name, options in (("all", {}), ("last", {"positions": "last"}), ("mean", {"pool": "mean"})):
            if name == "mean" and "attention" in capture:
                continue
            out = tmp / f"{name}.zarr"
            run = ss.capture(model="smollm2", prompts=prompts, out=str(out), capture=capture, dtype=args.dtype,
                             device="cpu", overwrite=True, progress=False, **options)
            row[f"{name}_bytes_per_prompt"] = round(activation_bytes(out) / len(prompts))
            row[f"{name}_rows"] = run.n_tokens
        row["all_over_last"] = round(row["all_bytes_per_prompt"] / row["last_bytes_per_prompt"], 1)
        results.append(row)
    print(json.dumps({"model": "smollm2", "prompts": len(prompts), "dtype": args.dtype, "results": results},
                     indent=1))


if __name__ == "__main__":
    main()
