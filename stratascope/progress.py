"""One kind of progress bar everywhere: tqdm (counts and rate) on stderr.

On a terminal it redraws twice a second; when stderr is a file, a pipe or a notebook it
writes a line at most once a minute (and the last one), never a stream of redraws. Work
done within two seconds shows no bar at all.
The plain tqdm class is used, not tqdm.auto, so notebooks without ipywidgets get no warning.
"""

from __future__ import annotations

import sys

from tqdm import tqdm as _tqdm


def _interactive() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class tqdm(_tqdm):
    def __init__(self, *args, **kwargs):
        tty = _interactive()
        kwargs.setdefault("file", sys.stderr)
        kwargs["mininterval"] = max(kwargs.get("mininterval", 0.5), 0.5) if tty else 60.0
        kwargs.setdefault("dynamic_ncols", tty)
        kwargs.setdefault("delay", 2.0)
        super().__init__(*args, **kwargs)


def dask_progress(enabled: bool, desc: str = "compute", delay: float = 2.0):
    """A progress bar of dask tasks (done / total, rate) around a local compute; a no-op context when
    disabled. (A dask.distributed cluster shows its progress on its dashboard.)"""
    import contextlib

    if not enabled:
        return contextlib.nullcontext()
    from tqdm.dask import TqdmCallback

    return TqdmCallback(tqdm_class=tqdm, desc=desc, unit="task", delay=delay)
