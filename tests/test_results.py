"""analysis/<job> results: an interrupted job neither replaces the earlier result nor is reused."""

import dask.array as da
import numpy as np
import pytest
import xarray as xr

import stratascope as ss
from conftest import PROMPTS
from stratascope.analyze.results import load_result, result_name, save_result


def _failing(block):
    raise RuntimeError("stopped")  # as if the job died while its chunks were being computed


def test_interrupted_result_is_never_reused_and_keeps_the_old_one(tiny_model_dirs, tmp_path):
    run = ss.capture(model=str(tiny_model_dirs["gpt2"]), prompts=PROMPTS, out=str(tmp_path / "r.zarr"),
                     capture="hidden", progress=False)
    good = xr.Dataset({"score": ("token", np.arange(run.n_tokens, dtype=np.float32))})
    save_result(run, "demo_job", good, {"k": 1})
    lazy = da.zeros(run.n_tokens, chunks=4, dtype=np.float32).map_blocks(_failing, dtype=np.float32)
    with pytest.raises(RuntimeError, match="stopped"):
        save_result(run, "demo_job", xr.Dataset({"score": ("token", lazy)}), {"k": 2})
    assert load_result(run, "demo_job", {"k": 2}) is None  # the half-written result is not taken
    kept = load_result(run, "demo_job", {"k": 1})
    np.testing.assert_array_equal(kept["score"].values, good["score"].values)
    redo = save_result(run, "demo_job", good * 2, {"k": 2})  # a rerun lands beside the first result
    np.testing.assert_array_equal(redo["score"].values, 2 * good["score"].values)
    np.testing.assert_array_equal(load_result(run, "demo_job", {"k": 1})["score"].values, good["score"].values)


def test_two_lens_results_live_side_by_side(tiny_model_dirs, tmp_path):
    """A lens with other depths lands beside the earlier one; both are reused; info lists them;
    the earlier values are unchanged; forget removes exactly one."""
    from click.testing import CliRunner

    from stratascope.cli import cli

    run = ss.capture(model=str(tiny_model_dirs["llama"]), prompts=PROMPTS, out=str(tmp_path / "r.zarr"),
                     capture="hidden", progress=False)
    full = run.lens(topk=3, progress=False)
    before = full["target_rank"].values.copy()
    part = run.lens(topk=3, depths="1-2", progress=False)
    assert [int(d) for d in part["depth"]] == [1, 2]
    assert len(run.results()) == 2 and {r["job"] for r in run.results()} == {"lens"}
    again = run.lens(topk=3, progress=False)  # reused, not recomputed
    assert again.attrs["created"] == full.attrs["created"]
    np.testing.assert_array_equal(again["target_rank"].values, before)
    np.testing.assert_array_equal(run.lens(topk=3, depths="1-2", progress=False)["target_rank"].values,
                                  before[:, 1:3])
    text = CliRunner().invoke(cli, ["info", run.path]).output
    names = [r["name"] for r in run.results()]
    assert all(f"lens/{n}" in text for n in names) and "depths=[1, 2]" in text
    out = CliRunner().invoke(cli, ["forget", run.path, f"lens/{names[0]}"])
    assert out.exit_code == 0 and [r["name"] for r in run.results()] == names[1:]
    bad = CliRunner().invoke(cli, ["forget", run.path, "lens/nope"])
    assert bad.exit_code == 1 and "has no analysis result lens/nope" in bad.output


def test_a_store_from_before_keyed_results_still_reads_and_is_adopted(tiny_model_dirs, tmp_path):
    """A result at analysis/<job> itself (the first layout) is read, and moved under its name
    when the job writes again; its values are unchanged."""
    import shutil

    import zarr

    run = ss.capture(model=str(tiny_model_dirs["gpt2"]), prompts=PROMPTS, out=str(tmp_path / "r.zarr"),
                     capture="hidden", progress=False)
    good = xr.Dataset({"score": ("token", np.arange(run.n_tokens, dtype=np.float32))})
    save_result(run, "demo_job", good, {"k": 1})
    name = list(zarr.open_group(run.path, path="analysis/demo_job", mode="r", use_consolidated=False).group_keys())[0]
    base = tmp_path / "r.zarr" / "analysis" / "demo_job"
    shutil.move(str(base / name), str(tmp_path / "aside"))  # lay it out as the first schema did
    shutil.rmtree(base)
    shutil.move(str(tmp_path / "aside"), str(base))
    np.testing.assert_array_equal(load_result(run, "demo_job", {"k": 1})["score"].values, good["score"].values)
    save_result(run, "demo_job", good * 3, {"k": 2})
    assert sorted(zarr.open_group(run.path, path="analysis/demo_job", mode="r",
                                  use_consolidated=False).group_keys()) == sorted([name, result_name({"k": 2})])
    np.testing.assert_array_equal(load_result(run, "demo_job", {"k": 1})["score"].values, good["score"].values)


def test_leftovers_of_a_dead_job_are_cleaned(tiny_model_dirs, tmp_path):
    import socket
    import subprocess
    import sys

    import zarr

    run = ss.capture(model=str(tiny_model_dirs["gpt2"]), prompts=PROMPTS, out=str(tmp_path / "r.zarr"),
                     capture="hidden", progress=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    leftover = f"analysis/_staging/abc__{pid}__{socket.gethostname()}__demo_job"
    zarr.open_group(run.path, path=leftover, mode="w")
    save_result(run, "demo_job", xr.Dataset({"score": ("token", np.zeros(run.n_tokens, np.float32))}), {"k": 1})
    staging = zarr.open_group(run.path, path="analysis/_staging", mode="r", use_consolidated=False)
    assert list(staging.group_keys()) == []


def test_kill_at_any_moment_of_a_job_leaves_the_earlier_result_intact(tiny_model_dirs, tmp_path):
    """kill -9 a lens job at many moments (computing, writing, moving into place): the earlier
    result still reads the same, the killed one is either absent or complete, and the next run
    cleans the leftovers and finishes."""
    import signal
    import subprocess
    import sys
    import time

    run = ss.capture(model=str(tiny_model_dirs["llama"]), prompts=PROMPTS * 30, out=str(tmp_path / "r.zarr"),
                     capture="hidden", progress=False)
    first = run.lens(topk=2, progress=False)
    expected = first["topk_ids"].values.copy()
    code = f"import stratascope as ss; ss.open_run({run.path!r}).lens(topk=5, progress=False)"
    for delay in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        again = ss.open_run(run.path)
        np.testing.assert_array_equal(again.lens(topk=2, progress=False)["topk_ids"].values, expected)
        from stratascope.analyze.lens import lens_params

        done = load_result(again, "lens", lens_params(again, topk=5))
        if done is not None:  # it got into place before the kill: then it is whole
            assert done.sizes["k"] == 5 and (done["topk_ids"].values >= 0).any()
    finished = ss.open_run(run.path).lens(topk=5, progress=False)
    assert finished.sizes["k"] == 5
    staging = tmp_path / "r.zarr" / "analysis" / "_staging"
    assert not staging.exists() or not [p for p in staging.iterdir() if p.is_dir()]
