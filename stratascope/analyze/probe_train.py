"""Training and scoring many linear probes at once, streaming over row blocks.

One model per (fold held out, depth, task|control), plus one per depth trained on every row
(whose weights are saved). All are updated from the same mini-batch, so each epoch reads the
features once however many depths and folds there are. Features are standardized with the
mean/std of each model's own training rows (from one streaming pass); the loss is the mean
cross-entropy (or half squared error on the standardized target) plus l2/2 * ||w||^2, i.e.
scikit-learn's LogisticRegression(C=1 / (l2 * n_train)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..progress import tqdm


@dataclass
class Targets:
    """What the models learn: per row its fold, label, control label; per model its fold and task."""

    fold: np.ndarray  # (n,) fold of each row
    y: np.ndarray  # (n,) class index (int) or value (float)
    control: np.ndarray | None  # (n,) control-task label, or None
    n_folds: int
    n_out: int  # classes, or 1 for regression
    regress: bool

    def models(self) -> tuple[np.ndarray, np.ndarray]:
        """(fold held out, is control) per model; fold n_folds = holds nothing out (the saved probe)."""
        folds = list(range(self.n_folds)) + [self.n_folds]
        ctrl = [False] * len(folds)
        if self.control is not None:
            folds += list(range(self.n_folds))
            ctrl += [True] * self.n_folds
        return np.array(folds), np.array(ctrl)


def _feature_stats(reader, fold: np.ndarray, n_folds: int, progress: bool):
    """Sums, sums of squares and counts per fold (float64), one pass."""
    S = Q = None
    N = np.zeros(n_folds)
    for b in tqdm(range(len(reader.blocks)), desc="probe stats", unit="block", disable=not progress, mininterval=0.5):
        rows, x = reader.read(b)
        x = x.astype(np.float64)
        if S is None:
            S, Q = np.zeros((n_folds,) + x.shape[1:]), np.zeros((n_folds,) + x.shape[1:])
        f = fold[rows]
        for k in range(n_folds):
            xk = x[f == k]
            S[k] += xk.sum(axis=0)
            Q[k] += (xk * xk).sum(axis=0)
            N[k] += len(xk)
    return S, Q, N


def _mean_sd(S, Q, N):
    mean = S / N
    var = np.maximum(Q / N - mean**2, 0.0)
    sd = np.sqrt(var)
    constant = var <= 1e-12 * (1.0 + mean**2)
    return mean, np.where(constant, 1.0, sd)


class StackedProbe(torch.nn.Module):
    """Linear models (M, depth) on standardized features: logits (n, M, depth, out).

    Features are first standardized with all rows' statistics (g, s) for numerical range, then by
    each model's own training-row statistics (mu, sd, expressed in that space): together exactly
    (x - mean_train) / sd_train, with no information from held-out rows.
    """

    def __init__(self, g, s, mu, sd, n_out: int):
        super().__init__()
        M, D, d = mu.shape
        self.register_buffer("g", torch.as_tensor(g, dtype=torch.float32))
        self.register_buffer("s", torch.as_tensor(s, dtype=torch.float32))
        self.register_buffer("mu", torch.as_tensor(mu, dtype=torch.float32))
        self.register_buffer("sd", torch.as_tensor(sd, dtype=torch.float32))
        self.W = torch.nn.Parameter(torch.zeros(M, D, d, n_out))
        self.b = torch.nn.Parameter(torch.zeros(M, D, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        M, D, d, C = self.W.shape
        z = ((x - self.g) / self.s).permute(1, 0, 2)  # (D, n, d)
        w = self.W / self.sd[..., None]  # (M, D, d, C)
        b = self.b - torch.einsum("mdk,mdkc->mdc", self.mu / self.sd, self.W)
        out = torch.bmm(z, w.permute(1, 2, 0, 3).reshape(D, d, M * C))  # (D, n, M*C)
        return out.reshape(D, -1, M, C).permute(1, 2, 0, 3) + b


def _targets_for(t: Targets, rows, ctrl_model: np.ndarray):
    y = t.y[rows]
    c = t.control[rows] if t.control is not None else y
    return np.where(ctrl_model[None, :], c[:, None], y[:, None])  # (n, M)


def fit(reader, t: Targets, *, epochs: int | None, batch_size: int, lr: float, l2: float, seed: int,
        device: str = "cpu", progress: bool = True):
    """Train every model; return (probe, model folds, model control flags, target mean, target sd)."""
    model_fold, model_ctrl = t.models()
    S, Q, N = _feature_stats(reader, t.fold, t.n_folds, progress)
    g, s = _mean_sd(S.sum(0), Q.sum(0), N.sum())
    mu, sd = [], []
    for f in model_fold:  # each model's training rows = every fold but its own
        keep = np.arange(t.n_folds) != f
        m, v = _mean_sd(S[keep].sum(0), Q[keep].sum(0), N[keep].sum())
        mu.append((m - g) / s)
        sd.append(v / s)
    probe = StackedProbe(g, s, np.stack(mu), np.stack(sd), t.n_out).to(device)
    # regression: each model standardizes the target with its own training rows
    y_mu = np.zeros(len(model_fold))
    y_sd = np.ones(len(model_fold))
    if t.regress:
        for i, (f, c) in enumerate(zip(model_fold, model_ctrl)):
            vals = (t.control if c else t.y)[t.fold != f]
            y_mu[i], y_sd[i] = vals.mean(), vals.std() or 1.0

    steps_per_epoch = sum(math.ceil(reader.block_len(b) / batch_size) for b in range(len(reader.blocks)))
    if epochs is None:  # enough optimizer steps for small sets, few passes for large ones
        epochs = int(np.clip(math.ceil(1000 / max(steps_per_epoch, 1)), 5, 500))
    total = epochs * steps_per_epoch
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, total) / total)))
    rng = np.random.default_rng(seed)
    mf = torch.as_tensor(model_fold, device=device)
    ymu_t = torch.as_tensor(y_mu, dtype=torch.float32, device=device)
    ysd_t = torch.as_tensor(y_sd, dtype=torch.float32, device=device)
    bar = tqdm(total=total, desc="probe train", unit="step", disable=not progress, mininterval=0.5)
    for _ in range(epochs):
        for blk in rng.permutation(len(reader.blocks)):
            rows, x = reader.read(blk)
            r = np.arange(rows.start, rows.stop)
            xb_all = torch.as_tensor(x, device=device)
            train_all = torch.as_tensor(t.fold[r], device=device)[:, None] != mf[None, :]  # (n, M)
            tgt_all = torch.as_tensor(_targets_for(t, r, model_ctrl), device=device)
            if t.regress:
                tgt_all = (tgt_all.float() - ymu_t) / ysd_t
            order = torch.as_tensor(rng.permutation(len(r)), device=device)
            for lo in range(0, len(r), batch_size):
                sel = order[lo:lo + batch_size]
                out = probe(xb_all[sel])  # (n, M, D, C)
                tgt = tgt_all[sel]
                if t.regress:
                    loss_rows = 0.5 * (out[..., 0] - tgt[..., None]) ** 2
                else:
                    logp = torch.log_softmax(out, dim=-1)
                    loss_rows = -logp.gather(-1, tgt.long()[:, :, None, None].expand(-1, -1, out.shape[2], 1))[..., 0]
                w = train_all[sel].float()[..., None]  # (n, M, 1): only each model's training rows count
                loss = ((loss_rows * w).sum(0) / w.sum(0).clamp(min=1)).sum() + 0.5 * l2 * (probe.W**2).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
    bar.close()
    return probe, model_fold, model_ctrl, y_mu, y_sd, epochs


@torch.no_grad()
def evaluate(reader, t: Targets, probe, model_fold, model_ctrl, y_mu, y_sd, device="cpu", progress=True) -> dict:
    """Held-out scores per (model, depth): confusion matrices, or SSE and target sums for R²."""
    M, D, _, C = probe.W.shape
    conf = np.zeros((M, D, C, C), dtype=np.int64)
    sse = np.zeros((M, D))
    ysum, ysq, cnt = np.zeros(M), np.zeros(M), np.zeros(M)
    for b in tqdm(range(len(reader.blocks)), desc="probe score", unit="block", disable=not progress, mininterval=0.5):
        rows, x = reader.read(b)
        r = np.arange(rows.start, rows.stop)
        test = t.fold[r][:, None] == model_fold[None, :]  # (n, M)
        if not test.any():
            continue
        out = probe(torch.as_tensor(x, device=device)).cpu().numpy()  # (n, M, D, C)
        tgt = _targets_for(t, r, model_ctrl)
        ii, mm = np.nonzero(test)
        if t.regress:
            pred = out[ii, mm, :, 0] * y_sd[mm, None] + y_mu[mm, None]  # (k, D)
            truth = tgt[ii, mm].astype(np.float64)
            np.add.at(sse, mm, (pred - truth[:, None]) ** 2)
            np.add.at(ysum, mm, truth)
            np.add.at(ysq, mm, truth**2)
            np.add.at(cnt, mm, 1)
        else:
            pred = out[ii, mm].argmax(-1)  # (k, D)
            truth = np.broadcast_to(tgt[ii, mm].astype(np.int64)[:, None], pred.shape)
            dd = np.broadcast_to(np.arange(D)[None, :], pred.shape)
            flat = ((mm[:, None] * D + dd) * C + truth) * C + pred
            conf += np.bincount(flat.ravel(), minlength=M * D * C * C).reshape(M, D, C, C)
    return {"confusion": conf, "sse": sse, "ysum": ysum, "ysq": ysq, "count": cnt}


def accuracy_f1(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and macro-F1 (over classes present in truth or prediction, as scikit-learn) from (..., C, C)."""
    tp = np.diagonal(conf, axis1=-2, axis2=-1).astype(np.float64)
    total = conf.sum(axis=(-2, -1))
    support, predicted = conf.sum(-1), conf.sum(-2)
    present = (support + predicted) > 0
    f1 = np.where(present, 2 * tp / np.maximum(support + predicted, 1), 0.0)
    macro = f1.sum(-1) / np.maximum(present.sum(-1), 1)
    return tp.sum(-1) / np.maximum(total, 1), macro


def r2(scores: dict) -> np.ndarray:
    n = np.maximum(scores["count"], 1)
    sst = scores["ysq"] - scores["ysum"] ** 2 / n
    return 1.0 - scores["sse"] / np.where(sst > 0, sst, np.nan)[:, None]


def raw_weights(probe: StackedProbe, m: int, y_mu: float, y_sd: float) -> tuple[np.ndarray, np.ndarray]:
    """Model m's weights in the stored hidden-state space: logits = hidden @ W + b, W (D, d, C), b (D, C)."""
    W = probe.W[m].detach().double().cpu().numpy()
    b = probe.b[m].detach().double().cpu().numpy()
    g, s = probe.g.double().cpu().numpy(), probe.s.double().cpu().numpy()
    mu, sd = probe.mu[m].double().cpu().numpy(), probe.sd[m].double().cpu().numpy()
    w_std = W / sd[..., None]  # on globally standardized z
    b_std = b - np.einsum("dk,dkc->dc", mu / sd, W)
    w_raw = w_std / s[..., None]
    b_raw = b_std - np.einsum("dk,dkc->dc", g / s, w_std)
    return w_raw * y_sd, b_raw * y_sd + y_mu
