"""Attention bytes on disk against the size of the unpadded attention.

Corpus: the demo prompts (short; --repeat copies of them) plus one prompt of exactly --long tokens. The key axis of
`attention` spans the longest sequence, so every short prompt's rows carry padding; this
script measures what that padding costs once stored.

unpadded = sum over prompts of len² × layers × heads × dtype bytes (the attention a prompt
has, causal zeros included); dense = rows × layers × heads × longest × dtype bytes (the
array's logical size). Bytes on disk: the sizes of the files under run.zarr/attention.

Run: PYTHONPATH=. .venv/bin/python benchmarks/attention_bytes.py [--layers 0-3] [--long 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

import stratascope as ss
from stratascope.workflows.demo import demo_corpus


def file_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def disk_usage(path: Path) -> int:
    """Allocated bytes (du): a small file still takes a whole block."""
    return int(subprocess.run(["du", "-sB1", str(path)], capture_output=True, text=True).stdout.split()[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="0-3")
    ap.add_argument("--long", type=int, default=2048, help="tokens of the one long prompt")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--repeat", type=int, default=100, help="copies of the 8 demo prompts")
    ap.add_argument("--out", default=None, help="folder for the store (default: a temporary one)")
    args = ap.parse_args()
    short = [json.loads(line)["text"] for line in open(demo_corpus())]
    words = " ".join(short * 400)  # far more than --long tokens; cut to exactly --long by --max-length
    prompts = short * args.repeat + [words]
    out = Path(args.out or tempfile.mkdtemp()) / "run.zarr"
    started = time.perf_counter()
    run = ss.capture(model="smollm2", prompts=prompts, out=str(out), capture=("attention",), layers=args.layers,
                      dtype=args.dtype, max_length=args.long, device="cpu", overwrite=True, progress=False)
    seconds = time.perf_counter() - started
    lengths = run.ds["n_tokens"].values.astype(np.int64)
    att = run.ds["attention"]
    _, n_layers, n_heads, width = att.shape
    item = np.dtype(args.dtype).itemsize
    unpadded = int((lengths ** 2).sum()) * n_layers * n_heads * item
    dense = int(att.shape[0]) * n_layers * n_heads * width * item
    stored = file_bytes(out / "attention")
    allocated = disk_usage(out / "attention")
    print(json.dumps({
        "config": {"model": "smollm2", "layers": args.layers, "heads": n_heads, "dtype": args.dtype,
                   "prompts": len(lengths), "repeat": args.repeat, "short_tokens": int(lengths[:-1].sum()), "long_tokens": int(lengths[-1]),
                   "key_width": int(width), "chunks": list(run.array("attention").chunks),
                   "shards": list(run.array("attention").shards or []), "cpu_count": os.cpu_count()},
        "unpadded_bytes": unpadded, "dense_bytes": dense, "stored_bytes": stored, "du_bytes": allocated,
        "stored_over_unpadded": round(stored / unpadded, 3), "dense_over_unpadded": round(dense / unpadded, 2),
        "files": sum(1 for f in (out / "attention").rglob("*") if f.is_file()), "capture_s": round(seconds, 1),
    }, indent=1))


if __name__ == "__main__":
    main()
