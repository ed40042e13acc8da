"""Capture throughput against a bare forward pass, measured in one process on the same batches.

steady ratio     = capture tokens/s (hidden + attention + mlp, float16, written to Zarr; the
                   capture's own timing: every shard computed, staged and written)
                   / bare forward tokens/s (the model with its LM head, output_hidden_states=True,
                   nothing stored; the capture's shards and length-bucketed batches)
end-to-end ratio = tokens / seconds of the whole ss.capture call (model load, store creation,
                   readout, consolidation included) / the same bare forward tokens/s

Each repeat runs the bare forward, the base-model forward (no LM head, as the capture runs it),
the capture and the bare forward again back to back; the ratios divide by the mean of the two
bare forwards around the capture, so a drift in the machine's speed (other tenants of the host)
hits both sides alike. Ratios are given per repeat.

Run: PYTHONPATH=. .venv/bin/python benchmarks/capture.py [--prompts 360] [--repeats 3] [--model smollm2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from benchmarks_corpus import corpus, padded_batch

import stratascope as ss
from stratascope.capture.config import CaptureConfig
from stratascope.capture.runner import _batches, make_plan, tokenize
from stratascope.models import find_adapter, load_model

CAPTURE = ("hidden", "attention", "mlp")


def cpu_seconds() -> float:
    """CPU seconds of this process, every thread (torch's, the writer's, zarr's)."""
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def bare_forward(model, ids, lengths, shards, batch_size) -> float:
    tokens, start = 0, time.perf_counter()
    with torch.inference_mode():
        for shard in shards:
            for batch in _batches(lengths, shard.lo, shard.hi, batch_size):
                input_ids, mask = padded_batch(ids, lengths, batch)
                model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
                tokens += int(lengths[batch].sum())
    return tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", type=int, default=360)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    texts = corpus(args.prompts)
    loaded = load_model(args.model, device="cpu")
    ids, _ = tokenize(loaded.tokenizer, texts, 512)
    lengths = np.array([len(s) for s in ids], dtype=np.int64)
    cfg = CaptureConfig(capture=CAPTURE, dtype="float16", batch_size=args.batch_size)
    plan = make_plan(find_adapter(loaded.model), cfg, lengths, 0)
    base = getattr(loaded.model, loaded.model.base_model_prefix)
    tmp = Path(tempfile.mkdtemp())
    rows = []
    try:
        ss.capture(model=args.model, prompts=texts[:8], out=str(tmp / "warm.zarr"), capture=CAPTURE,
                   dtype="float16", device="cpu", progress=False)  # imports and the model cache, once
        for _ in range(args.repeats):
            cpu = cpu_seconds()
            bare = bare_forward(loaded.model, ids, lengths, plan.shards, args.batch_size)
            bare_cpu, cpu = cpu_seconds() - cpu, cpu_seconds()
            bare_base = bare_forward(base, ids, lengths, plan.shards, args.batch_size)
            cpu, start = cpu_seconds(), time.perf_counter()
            run = ss.capture(model=args.model, prompts=texts, out=str(tmp / "b.zarr"), overwrite=True,
                             capture=CAPTURE, dtype="float16", batch_size=args.batch_size, device="cpu",
                             progress=False)
            e2e = run.n_tokens / (time.perf_counter() - start)
            capture_cpu = cpu_seconds() - cpu
            steady = run.attrs["timing"]["tokens_per_s"]
            bare_after = bare_forward(loaded.model, ids, lengths, plan.shards, args.batch_size)
            bare_before, bare = bare, (bare + bare_after) / 2
            rows.append({"bare_before": bare_before, "bare_after": bare_after, "bare": bare,
                         "bare_base_model": bare_base, "capture_steady": steady, "capture_e2e": e2e,
                         "steady_ratio": steady / bare, "e2e_ratio": e2e / bare,
                         "steady_ratio_vs_base_model": steady / bare_base,
                         "cpu_ratio_e2e": bare_cpu / capture_cpu, "loadavg_1min": os.getloadavg()[0]})
        stored = zarr.open_group(str(tmp / "b.zarr"), mode="r")
        raw = {n: stored[n].nbytes for n in CAPTURE}  # every stored row, padding rows included
        disk = {n: sum(f.stat().st_size for f in (tmp / "b.zarr" / n).rglob("*") if f.is_file()) for n in CAPTURE}
        span = {k: [round(min(r[k] for r in rows), 3), round(max(r[k] for r in rows), 3)]
                for k in ("steady_ratio", "e2e_ratio", "steady_ratio_vs_base_model", "cpu_ratio_e2e")}
        result = {"model": args.model, "prompts": len(texts), "tokens": int(lengths.sum()), "shards": len(plan.shards),
                  "torch_threads": torch.get_num_threads(), "loadavg": os.getloadavg(),
                  "repeats": [{k: round(v, 3) for k, v in r.items()} for r in rows], "ratio_range": span,
                  "bytes_per_token_uncompressed": sum(raw.values()) / run.n_tokens,
                  "bytes_per_token_on_disk": sum(disk.values()) / run.n_tokens,
                  "compression_ratio": {n: raw[n] / disk[n] for n in CAPTURE}}
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
