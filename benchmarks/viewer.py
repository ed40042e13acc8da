"""Run from the repository root: PYTHONPATH=. python benchmarks/viewer.py

How fast the app opens a large store and answers its first views (run once, briefly).

Writes a synthetic capture of 1M tokens of a tiny config (prompts of 64 tokens, 2 layers, 2 heads;
attention written for the first rows), starts the app in a thread and times: opening the run and
building the app, the page, the first head-view slice, and a slice far into the store.
"""

from __future__ import annotations

import argparse
import http.client
import tempfile
import time
from pathlib import Path


def get(port: int, path: str) -> tuple[int, int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, len(body)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1_000_000)
    args = ap.parse_args()
    import stratascope as ss
    from stratascope.viewer.app import serve_in_thread
    from stratascope.viewer.synthetic import write_large_store

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "big.zarr")
        t = time.perf_counter()
        write_large_store(path, n_tokens=args.tokens)
        print(f"wrote {args.tokens} tokens in {time.perf_counter() - t:.2f} s")
        t0 = time.perf_counter()
        server, url = serve_in_thread(ss.open_run(path))
        port = server.server_address[1]
        t_open = time.perf_counter() - t0
        timings = {"open run + build app": t_open}
        for name, path_q in (("page /", "/"), ("first head view slice", "/api/attention?prompt=0&layer=0"),
                             ("same slice again", "/api/attention?prompt=0&layer=0"),
                             ("tokens of the last prompt", f"/api/tokens?prompt={args.tokens // 64 - 1}"),
                             ("attention far into the store", f"/api/attention?prompt={args.tokens // 128}&layer=1")):
            t = time.perf_counter()
            status, size = get(port, path_q)
            timings[name] = time.perf_counter() - t
            assert status == 200, (path_q, status)
        timings["first view answered (open + page + slice)"] = sum(
            timings[k] for k in ("open run + build app", "page /", "first head view slice"))
        server.shutdown()
        for name, seconds in timings.items():
            print(f"{name:<45}{seconds * 1000:9.0f} ms")


if __name__ == "__main__":
    main()
