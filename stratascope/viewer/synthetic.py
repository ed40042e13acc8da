"""Synthetic data for the viewer's tests and benchmarks, written straight into a store.

The lens and attribution writers lay their arrays out as the schema says (schemas.LENS, the
root attribution_<method> spec), so they stand in for the lens job and attribution capture.
`write_large_store` writes a whole capture-shaped store cheaply (attention is written for the first
rows only; the rest reads as the fill value), to check that the app opens large stores at once.
"""

from __future__ import annotations

import contextlib
import datetime

import numpy as np
import xarray as xr
import zarr

from ..schemas import ATTRIBUTION_PREFIX, LENS, VARIABLES, RootAttrs, consolidate, describe, root_spec


def write_lens(path: str, token_id: np.ndarray, prompt_index: np.ndarray, depths: list[int], k: int,
               vocab_size: int, watch: list[str], seed: int = 0) -> xr.Dataset:
    """An analysis/lens group laid out as the lens job writes it (random values): 1-based ranks, and
    target_id / target_rank -1, target_prob NaN on the last token of each prompt; returned for checks."""
    rng = np.random.default_rng(seed)
    n_tokens, D, W = len(token_id), len(depths), len(watch)
    ids = np.stack([rng.choice(vocab_size, size=k, replace=False) for _ in range(n_tokens * D)]).reshape(n_tokens, D, k)
    probs = np.sort(rng.dirichlet(np.full(4 * k, 0.3), size=(n_tokens, D))[..., :k], axis=-1)[..., ::-1]
    last = np.append(prompt_index[1:] != prompt_index[:-1], True)  # no next token in the same prompt
    target = np.where(last, -1, np.roll(token_id, -1)).astype(np.int32)
    ranks = rng.integers(1, vocab_size + 1, size=(n_tokens, D))
    ranks[last] = -1
    target_prob = rng.random((n_tokens, D)).astype(np.float32)
    target_prob[last] = np.nan
    values = {"topk_ids": ids, "topk_probs": probs, "target_rank": ranks, "target_prob": target_prob,
              "entropy": rng.random((n_tokens, D)), "kl_final": rng.random((n_tokens, D)),
              "watch_rank": rng.integers(1, vocab_size + 1, size=(n_tokens, D, W)),
              "watch_prob": rng.random((n_tokens, D, W)), "target_id": target,
              "depth": np.asarray(depths), "k": np.arange(k), "watch": np.asarray(watch, dtype=object),
              "watch_id": rng.choice(vocab_size, size=W, replace=False)}
    typed = {n: (LENS[n].dims, v if LENS[n].dtype == "str" else v.astype(LENS[n].dtype)) for n, v in values.items()}
    coords = [v.name for v in LENS.coords]
    ds = xr.Dataset({n: v for n, v in typed.items() if n not in coords}, coords={n: typed[n] for n in coords})
    ds.attrs.update({"job": LENS.job, "synthetic": True, "rank": "1-based", "params": {"synthetic": True}})
    describe(LENS, ds).to_zarr(path, group=f"{LENS.path}/synthetic", mode="w", zarr_format=3, consolidated=False)
    consolidate(path)
    return ds


def write_attribution(path: str, method: str, n_tokens: int, max_len: int, positions: np.ndarray,
                      targets: np.ndarray, seed: int = 0) -> np.ndarray:
    """A root array attribution_<method> (token, key) laid out as the capture writes it: on target rows
    (targets True) non-negative values on keys <= position and 0 after; other rows NaN."""
    rng = np.random.default_rng(seed)
    values = np.abs(rng.normal(size=(n_tokens, max_len))).astype(np.float32)
    values[np.arange(max_len)[None, :] > positions[:, None]] = 0
    values[~targets] = np.nan
    spec = VARIABLES[ATTRIBUTION_PREFIX + method]
    group = zarr.open_group(path, mode="r+", use_consolidated=False)
    arr = group.create_array(spec.name, shape=values.shape, chunks=values.shape, dtype=spec.dtype,
                             dimension_names=spec.dims, overwrite=True, fill_value=np.nan, attributes=spec.attrs())
    arr[:] = values
    consolidate(path)
    return values


def write_token_column(path: str, name: str, values: np.ndarray) -> None:
    """A (token,) array at the root, e.g. token_type_ids for sentence A/B."""
    spec = root_spec(name)
    group = zarr.open_group(path, mode="r+", use_consolidated=False)
    arr = group.create_array(name, shape=values.shape, chunks=values.shape, dtype=values.dtype,
                             dimension_names=("token",), overwrite=True, attributes=spec.attrs(name) if spec else {})
    arr[:] = values
    consolidate(path)


def write_large_store(path: str, n_tokens: int = 1_000_000, prompt_len: int = 64, n_layers: int = 2,
                      n_heads: int = 2, written_rows: int = 4096, chunk_rows: int = 65536) -> None:
    """A capture-shaped store of `n_tokens` tokens of a tiny config (prompts of `prompt_len` tokens)."""
    P = n_tokens // prompt_len
    n_tokens = P * prompt_len
    root = zarr.open_group(path, mode="w")
    root.attrs.update(RootAttrs(
        created=datetime.datetime.now(datetime.UTC).isoformat(), complete=True,
        model={"name": "synthetic-tiny", "family": "llama", "causal": True, "n_layers": n_layers,
               "n_heads": n_heads, "d_model": 8, "d_mlp": 16, "d_head": 4, "vocab_size": 256,
               "weights_sha256": "0" * 64, "class": "Synthetic"},
        capture={"arrays": ["attention"], "dtype": "float32", "layers": list(range(n_layers)), "depths": []},
        corpus={"sha256": "0" * 64, "n_prompts": P, "n_tokens": n_tokens, "max_len": prompt_len,
                "metadata_columns": []},
        software={}, extra={"synthetic": True}).to_dict())

    def array(name, shape, chunks=None):  # dtype, dims and attrs from the schema
        spec = VARIABLES[name]
        dtype = str if spec.dtype == "str" else (spec.dtype or "float32")
        return root.create_array(name, shape=shape, dtype=dtype, dimension_names=spec.dims,
                                 chunks=chunks or (min(chunk_rows, shape[0]),) + tuple(shape[1:]),
                                 attributes=spec.attrs())

    positions = np.tile(np.arange(prompt_len, dtype=np.int32), P)
    array("token_id", (n_tokens,))[:] = positions % 256
    array("position", (n_tokens,))[:] = positions
    array("prompt_index", (n_tokens,))[:] = np.repeat(np.arange(P, dtype=np.int32), prompt_len)
    array("is_generated", (n_tokens,))[:] = False
    words = np.array([f" w{i}" for i in range(256)], dtype=object)
    array("token_str", (n_tokens,))[:] = words[positions % 256]
    array("prompt_text", (P,))[:] = np.array([f"synthetic prompt {p}" for p in range(P)], dtype=object)
    array("token_offset", (P,))[:] = np.arange(P, dtype=np.int64) * prompt_len
    array("n_tokens", (P,))[:] = np.full(P, prompt_len, dtype=np.int32)
    array("layer", (n_layers,))[:] = np.arange(n_layers, dtype=np.int32)
    array("head", (n_heads,))[:] = np.arange(n_heads, dtype=np.int32)
    att = array("attention", (n_tokens, n_layers, n_heads, prompt_len), chunks=(4096, n_layers, n_heads, prompt_len))
    # Causal uniform attention on the first rows; the rest stays unwritten (reads as 0).
    rows = min(written_rows, n_tokens)
    pos = positions[:rows]
    block = (np.arange(prompt_len)[None, :] <= pos[:, None]) / (pos[:, None] + 1.0)
    att[:rows] = np.broadcast_to(block[:, None, None, :], (rows, n_layers, n_heads, prompt_len)).astype(np.float32)
    consolidate(path)


@contextlib.contextmanager
def comm_bytes():
    """What the kernel side of Jupyter widgets sends to the front end while the block runs: the yielded
    list gets one (message type, JSON bytes + binary buffer bytes) per comm message (the comm_open that
    carries a widget's whole state, state updates, custom messages). Works outside a kernel: every
    comm created meanwhile is a recording DummyComm."""
    import json

    import comm

    sent: list[tuple[str, int]] = []

    class Recording(comm.DummyComm):
        def publish_msg(self, msg_type, data=None, metadata=None, buffers=None, **keys):
            size = len(json.dumps(data or {}, separators=(",", ":")).encode())
            sent.append((msg_type, size + sum(len(memoryview(b).cast("B")) for b in buffers or [])))

    original = comm.create_comm
    comm.create_comm = lambda *args, **kwargs: Recording(*args, **kwargs)
    try:
        yield sent
    finally:
        comm.create_comm = original
