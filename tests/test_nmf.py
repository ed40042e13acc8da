"""NMF of MLP activations, checked against planted factors, scikit-learn, scipy's nnls and numpy."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.optimize import linear_sum_assignment, nnls

import stratascope as ss
from conftest import PROMPTS, TEXT
from stratascope.cli import cli
from stratascope.errors import ConfigError, DeviceError, MissingArrayError, OutOfRangeError
from stratascope.testing import synthetic_mlp_store

N, L, D, K = 900, 2, 24, 4


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """W·H + small noise with known sparse factors H; the last rows are masked and hold garbage."""
    rng = np.random.default_rng(7)
    W = rng.exponential(size=(N, K))
    H = rng.exponential(size=(K, L * D)) * (rng.random((K, L * D)) < 0.4)
    A = W @ H + 0.02 * rng.standard_normal((N, L * D))
    masked = np.zeros(N, dtype=bool)
    masked[-20:] = True
    A[masked] = 1e4  # would dominate the fit if masked rows were not ignored
    path = str(tmp_path_factory.mktemp("planted") / "planted.zarr")
    synthetic_mlp_store(path, N, L, D, lambda a, b: A[a:b], chunk_rows=64, masked=masked)
    return ss.open_run(path), A, H, masked


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dirs, tmp_path_factory):
    """A small real matrix: the tiny llama's SiLU-gated MLP activations over a few dozen prompts."""
    prompts = PROMPTS + [s.strip() + "." for s in TEXT.split(".")[:8] if s.strip()]
    out = tmp_path_factory.mktemp("nmf") / "tiny.zarr"
    return ss.capture(model=str(tiny_model_dirs["llama"]), prompts=prompts, out=str(out), capture="mlp,hidden",
                      device="cpu", progress=False)


def _matrix(run, negative="clip"):
    """The factorized matrix built directly with numpy from the stored array."""
    a = run.ds["mlp"].values.reshape(run.n_tokens, -1).astype(np.float64)
    return np.maximum(a, 0) if negative == "clip" else a - a.min(axis=0)


def _cosines(found, planted):
    f = found / np.linalg.norm(found, axis=1, keepdims=True)
    p = planted / np.linalg.norm(planted, axis=1, keepdims=True)
    sim = p @ f.T
    rows, cols = linear_sum_assignment(-sim)
    return sim[rows, cols]


def test_recovers_planted_factors_and_ignores_masked_rows(planted):
    run, A, H, masked = planted
    res = run.nmf(factors=K, layers=[0, 1], iterations=200, progress=False)
    found = res["factor_neuron"].values.reshape(K, -1)
    assert _cosines(found, H).min() >= 0.95
    W = res["token_factor"].values
    assert (W >= 0).all() and (W[masked] == 0).all()
    assert res["factor_neuron"].dims == ("factor", "layer", "neuron")
    # the stored relative error is |A - WH| / |A| over the unmasked rows, by numpy
    a = A[~masked]
    expected = np.linalg.norm(np.maximum(a, 0) - W[~masked] @ found) / np.linalg.norm(np.maximum(a, 0))
    assert float(res["relative_error"]) == pytest.approx(expected, rel=1e-2)  # float32 statistics
    assert float(res["relative_error"]) < 0.05


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_relative_error_close_to_scikit_learn(tiny_run):
    from sklearn.decomposition import NMF

    for negative in ("clip", "shift"):
        a = _matrix(tiny_run, negative)
        ref = NMF(n_components=4, max_iter=200, random_state=0, solver="cd")
        w = ref.fit_transform(a)
        ref_err = np.linalg.norm(a - w @ ref.components_) / np.linalg.norm(a)
        res = tiny_run.nmf(factors=4, layers=[0, 1, 2], iterations=200, negative=negative, progress=False)
        ours = float(res["relative_error"])
        assert ours <= 1.05 * ref_err, (negative, ours, ref_err)
        # the stored objective is |A - WH|² of the stored factors, and HALS never increases it
        obj = res["objective"].values
        recon = res["token_factor"].values @ res["factor_neuron"].values.reshape(4, -1)
        assert obj[-1] == pytest.approx(np.sum((a - recon) ** 2), rel=1e-4)
        assert (np.diff(obj) <= 1e-6 * obj[0]).all()  # up to float32 rounding
        assert res.attrs["params"]["negative"] == negative


def test_result_does_not_depend_on_chunk_size(tiny_run):
    runs = [tiny_run.nmf(factors=3, layers="0-2", iterations=60, chunk_tokens=c, recompute=True, progress=False)
            for c in (7, 10_000)]
    small, whole = ({n: r[n].values for n in ("token_factor", "factor_neuron", "objective")} for r in runs)
    assert runs[0].attrs["chunk_tokens"] == 7
    for name in small:
        np.testing.assert_allclose(small[name], whole[name], rtol=1e-4, atol=1e-5 * np.abs(whole[name]).max())


def test_same_result_on_a_distributed_client(tiny_run):
    from distributed import Client

    local = tiny_run.nmf(factors=3, layers="0-2", iterations=20, chunk_tokens=16, recompute=True,
                         progress=False)["factor_neuron"].values
    with Client(processes=False, n_workers=2, threads_per_worker=1, dashboard_address=None):
        remote = tiny_run.nmf(factors=3, layers="0-2", iterations=20, chunk_tokens=16, recompute=True,
                              progress=False)["factor_neuron"].values
    np.testing.assert_array_equal(local, remote)


def test_stored_result_is_reused_for_same_parameters(planted):
    run, *_ = planted
    first = run.nmf(factors=2, layers="0-1", iterations=5, seed=3, progress=False)
    again = run.nmf(factors=2, layers=[0, 1], iterations=5, seed=3, progress=False)
    assert again.attrs["created"] == first.attrs["created"]
    other = run.nmf(factors=2, layers="0-1", iterations=5, seed=4, progress=False)
    assert other.attrs["created"] != first.attrs["created"]


def test_transform_solves_nonnegative_least_squares(tiny_run, planted):
    fitted = tiny_run.nmf(factors=3, layers="0-2", iterations=50, progress=False)
    res = tiny_run.nmf_transform(factors_from=tiny_run, progress=False)
    H = fitted["factor_neuron"].values.reshape(3, -1).astype(np.float64)
    a = _matrix(tiny_run)
    W = res["token_factor"].values
    for row in range(0, len(a), 5):  # scipy's active-set NNLS, row by row
        np.testing.assert_allclose(W[row], nnls(H.T, a[row])[0], rtol=1e-3, atol=1e-4)
    assert res.attrs["factors_from"] == tiny_run.path
    assert float(res["relative_error"]) <= float(fitted["relative_error"]) + 1e-6
    assert not tiny_run.factor_tokens(0, top=3, job="nmf_transform").empty
    planted_run, *_ = planted
    with pytest.raises(ConfigError, match="neurons per layer"):
        planted_run.nmf_transform(factors_from=tiny_run)


def test_factor_tokens_and_activations(tiny_run):
    res = tiny_run.nmf(factors=3, layers="0-2", iterations=50, progress=False)
    W = res["token_factor"].values
    top = tiny_run.factor_tokens(1, top=5)
    assert list(top.columns) == ["token", "prompt", "position", "weight"]
    best = np.argsort(-W[:, 1], kind="stable")[:5]
    np.testing.assert_allclose(top["weight"].to_numpy(), W[best, 1], rtol=1e-6)
    strs = tiny_run.ds["token_str"].values
    assert list(top["token"]) == [strs[i] for i in best]
    assert list(top["prompt"]) == list(tiny_run.ds["prompt_index"].values[best])
    acts = tiny_run.factor_activations(2)
    rows = tiny_run.token_slice(2)
    assert list(acts["token"]) == list(tiny_run.tokens(2)["token"])
    np.testing.assert_allclose(acts[[0, 1, 2]].to_numpy(), W[rows])
    with pytest.raises(OutOfRangeError, match="factors 0-2"):
        tiny_run.factor_tokens(3)


def test_clear_errors(tiny_model_dirs, tiny_run, tmp_path):
    no_mlp = ss.capture(model=str(tiny_model_dirs["gpt2"]), prompts=PROMPTS[:2], out=str(tmp_path / "h.zarr"),
                        capture="hidden", device="cpu", progress=False)
    with pytest.raises(MissingArrayError, match="this run has no mlp activations; capture with --capture mlp"):
        no_mlp.nmf(factors=2)
    with pytest.raises(MissingArrayError, match="no analysis/nmf result"):
        no_mlp.factor_tokens(0)
    with pytest.raises(ConfigError, match="--factors"):
        tiny_run.nmf(factors=0)
    with pytest.raises(ConfigError, match="--device"):
        tiny_run.nmf(factors=2, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="use --device cpu"):
            tiny_run.nmf(factors=2, device="cuda")
    with pytest.raises(ConfigError, match="--negative"):
        tiny_run.nmf(factors=2, negative="abs")
    with pytest.raises(ConfigError, match="--layers"):
        tiny_run.nmf(factors=2, layers="0-7")
    partial = ss.capture(model=str(tiny_model_dirs["llama"]), prompts=PROMPTS[:2], out=str(tmp_path / "p.zarr"),
                         capture="mlp", layers="0", device="cpu", progress=False)
    with pytest.raises(OutOfRangeError, match="layer 1 was not captured"):
        partial.nmf(factors=2, layers="0-1")
    with pytest.raises(OutOfRangeError, match="did not capture"):
        partial.nmf_transform(factors_from=tiny_run)
    result = CliRunner().invoke(cli, ["nmf", no_mlp.path, "--factors", "2"])
    assert result.exit_code == 1 and "capture with --capture mlp" in result.output


def test_cli_prints_error_and_top_tokens(tiny_run):
    result = CliRunner().invoke(cli, ["nmf", tiny_run.path, "--factors", "3", "--layers", "0-2",
                                      "--iterations", "30", "--top", "4"])
    assert result.exit_code == 0, result.output
    assert "relative reconstruction error" in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("factor ")]
    assert len(lines) == 3
    result = CliRunner().invoke(cli, ["nmf", tiny_run.path, "--factors-from", tiny_run.path, "--top", "2"])
    assert result.exit_code == 0 and "nmf_transform: 3 factors" in result.output, result.output


def test_nmf_job_never_imports_transformers(planted):
    run, *_ = planted
    code = ("import sys, stratascope as ss; r = ss.open_run(sys.argv[1]); "
            "r.nmf(factors=2, iterations=3, seed=11, progress=False); r.factor_tokens(0); r.factor_activations(0); "
            "r.nmf_transform(factors_from=r, progress=False); "
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    subprocess.run([sys.executable, "-c", code, run.path], check=True)


@pytest.mark.real
def test_smollm2_demo_corpus_factors(tmp_path):
    from stratascope.workflows.demo import demo_corpus

    run = ss.capture(model="smollm2", corpus=demo_corpus(), out=str(tmp_path / "demo.zarr"), capture="mlp",
                     layers="0-5", device="cpu", progress=False)
    res = run.nmf(factors=8, layers=range(0, 6), iterations=200, progress=False)
    assert res.sizes["factor"] == 8 and list(res["layer"].values) == list(range(6))
    assert res["factor_neuron"].shape == (8, 6, 1536)
    assert 0 < float(res["relative_error"]) < 1
    for f in range(8):
        top = run.factor_tokens(f, top=20)
        assert len(top) > 0 and (top["weight"] > 0).all()
