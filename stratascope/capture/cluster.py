"""Shards as tasks on a dask.distributed cluster: a LocalCluster, or an existing scheduler.

Each worker loads the model once and keeps it; each task captures one shard and writes
its rows straight into the store, then records the shard complete. GPU workers declare a
`GPU` resource and every task asks for one, so a GPU runs one shard at a time.
"""

from __future__ import annotations

import threading

import numpy as np
import zarr

_WORKER_STATE: dict = {}  # per worker process: the loaded model and vocabulary, by key
_LOCK = threading.Lock()


def _capturer(out: str, model: str, cfg, plan, ids_by_prompt: dict[int, list[int]]):
    from ..models import find_adapter, load_model
    from .runner import ShardCapturer

    key = (out, model, cfg.device, tuple(cfg.capture))
    with _LOCK:
        if key not in _WORKER_STATE:
            import torch
            from distributed import get_worker

            worker = get_worker()
            torch.set_num_threads(max(1, worker.state.nthreads))
            device = cfg.device
            if device in ("cuda", "auto") and torch.cuda.is_available():
                index = worker.name if isinstance(worker.name, int) else 0
                device = f"cuda:{index % torch.cuda.device_count()}"
            loaded = load_model(model, device=device, attn="eager" if "attention" in cfg.capture else "sdpa")
            vocab = zarr.open_group(out, mode="r")["readout/vocab_str"][:].astype(object)
            _WORKER_STATE[key] = (loaded, find_adapter(loaded.model), np.asarray(vocab, dtype=object))
        loaded, adapter, vocab = _WORKER_STATE[key]
    return ShardCapturer(loaded, adapter, cfg, plan, ids_by_prompt, vocab)


def capture_shard_task(out: str, model: str, cfg, plan, shard, ids_by_prompt: dict[int, list[int]]) -> int:
    """Runs on a worker: capture one shard, write it, record it complete. Returns its token count."""
    from .shards import write_shard

    stage = _capturer(out, model, cfg, plan, ids_by_prompt)(shard)
    write_shard(zarr.open_group(out, mode="r+"), shard, stage)
    return plan.shard_tokens(shard)


def run_on_cluster(out: str, model: str, cfg, plan, ids, todo, workers: int | None, scheduler: str | None,
                   progress: bool) -> None:
    from distributed import as_completed

    from ..cluster import dask_client
    from .runner import progress_bar

    gpu = cfg.device.startswith("cuda")
    with dask_client(workers, scheduler, gpu) as client, progress_bar(plan, todo, progress) as bar:
        shared_plan = client.scatter(plan, broadcast=True)  # sent once, not with every task
        # a shard carries only its own prompts' token ids
        futures = [client.submit(capture_shard_task, out, model, cfg, shared_plan, shard,
                                 {p: ids[p] for p in range(shard.lo, shard.hi)}, pure=False,
                                 resources={"GPU": 1} if gpu else None, key=f"stratascope-shard-{shard.index}")
                   for shard in todo]
        for future in as_completed(futures):
            bar.update(future.result())  # re-raises a task's error here
