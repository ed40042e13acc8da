"""Attribution throughput: targets/s with batched backward passes vs one backward per target.

Same model, prompts, generated tokens and targets for both; the two results are checked to
agree before the ratio is reported. Run from the repository root:

    python benchmarks/attribution.py [--model smollm2] [--prompts 8] [--generate 5]
        [--method grad_x_input] [--ig-steps 8] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stratascope.capture.corpus import read_corpus
from stratascope.capture.generate import GenerationConfig, generate_batch
from stratascope.capture.gradients import GradientConfig, attribute, target_positions
from stratascope.models import load_model
from stratascope.workflows.demo import demo_corpus


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--generate", type=int, default=5)
    ap.add_argument("--method", default="grad_x_input")
    ap.add_argument("--ig-steps", type=int, default=8)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    loaded = load_model(args.model, device=args.device)
    model, device = loaded.model, next(loaded.model.parameters()).device
    texts = read_corpus(demo_corpus()).texts[:args.prompts]
    prompts = [loaded.tokenizer(t)["input_ids"] for t in texts]
    new = generate_batch(model, prompts, GenerationConfig(args.generate), device)
    seqs = [p + g for p, g in zip(prompts, new)]
    targets = [target_positions(len(s), args.generate, "generated") for s in seqs]
    cfg = GradientConfig((args.method,), False, "generated", args.ig_steps, "gausslegendre")
    n_targets = sum(len(t) for t in targets)

    def timed(max_rows):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = attribute(model, seqs, targets, cfg, device, max_rows=max_rows)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    attribute(model, seqs[:1], targets[:1], cfg, device)  # warm-up
    batched, t_batched = timed(None)
    single, t_single = timed(1)
    name = f"attribution_{args.method}"
    for a, b in zip(batched[name], single[name]):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
    result = {"model": args.model, "device": str(device), "threads": torch.get_num_threads(), "method": args.method,
              "ig_steps": args.ig_steps if args.method == "integrated_gradients" else None,
              "prompts": len(seqs), "targets": n_targets, "tokens": sum(map(len, seqs)),
              "batched_targets_per_s": n_targets / t_batched, "single_targets_per_s": n_targets / t_single,
              "speedup": t_single / t_batched}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
