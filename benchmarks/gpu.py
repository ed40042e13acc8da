"""The GPU path: SmolLM2 in bfloat16 on CUDA, captured, against a bare forward, the disk and the CPU.

Measured in one process, on one GPU:
- capture tokens/s (hidden + mlp with sdpa attention; hidden + attention + mlp with eager
  attention; float16 storage) ÷ bare forward tokens/s (the same model, dtype, batches and
  attention kind, output_hidden_states=True, nothing stored), best of --repeats, interleaved;
- the bytes the capture wrote per second ÷ the disk's write bandwidth (the same number of
  bytes written in 8 MiB blocks and fsynced, like `dd bs=8M conv=fsync`, beside the store);
- attribution (grad_x_input, float32: gradients are float32 only) targets/s on the GPU ÷ on the
  CPU (benchmarks/attribution.py on each device).

Run from the repository root on a machine with CUDA (it refuses without):

    python benchmarks/gpu.py [--prompts 2048] [--batch-size 64] [--repeats 3] [--out DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import attribution
from benchmarks_corpus import corpus, padded_batch

import stratascope as ss
from stratascope.capture.runner import _batches, tokenize
from stratascope.models import load_model


def bare_forward(model, ids, lengths, batch_size, device) -> float:
    """Tokens/s of a plain forward over the same length-bucketed batches, nothing kept."""
    tokens = 0
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in _batches(lengths, 0, len(lengths), batch_size):
            input_ids, mask = padded_batch(ids, lengths, batch)
            model(input_ids=input_ids.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                  use_cache=False)
            tokens += int(lengths[batch].sum())
    torch.cuda.synchronize()
    return tokens / (time.perf_counter() - start)


def disk_write_bandwidth(directory: Path, nbytes: int) -> float:
    """Bytes/s writing nbytes of incompressible data in 8 MiB blocks, fsynced (dd bs=8M conv=fsync)."""
    block = np.random.default_rng(0).integers(0, 256, 8 * 2**20, dtype=np.uint8).tobytes()
    path = directory / "dd.bin"
    start = time.perf_counter()
    with open(path, "wb") as f:
        written = 0
        while written < nbytes:
            f.write(block)
            written += len(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return written / seconds


def store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attribution-prompts", type=int, default=8)
    ap.add_argument("--out", default=None, help="directory for the stores (default: a temporary one)")
    ap.add_argument("--json", default=None, help="also write the result to this file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py measures the CUDA path and this machine has no CUDA device "
                 f"(torch {torch.__version__}); run it on a GPU machine with a CUDA build of torch")
    device = torch.device("cuda:0")
    dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    texts = corpus(args.prompts)
    tmp = Path(args.out) if args.out else Path(tempfile.mkdtemp())
    tmp.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "model_dtype": dtype, "storage_dtype": "float16", "prompts": len(texts), "batch_size": args.batch_size}
    try:
        for label, capture, attn in (("hidden_mlp", ("hidden", "mlp"), "sdpa"),
                                     ("hidden_attention_mlp", ("hidden", "attention", "mlp"), "eager")):
            loaded = load_model(args.model, device="cuda", attn=attn, dtype=dtype)
            ids, _ = tokenize(loaded.tokenizer, texts, 512)
            lengths = np.array([len(s) for s in ids])
            bare_forward(loaded.model, ids[:64], lengths[:64], args.batch_size, device)  # warm-up
            bare, cap, seconds = [], [], []
            for _ in range(args.repeats):  # interleaved, best of each
                bare.append(bare_forward(loaded.model, ids, lengths, args.batch_size, device))
                out = tmp / f"{label}.zarr"
                start = time.perf_counter()
                run = ss.capture(model=args.model, prompts=texts, out=str(out), overwrite=True, capture=capture,
                                 dtype="float16", model_dtype=dtype, batch_size=args.batch_size, device="cuda",
                                 progress=False)
                seconds.append(time.perf_counter() - start)
                cap.append(run.attrs["timing"]["tokens_per_s"])
            del loaded
            torch.cuda.empty_cache()
            written = store_bytes(out)
            disk = disk_write_bandwidth(tmp, written)
            steady = run.attrs["timing"]["seconds"]
            result[label] = {
                "tokens": int(lengths.sum()), "attn_implementation": attn,
                "bare_tokens_per_s": max(bare), "capture_tokens_per_s": max(cap), "ratio": max(cap) / max(bare),
                "end_to_end_tokens_per_s": int(lengths.sum()) / min(seconds),
                "store_bytes": written, "capture_write_bytes_per_s": written / steady,
                "disk_write_bytes_per_s": disk, "share_of_disk_bandwidth": written / steady / disk}
        gpu = attribution.main(["--model", args.model, "--prompts", str(args.attribution_prompts), "--device", "cuda"])
        cpu = attribution.main(["--model", args.model, "--prompts", str(args.attribution_prompts), "--device", "cpu"])
        result["attribution"] = {"method": gpu["method"], "targets": gpu["targets"],
                                 "gpu_targets_per_s": gpu["batched_targets_per_s"],
                                 "cpu_targets_per_s": cpu["batched_targets_per_s"], "cpu_threads": cpu["threads"],
                                 "speedup": gpu["batched_targets_per_s"] / cpu["batched_targets_per_s"]}
    finally:
        if not args.out:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
