"""Reopening runs: lazy, model-free, validated; interrupted captures are never shown as complete."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import stratascope as ss
from conftest import PROMPTS
from stratascope.errors import IncompleteRunError, MissingArrayError, OutOfRangeError


@pytest.fixture(scope="module")
def run(tiny_model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "run.zarr"
    prompts = [{"text": t, "topic": f"t{i % 3}", "score": i / 2} for i, t in enumerate(PROMPTS)]
    return ss.capture(model=str(tiny_model_dirs["gpt2"]), prompts=prompts, out=str(out), device="cpu",
                      batch_size=3, progress=False)


def test_reopen_in_fresh_process_without_transformers(run):
    code = textwrap.dedent(f"""
        import sys, stratascope as ss
        run = ss.open_run({run.path!r})
        h = run.ds.hidden.isel(token=run.token_slice(1)).values
        t = run.tokens(1)
        p = run.prompts
        r = run.readout.unembed.values
        assert h.shape[0] == len(t) == int(p.n_tokens[1])
        assert "transformers" not in sys.modules, "opening a run imported transformers"
        print("ok", h.shape)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_prompts_tokens_and_metadata(run, tiny_model_dirs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dirs["gpt2"])
    prompts = run.prompts
    assert list(prompts.text) == PROMPTS
    assert list(prompts.topic) == [f"t{i % 3}" for i in range(len(PROMPTS))]
    np.testing.assert_allclose(prompts.score, [i / 2 for i in range(len(PROMPTS))])
    for p, text in enumerate(PROMPTS):
        ids = tok(text)["input_ids"]
        tokens = run.tokens(p)
        assert list(tokens.token_id) == ids
        assert list(tokens.position) == list(range(len(ids)))
        assert "".join(tokens.token) == tok.decode(ids)
    assert int(prompts.token_offset.iloc[-1] + prompts.n_tokens.iloc[-1]) == run.n_tokens
    assert (run.ds.prompt_index.values == np.repeat(np.arange(len(PROMPTS)), prompts.n_tokens)).all()


def test_lazy_dataset(run):
    import dask.array

    assert isinstance(run.ds.hidden.data, dask.array.Array)
    assert run.ds.hidden.dims == ("token", "depth", "d_model")
    assert list(run.ds.depth.values) == [0, 1, 2, 3] and list(run.ds.layer.values) == [0, 1, 2]


def test_range_and_missing_errors(run, tiny_model_dirs, tmp_path):
    with pytest.raises(OutOfRangeError, match="prompts 0-5"):
        run.tokens(6)
    small = ss.capture(model=str(tiny_model_dirs["gpt2"]), prompts=PROMPTS[:2], out=str(tmp_path / "s.zarr"),
                       capture="mlp", progress=False)
    with pytest.raises(MissingArrayError, match="--capture hidden"):
        small.require("hidden")


def test_interrupted_capture_is_marked_incomplete(tiny_model_dirs, tmp_path, monkeypatch):
    from stratascope.capture import runner

    calls = {"n": 0}
    real = runner._forward

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "_forward", flaky)
    out = tmp_path / "cut.zarr"
    with pytest.raises(KeyboardInterrupt):
        ss.capture(model=str(tiny_model_dirs["gpt2"]), prompts=PROMPTS, out=str(out), batch_size=1, progress=False)
    with pytest.raises(IncompleteRunError, match="did not finish"):
        ss.open_run(out)
    assert ss.open_run(out, allow_incomplete=True).attrs["complete"] is False
