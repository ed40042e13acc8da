"""Shards as tasks on a dask.distributed cluster: a LocalCluster, or an existing scheduler.

Each worker loads the model once and keeps it; each task captures one shard and writes
its rows straight into the store, then records the shard complete. GPU workers declare a
`GPU` resource and every task asks for one, so a worker runs one shard at a time on the GPUs
it owns (a LocalCluster gives each worker its own slice of the GPUs; cluster.py).
"""

from __future__ import annotations

import threading
import uuid

import numpy as np
import zarr

from ..caching import LRU
from .buffers import StageBuffers
from .memory import keep_freed_memory

_MODELS = LRU(1)  # per worker process: the loaded model, kept across shards and captures
_LOADING = threading.Lock()  # one load at a time, so a worker never holds two models
_BUFFERS = LRU(1)  # per worker process: the staging arrays, reused from shard to shard (buffers.py)


def _capturer(capturer_cls, model: str, weights: str, cfg, plan, ids_by_prompt: dict[int, list[int]],
              vocab: np.ndarray):
    """A capturer_cls (runner.ShardCapturer) around this worker's copy of the model, loaded once per weights."""
    from ..models import find_adapter, load_model

    key = (model, weights, cfg.device, cfg.attn_implementation, cfg.model_dtype, str(cfg.device_map),
           str(cfg.max_memory))

    def load():
        _MODELS.clear()  # a new model replaces the last: free it before loading
        # a LocalCluster worker sees only its own GPUs (CUDA_VISIBLE_DEVICES, worker_setup.py): 'cuda' is its first
        loaded = load_model(model, device=cfg.device, attn=cfg.attn_implementation, dtype=cfg.model_dtype,
                            device_map=cfg.device_map, max_memory=cfg.max_memory)
        return loaded, find_adapter(loaded.model)

    with _LOADING:
        loaded, adapter = _MODELS.get(key, load)
        made = StageBuffers.for_plan(plan, capturer_cls.ARRAYS)  # allocates nothing until a take
        buffers = _BUFFERS.get(repr((made.shapes, made.dtypes)), lambda: made)
    return capturer_cls(loaded, adapter, cfg, plan, ids_by_prompt, vocab, buffers)


def capture_shard_task(capturer_cls, out: str, model: str, weights: str, cfg, plan, shard,
                       ids_by_prompt: dict[int, list[int]], vocab: np.ndarray) -> int:
    """Runs on a worker: capture one shard, write it, record it complete. Returns its token count."""
    import torch

    from .durable import open_for_writing
    from .shards import write_shard

    # the capture's thread count (capture/numerics.py), not the worker's: every shard is computed alike
    torch.set_num_threads(cfg.threads)
    keep_freed_memory()
    capturer = _capturer(capturer_cls, model, weights, cfg, plan, ids_by_prompt, vocab)
    stage = capturer(shard)
    write_shard(zarr.open_group(open_for_writing(out), mode="r+"), shard, stage)
    capturer.buffers.give(stage)
    return plan.shard_tokens(shard)


def run_on_cluster(capturer_cls, out: str, model: str, weights: str, cfg, plan, ids, vocab: np.ndarray, todo,
                   workers: int | None, scheduler: str | None, on_shard) -> None:
    """Capture the shards `todo` on the cluster; on_shard(tokens) is called as each completes."""
    from distributed import as_completed

    from ..cluster import dask_client
    from ..devices import resolve_device

    gpu = resolve_device(cfg.device).type == "cuda"
    with dask_client(workers, scheduler, gpu) as client:
        # plan and vocabulary are sent once, not with every task; a shard carries only its own prompts' ids
        shared_plan, shared_vocab = client.scatter([plan, vocab], broadcast=True)
        run_id = uuid.uuid4().hex[:8]  # task keys unique per capture, also on a shared cluster
        futures = [client.submit(capture_shard_task, capturer_cls, out, model, weights, cfg, shared_plan, shard,
                                 {p: ids[p] for p in range(shard.lo, shard.hi)}, shared_vocab, pure=False,
                                 resources={"GPU": 1} if gpu else None, key=f"stratascope-{run_id}-shard-{shard.index}")
                   for shard in todo]
        for future in as_completed(futures):
            on_shard(future.result())  # re-raises a task's error here
