"""Similarity across depths and runs: streamed CKA, SVCCA and PWCCA against plain full-batch numpy
written here, their invariances, and tiny-model stores end to end through the CLI and the API."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

import stratascope as ss
from conftest import PROMPTS
from stratascope.analyze.similarity import ArrayPairs, cka_matrix, compare_arrays
from stratascope.cli import cli

# ---------------------------------------------------------------- plain numpy references (full batch)


def np_cka(x, y):
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def _inv_sqrt(c):
    w, v = np.linalg.eigh(c)
    return v @ np.diag(w ** -0.5) @ v.T


def np_cca(x, y):
    """Canonical correlations and x's canonical weights by whitening the covariances."""
    x, y = x - x.mean(0), y - y.mean(0)
    kx, ky = _inv_sqrt(x.T @ x), _inv_sqrt(y.T @ y)
    p, rho, qt = np.linalg.svd(kx @ (x.T @ y) @ ky)
    return rho, kx @ p, ky @ qt.T


def np_svcca(x, y, keep=0.99):
    def reduce(a):
        a = a - a.mean(0)
        u, s, _ = np.linalg.svd(a, full_matrices=False)
        k = next(i + 1 for i in range(len(s)) if (s[:i + 1] ** 2).sum() / (s ** 2).sum() >= keep)
        return u[:, :k] * s[:k]
    xr_, yr = reduce(x), reduce(y)
    rho = np_cca(xr_, yr)[0]
    return rho[:min(xr_.shape[1], yr.shape[1])].mean()


def np_pwcca(x, y):
    rho, wx, wy = np_cca(x, y)
    m = min(x.shape[1], y.shape[1])
    a, w = (x, wx) if x.shape[1] <= y.shape[1] else (y, wy)
    a = a - a.mean(0)
    h = a @ w[:, :m]
    h /= np.linalg.norm(h, axis=0)
    alpha = np.abs(h.T @ a).sum(1)
    return (alpha * rho[:m]).sum() / alpha.sum()


def _data(n=400, d=(12, 9, 16), seed=0):
    """Related random matrices: y and z are noisy linear images of x (float32-exact values)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d[0]))
    y = np.tanh(x @ rng.normal(size=(d[0], d[1]))) + 0.3 * rng.normal(size=(n, d[1]))
    z = x @ rng.normal(size=(d[0], d[2])) + rng.normal(size=(n, d[2])) + 5.0
    return [a.astype(np.float32).astype(np.float64) for a in (x, y, z)]


# ---------------------------------------------------------------- against numpy

def test_cka_streamed_equals_full_batch_numpy():
    x, y, z = _data()
    stack = np.stack([x, x[:, ::-1] * 2 + 1, np.tanh(x)], axis=1)  # three "depths" of width 12
    got = compare_arrays(stack, block_rows=37)  # 11 blocks: the moments are accumulated across them
    want = np.array([[np_cka(stack[:, i], stack[:, j]) for j in range(3)] for i in range(3)])
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    # two sides of different widths
    got = compare_arrays(y, z, block_rows=50)
    assert got.shape == (1, 1) and abs(got[0, 0] - np_cka(y, z)) < 1e-6


def test_cka_passes_do_not_change_the_value():
    x, y, z = _data()
    stack = np.stack([x, x * 0.5 + 1, np.sin(x)], axis=1)
    one, p1 = cka_matrix(ArrayPairs(stack, block_rows=64), 3, None, memory_mib=512)
    many, p2 = cka_matrix(ArrayPairs(stack, block_rows=64), 3, None, memory_mib=8 * 12 * 12 / 2**20)
    assert p1 == 1 and p2 == 6  # 6 pairs (i <= j), one per pass
    np.testing.assert_allclose(one, many, atol=1e-12)


def test_svcca_equals_numpy():
    x, y, z = _data()
    got = compare_arrays(x, y, method="svcca")[0, 0]
    assert abs(got - np_svcca(x, y)) < 1e-6
    got = compare_arrays(z, x, method="svcca", variance=0.9)[0, 0]
    assert abs(got - np_svcca(z, x, keep=0.9)) < 1e-6


def test_pwcca_equals_numpy():
    x, y, z = _data()
    for a, b in ((y, z), (z, y), (x, z)):  # weights from the narrower side either way
        got = compare_arrays(a, b, method="pwcca")[0, 0]
        assert abs(got - np_pwcca(a, b)) < 1e-6, (a.shape, b.shape)


# ---------------------------------------------------------------- invariances

def _orthogonal(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


def test_cka_invariances():
    x, y, z = _data()
    base = compare_arrays(x, z)[0, 0]
    for t in (x @ _orthogonal(12, 1), 7.5 * x, 0.01 * x @ _orthogonal(12, 2)):
        assert abs(compare_arrays(t.astype(np.float32), z)[0, 0] - base) < 1e-6
    stack = np.stack([x, y[:, :9].repeat(2, axis=1)[:, :12]], axis=1)
    np.testing.assert_allclose(np.diag(compare_arrays(stack)), 1.0, atol=1e-12)
    # not invariant to a general linear map (CKA is not CCA): a check that could fail
    skew = x @ np.diag(np.geomspace(1, 50, 12))
    assert abs(compare_arrays(skew, z)[0, 0] - base) > 1e-3


def test_svcca_invariant_to_invertible_maps():
    x, y, z = _data()
    rng = np.random.default_rng(3)
    a = rng.normal(size=(12, 12)) + 3 * np.eye(12)
    assert np.linalg.cond(a) < 1e3
    for keep in (1.0,):  # plain CCA of the whole space: any invertible map
        base = compare_arrays(x, z, method="svcca", variance=keep)[0, 0]
        assert abs(compare_arrays(x @ a, z, method="svcca", variance=keep)[0, 0] - base) < 1e-6
    base = compare_arrays(x, z, method="svcca")[0, 0]  # 99% of the variance: maps that keep the spectrum's shape
    assert abs(compare_arrays(3.0 * x @ _orthogonal(12, 4), z, method="svcca")[0, 0] - base) < 1e-6
    assert abs(compare_arrays(x, z @ _orthogonal(16, 5), method="pwcca")[0, 0]
               - compare_arrays(x, z, method="pwcca")[0, 0]) < 1e-6


# ---------------------------------------------------------------- tiny-model stores, CLI and API

def invoke(*args):
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def stores(tiny_model_dirs, tmp_path_factory):
    """Three captures of the tiny Llama: the corpus in float32, the same in float16, and the
    corpus reversed with an extra prompt (so tokens no longer line up by prompt and position)."""
    root = tmp_path_factory.mktemp("similarity")
    corpus, other = root / "c.jsonl", root / "r.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in PROMPTS) + "\n")
    other.write_text("\n".join(json.dumps({"text": t}) for t in ["An extra prompt here", *PROMPTS[::-1]]) + "\n")
    out = {}
    for name, src, dtype in (("a", corpus, "float32"), ("half", corpus, "float16"), ("rev", other, "float32")):
        path = root / f"{name}.zarr"
        code, text = invoke("capture", "--model", tiny_model_dirs["llama"], "--corpus", src, "--out", path,
                            "--device", "cpu", "--capture", "hidden,mlp", "--dtype", dtype)
        assert code == 0, text
        out[name] = str(path)
    return out


def _rows(path, array="hidden"):
    """Every prompt's token rows of `array`, straight from Zarr, in corpus order: (tokens, depth, d)."""
    g = zarr.open_group(path, mode="r")
    off, n = g["token_offset"][:], g["n_tokens"][:]
    x = g[array][:].astype(np.float64)
    return np.concatenate([x[o:o + k] for o, k in zip(off, n)]), off, n, x


def _newest(path):
    """The newest similarity result (analysis/similarity/<name>), opened with zarr."""
    from stratascope.analyze.results import result_groups

    return zarr.open_group(str(path), mode="r", path=result_groups(ss.open_run(str(path)), "similarity")[0],
                           use_consolidated=False)


def _matrix(a, b, fn):
    return np.array([[fn(a[:, i], b[:, j]) for j in range(b.shape[1])] for i in range(a.shape[1])])


def test_cli_cka_within_run_matches_numpy_and_is_reused(stores):
    code, text = invoke("similarity", stores["a"])
    assert code == 0, text
    assert "cka of hidden" in text and "depth" in text
    sim = _newest(stores["a"])
    x = _rows(stores["a"])[0]
    np.testing.assert_allclose(sim["similarity"][:], _matrix(x, x, np_cka), atol=1e-6)
    assert list(sim["depth_a"][:]) == [0, 1, 2, 3]
    created = dict(sim.attrs)["created"]
    code, text = invoke("similarity", stores["a"])  # the same parameters: reused, not recomputed
    assert code == 0
    assert dict(_newest(stores["a"]).attrs)["created"] == created


def test_api_methods_arrays_positions(stores):
    import stratascope as ss

    run = ss.open_run(stores["a"])
    x, off, n, full = _rows(stores["a"])
    ds = run.similarity(method="svcca", depths="1-3", progress=False)
    np.testing.assert_allclose(ds["similarity"].values, _matrix(x[:, 1:], x[:, 1:], np_svcca), atol=1e-6)
    assert list(ds["depth_a"].values) == [1, 2, 3]
    ds = run.similarity(method="pwcca", progress=False)
    np.testing.assert_allclose(ds["similarity"].values, _matrix(x, x, np_pwcca)[:, :], atol=1e-6)
    m = _rows(stores["a"], "mlp")[0]
    ds = run.similarity(array="mlp", progress=False)
    assert ds["similarity"].dims == ("layer_a", "layer_b")
    np.testing.assert_allclose(ds["similarity"].values, _matrix(m, m, np_cka), atol=1e-6)
    last = full[off + n - 1]  # one row per prompt: its last token
    ds = run.similarity(positions="last", progress=False)
    np.testing.assert_allclose(ds["similarity"].values, _matrix(last, last, np_cka), atol=1e-6)
    mean = np.stack([full[o:o + k].mean(0) for o, k in zip(off, n)])
    ds = run.similarity(positions="mean", progress=False)
    np.testing.assert_allclose(ds["similarity"].values, _matrix(mean, mean, np_cka), atol=1e-5)
    # a row sample: the seeded rows, the same on every call
    ds = run.similarity(max_rows=20, progress=False)
    rows = np.sort(np.random.default_rng(0).choice(len(x), size=20, replace=False))
    np.testing.assert_allclose(ds["similarity"].values, _matrix(x[rows], x[rows], np_cka), atol=1e-6)
    assert ds.attrs["n_rows"] == 20
    # from position 1 on (a first-token attention sink left out)
    keep = np.concatenate([np.arange(k) >= 1 for k in n])
    ds = run.similarity(min_position=1, progress=False)
    np.testing.assert_allclose(ds["similarity"].values, _matrix(x[keep], x[keep], np_cka), atol=1e-6)
    assert ds.attrs["n_rows"] == int(keep.sum()) and "from position 1 on" in ds.attrs["rows"]


def test_between_runs_by_prompt_and_position(stores):
    import stratascope as ss

    code, text = invoke("similarity", stores["a"], "--with", stores["half"])
    assert code == 0, text
    x, y = _rows(stores["a"])[0], _rows(stores["half"])[0]
    ds = ss.open_run(stores["a"]).similarity(other=stores["half"], progress=False)  # reused from the CLI's
    np.testing.assert_allclose(ds["similarity"].values, _matrix(x, y, np_cka), atol=1e-6)
    assert ds.attrs["rows"] == "every token, matched by prompt and position"
    assert np.all(np.diag(ds["similarity"].values) > 0.999)  # float16 rounding barely moves anything
    ds = ss.open_run(stores["a"]).similarity(other=stores["half"], method="svcca", progress=False)
    np.testing.assert_allclose(ds["similarity"].values, _matrix(x, y, np_svcca), atol=1e-6)


def test_between_runs_by_prompt_text(stores):
    import stratascope as ss

    code, text = invoke("similarity", stores["a"], "--with", stores["rev"])
    assert code == 1 and "--positions last or --positions mean" in text and stores["rev"] in text, text
    code, text = invoke("similarity", stores["a"], "--with", stores["rev"], "--positions", "last")
    assert code == 0, text
    _, off, n, xa = _rows(stores["a"])
    _, off_b, n_b, xb = _rows(stores["rev"])
    order = [len(PROMPTS) - i for i in range(len(PROMPTS))]  # prompt i of a is prompt 6 - i of rev
    a_last, b_last = xa[off + n - 1], xb[off_b[order] + n_b[order] - 1]
    ds = ss.open_run(stores["a"]).similarity(other=stores["rev"], positions="last", progress=False)
    np.testing.assert_allclose(ds["similarity"].values, _matrix(a_last, b_last, np_cka), atol=1e-6)
    np.testing.assert_allclose(np.diag(ds["similarity"].values), 1.0, atol=1e-6)  # same model, same prompts


def test_bad_input_one_sentence(stores, tmp_path):
    code, text = invoke("similarity", stores["a"], "--depths", "0-9")
    assert code == 1 and "out of range" in text, text
    code, text = invoke("similarity", stores["a"], "--positions", "last", "--min-position", "1")
    assert code == 1 and "only with --positions all" in text, text
    code, text = invoke("similarity", stores["a"], "--method", "cca")
    assert code == 2 and "cca" in text
    before = dict(_newest(stores["a"]).attrs)
    code, text = invoke("similarity", stores["a"], "--with", tmp_path / "none.zarr")
    assert code == 1 and "does not exist" in text
    assert dict(_newest(stores["a"]).attrs) == before
