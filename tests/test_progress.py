"""One progress style: when stderr is not a terminal, a bar writes a line at most once a minute."""

from __future__ import annotations

import io
import sys

import dask.array as da

from stratascope.progress import dask_progress, tqdm


def test_bar_into_a_file_writes_a_few_lines_not_a_stream(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with tqdm(total=20000, desc="capture", unit="tok", delay=0) as bar:
        for _ in range(20000):
            bar.update(1)
    lines = [x for x in err.getvalue().replace("\r", "\n").splitlines() if x.strip()]
    assert 1 <= len(lines) <= 3, lines
    assert "20000/20000" in lines[-1] and "tok/s" in lines[-1]


def test_short_work_shows_no_bar(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with tqdm(total=10, desc="quick") as bar:
        bar.update(10)
    assert err.getvalue() == ""


def test_dask_progress_counts_tasks_quietly_into_a_file(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with dask_progress(True, "lens", delay=0):
        assert float(da.ones(1000, chunks=1).sum().compute(scheduler="sync")) == 1000
    text = err.getvalue()
    assert "Completed" not in text and "lens" in text and len(text) < 2000
    with dask_progress(False):
        da.ones(10, chunks=1).sum().compute(scheduler="sync")
    assert err.getvalue() == text
