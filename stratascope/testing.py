"""Synthetic stores written through the schema, for tests and benchmarks of analysis jobs.

No model is involved: the caller supplies the activations block by block, so a store of any
size can be written in bounded memory.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Callable

import numpy as np
import zarr

from .capture.writer import create_array
from .schemas import RootAttrs, consolidate


def synthetic_mlp_store(path: str, n_tokens: int, n_layers: int, d_mlp: int,
                        rows: Callable[[int, int], np.ndarray], *, prompt_len: int = 16, chunk_rows: int = 256,
                        masked: np.ndarray | None = None) -> str:
    """Write a store holding only an `mlp` array of shape (n_tokens, n_layers, d_mlp).

    `rows(start, stop)` returns the float32 activations of token rows start..stop-1. Prompts
    are consecutive runs of `prompt_len` tokens; rows where `masked` is true get
    prompt_index -1, like the padding rows of a sharded capture.
    """
    masked = np.zeros(n_tokens, dtype=bool) if masked is None else np.asarray(masked, dtype=bool)
    n_prompts = -(-n_tokens // prompt_len)
    root = zarr.open_group(path, mode="w")
    root.attrs.update(RootAttrs(
        stratascope_version="synthetic", created=datetime.datetime.now(datetime.UTC).isoformat(),
        model={"name": "synthetic", "source": "synthetic", "class": "none", "family": "none", "causal": True,
               "n_layers": n_layers, "n_heads": 1, "d_model": 1, "d_mlp": d_mlp, "d_head": 1, "vocab_size": 1,
               "weights_sha256": "synthetic"},
        capture={"arrays": ["mlp"], "dtype": "float32", "layers": list(range(n_layers)), "depths": [],
                 "token_chunk": chunk_rows},
        corpus={"source": "synthetic", "sha256": hashlib.sha256(f"{n_tokens}".encode()).hexdigest(),
                "n_prompts": n_prompts, "n_tokens": n_tokens, "max_len": prompt_len, "metadata_columns": []},
        software={}).to_dict())
    starts = np.arange(n_prompts, dtype=np.int64) * prompt_len
    lengths = np.minimum(prompt_len, n_tokens - starts).astype(np.int32)
    create_array(root, "prompt_text", (n_prompts,), n_prompts, "str")[:] = \
        np.array([f"prompt {p}" for p in range(n_prompts)], dtype=object)
    create_array(root, "token_offset", (n_prompts,), n_prompts, "int64")[:] = starts
    create_array(root, "n_tokens", (n_prompts,), n_prompts, "int32")[:] = lengths
    create_array(root, "layer", (n_layers,), n_layers, "int32")[:] = np.arange(n_layers, dtype=np.int32)
    tokens = np.arange(n_tokens)
    table = {"token_id": (tokens % 997).astype(np.int32), "position": (tokens % prompt_len).astype(np.int32),
             "prompt_index": np.where(masked, -1, tokens // prompt_len).astype(np.int32),
             "is_generated": np.zeros(n_tokens, dtype=bool),
             "token_str": np.array([f"t{i}" for i in tokens], dtype=object)}
    for name, values in table.items():
        dtype = "str" if name == "token_str" else str(values.dtype)
        create_array(root, name, (n_tokens,), chunk_rows, dtype)[:] = values
    mlp = create_array(root, "mlp", (n_tokens, n_layers, d_mlp), chunk_rows, "float32")
    for start in range(0, n_tokens, chunk_rows):
        stop = min(n_tokens, start + chunk_rows)
        mlp[start:stop] = np.asarray(rows(start, stop), dtype=np.float32).reshape(stop - start, n_layers, d_mlp)
    root.attrs["complete"] = True
    consolidate(path)
    return path


def tile_store(src: str, dst: str, reps: int) -> None:
    """A store `reps` times larger: the capture at `src` (token table, prompt table, hidden,
    metadata) repeated, prompts renumbered; analysis results are dropped."""
    import shutil

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    g = zarr.open_group(dst, mode="r+", use_consolidated=False)
    n, P = g["token_id"].shape[0], g["prompt_text"].shape[0]
    shift = {"prompt_index": P, "token_offset": n}
    for name in ("token_id", "position", "prompt_index", "is_generated", "token_str", "next_token_id",
                 "token_type_ids", "is_decoder", "hidden", "prompt_text", "token_offset", "n_tokens", "seq_len",
                 "n_source_tokens", *[k for k in g.array_keys() if k.startswith("meta_")]):
        if name not in g:
            continue
        old = g[name]
        values, spec = old[:], dict(chunks=old.chunks, dtype=old.dtype, fill_value=old.fill_value,
                                    dimension_names=old.metadata.dimension_names, compressors=old.compressors or None,
                                    attributes=dict(old.attrs))
        del g[name]
        new = g.create_array(name, shape=(len(values) * reps,) + values.shape[1:], **spec)
        for r in range(reps):
            new[r * len(values):(r + 1) * len(values)] = values + r * shift[name] if name in shift else values
    if "analysis" in g:
        del g["analysis"]
    g.attrs["corpus"] = {**g.attrs["corpus"], "n_prompts": P * reps, "n_tokens": n * reps}
    consolidate(dst)
