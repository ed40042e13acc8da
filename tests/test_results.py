"""analysis/<job> results: an interrupted job neither replaces the earlier result nor is reused."""

import dask.array as da
import numpy as np
import pytest
import xarray as xr

import stratascope as ss
from conftest import PROMPTS
from stratascope.analyze.results import load_result, save_result


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
    redo = save_result(run, "demo_job", good * 2, {"k": 2})  # a rerun replaces it cleanly
    np.testing.assert_array_equal(redo["score"].values, 2 * good["score"].values)
    assert load_result(run, "demo_job", {"k": 1}) is None
