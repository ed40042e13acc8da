"""Dask clusters for capture and analysis: a LocalCluster of N workers, or an existing scheduler."""

from __future__ import annotations

import contextlib

from .errors import ConfigError


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
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      resources={"GPU": 1} if gpu else None) as cluster, Client(cluster) as client:
        yield client


def check_scheduler(scheduler: str) -> None:
    """Fail before anything is written when the scheduler does not answer."""
    with dask_client(scheduler=scheduler):
        pass
