"""Run from the repository root: PYTHONPATH=. python benchmarks/widget.py

What a notebook widget of a large store sends to the front end, in bytes.

Writes a synthetic capture of 1M tokens of a tiny config (prompts of 64 tokens, 2 layers, 2 heads;
attention, 1 GiB as float32, written for the first rows), makes the head-view widget of prompt 3,
and counts what goes through its comms (stratascope.viewer.synthetic.comm_bytes): the comm_open
carrying the widget's state, the display message (with the static fallback page), and the kernel's
replies to the two requests a user makes by looking at layer 0 and then picking layer 1.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import tracemalloc
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1_000_000)
    args = ap.parse_args()
    import numpy as np
    import zarr

    import stratascope as ss
    import stratascope.viewer.widget  # anywidget and ipywidgets imported before memory is traced
    from stratascope.viewer.synthetic import comm_bytes, write_large_store

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "big.zarr")
        write_large_store(path, n_tokens=args.tokens)
        attention = int(np.prod(zarr.open_group(path, mode="r")["attention"].shape)) * 4
        tracemalloc.start()
        t = time.perf_counter()
        with comm_bytes() as sent:
            w = ss.open_run(path).view.head(prompt=3, layer=0)
            state = sum(b for _, b in sent)
            display = len(json.dumps(w._repr_mimebundle_()[0]).encode())
            replies = []
            for layer in (0, 1):
                before = sum(b for _, b in sent)
                params = {"prompt": 3, "layer": layer}
                ask = {"type": "get", "id": str(layer), "endpoint": "attention", "params": params}
                w._handle_msg({"content": {"data": {"method": "custom", "content": ask}}, "buffers": []})
                replies.append(sum(b for _, b in sent) - before)
        seconds = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    esm = len(w._esm.encode())
    total = state + display + sum(replies)
    print(f"store: {args.tokens:,} tokens, attention {attention / 2**30:.2f} GiB (float32)")
    print(f"widget state (comm_open, incl. Layout): {state:,} B, of which the ES module {esm:,} B")
    print(f"display message (widget + static fallback page): {display:,} B")
    print(f"replies: layer 0 {replies[0]:,} B, layer 1 {replies[1]:,} B")
    print(f"total {total:,} B = {total / attention:.2e} of the attention array; "
          f"{seconds:.2f} s; traced peak {peak / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
