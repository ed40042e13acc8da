"""Run by dask in each LocalCluster worker process as it starts (a dask preload).

Ctrl-C in a terminal reaches every process of the command, workers included; a worker that
takes it dies with a screen of tracebacks. Workers therefore ignore SIGINT: the command that
owns them takes the interrupt and stops the cluster (cluster.py), which ends the workers.
"""

import signal


def dask_setup(worker=None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
