"""One writer at a time: a second capture or the same analysis at once gets one sentence naming
the holder; a lock left by a dead process is taken over; a result computed from an incomplete
store is not reused once the store has changed."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import stratascope as ss
from conftest import PROMPTS, fail_chunk_write
from stratascope.analyze.results import result_name
from stratascope.cli import cli
from stratascope.errors import StoreLockedError
from stratascope.locks import hold, lock_dir


def _capture_args(tiny_model_dirs, corpus, out, *extra):
    return ["capture", "--model", str(tiny_model_dirs["llama"]), "--corpus", str(corpus), "--out", str(out),
            "--capture", "hidden", "--device", "cpu", *extra]


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def test_second_capture_to_the_same_out_is_refused_naming_the_holder(tiny_model_dirs, corpus, tmp_path):
    out = tmp_path / "r.zarr"
    with hold(str(out), "capture"):
        result = CliRunner().invoke(cli, _capture_args(tiny_model_dirs, corpus, out))
    assert result.exit_code == 1 and "is being written by" in result.output and "pid " in result.output
    assert not out.exists() and not lock_dir(str(out)).exists()  # nothing half-made, the lock gone
    assert CliRunner().invoke(cli, _capture_args(tiny_model_dirs, corpus, out)).exit_code == 0


def test_overwrite_while_an_analysis_writes_is_refused(tiny_model_dirs, corpus, tmp_path):
    out = tmp_path / "r.zarr"
    assert CliRunner().invoke(cli, _capture_args(tiny_model_dirs, corpus, out)).exit_code == 0
    before = sorted(p.name for p in out.iterdir())
    with hold(str(out), "lens-0123456789"):
        result = CliRunner().invoke(cli, _capture_args(tiny_model_dirs, corpus, out, "--overwrite"))
    assert result.exit_code == 1 and "is being written by" in result.output
    assert sorted(p.name for p in out.iterdir()) == before


def test_the_same_analysis_twice_at_once_is_refused(tiny_model_dirs, tmp_path):
    run = ss.capture(model=str(tiny_model_dirs["llama"]), prompts=PROMPTS, out=str(tmp_path / "r.zarr"),
                     capture="hidden", progress=False)
    from stratascope.analyze.lens import lens_params

    name = result_name(lens_params(run, topk=2))
    with hold(run.path, f"lens-{name}"):
        with pytest.raises(StoreLockedError, match="is being written by"):
            run.lens(topk=2, progress=False)
        other = run.lens(topk=3, progress=False)  # other parameters: another result, another lock
    assert other.sizes["k"] == 3 and run.lens(topk=2, progress=False).sizes["k"] == 2


def test_a_dead_process_lock_is_taken_over(tiny_model_dirs, corpus, tmp_path):
    out = tmp_path / "r.zarr"
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    lock_dir(str(out)).mkdir(parents=True)
    (lock_dir(str(out)) / "capture.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead}))
    assert CliRunner().invoke(cli, _capture_args(tiny_model_dirs, corpus, out)).exit_code == 0


def test_result_of_an_incomplete_store_is_not_reused_once_it_changes(tiny_model_dirs, tmp_path, monkeypatch):

    out = tmp_path / "p.zarr"
    opts = dict(capture="hidden", batch_size=2, device="cpu", progress=False, shard_tokens=16)
    fail_chunk_write(monkeypatch, "hidden", 2, OSError("disk went away"))
    with pytest.raises(OSError):
        ss.capture(model=str(tiny_model_dirs["llama"]), prompts=PROMPTS, out=str(out), **opts)
    monkeypatch.undo()
    partial = ss.open_run(str(out), allow_incomplete=True)
    early = partial.lens(topk=2, progress=False)
    assert early.attrs["source"]["incomplete_shards_done"] >= 1
    done = ss.capture(model=str(tiny_model_dirs["llama"]), prompts=PROMPTS, out=str(out), resume=True, **opts)
    later = done.lens(topk=2, progress=False)
    assert later.attrs["created"] != early.attrs["created"]  # recomputed on the finished store
    assert np.isfinite(later["target_prob"].values[later["target_rank"].values > 0]).all()
