"""Linear probes at every depth: where does a corpus label become linearly readable?

Labels come from the store: a token-level ``label_<name>`` array (one row per labelled token)
or a prompt-level ``meta_<name>`` column (one row per prompt, its hidden state at the last
prompt token, or the mean over its tokens). Text, bool and integer labels with few values get
a softmax classifier (accuracy, macro-F1); other numeric labels a linear regression (R²).

Cross-validation splits by prompt (or by a metadata column, `group_by`), so no prompt has rows
on both sides. The control task (Hewitt & Liang 2019) gives every type (token id for token
labels; prompt text, or the `control_by` column, for prompt labels) one random label drawn from
the label's empirical distribution, seeded, and trains the same probe on it; selectivity =
accuracy - control accuracy. Rows of masked padding (prompt_index < 0) are never used.

The result lands in analysis/probe_<label>: scores per depth and fold, the weights of a probe
trained on every row per depth (logits = hidden @ weights.T + bias), and the parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import xarray as xr

from ..devices import resolve_device
from ..errors import ConfigError, OutOfRangeError
from ..schemas import LABEL_PREFIX, META_PREFIX, PROBE
from .probe_rows import ArrayRows, PromptRows, TokenRows, prompt_token_ranges
from .probe_train import Targets, accuracy_f1, evaluate, fit, r2, raw_weights
from .results import load_result, save_result
from .stacks import single_stack
from .stored_rows import check_prompt_rows, every_position

MAX_CLASSES_FOR_INT = 20  # integer labels with more distinct values are regressed


@dataclass
class ProbeResult:
    """analysis/probe_<label>, with the summary table as `scores`."""

    ds: xr.Dataset

    @property
    def task(self) -> str:
        return self.ds.attrs["task"]

    @property
    def scores(self) -> pd.DataFrame:
        """Per depth: mean and sd (over folds, ddof=1) of the score, control score, selectivity, baseline, n."""
        ds, n = self.ds, int(self.ds.attrs["n_rows"])
        metric = "accuracy" if self.task == "classify" else "r2"
        score = ds[metric].values  # (depth, fold)
        out = {"depth": ds["depth"].values, metric: score.mean(1), f"{metric}_sd": score.std(1, ddof=1)}
        if self.task == "classify":
            out["macro_f1"] = ds["macro_f1"].values.mean(1)
        control = ds[f"control_{metric}"].values.mean(1) if f"control_{metric}" in ds else np.full(len(score), np.nan)
        out[f"control_{metric}"] = control
        out["selectivity"] = out[metric] - control
        out["baseline" if self.task == "regress" else "majority"] = (
            0.0 if self.task == "regress" else float(ds["majority"].values.mean()))
        out["n"] = n
        return pd.DataFrame(out)

    def direction(self, depth: int) -> np.ndarray:
        """The probe's direction in hidden space at `depth` (binary: class 1 minus class 0; regression: w)."""
        w = self.ds["weights"].sel(depth=depth).values  # (class, d_model)
        if len(w) == 1:
            return w[0]
        if len(w) == 2:
            return w[1] - w[0]
        raise ConfigError(f"a probe over {len(w)} classes has no single direction; read ds['weights'] per class")


def available_labels(ds: xr.Dataset) -> tuple[list[str], list[str]]:
    """(token-level labels, prompt-level labels) in the store."""
    names = list(ds.data_vars)
    return ([n[len(LABEL_PREFIX):] for n in names if n.startswith(LABEL_PREFIX)],
            [n[len(META_PREFIX):] for n in names if n.startswith(META_PREFIX)])


def _values(da: xr.DataArray) -> np.ndarray:
    v = da.values
    return v if v.dtype.kind in "biuf" else v.astype(object)


def _present(v: np.ndarray) -> np.ndarray:
    if v.dtype.kind == "f":
        return ~np.isnan(v)
    if v.dtype.kind in "biu":
        return np.ones(len(v), dtype=bool)
    return np.array([x is not None and str(x) != "" for x in v], dtype=bool)


def _choose_task(v: np.ndarray, task: str, label: str) -> str:
    if task not in ("auto", "classify", "regress"):
        raise ConfigError(f"task {task!r} is not known; use auto, classify or regress")
    numeric = v.dtype.kind in "iuf"
    if task == "regress" and not numeric:
        raise ConfigError(f"label '{label}' holds text, which cannot be regressed; use task='classify'")
    if task != "auto":
        return task
    if v.dtype.kind == "f" or (v.dtype.kind in "iu" and len(np.unique(v)) > MAX_CLASSES_FOR_INT):
        return "regress"
    return "classify"


def _encode(v: np.ndarray, task: str, label: str) -> tuple[np.ndarray, list[str]]:
    if task == "regress":
        y = v.astype(np.float64)
        if np.ptp(y) == 0:
            raise ConfigError(f"label '{label}' has one value ({y[0]:g}) on every row; a probe needs variation")
        return y, []
    keys = v.astype(str) if v.dtype.kind not in "biu" else v
    classes, y = np.unique(keys, return_inverse=True)
    if len(classes) < 2:
        raise ConfigError(f"label '{label}' has one class ({classes[0]!s}) on all {len(v)} labelled rows; "
                          "a probe needs at least two classes")
    return y.astype(np.int64), [str(c) for c in classes]


def assign_folds(groups: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """A fold per row such that rows of one group (prompt) always share it; seeded."""
    uniq, inv = np.unique(groups, return_inverse=True)
    if n_folds < 2:
        raise ConfigError(f"--folds {n_folds}: cross-validation needs at least 2 folds")
    if len(uniq) < n_folds:
        raise ConfigError(f"--folds {n_folds} is more than the {len(uniq)} prompts (groups) with this label; "
                          "use fewer folds")
    perm = np.random.default_rng([seed, 0]).permutation(len(uniq))
    fold_of_group = np.empty(len(uniq), dtype=np.int64)
    fold_of_group[perm] = np.arange(len(uniq)) % n_folds
    return fold_of_group[inv]


def control_labels(types: np.ndarray, y: np.ndarray, regress: bool, n_classes: int, seed: int) -> np.ndarray:
    """Each distinct type gets one random label from the label's empirical distribution."""
    uniq, inv = np.unique(types, return_inverse=True)
    rng = np.random.default_rng([seed, 1])
    if regress:
        draws = rng.choice(y, size=len(uniq))
    else:
        draws = rng.choice(n_classes, size=len(uniq), p=np.bincount(y, minlength=n_classes) / len(y))
    return draws[inv]


def _parse_depths(depths, captured: np.ndarray) -> np.ndarray:
    from ..ranges import parse_ranges

    chosen = parse_ranges(depths, int(captured.max()) + 1, "depths")
    if chosen is None:
        return np.arange(len(captured))
    missing = [d for d in chosen if d not in set(captured.tolist())]
    if missing:
        raise OutOfRangeError(f"--depths: depth {missing[0]} was not captured; this run has depths "
                              f"{', '.join(map(str, captured.tolist()))}")
    return np.searchsorted(captured, chosen)


def fit_and_score(reader, y, groups, types, *, folds: int, regress: bool, n_classes: int, control: bool,
                  seed: int, epochs, batch_size: int, lr: float, l2: float, device: str, progress: bool) -> dict:
    """Train and cross-validate the probes on rows from `reader`; the arrays of the result."""
    fold = assign_folds(groups, folds, seed)
    ctrl = control_labels(types, y, regress, n_classes, seed) if control else None
    t = Targets(fold=fold, y=y, control=ctrl, n_folds=folds, n_out=1 if regress else n_classes, regress=regress)
    probe, model_fold, model_ctrl, y_mu, y_sd, used_epochs = fit(
        reader, t, epochs=epochs, batch_size=batch_size, lr=lr, l2=l2, seed=seed, device=device, progress=progress)
    sc = evaluate(reader, t, probe, model_fold, model_ctrl, y_mu, y_sd, device=device, progress=progress)
    F = folds
    out = {"fold": fold, "epochs": used_epochs, "n_test": np.bincount(fold, minlength=F)}
    if regress:
        score = r2(sc)  # (M, D)
        out["r2"] = score[:F].T
        if control:
            out["control_r2"] = score[F + 1:].T
    else:
        acc, f1 = accuracy_f1(sc["confusion"])
        out.update(accuracy=acc[:F].T, macro_f1=f1[:F].T)
        if control:
            out.update(control_accuracy=acc[F + 1:].T, control_macro_f1=f1[F + 1:].T)
        out["majority"] = np.array([np.mean(y[fold == f] == np.bincount(y[fold != f], minlength=n_classes).argmax())
                                    for f in range(F)])
    w, b = raw_weights(probe, F, float(y_mu[F]), float(y_sd[F]))  # the probe trained on every row
    out["weights"], out["bias"] = w.transpose(0, 2, 1), b
    out["feature_mean"], out["feature_std"] = probe.g.cpu().numpy(), probe.s.cpu().numpy()
    return out


def probe_matrix(x: np.ndarray, y, groups, *, folds: int = 5, types=None, task: str = "auto", seed: int = 0,
                 epochs=None, batch_size: int = 128, lr: float = 0.05, l2: float = 1e-3,
                 progress: bool = False) -> dict:
    """The same probe on an in-memory matrix x (rows, d) or (rows, depth, d): for small studies and checks."""
    x = np.asarray(x, dtype=np.float32)
    x = x[:, None, :] if x.ndim == 2 else x
    y = np.asarray(y)
    task = _choose_task(y, task, "y")
    yy, classes = _encode(y, task, "y")
    return fit_and_score(ArrayRows(x), yy, np.asarray(groups), np.asarray(types if types is not None else groups),
                         folds=folds, regress=task == "regress", n_classes=len(classes), control=types is not None,
                         seed=seed, epochs=epochs, batch_size=batch_size, lr=lr, l2=l2, device="cpu",
                         progress=progress) | {"classes": classes}


def linear_probe(run, label: str, at: str = "last", folds: int = 5, depths=None, control: str = "shuffle",
                 seed: int = 0, *, task: str = "auto", group_by: str | None = None, control_by: str | None = None,
                 epochs: int | None = None, batch_size: int = 128, lr: float = 0.05, l2: float = 1e-3,
                 device: str = "cpu", progress: bool = True, recompute: bool = False) -> ProbeResult:
    """Probe `label` at every captured depth (or `depths`, e.g. '0-30'); see the module docstring."""
    single_stack(run, "the linear probe")
    ds = run.ds
    hidden = run.require("hidden", "hidden")
    token_labels, prompt_labels = available_labels(ds)
    if label not in token_labels and label not in prompt_labels:
        listed = "; ".join(s for s in (f"token labels: {', '.join(token_labels)}" if token_labels else "",
                                       f"prompt labels: {', '.join(prompt_labels)}" if prompt_labels else "") if s)
        raise ConfigError(f"this run has no label '{label}'; " + (f"available are {listed}" if listed else
                          "it has no labels at all: add metadata columns or token-label fields to the corpus"))
    if at not in ("last", "mean"):
        raise ConfigError(f"--at {at!r} is not known; use last or mean")
    if control not in ("shuffle", "none"):
        raise ConfigError(f"--control {control!r} is not known; use shuffle or none")
    if epochs is not None and epochs < 1:
        raise ConfigError(f"--epochs {epochs} must be at least 1")
    if folds < 2:
        raise ConfigError(f"--folds {folds} must be at least 2 (cross-validation needs a held-out fold)")
    device = str(resolve_device(device))
    for col in (group_by, control_by):
        if col is not None and col not in prompt_labels:
            raise ConfigError(f"no metadata column '{col}' to group by; "
                              f"available: {', '.join(prompt_labels) or 'none'}")
    depth_idx = _parse_depths(depths, ds["depth"].values)
    level = "token" if label in token_labels else "prompt"
    if level == "prompt" and not every_position(run):  # a store of selected rows holds what --at reads, or not
        check_prompt_rows(run, at, *prompt_token_ranges(ds, np.arange(run.n_prompts)))
    params = {"label": label, "level": level, "at": at if level == "prompt" else "token", "folds": folds,
              "depths": ds["depth"].values[depth_idx].tolist(), "control": control, "seed": seed, "task": task,
              "group_by": group_by, "control_by": control_by, "epochs": epochs, "batch_size": batch_size,
              "lr": lr, "l2": l2}
    job = PROBE.prefix + label
    if not recompute and (stored := load_result(run, job, params)) is not None:
        return ProbeResult(stored)

    if level == "token":
        v = _values(ds[LABEL_PREFIX + label])
        prompt_of_token = ds["prompt_index"].values
        keep = _present(v) & (prompt_of_token >= 0)
        rows = np.flatnonzero(keep)
        v, prompt_of_row = v[rows], prompt_of_token[rows]
        types = ds["token_id"].values[rows]
    else:
        v = _values(ds[META_PREFIX + label])
        rows = np.flatnonzero(_present(v))
        v, prompt_of_row = v[rows], rows
        types = _values(ds["prompt_text"])[rows].astype(str)
    if len(rows) == 0:
        raise ConfigError(f"label '{label}' has no labelled rows in this run")
    if control_by is not None:
        types = _values(ds[META_PREFIX + control_by])[prompt_of_row].astype(str)
    groups = prompt_of_row if group_by is None else _values(ds[META_PREFIX + group_by])[prompt_of_row].astype(str)
    task = _choose_task(v, task, label)
    y, classes = _encode(v, task, label)
    reader = (TokenRows(hidden.data, rows, depth_idx) if level == "token"
              else PromptRows(ds, rows, at, depth_idx, progress))
    try:
        res = fit_and_score(reader, y, groups, types, folds=folds, regress=task == "regress",
                            n_classes=len(classes), control=control == "shuffle", seed=seed, epochs=epochs,
                            batch_size=batch_size, lr=lr, l2=l2, device=device, progress=progress)
    finally:
        reader.close()
    result = _to_dataset(res, ds["depth"].values[depth_idx], classes, task, level, len(rows), groups)
    return ProbeResult(save_result(run, job, result, params))


def _to_dataset(res: dict, depths, classes, task, level, n_rows, groups) -> xr.Dataset:
    F = len(res["n_test"])
    out_names = classes if task == "classify" else ["value"]
    data = {k: (("depth", "fold"), res[k]) for k in ("accuracy", "macro_f1", "control_accuracy",
                                                     "control_macro_f1", "r2", "control_r2") if k in res}
    data["n_test"] = (("fold",), res["n_test"])
    if "majority" in res:
        data["majority"] = (("fold",), res["majority"])
    data["weights"] = (("depth", "output", "d_model"), res["weights"].astype(np.float32))
    data["bias"] = (("depth", "output"), res["bias"].astype(np.float32))
    data["feature_mean"] = (("depth", "d_model"), res["feature_mean"])
    data["feature_std"] = (("depth", "d_model"), res["feature_std"])
    ds = xr.Dataset(data, coords={"depth": np.asarray(depths, dtype=np.int32), "fold": np.arange(F)})
    ds.attrs.update({"task": task, "level": level, "outputs": list(out_names), "n_rows": int(n_rows),
                     "n_groups": int(len(np.unique(groups))), "epochs": int(res["epochs"]),
                     "probe": "logits = hidden @ weights[depth].T + bias[depth] (trained on every row)"})
    return ds
