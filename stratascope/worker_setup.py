"""Run by dask in each LocalCluster worker process as it starts (a dask preload).

Ctrl-C in a terminal reaches every process of the command, workers included; a worker that
takes it dies with a screen of tracebacks. Workers therefore ignore SIGINT: the command that
owns them takes the interrupt and stops the cluster (cluster.py), which ends the workers.

GPU workers each own a slice of the machine's GPUs: the command puts the slices in
STRATASCOPE_WORKER_GPUS (cluster.py) and each worker sets CUDA_VISIBLE_DEVICES to its own
before torch starts CUDA, so `cuda` and `--device-map auto` in a worker mean its GPUs only.
"""

import json
import os
import signal

WORKER_GPUS = "STRATASCOPE_WORKER_GPUS"


def gpu_slices(gpus: list[str], n_workers: int) -> list[str]:
    """CUDA_VISIBLE_DEVICES of each worker: the GPUs split into equal whole slices (a remainder
    stays unused), or, with more workers than GPUs, one GPU each, shared round robin."""
    if not gpus:
        return [""] * n_workers
    if n_workers >= len(gpus):
        return [gpus[i % len(gpus)] for i in range(n_workers)]
    per = len(gpus) // n_workers
    return [",".join(gpus[i * per:(i + 1) * per]) for i in range(n_workers)]


def dask_setup(worker=None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    slices = json.loads(os.environ.get(WORKER_GPUS) or "[]")
    name = getattr(worker, "name", None)
    if slices and isinstance(name, int):
        os.environ["CUDA_VISIBLE_DEVICES"] = slices[name % len(slices)]
