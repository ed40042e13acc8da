"""A store follows xarray's conventions: plain `xr.open_zarr` opens it (and its analysis groups)
silently from consolidated metadata, the token table are coordinates, every array is described;
stores of the first schema still open; results are checked against the schema."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

import stratascope as ss
from conftest import PROMPTS
from stratascope.errors import SchemaError
from stratascope.schemas import HEADS, TOKEN_COORDS, RootAttrs, check_group, upgrade_store

TOKEN_TABLE = ("token_id", "position", "prompt_index", "token_str", "is_generated")


@pytest.fixture(scope="module")
def run(tiny_model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("conventions") / "run.zarr"
    prompts = [{"text": t, "topic": f"t{i % 3}"} for i, t in enumerate(PROMPTS)]
    run = ss.capture(model=str(tiny_model_dirs["gpt2"]), prompts=prompts, out=str(out), device="cpu",
                     capture=("hidden", "attention"), batch_size=3, progress=False)
    run.heads(top=2)  # an analysis after the capture: consolidated metadata must follow it
    return run


def _open_strictly(path: str, group: str | None = None) -> dict:
    """Open with plain xarray in a fresh process, every warning an error; what it saw."""
    code = textwrap.dedent(f"""
        import json, warnings, xarray as xr
        warnings.simplefilter("error")
        ds = xr.open_zarr({path!r}, group={group!r})
        print(json.dumps({{"coords": sorted(map(str, ds.coords)), "data_vars": sorted(map(str, ds.data_vars)),
                           "indexes": sorted(map(str, ds.indexes)),
                           "attrs": {{str(n): dict(v.attrs) for n, v in ds.variables.items()}}}}))
    """)
    result = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_plain_xarray_opens_the_store_silently_with_the_token_table_as_coordinates(run):
    seen = _open_strictly(run.path)
    for name in TOKEN_TABLE:
        assert name in seen["coords"] and name not in seen["data_vars"]
    assert {"depth", "layer", "head"} <= set(seen["indexes"])
    assert "hidden" in seen["data_vars"] and "attention" in seen["data_vars"]
    g = zarr.open_group(run.path, mode="r", use_consolidated=False)
    assert seen["indexes"] and list(g["head"][:]) == list(range(g["attention"].shape[2]))
    for name, attrs in seen["attrs"].items():
        assert attrs.get("long_name") and attrs.get("description"), name
    assert seen["attrs"]["meta_topic"]["long_name"] == "topic"


def test_analysis_groups_open_silently_after_later_analyses(run):
    from stratascope.analyze.results import result_groups

    heads = result_groups(run, "heads")[0]  # analysis/heads/<name>
    seen = _open_strictly(run.path, heads)
    assert set(seen["data_vars"]) == set(HEADS.names())
    assert all(a.get("long_name") and a.get("description") for a in seen["attrs"].values())
    _open_strictly(run.path, "readout")
    run.lens(topk=2, progress=False)  # a second analysis: both groups (and the root) still open silently
    assert "topk_ids" in _open_strictly(run.path, result_groups(run, "lens")[0])["data_vars"]
    _open_strictly(run.path, heads)
    _open_strictly(run.path)


def test_token_table_coordinates_keep_every_reader_working(run):
    ds = xr.open_zarr(run.path)
    np.testing.assert_array_equal(run.ds.token_id.values, zarr.open_group(run.path, mode="r")["token_id"][:])
    assert ds.hidden.coords["token_id"].dims == ("token",)
    assert list(run.prompts["topic"]) == [f"t{i % 3}" for i in range(len(PROMPTS))]
    assert run.info()["arrays"].keys() == {"hidden", "attention"}
    assert list(run.tokens(0)["token_id"]) == list(ds.token_id.values[run.token_slice(0)])


def _first_schema_copy(src: str, dst: Path) -> str:
    """The store as the first schema wrote it: no coordinates attr, array descriptions, head array or
    consolidated metadata."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "zarr.json").read_text())
    meta.pop("consolidated_metadata", None)
    del meta["attributes"]["coordinates"]
    (dst / "zarr.json").write_text(json.dumps(meta))
    shutil.rmtree(dst / "head")
    for path in dst.rglob("zarr.json"):
        node = json.loads(path.read_text())
        node.get("attributes", {}).pop("long_name", None)
        node.get("attributes", {}).pop("description", None)
        path.write_text(json.dumps(node))
    return str(dst)


def test_stores_of_the_first_schema_open_and_can_be_upgraded(run, tmp_path):
    old = _first_schema_copy(run.path, tmp_path / "old.zarr")
    with pytest.warns(RuntimeWarning, match="consolidated"):  # what a user saw before
        assert "token_id" in xr.open_zarr(old).data_vars
    reopened = ss.open_run(old)
    assert set(TOKEN_COORDS) & set(reopened.ds.data_vars) == set()
    assert list(reopened.ds["head"].values) == list(run.ds["head"].values)
    np.testing.assert_array_equal(reopened.ds.hidden.values, run.ds.hidden.values)
    assert reopened.heads(top=2).equals(run.heads(top=2))
    upgrade_store(old)
    seen = _open_strictly(old)
    assert "token_id" in seen["coords"] and "head" in seen["indexes"]
    assert seen["attrs"]["hidden"]["description"] == run.ds.hidden.attrs["description"]
    from stratascope.analyze.results import result_groups

    heads = result_groups(ss.open_run(old), "heads")[0]
    assert _open_strictly(old, heads)["attrs"]["entropy"]["long_name"] == "entropy"


def test_root_attrs_round_trip(run):
    attrs = dict(zarr.open_group(run.path, mode="r").attrs)
    parsed = RootAttrs.from_dict(attrs, run.path)
    assert parsed.to_dict() == attrs
    assert parsed.model["weights_sha256"] == run.attrs["model"]["weights_sha256"] and parsed.complete is True
    assert RootAttrs.from_dict({**attrs, "later_key": 1}).extra == {"later_key": 1}
    with pytest.raises(SchemaError, match="lacks the root attributes corpus"):
        RootAttrs.from_dict({k: v for k, v in attrs.items() if k != "corpus"}, "store.zarr")


def test_results_are_checked_against_the_schema(run):
    ok = {"entropy": (("layer", "head"), np.dtype("float64")), "label": (("layer", "head"), np.dtype(object))}
    check_group(HEADS, ok, "analysis/heads")
    with pytest.raises(SchemaError, match="'entropy' has dims \\('head', 'layer'\\)"):
        check_group(HEADS, {"entropy": (("head", "layer"), np.dtype("float64"))}, "analysis/heads")
    with pytest.raises(SchemaError, match="dtype int32"):
        check_group(HEADS, {"entropy": (("layer", "head"), np.dtype("int32"))}, "analysis/heads")
    with pytest.raises(SchemaError, match="'entropies' is not in the schema"):
        check_group(HEADS, {"entropies": (("layer", "head"), np.dtype("float64"))}, "analysis/heads")
