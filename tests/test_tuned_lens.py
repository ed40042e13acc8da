"""The tuned lens against independent computations: a store with a planted per-depth affine
distortion (training must undo it), and numpy full-vocabulary KL / cross-entropy / entropy
of both lenses from the stored arrays and translators."""

import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

import stratascope as ss
from conftest import TEXT
from stratascope.analyze.readout import Readout
from stratascope.analyze.tuned_lens import split_prompts
from stratascope.analyze.tuned_lens_kernel import kl_to_final, readout_stats
from stratascope.cli import cli
from stratascope.errors import ConfigError, MissingArrayError

STEPS, LR, BATCH = 300, 0.1, 256


def _prompts(n=60):
    words = TEXT.split()
    return [" ".join(words[(7 * i) % (len(words) - 12):][:6 + i % 7]) for i in range(n)]


@pytest.fixture(scope="module")
def planted(tiny_model_dirs, tmp_path_factory):
    """A tiny Llama capture whose depths d < L hold (I + A_d)^-1 (h_L - b_d): the translator A_d, b_d
    recovers the final residual exactly. The unembedding is scaled up so distributions are peaked."""
    out = tmp_path_factory.mktemp("tuned") / "planted.zarr"
    ss.capture(model=str(tiny_model_dirs["llama"]), prompts=_prompts(), out=str(out), capture=("hidden",),
               batch_size=8, device="cpu", progress=False)
    g = zarr.open_group(str(out), mode="r+")
    g["readout/unembed"][:] = g["readout/unembed"][:] * 60.0
    h = g["hidden"][:]
    L, d = h.shape[1] - 1, h.shape[2]
    rng = np.random.default_rng(1)
    planted = []
    for k in range(L):
        A = rng.normal(0, 0.6 / np.sqrt(d), (d, d)).astype(np.float32)
        b = rng.normal(0, 0.5 * h[:, L].std(), d).astype(np.float32)
        h[:, k] = np.linalg.solve(np.eye(d) + A, (h[:, L] - b).T).T
        planted.append((A, b))
    g["hidden"][:] = h
    return ss.open_run(str(out)), planted


def _np_readout(run):
    r = run.readout
    U = r["unembed"].values.astype(np.float64)
    w = r["norm_weight"].values.astype(np.float64)
    eps = float(r.attrs["norm_eps"])
    return lambda h: (h / np.sqrt((h**2).mean(-1, keepdims=True) + eps) * w) @ U.T


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_metrics(run, weight, bias, depths, prompts):
    """Held-out KL / CE / entropy per depth for logit (weight = 0) and tuned lens, plain numpy float64."""
    logits = _np_readout(run)
    L = int(run.attrs["model"]["n_layers"])
    kl, ce, ent = [], [], []
    rows, targets = [], []
    for p in prompts:
        sl = run.token_slice(int(p))
        rows.append(np.arange(sl.start, sl.stop))
        ids = run.ds["token_id"].values[sl]
        targets.append(np.append(ids[1:], -1))
    rows, targets = np.concatenate(rows), np.concatenate(targets)
    h = run.ds["hidden"].values[rows].astype(np.float64)
    lp_f = _log_softmax(logits(h[:, L]))
    has = targets >= 0
    for k, dep in enumerate(depths):
        hk = h[:, dep]
        hk = hk + hk @ weight[k].T.astype(np.float64) + bias[k]
        lp = _log_softmax(logits(hk))
        kl.append((np.exp(lp_f) * (lp_f - lp)).sum(-1).mean())
        ce.append(-lp[has][np.arange(has.sum()), targets[has]].mean())
        ent.append(-(np.exp(lp) * lp).sum(-1).mean())
    return np.array(kl), np.array(ce), np.array(ent)


@pytest.fixture(scope="module")
def trained(planted):
    run, _ = planted
    return run.tuned_lens(steps=STEPS, lr=LR, batch_size=BATCH, holdout=0.25, seed=0, progress=False)


def test_training_undoes_the_planted_distortion(planted, trained):
    run, _ = planted
    ev = trained.eval
    L = int(run.attrs["model"]["n_layers"])
    below = ev[ev.depth < L]
    logit, tuned = below[below.lens == "logit"].kl.values, below[below.lens == "tuned"].kl.values
    assert (logit > 0.5).all(), logit  # the distortion hurts the logit lens
    assert (tuned < 0.05).all() and (tuned < 0.01 * logit).all(), (logit, tuned)
    curve = trained.ds["train_kl"].values[:, :L].mean(1)
    assert curve[-20:].mean() < 0.05 * curve[0]


def test_metrics_equal_numpy(planted, trained):
    run, _ = planted
    L = int(run.attrs["model"]["n_layers"])
    depths = list(range(L + 1))
    W, B = trained.ds["weight"].values, trained.ds["bias"].values
    held = np.flatnonzero(trained.ds["heldout"].values)
    assert (W[-1] == 0).all() and (B[-1] == 0).all()  # identity at the output depth
    for lens, (w, b) in {"logit": (0 * W, 0 * B), "tuned": (W, B)}.items():
        kl, ce, ent = _np_metrics(run, w, b, depths, held)
        got = trained.ds.sel(lens=lens)
        np.testing.assert_allclose(got["kl"].values, kl, rtol=1e-3, atol=2e-5)
        np.testing.assert_allclose(got["cross_entropy"].values, ce, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got["entropy"].values, ent, rtol=1e-4, atol=1e-5)


def test_split_by_prompt_and_stored(planted, trained):
    run, _ = planted
    held = trained.ds["heldout"].values
    np.testing.assert_array_equal(held, split_prompts(run.n_prompts, 0.25, 0))
    assert held.sum() == round(0.25 * run.n_prompts)
    assert trained.ds.attrs["n_heldout_tokens"] == int(run.ds["n_tokens"].values[held].sum())
    assert trained.weights_sha256 == run.attrs["model"]["weights_sha256"]
    other = split_prompts(run.n_prompts, 0.25, 1)
    assert not np.array_equal(held, other) and other.sum() == held.sum()


def test_batches_come_from_training_prompts_only(planted):
    from stratascope.analyze.tuned_lens import BUFFER_BYTES, _batches, _Rows

    run, _ = planted
    held = split_prompts(run.n_prompts, 0.25, 0)
    h = run.ds["hidden"].values
    pidx = run.ds["prompt_index"].values
    train_rows = Counter(h[i].tobytes() for i in np.flatnonzero(~held[pidx]))  # (equal prefixes give equal rows)
    rows = _Rows(run, np.flatnonzero(~held), list(range(h.shape[1])))
    assert rows.n_rows == train_rows.total() and rows.row_bytes * rows.n_rows < BUFFER_BYTES
    seen = [b for _, b in zip(range(3 * rows.n_rows // 16 + 1), _batches(rows, 16, np.random.default_rng(0)))]
    assert all(r.tobytes() in train_rows for b in seen for r in b)
    first_epoch = Counter(r.tobytes() for b in seen[:rows.n_rows // 16] for r in b)
    assert first_epoch.total() == rows.n_rows // 16 * 16 and not first_epoch - train_rows  # each row at most once
    again = [b for _, b in zip(range(5), _batches(rows, 16, np.random.default_rng(0)))]
    np.testing.assert_array_equal(np.stack(again), np.stack(seen[:5]))


def _copy(run, path):
    shutil.copytree(run.path, path)
    return ss.open_run(str(path))


def test_reused_and_deterministic(planted, trained, tmp_path):
    run, _ = planted
    again = run.tuned_lens(steps=STEPS, lr=LR, batch_size=BATCH, holdout=0.25, seed=0, progress=False)
    assert again.ds.attrs["created"] == trained.ds.attrs["created"]  # read back, not retrained
    run = _copy(run, tmp_path / "copy.zarr")  # retraining below replaces the stored lens
    short = [run.tuned_lens(steps=5, lr=LR, batch_size=BATCH, holdout=0.25, seed=0, progress=False,
                            recompute=True).ds["weight"].values for _ in range(2)]
    np.testing.assert_array_equal(short[0], short[1])
    other = run.tuned_lens(steps=5, lr=LR, batch_size=BATCH, holdout=0.25, seed=1, progress=False)
    assert not np.array_equal(other.ds["weight"].values, short[0])


def test_kl_gradient_equals_autograd():
    """The blockwise KL and its hand-written gradient against full-vocabulary torch autograd."""
    g = torch.Generator().manual_seed(0)
    V, d, R = 1000, 16, 7
    U, c = torch.randn(V, d, generator=g), torch.randn(V, generator=g)
    readout = Readout("none", 0.0, None, None, U, c)
    xf = torch.randn(R, d, generator=g) * 2
    x = (torch.randn(R, d, generator=g) * 2).requires_grad_()
    final = readout_stats(xf, readout, with_unembed=True, vocab_block=128)
    kl = kl_to_final(x, readout, final)
    kl.sum().backward()
    x2 = x.detach().clone().double().requires_grad_()
    lpf = torch.log_softmax(xf.double() @ U.double().T + c.double(), -1)
    lp = torch.log_softmax(x2 @ U.double().T + c.double(), -1)
    want = (lpf.exp() * (lpf - lp)).sum(-1)
    want.sum().backward()
    np.testing.assert_allclose(kl.detach().numpy(), want.detach().numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(x.grad.numpy(), x2.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_lens_job_and_one_prompt_views_with_tuned(planted, trained):
    run, _ = planted
    L = int(run.attrs["model"]["n_layers"])
    logits = _np_readout(run)
    W, B = trained.ds["weight"].values, trained.ds["bias"].values
    ds = run.lens(topk=3, lens="tuned", progress=False).load()
    assert ds.attrs["params"]["lens"]["kind"] == "tuned"
    sl = run.token_slice(2)
    h = run.ds["hidden"].values[sl].astype(np.float64)
    lp_f = _log_softmax(logits(h[:, L]))
    for k in range(L + 1):
        hk = h[:, k] + h[:, k] @ W[k].T.astype(np.float64) + B[k]
        lp = _log_softmax(logits(hk))
        rows = ds.isel(token=sl, depth=k)
        np.testing.assert_array_equal(rows.topk_ids.values, np.argsort(-lp, -1)[:, :3])
        np.testing.assert_allclose(rows.kl_final.values, (np.exp(lp_f) * (lp_f - lp)).sum(-1), atol=2e-4, rtol=1e-3)
        if k == 1:
            pred = run.layer_predictions(prompt=2, position=-1, depth=1, topk=3, lens="tuned")
            assert list(pred.token_id) == list(np.argsort(-lp[-1])[:3])
            np.testing.assert_allclose(pred.prob.values, np.exp(np.sort(lp[-1])[::-1][:3]), rtol=1e-4)
    # logit and tuned results are keyed apart
    logit = run.lens(topk=3, progress=False)
    assert "lens" not in logit.attrs["params"]
    ranks_t, ranks_l = run.rankings(prompt=2, lens="tuned"), run.rankings(prompt=2)
    assert (ranks_t.loc[L] == ranks_l.loc[L]).all()  # the output depth is the same for both
    assert not ranks_t.loc[0].equals(ranks_l.loc[0])
    watch = run.rankings_watch(prompt=2, watch=[" the"], lens="tuned")
    assert watch.shape == (L + 1, 1)


def test_other_model_refused_and_bad_input(planted, trained, tmp_path):
    run, _ = planted
    other = tmp_path / "other.zarr"
    shutil.copytree(run.path, other)
    g = zarr.open_group(str(other), mode="r+")
    g.attrs["model"] = {**g.attrs["model"], "weights_sha256": "0" * 64}
    shutil.rmtree(other / "analysis", ignore_errors=True)
    orun = ss.open_run(str(other))
    with pytest.raises(ConfigError, match="was trained for"):
        orun.lens(lens=f"tuned:{run.path}", progress=False)
    res = CliRunner().invoke(cli, ["lens", str(other), "--lens", f"tuned:{run.path}"])
    assert res.exit_code == 1 and "trained for" in res.output and res.output.count("\n") == 1
    with pytest.raises(MissingArrayError, match="has no analysis/tuned_lens result"):
        orun.layer_predictions(lens="tuned")
    with pytest.raises(ConfigError, match="is not logit, tuned"):
        run.rankings(lens="tuned:")
    with pytest.raises(ConfigError, match="holdout"):
        run.tuned_lens(holdout=1.5)
    with pytest.raises(ConfigError, match="norm none"):
        run.rankings(lens="tuned", norm="none")


def test_cli_train_and_eval(planted, trained):
    run, _ = planted
    res = CliRunner().invoke(cli, ["tuned-lens", "eval", run.path])
    assert res.exit_code == 0, res.output
    L = int(run.attrs["model"]["n_layers"])
    lines = res.output.splitlines()
    assert len(lines) == 3 + L + 1 and lines[-1].split()[0] == str(L)
    row0 = lines[3].split()
    np.testing.assert_allclose(float(row0[2]), float(trained.ds["kl"].sel(lens="tuned").values[0]), atol=1e-3)
    res = CliRunner().invoke(cli, ["tuned-lens", "train", run.path, "--steps", str(STEPS), "--lr", str(LR),
                                   "--batch-size", str(BATCH), "--holdout", "0.25"])
    assert res.exit_code == 0 and "held-out" in res.output  # the stored result, reused


def test_no_transformers_import(planted, trained, tmp_path):
    run = _copy(planted[0], tmp_path / "copy.zarr")
    code = ("import sys, stratascope as ss\n"
            f"run = ss.open_run({run.path!r})\n"
            "tl = run.tuned_lens(steps=3, holdout=0.3, progress=False)\n"
            "tl.eval\n"
            "run.layer_predictions(prompt=0, lens='tuned'); run.rankings(prompt=0, lens='tuned')\n"
            "run.lens(topk=2, lens='tuned', progress=False)\n"
            "assert 'transformers' not in sys.modules, 'transformers was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
