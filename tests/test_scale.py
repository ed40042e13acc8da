"""Sharded capture: the same store in-process and on 1 or 2 dask workers, resume after a kill,
completion records that never lie, refusal to resume something else, fsspec URLs."""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import zarr

import stratascope as ss
from conftest import PROMPTS, fail_chunk_write
from stratascope.errors import ResumeMismatchError

CORPUS = [f"{p} number {i}" for i in range(6) for p in PROMPTS]  # 36 prompts
ARRAYS = ("hidden", "attention", "mlp", "token_id", "position", "prompt_index", "is_generated", "token_str",
          "token_offset", "n_tokens")
OPTS = dict(batch_size=4, device="cpu", progress=False, shard_tokens=64)


def assert_same(a, b):
    for name in ARRAYS:
        assert np.array_equal(a.ds[name].values, b.ds[name].values), name


@pytest.fixture(scope="module")
def reference(tiny_model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    return ss.capture(model=str(tiny_model_dirs["llama"]), prompts=CORPUS, out=str(out), **OPTS)


def test_shards_align_to_chunks_and_pad_with_masked_rows(reference):
    run = reference
    chunk = run.attrs["capture"]["token_chunk"]
    assert run.attrs["capture"]["n_shards"] > 2
    prompt_index = run.ds.prompt_index.values
    masked = prompt_index < 0
    assert masked.any() and (run.ds.token_id.values[masked] == -1).all()
    assert not run.ds.hidden.values[masked].any()
    # each shard starts on a chunk boundary: a prompt that starts a shard follows padding or row 0
    starts = run.prompts.token_offset.values
    after_padding = [s for s in starts if s == 0 or masked[s - 1]]
    assert all(s % chunk == 0 for s in after_padding) and len(after_padding) > 2
    # every prompt's rows are its own tokens, contiguous
    for p, (o, n) in enumerate(zip(starts, run.prompts.n_tokens.values)):
        assert (prompt_index[o:o + n] == p).all()
    assert run.attrs["corpus"]["n_tokens"] == int((~masked).sum())


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_give_identical_store(reference, tiny_model_dirs, tmp_path, workers):
    before = dict(os.environ)
    run = ss.capture(model=str(tiny_model_dirs["llama"]), prompts=CORPUS, out=str(tmp_path / "w.zarr"),
                     workers=workers, **OPTS)
    assert_same(reference, run)
    # distributed's nanny sets OMP_NUM_THREADS=1 here for its workers; left set, later subprocesses
    # would run torch with another thread count than this process
    assert dict(os.environ) == before


def test_kill_then_resume_is_bit_identical(reference, tiny_model_dirs, tmp_path):
    out = tmp_path / "killed.zarr"
    script = textwrap.dedent(f"""
        import time, stratascope as ss
        from stratascope.capture import runner
        real = runner.ShardCapturer.__call__
        def slow(self, shard, on_batch=None):
            time.sleep(0.3)  # time for the parent to kill us mid-run
            return real(self, shard, on_batch)
        runner.ShardCapturer.__call__ = slow
        ss.capture(model={str(tiny_model_dirs['llama'])!r}, prompts={CORPUS!r}, out={str(out)!r},
                   batch_size=4, device="cpu", progress=False, shard_tokens=64)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=os.getcwd())
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                done = zarr.open_group(str(out), mode="r")["shard_complete"][:]
                if done.sum() >= 2:
                    break
            except Exception:  # not created yet
                pass
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    done = zarr.open_group(str(out), mode="r")["shard_complete"][:]
    assert 2 <= done.sum() < len(done), "the kill must land mid-capture"
    with pytest.raises(Exception, match="did not finish"):
        ss.open_run(out)
    resumed = ss.capture(model=str(tiny_model_dirs["llama"]), prompts=CORPUS, out=str(out), resume=True, **OPTS)
    assert resumed.attrs["complete"] is True
    assert_same(reference, resumed)


def test_failed_shard_write_is_never_recorded_complete(tiny_model_dirs, tmp_path, monkeypatch):
    from stratascope.capture import shards

    # the second shard's mlp chunk dies, after its hidden rows are written
    fail_chunk_write(monkeypatch, "mlp", 2, OSError("disk went away"))
    out = tmp_path / "fail.zarr"
    with pytest.raises(OSError, match="disk went away"):
        ss.capture(model=str(tiny_model_dirs["llama"]), prompts=CORPUS, out=str(out), **OPTS)
    monkeypatch.undo()
    done = zarr.open_group(str(out), mode="r")["shard_complete"][:]
    assert done[0] and not done[1:].any()
    assert shards.completed(zarr.open_group(str(out), mode="r")).sum() == 1
    from click.testing import CliRunner

    from stratascope.cli import cli

    info = CliRunner().invoke(cli, ["info", str(out)])  # an incomplete store is shown, with the way on
    assert info.exit_code == 0 and f"1 of {done.size} shards complete" in info.output and "--resume" in info.output


def test_resume_with_other_corpus_is_refused_and_changes_nothing(reference, tiny_model_dirs, tmp_path):
    import shutil

    out = tmp_path / "copy.zarr"
    shutil.copytree(reference.path, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for changed, said in ((dict(prompts=CORPUS[:-1]), "the corpus differ"),
                          (dict(prompts=CORPUS, layers="0-1"), "--layers was None, now '0-1'")):
        kwargs = {**OPTS, **changed}
        with pytest.raises(ResumeMismatchError, match=re.escape(said)):
            ss.capture(model=str(tiny_model_dirs["llama"]), out=str(out), resume=True, **kwargs)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert before == after


def test_memory_url_and_zarr_sharding_codec(reference, tiny_model_dirs):
    run = ss.capture(model=str(tiny_model_dirs["llama"]), prompts=CORPUS, out="memory://scale/run.zarr",
                     zarr_shards=True, **OPTS)
    reopened = ss.open_run("memory://scale/run.zarr")
    assert reopened.attrs["capture"]["zarr_shard_rows"] == 64
    codecs = zarr.open_group("memory://scale/run.zarr", mode="r")["hidden"].metadata.codecs
    assert type(codecs[0]).__name__ == "ShardingCodec"
    for name in ("hidden", "attention", "mlp", "token_id"):  # same values; layout padding may differ
        ref = reference.ds[name].values[reference.ds.prompt_index.values >= 0]
        got = reopened.ds[name].values[reopened.ds.prompt_index.values >= 0]
        assert np.array_equal(ref, got), name
    assert run.info()["bytes_on_disk"] > 0


def test_analysis_on_a_local_cluster_matches_in_process(reference, tmp_path):
    """`--workers` runs an analysis job's dask graph on a LocalCluster; the result is the same."""
    import shutil

    from click.testing import CliRunner

    from stratascope.cli import cli

    out = tmp_path / "an.zarr"
    shutil.copytree(reference.path, out)
    args = ["nmf", str(out), "--factors", "2", "--iterations", "3", "--layers", "0-1"]
    local = CliRunner().invoke(cli, args)
    assert local.exit_code == 0, local.output
    first = ss.open_run(out).nmf(factors=2, iterations=3, layers=[0, 1]).token_factor.values
    shutil.rmtree(out / "analysis")
    cluster = CliRunner().invoke(cli, args + ["--workers", "1"])
    assert cluster.exit_code == 0, cluster.output
    np.testing.assert_allclose(ss.open_run(out).nmf(factors=2, iterations=3, layers=[0, 1]).token_factor.values,
                               first, rtol=1e-5, atol=1e-6)


def test_lens_on_a_local_cluster_matches_in_process(reference, tmp_path):
    import shutil

    from click.testing import CliRunner

    from stratascope.cli import cli

    out = tmp_path / "lens.zarr"
    shutil.copytree(reference.path, out)
    local = ss.open_run(out).lens(topk=3, progress=False)
    expected = {name: local[name].values for name in ("topk_ids", "target_rank")}
    shutil.rmtree(out / "analysis")
    result = CliRunner().invoke(cli, ["lens", str(out), "--topk", "3", "--workers", "1"])
    assert result.exit_code == 0, result.output
    stored = ss.open_run(out).lens(topk=3, progress=False)
    for name, values in expected.items():
        np.testing.assert_array_equal(stored[name].values, values)


def test_the_local_cluster_runs_no_profiler_or_system_monitor_nothing_reads():
    """`--workers N` starts a cluster without a dashboard: its workers sample no statistical
    profile, and the system monitor and event-loop tick run seldom (stratascope/cluster.py)."""
    import dask

    from stratascope.cluster import dask_client

    def every(server):  # milliseconds between each of a dask server's periodic callbacks
        return {name: callback.callback_time for name, callback in server.periodic_callbacks.items()}

    with dask_client(workers=1) as client:
        (worker,) = client.run(lambda dask_worker: every(dask_worker)).values()
        scheduler = client.run_on_scheduler(lambda dask_scheduler: every(dask_scheduler))
    for server in (worker, scheduler):
        assert server["tick"] == 1000 and server["monitor"] == 5000
    assert not any(name.startswith("profile") for name in worker)
    assert dask.config.get("distributed.worker.profile.enabled") is True  # this process is left as it was
