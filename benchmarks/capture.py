"""Capture throughput against a bare forward pass, measured in one process on the same batches.

ratio = capture tokens/s (hidden + attention + mlp, float16, written to Zarr)
        / bare forward tokens/s (output_hidden_states=True, nothing stored)

Run: .venv/bin/python benchmarks/capture.py [--prompts 96] [--repeats 3] [--model smollm2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from benchmarks_corpus import corpus

import stratascope as ss
from stratascope.capture.runner import _batches, tokenize
from stratascope.models import load_model


def bare_forward(model, ids, lengths, batch_size) -> float:
    tokens, start = 0, time.perf_counter()
    with torch.inference_mode():
        for batch in _batches(lengths, 0, len(lengths), batch_size):
            width = int(lengths[batch].max())
            input_ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for b, p in enumerate(batch):
                input_ids[b, : lengths[p]] = torch.tensor(ids[p])
                mask[b, : lengths[p]] = 1
            model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
            tokens += int(lengths[batch].sum())
    return tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    texts = corpus(args.prompts)
    loaded = load_model(args.model, device="cpu")
    ids, _ = tokenize(loaded.tokenizer, texts, 512)
    lengths = np.array([len(s) for s in ids])
    tmp = Path(tempfile.mkdtemp())
    bare, cap = [], []
    try:
        for _ in range(args.repeats):  # interleaved, best of each: the machine is noisy
            bare.append(bare_forward(loaded.model, ids, lengths, args.batch_size))
            run = ss.capture(model=args.model, prompts=texts, out=str(tmp / "b.zarr"), overwrite=True,
                             capture=("hidden", "attention", "mlp"), dtype="float16", batch_size=args.batch_size,
                             device="cpu", progress=False)
            cap.append(run.attrs["timing"]["tokens_per_s"])
        raw = sum(run.ds[n].nbytes for n in ("hidden", "attention", "mlp"))
        disk = sum(f.stat().st_size for n in ("hidden", "attention", "mlp") for f in (tmp / "b.zarr" / n).rglob("*")
                   if f.is_file())
        result = {"model": args.model, "prompts": len(texts), "tokens": int(lengths.sum()),
                  "torch_threads": torch.get_num_threads(),
                  "bare_tokens_per_s": max(bare), "capture_tokens_per_s": max(cap),
                  "ratio": max(cap) / max(bare),
                  "bytes_per_token_uncompressed": raw / run.n_tokens, "bytes_per_token_on_disk": disk / run.n_tokens,
                  "compression_ratio": raw / disk}
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
