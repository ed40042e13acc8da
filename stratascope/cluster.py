"""Dask clusters for capture and analysis: a LocalCluster of N workers, or an existing scheduler."""

from __future__ import annotations

import contextlib

from .errors import ConfigError

# The cluster started here has no dashboard, so nothing reads the workers' statistical profile or
# the system monitor; both ran in every process all the time, and with the 20 ms event-loop tick
# an idle 2-worker cluster took 1.4 CPU s per 20 s, 0.5 without (benchmarks/README.md, scale):
# on a machine whose cores all run workers, that comes out of the capture.
QUIET = {"distributed.worker.profile.enabled": False, "distributed.admin.system-monitor.interval": "5s",
         "distributed.admin.tick.interval": "1s"}


@contextlib.contextmanager
def dask_client(workers: int | None = None, scheduler: str | None = None, gpu: bool = False):
    """Yield a distributed Client (None when neither is given: dask's local threads are used).

    While it is open, every dask computation (the analysis jobs) runs on that cluster.
    """
    if not workers and not scheduler:
        yield None
        return
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="15s")
        except (OSError, TimeoutError, ValueError) as e:
            raise ConfigError(f"--scheduler {scheduler}: no dask scheduler answered there ({e}); "
                              "check the address, or use --workers N for a local cluster") from e
        with client:
            yield client
        return
    import logging

    import dask

    # workers ignore Ctrl-C (worker_setup.py); on an interrupt this process stops them, quietly
    with dask.config.set(QUIET), _spawn_env(workers if gpu else 0):  # the workers are started when this returns
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                               resources={"GPU": 1} if gpu else None, silence_logs=logging.ERROR,
                               preload=["stratascope.worker_setup"])
    try:
        with Client(cluster) as client:
            yield client
    except KeyboardInterrupt:
        _quiet_close(cluster)
        raise
    cluster.close()


@contextlib.contextmanager
def _spawn_env(gpu_workers: int):
    """The environment the workers start in, given back afterwards: with GPUs, each worker's slice
    of them (worker_setup.py). distributed's nanny also sets OMP_NUM_THREADS=1 (and MKL's, ...) in
    this process to pass them on; left there, every later subprocess of this process would run
    torch with 1 thread."""
    import json
    import os

    from .worker_setup import WORKER_GPUS, gpu_slices

    before = dict(os.environ)
    if gpu_workers:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            gpus = [g.strip() for g in visible.split(",") if g.strip()]
        else:
            import torch

            gpus = [str(i) for i in range(torch.cuda.device_count())]
        os.environ[WORKER_GPUS] = json.dumps(gpu_slices(gpus, gpu_workers))
    try:
        yield
    finally:
        for key in set(os.environ) - set(before):
            del os.environ[key]
        os.environ.update(before)


def _quiet_close(cluster) -> None:
    """Stop the workers after an interrupt without distributed's log lines about cancelled tasks."""
    import logging

    for name in ("distributed", "distributed.worker", "distributed.nanny", "distributed.scheduler"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    with contextlib.suppress(Exception):
        cluster.close(timeout=10)


def check_scheduler(scheduler: str) -> None:
    """Fail before anything is written when the scheduler does not answer."""
    with dask_client(scheduler=scheduler):
        pass
