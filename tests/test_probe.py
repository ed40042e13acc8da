"""Linear probes: planted signal, scikit-learn agreement, folds by prompt, controls, errors, CLI."""

import subprocess
import sys

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

import stratascope as ss
from stratascope.analyze.probe import probe_matrix
from stratascope.cli import cli
from stratascope.errors import ConfigError, MissingArrayError

WORDS = "quick brown fox jumps over lazy dog airport city keys cabinet table nurse doctor name".split()
K = 2  # the planted label is readable from depth K on


def _prompts(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"text": " ".join(rng.choice(WORDS, size=rng.integers(3, 7))), "kind": ["a", "b"][i % 2],
             "score": float(rng.normal())} for i in range(n)]


@pytest.fixture(scope="module")
def planted(tiny_model_dirs, tmp_path_factory):
    """A tiny-llama capture whose hidden states are replaced by synthetic ones: noise everywhere, plus
    the prompt's label (kind: ±1) and each token's label (tag: ±1) along fixed directions from depth K."""
    out = tmp_path_factory.mktemp("probe") / "planted.zarr"
    prompts = _prompts(160)
    run = ss.capture(model=str(tiny_model_dirs["llama"]), prompts=prompts, out=str(out), capture=("hidden",),
                     device="cpu", progress=False)
    T, D, d = run.ds["hidden"].shape
    rng = np.random.default_rng(1)
    pidx = run.ds["prompt_index"].values
    kind = np.array([1.0 if p["kind"] == "b" else -1.0 for p in prompts])[pidx]
    tag = rng.choice([-1.0, 1.0], size=T)
    u, v = np.eye(d)[0], np.eye(d)[1]
    hidden = rng.normal(size=(T, D, d))
    hidden[:, K:] += 3.0 * (kind[:, None, None] * u + tag[:, None, None] * v)
    root = zarr.open_group(str(out), mode="r+")
    root["hidden"][:] = hidden.astype(np.float32)
    root.create_array("label_tag", shape=(T,), chunks=root["token_id"].chunks, dtype=str,
                      dimension_names=("token",))[:] = np.where(tag > 0, "pos", "neg").astype(object)
    return ss.open_run(str(out)), tag


def test_planted_prompt_label_chance_before_k_near_one_after(planted):
    run, _ = planted
    res = run.linear_probe("kind", at="last", folds=5, seed=0, progress=False)
    s = res.scores.set_index("depth")
    assert list(s.index) == list(range(4))
    assert (s.loc[:K - 1, "accuracy"] < 0.7).all(), s
    assert (s.loc[K:, "accuracy"] > 0.95).all(), s
    # the control (a random label per prompt text) is not learnable: selectivity is large after K
    assert (s["control_accuracy"] < 0.7).all(), s
    assert (s.loc[K:, "selectivity"] > 0.25).all(), s
    assert s["n"].iloc[0] == 160 and s["majority"].iloc[0] == pytest.approx(0.5, abs=0.1)
    # the saved direction (trained on every row) points along the planted one
    w = res.direction(K)
    assert np.argmax(np.abs(w)) == 0 and w[0] > 0 and abs(w[0]) / np.linalg.norm(w) > 0.6


def test_planted_mean_and_token_labels(planted):
    run, tag = planted
    mean = run.linear_probe("kind", at="mean", folds=4, seed=0, control="none", progress=False).scores
    assert (mean["accuracy"][:K] < 0.7).all() and (mean["accuracy"][K:] > 0.95).all(), mean
    tok = run.linear_probe("tag", folds=3, seed=0, epochs=10, progress=False)
    s = tok.scores
    assert (s["accuracy"][:K] < 0.6).all() and (s["accuracy"][K:] > 0.95).all(), s
    assert s["n"].iloc[0] == len(tag) and tok.ds.attrs["level"] == "token"


def test_result_is_stored_and_reused(planted):
    run, _ = planted
    opts = dict(folds=3, depths="2-3", seed=3, epochs=50, progress=False)
    first = run.linear_probe("kind", **opts)
    again = ss.open_run(run.path).linear_probe("kind", **opts)
    assert again.ds.attrs["created"] == first.ds.attrs["created"]
    assert list(again.ds["depth"].values) == [2, 3]
    np.testing.assert_array_equal(again.ds["weights"].values, first.ds["weights"].values)
    # deterministic: recomputing gives the same numbers
    third = run.linear_probe("kind", **opts, recompute=True)
    np.testing.assert_array_equal(third.ds["accuracy"].values, first.ds["accuracy"].values)


def test_regression_probe_r2(planted):
    run, _ = planted
    s = run.linear_probe("score", folds=3, control="none", epochs=100, progress=False).scores
    assert "r2" in s and s["baseline"].iloc[0] == 0.0
    assert (s["r2"] < 0.2).all()  # the score is nowhere in these synthetic states


def _sklearn_cv(x, y, fold, l2):
    accs, f1s = [], []
    for f in np.unique(fold):
        tr, te = fold != f, fold == f
        mu, sd = x[tr].mean(0), x[tr].std(0)
        clf = LogisticRegression(C=1 / (l2 * tr.sum()), max_iter=5000).fit((x[tr] - mu) / sd, y[tr])
        pred = clf.predict((x[te] - mu) / sd)
        accs.append(np.mean(pred == y[te]))
        f1s.append(f1_score(y[te], pred, average="macro"))
    return np.array(accs), np.array(f1s)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_accuracy_matches_sklearn_logistic_regression(n_classes):
    rng = np.random.default_rng(n_classes)
    n, d = 600, 20
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 5, size=d) + rng.normal(size=d) * 10
    scores = (x - x.mean(0)) / x.std(0) @ rng.normal(size=(d, n_classes)) * 0.6 + rng.gumbel(size=(n, n_classes))
    y = scores.argmax(1)
    groups = np.repeat(np.arange(n // 4), 4)
    res = probe_matrix(x, y, groups, folds=5, seed=0, l2=1e-3)
    acc, f1 = _sklearn_cv(x, y, res["fold"], 1e-3)
    assert 0.6 < acc.mean() < 0.97  # a task that is neither trivial nor hopeless
    assert abs(res["accuracy"][0].mean() - acc.mean()) < 0.02
    assert abs(res["macro_f1"][0].mean() - f1.mean()) < 0.03


def test_folds_never_share_a_prompt():
    """Each prompt has its own random label and a prompt-specific random vector in every token: a probe
    that saw some of a prompt's tokens in training would memorize it. Split by prompt, it cannot."""
    rng = np.random.default_rng(0)
    n_prompts, per, d = 40, 8, 64
    groups = np.repeat(np.arange(n_prompts), per)
    y = rng.integers(0, 2, size=n_prompts)[groups]
    x = rng.normal(size=(n_prompts, d))[groups] * 3 + rng.normal(size=(len(groups), d)) * 0.3
    res = probe_matrix(x, y, groups, folds=4, seed=0, epochs=100)
    for p in range(n_prompts):
        assert len(set(res["fold"][groups == p])) == 1
    assert res["accuracy"].mean() < 0.7
    # the same data split by token instead (every row its own group) is memorized: the check has teeth
    leaky = probe_matrix(x, y, np.arange(len(y)), folds=4, seed=0, epochs=100)
    assert leaky["accuracy"].mean() > 0.9


def test_errors(planted, tiny_model_dirs, tmp_path):
    run, _ = planted
    with pytest.raises(ConfigError, match="no label 'colour'.*tag.*kind"):
        run.linear_probe("colour", progress=False)
    root = zarr.open_group(run.path, mode="r+")
    root.create_array("meta_same", shape=(run.n_prompts,), chunks=(run.n_prompts,), dtype=str,
                      dimension_names=("prompt",))[:] = np.array(["x"] * run.n_prompts, dtype=object)
    with pytest.raises(ConfigError, match="one class"):
        ss.open_run(run.path).linear_probe("same", progress=False)
    no_hidden = ss.capture(model=str(tiny_model_dirs["llama"]), prompts=_prompts(6), out=str(tmp_path / "a.zarr"),
                           capture=("mlp",), device="cpu", progress=False)
    with pytest.raises(MissingArrayError, match="--capture hidden"):
        no_hidden.linear_probe("kind", progress=False)
    with pytest.raises(ConfigError, match="folds"):
        run.linear_probe("kind", folds=500, progress=False)


def test_cli_prints_table(planted):
    run, _ = planted
    result = CliRunner().invoke(cli, ["probe", "linear", run.path, "--label", "kind", "--folds", "3",
                                      "--depths", "2-3", "--epochs", "20"])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "control_accuracy" in result.output and "selectivity" in result.output
    bad = CliRunner().invoke(cli, ["probe", "linear", run.path, "--label", "nope"])
    assert bad.exit_code == 1 and "available are" in bad.output


def test_probe_job_never_imports_transformers(planted):
    run, _ = planted
    code = ("import sys, stratascope as ss; r = ss.open_run(sys.argv[1]); "
            "r.linear_probe('kind', folds=3, depths='3', epochs=5, recompute=True, progress=False); "
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    subprocess.run([sys.executable, "-c", code, run.path], check=True)


def test_prompt_rows_are_last_token_and_mean(planted):
    from stratascope.analyze.probe_rows import PromptRows

    run, _ = planted
    prompts = np.array([0, 3, 4, 50, 159])
    depth_idx = np.array([1, 3])
    for at in ("last", "mean"):
        rows = PromptRows(run.ds, prompts, at, depth_idx, progress=False)
        try:
            got = np.concatenate([rows.read(b)[1] for b in range(len(rows.blocks))])
        finally:
            rows.close()
        for i, p in enumerate(prompts):
            h = run.ds["hidden"].isel(token=run.token_slice(int(p))).values[:, depth_idx]
            np.testing.assert_allclose(got[i], h[-1] if at == "last" else h.mean(0), rtol=1e-5, atol=1e-5)
