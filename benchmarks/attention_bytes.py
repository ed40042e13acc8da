"""Attention bytes on disk against the size of the unpadded attention.

Corpus: the demo prompts (short; --repeat copies of them) plus one prompt of exactly --long
tokens. The key axis of `attention` spans the longest sequence, so every short prompt's rows
carry padding; this script measures what that padding costs once stored.

unpadded = sum over prompts of len² × layers × heads × dtype bytes (the attention a prompt
has, causal zeros included); causal = the same over the keys a query sees (len·(len+1)/2);
dense = rows × layers × heads × longest × dtype bytes (the array's logical size). Bytes on
disk: the sizes of the files under run.zarr/attention ("short" counts only the chunks holding
short prompts' rows alone, against those prompts' unpadded size).

With --codecs the captured attention is also rewritten with Blosc lz4 (the codec before) and
Blosc zstd level 1 (now), alternately, best of 3: bytes and encode/decode seconds side by side.

Run: PYTHONPATH=. .venv/bin/python benchmarks/attention_bytes.py [--layers 0-3] [--long 2048] [--repeat 100]
     [--codecs]
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


def short_chunk_bytes(out: Path, chunk_rows: int, short_rows: int) -> tuple[int, int]:
    """(bytes, rows) of the attention chunks that hold only short prompts' rows."""
    n = short_rows // chunk_rows
    files = [out / "attention" / "c" / str(i) / "0" / "0" / "0" for i in range(n)]
    return sum(f.stat().st_size for f in files if f.exists()), n * chunk_rows


def codec_race(src, repeats: int = 3) -> dict:
    """Rewrite `src` (the attention array) with each codec, alternately; bytes and best seconds."""
    import shutil

    import zarr
    from zarr.codecs import BloscCodec, Crc32cCodec

    values = src[:]
    folder = Path(tempfile.mkdtemp())
    out = {}
    for _ in range(repeats):
        for cname, level in (("lz4", 5), ("zstd", 1)):
            path = folder / f"{cname}.zarr"
            shutil.rmtree(path, ignore_errors=True)
            array = zarr.open_group(str(path), mode="w").create_array(
                "a", shape=values.shape, chunks=src.chunks, dtype=values.dtype, fill_value=0,
                compressors=[BloscCodec(cname=cname, clevel=level, shuffle="shuffle"), Crc32cCodec()],
                config={"write_empty_chunks": True})
            started = time.perf_counter()
            array[:] = values
            write = time.perf_counter() - started
            started = time.perf_counter()
            array[:]
            read = time.perf_counter() - started
            best = out.setdefault(cname, {"bytes": file_bytes(path / "a"), "write_s": write, "read_s": read})
            best["write_s"], best["read_s"] = min(best["write_s"], write), min(best["read_s"], read)
    shutil.rmtree(folder, ignore_errors=True)
    return {k: {**v, "write_s": round(v["write_s"], 2), "read_s": round(v["read_s"], 2)} for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="0-3")
    ap.add_argument("--long", type=int, default=2048, help="tokens of the one long prompt")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--repeat", type=int, default=100, help="copies of the 8 demo prompts")
    ap.add_argument("--out", default=None, help="folder for the store (default: a temporary one)")
    ap.add_argument("--codecs", action="store_true", help="also race lz4 against zstd-1 on the captured attention")
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
    per_key = n_layers * n_heads * np.dtype(args.dtype).itemsize
    unpadded = int((lengths ** 2).sum()) * per_key
    causal = int((lengths * (lengths + 1) // 2).sum()) * per_key
    dense = int(att.shape[0]) * per_key * int(width)
    stored = file_bytes(out / "attention")
    chunks = list(run.array("attention").chunks)
    short_bytes, short_rows = short_chunk_bytes(out, chunks[0], int(lengths[:-1].sum()))
    ends = np.cumsum(lengths[:-1])  # the short prompts whose rows all lie in those chunks
    whole = lengths[:-1][ends <= short_rows]
    short_unpadded = int((whole ** 2).sum()) * per_key
    codec = run.array("attention").metadata.to_dict()["codecs"]
    race = codec_race(run.array("attention")) if args.codecs else None
    print(json.dumps({
        "config": {"model": "smollm2", "layers": args.layers, "heads": int(n_heads), "dtype": args.dtype,
                   "prompts": len(lengths), "repeat": args.repeat, "short_tokens": int(lengths[:-1].sum()),
                   "long_tokens": int(lengths[-1]), "key_width": int(width), "chunks": chunks,
                   "codec": [c.get("configuration", {}).get("cname", c["name"]) for c in codec],
                   "cpu_count": os.cpu_count()},
        "unpadded_bytes": unpadded, "causal_bytes": causal, "dense_bytes": dense, "stored_bytes": stored,
        "du_bytes": disk_usage(out / "attention"), "stored_over_unpadded": round(stored / unpadded, 3),
        "stored_over_causal": round(stored / causal, 3), "dense_over_unpadded": round(dense / unpadded, 2),
        "short_chunks": {"rows": short_rows, "stored_bytes": short_bytes, "unpadded_bytes": short_unpadded,
                         "stored_over_unpadded": round(short_bytes / max(1, short_unpadded), 2)},
        "files": sum(1 for f in (out / "attention").rglob("*") if f.is_file()), "capture_s": round(seconds, 1),
        **({"codecs": race} if race else {}),
    }, indent=1))


if __name__ == "__main__":
    main()
