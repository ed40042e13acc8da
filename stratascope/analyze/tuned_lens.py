"""The tuned lens (Belrose et al. 2023), trained from the store alone: no model is loaded.

Per depth d < L a translator h -> h + A_d h + b_d (A_d, b_d zero at the start, so training
starts at the logit lens) is trained so that the readout (final norm, then unembedding) of
the translated residual matches the model's output distribution: the loss is
KL(p_final || p_d), p_final the readout of the stored depth-L residual. Prompts are split
into training and held-out sets (seeded); mini-batches of training token rows come from a
bounded, shuffled buffer of whole token chunks, every depth trained from the same batch.
The loss and its exact gradient are computed in vocabulary blocks (tuned_lens_kernel.py).

Stored in analysis/tuned_lens: the translators (`weight` A, `bias` b per depth; zero, the
identity, at depth L), the training curve, held-out KL / cross-entropy / entropy per depth for
the logit and the tuned lens, the held-out prompts, and the weights hash of the model. The
translators apply to runs of the same model only (same weights hash).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import torch
import xarray as xr

from ..errors import ConfigError, MissingArrayError
from ..progress import tqdm
from ..ranges import format_ranges
from ..store import Store
from .lens_inputs import captured_depths, next_ids_lazy, parse_depths, require_hidden
from .probe_rows import chunk_bounds
from .readout import readout_for
from .results import load_result, require_result, save_result
from .stacks import single_stack
from .tuned_lens_kernel import (
    Stats,
    kl_from_stats,
    kl_to_final,
    readout_stats,
    target_logits,
)

JOB = "tuned_lens"
LENSES = ("logit", "tuned")
DEFAULT_STEPS = 250
DEFAULT_LR = 3e-4
DEFAULT_BATCH = 32
BUFFER_BYTES = 64 * 2**20  # the shuffle buffer of token rows (all trained depths) read at once
EVAL_ROWS = 2048  # (token, depth) rows per readout pass during evaluation


# ---------------------------------------------------------------- inputs


def _final_depth(run) -> int:
    L = int(run.attrs["model"]["n_layers"])
    if L not in captured_depths(run):
        raise MissingArrayError(f"the tuned lens trains toward the model's output at depth {L}, which "
                                f"{run.path} did not capture; capture hidden at every layer")
    return L


def tuned_params(run, depths=None, holdout: float = 0.2, steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR,
                 seed: int = 0, batch_rows: int = DEFAULT_BATCH) -> dict:
    """The parameters that decide a tuned lens (the device does not)."""
    require_hidden(run)
    L = _final_depth(run)
    chosen = [d for d in parse_depths(run, depths) if d != L]
    if not chosen:
        raise ConfigError(f"--depths {depths!r} selects only the output depth {L}, which needs no translator; "
                          f"choose depths below {L}")
    if not 0 < float(holdout) < 1:
        raise ConfigError(f"--holdout {holdout} must lie strictly between 0 and 1 (the share of prompts held out)")
    if run.n_prompts < 2:
        raise ConfigError(f"{run.path} has {run.n_prompts} prompt; the tuned lens needs at least 2 "
                          "(training and held-out prompts)")
    if int(steps) < 1 or int(batch_rows) < 1:
        raise ConfigError(f"--steps {steps} and --batch-size {batch_rows} must be at least 1")
    if not float(lr) > 0:
        raise ConfigError(f"--lr {lr} must be positive")
    return {"depths": sorted(chosen), "holdout": float(holdout), "steps": int(steps), "lr": float(lr),
            "seed": int(seed), "batch_rows": int(batch_rows)}


def split_prompts(n_prompts: int, holdout: float, seed: int) -> np.ndarray:
    """A boolean mask over prompts: True = held out. round(holdout * n) prompts, at least one on each side."""
    n_held = min(n_prompts - 1, max(1, int(round(holdout * n_prompts))))
    order = np.random.default_rng([seed, 0]).permutation(n_prompts)
    held = np.zeros(n_prompts, dtype=bool)
    held[order[:n_held]] = True
    return held


class _Rows:
    """The token chunks of the hidden array that hold rows of a set of prompts, read one at a time."""

    def __init__(self, run, prompts: np.ndarray, depth_idx: list[int]):
        self.hidden = run.ds["hidden"].data
        self.pidx = run.ds["prompt_index"].data
        self.next = next_ids_lazy(run)  # the id of the token that came next, -1 where none
        self.keep = np.zeros(run.n_prompts, dtype=bool)
        self.keep[prompts] = True
        self.depth_idx = depth_idx
        self.edges = chunk_bounds(self.hidden)
        offset = run.ds["token_offset"].values[prompts].astype(np.int64)
        n = run.ds["n_tokens"].values[prompts].astype(np.int64)
        first = np.searchsorted(self.edges, offset, side="right") - 1
        last = np.searchsorted(self.edges, offset + n - 1, side="right") - 1
        self.chunks = np.unique(np.concatenate([np.arange(a, b + 1) for a, b in zip(first, last)]))
        self.n_rows = int(n.sum())
        self.row_bytes = len(depth_idx) * self.hidden.shape[2] * 4

    def read(self, c: int, with_targets: bool = False):
        """Chunk c's selected rows: hidden (n, D, d) float32, and their next-token ids (or -1)."""
        a, b = int(self.edges[c]), int(self.edges[c + 1])
        pidx = np.asarray(self.pidx[a:b].compute())
        sel = np.flatnonzero((pidx >= 0) & self.keep[np.maximum(pidx, 0)])
        h = np.asarray(self.hidden[a:b].compute())[sel][:, self.depth_idx].astype(np.float32, copy=False)
        if not with_targets:
            return h, None
        return h, np.asarray(self.next[a:b].compute())[sel]


def _batches(rows: _Rows, batch: int, rng: np.random.Generator):
    """Endless shuffled mini-batches (batch, D, d): chunks in a random order per epoch, gathered
    into a buffer of about BUFFER_BYTES, its rows shuffled; what is left over carries on."""
    per_read = max(batch, BUFFER_BYTES // rows.row_bytes)
    carry = np.zeros((0, len(rows.depth_idx), rows.hidden.shape[2]), dtype=np.float32)
    while True:
        order = rng.permutation(rows.chunks)
        i = 0
        while i < len(order):
            parts, n = [carry], len(carry)
            while i < len(order) and n < per_read:
                h, _ = rows.read(int(order[i]))
                parts.append(h)
                n += len(h)
                i += 1
            buf = np.concatenate(parts)
            parts = None  # at most the buffer and its shuffled copy are held
            buf = buf[rng.permutation(len(buf))]
            whole = len(buf) // batch * batch
            for lo in range(0, whole, batch):
                yield buf[lo:lo + batch]
            carry = buf[whole:]


# ---------------------------------------------------------------- the translators


class Translators(torch.nn.Module):
    """h -> h + A_k h + b_k for each of D depths, learned in a standardized basis.

    The parameters act on the residual standardized with per-dimension mean and sd and are
    scaled by the residual's RMS (statistics of a first sample of training rows), so one
    learning rate suits every depth and dimension (SmolLM2's residual has a few dimensions
    hundreds of times larger than the rest). `affine()` gives the same map as A, b.
    """

    def __init__(self, mean: torch.Tensor, sd: torch.Tensor, rms: torch.Tensor):
        super().__init__()
        D, d = mean.shape
        self.register_buffer("mean", mean)
        self.register_buffer("sd", sd)
        self.register_buffer("rms", rms)
        self.w = torch.nn.Parameter(torch.zeros(D, d, d, device=mean.device))
        self.b = torch.nn.Parameter(torch.zeros(D, d, device=mean.device))

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (n, D, d)
        hs = ((h - self.mean) / self.sd).transpose(0, 1)  # (D, n, d)
        out = torch.baddbmm(self.b[:, None, :], hs, self.w.transpose(1, 2))  # (D, n, d)
        return h + self.rms[None, :, None] * out.transpose(0, 1)

    @torch.no_grad()
    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        A = self.rms[:, None, None] * self.w / self.sd[:, None, :]
        b = self.rms[:, None] * (self.b - torch.einsum("kij,kj->ki", self.w, self.mean / self.sd))
        return A, b


def translate(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """h + A h + b for h (n, D, d) with A (D, d, d), b (D, d)."""
    h = h.float()
    return h + torch.einsum("nkj,kij->nki", h, weight.to(h.device)) + bias.to(h.device)


def _standardizer(sample: np.ndarray, device) -> tuple[torch.Tensor, ...]:
    x = torch.from_numpy(sample).double()
    mean, sd = x.mean(0), x.std(0, unbiased=False)
    rms = x.pow(2).mean((0, 2)).sqrt()
    sd = torch.maximum(sd, 1e-6 * rms[:, None] + 1e-12)
    return tuple(t.float().to(device) for t in (mean, sd, rms))


# ---------------------------------------------------------------- training and evaluation


def _final_stats(h_final: torch.Tensor, readout) -> tuple[torch.Tensor, Stats]:
    x = readout.normalize(h_final.to(readout.device))
    return x, readout_stats(x, readout, with_unembed=True)


def train(run, params: dict, device: str = "cpu", progress: bool = True) -> tuple[Translators, np.ndarray]:
    """Translators for params['depths'] and the training curve (steps, depths) of batch KL."""
    readout = readout_for(run, device, "float32")
    # The cached readout may have been made under torch.inference_mode (by the lens job); the norm
    # parameters take part in the backward pass, so use ordinary copies of them.
    readout = replace(readout, **{k: getattr(readout, k).clone() for k in ("norm_weight", "norm_bias")
                                  if getattr(readout, k) is not None})
    have = captured_depths(run)
    depth_idx = [have.index(d) for d in params["depths"]] + [have.index(_final_depth(run))]
    held = split_prompts(run.n_prompts, params["holdout"], params["seed"])
    rows = _Rows(run, np.flatnonzero(~held), depth_idx)
    batch = min(params["batch_rows"], rows.n_rows)
    stream = _batches(rows, batch, np.random.default_rng([params["seed"], 1]))
    torch.manual_seed(params["seed"])
    first = next(stream)
    D = len(params["depths"])
    # The standardizing statistics come from the first few batches (at most half a buffer of rows).
    n_sample = min(4096, BUFFER_BYTES // 2 // rows.row_bytes) // batch
    sample = np.concatenate([first] + [next(stream) for _ in range(max(0, n_sample - 1))])[:, :D]
    model = Translators(*_standardizer(sample, readout.device))
    del sample
    opt = torch.optim.Adam(model.parameters(), lr=params["lr"])
    # Linear warm-up over the first 10% of steps (Adam's first steps move every entry of A by
    # about lr at once), then linear decay to zero.
    steps, warm = params["steps"], max(1, params["steps"] // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min((t + 1) / warm, (steps - t) / max(1, steps - warm)))
    curve = np.zeros((params["steps"], D), dtype=np.float32)
    bar = tqdm(range(params["steps"]), desc="tuned lens", unit="step", disable=not progress,
               mininterval=0.5)
    h = first
    for step in bar:
        if step:
            h = next(stream)
        ht = torch.from_numpy(h).to(readout.device)
        _, final = _final_stats(ht[:, D], readout)
        x = readout.normalize(model(ht[:, :D]))  # (batch, D, d)
        kl = kl_to_final(x.reshape(-1, x.shape[-1]), readout, final.expand(D)).view(-1, D)
        per_depth = kl.mean(0)
        opt.zero_grad(set_to_none=True)
        per_depth.sum().backward()
        opt.step()
        sched.step()
        curve[step] = per_depth.detach().cpu().numpy()
        bar.set_postfix(kl=f"{float(curve[step].mean()):.4f}", refresh=False)
    return model, curve


@torch.no_grad()
def evaluate(run, weight: torch.Tensor, bias: torch.Tensor, depths: list[int], prompts: np.ndarray,
             device: str = "cpu", progress: bool = True) -> dict[str, np.ndarray]:
    """Mean KL(p_final || p_d), cross-entropy of the next token and entropy (nats) per (lens, depth)
    over the rows of `prompts`; `depths` (< L) get translators weight/bias, depth L is appended."""
    readout = readout_for(run, device, "float32")
    have, L = captured_depths(run), _final_depth(run)
    rows = _Rows(run, prompts, [have.index(d) for d in depths] + [have.index(L)])
    D = len(depths)
    sums = {m: np.zeros((2, D + 1)) for m in ("kl", "cross_entropy", "entropy")}
    n_rows = n_targets = 0
    step = max(1, EVAL_ROWS // (D + 1))
    for c in tqdm(rows.chunks, desc="tuned lens eval", unit="chunk", disable=not progress,
                  mininterval=0.5):
        h_all, tgt_all = rows.read(int(c), with_targets=True)
        for lo in range(0, len(h_all), step):
            h = torch.from_numpy(h_all[lo:lo + step]).to(readout.device)
            tgt = torch.from_numpy(tgt_all[lo:lo + step]).long().to(readout.device)
            n = len(h)
            x_f, final = _final_stats(h[:, D], readout)
            has = (tgt >= 0).cpu().numpy()
            for li, lens in enumerate(LENSES):
                hd = translate(h[:, :D], weight, bias) if lens == "tuned" else h[:, :D]
                x = torch.cat([readout.normalize(hd), x_f[:, None]], 1).reshape(n * (D + 1), -1)
                st = readout_stats(x, readout)
                kl = kl_from_stats(x, st, final.expand(D + 1)).clamp(min=0).view(n, D + 1)
                kl[:, D] = 0  # the output depth is the final distribution itself
                ce = (st.lse - target_logits(x, readout, tgt.repeat_interleave(D + 1))).view(n, D + 1)
                sums["kl"][li] += kl.sum(0).cpu().numpy()
                sums["entropy"][li] += st.entropy.view(n, D + 1).sum(0).cpu().numpy()
                sums["cross_entropy"][li] += ce.cpu().numpy()[has].sum(0)
            n_rows += n
            n_targets += int(has.sum())
    out = {m: (v / max(1, n_targets if m == "cross_entropy" else n_rows)).astype(np.float32) for m, v in sums.items()}
    out.update(n_rows=n_rows, n_targets=n_targets)
    return out


def tuned_dataset(run, params: dict, device: str = "cpu", progress: bool = True) -> xr.Dataset:
    """Train, evaluate on the held-out prompts, and gather everything analysis/tuned_lens stores."""
    model, curve = train(run, params, device, progress)
    weight, bias = (t.cpu() for t in model.affine())
    held = split_prompts(run.n_prompts, params["holdout"], params["seed"])
    scores = evaluate(run, weight, bias, params["depths"], np.flatnonzero(held), device, progress)
    L = _final_depth(run)
    depths = params["depths"] + [L]
    d = weight.shape[1]
    W = np.concatenate([weight.numpy(), np.zeros((1, d, d), np.float32)])
    B = np.concatenate([bias.numpy(), np.zeros((1, d), np.float32)])
    n_tok = run.ds["n_tokens"].values.astype(np.int64)
    ds = xr.Dataset(
        {"weight": (("depth", "d_out", "d_in"), W), "bias": (("depth", "d_out"), B),
         "train_kl": (("step", "depth"), np.concatenate([curve, np.zeros((len(curve), 1), np.float32)], 1)),
         "kl": (("lens", "depth"), scores["kl"]), "cross_entropy": (("lens", "depth"), scores["cross_entropy"]),
         "entropy": (("lens", "depth"), scores["entropy"]), "heldout": (("prompt",), held)},
        coords={"depth": np.array(depths, dtype=np.int32), "lens": np.array(LENSES, dtype=object),
                "step": np.arange(len(curve), dtype=np.int32)})
    ds.attrs.update({
        "model": run.attrs["model"]["name"], "weights_sha256": run.attrs["model"]["weights_sha256"],
        "d_model": int(d), "device": device, "optimizer": "Adam on standardized residuals (see tuned_lens.py)",
        "translator": f"h + weight h + bias; identity (zero) at the output depth {L}",
        "loss": "KL(p_final || p_depth), nats, mean over the batch's token rows, summed over depths",
        "metrics": "held-out prompts: mean KL over rows, cross-entropy of the next token over rows that "
                   "have one, entropy over rows; nats",
        "n_train_prompts": int((~held).sum()), "n_heldout_prompts": int(held.sum()),
        "n_train_tokens": int(n_tok[~held].sum()), "n_heldout_tokens": int(scores["n_rows"]),
        "n_heldout_targets": int(scores["n_targets"])})
    return ds


# ---------------------------------------------------------------- the stored lens


class TunedLens:
    """Translators stored in a run's analysis/tuned_lens, and what they scored on held-out prompts."""

    def __init__(self, path: str, ds: xr.Dataset):
        self.path, self.ds = str(path), ds

    def __repr__(self) -> str:
        p = self.ds.attrs["params"]
        return (f"<TunedLens of {self.ds.attrs['model']} from {self.path}: depths {format_ranges(p['depths'])}, "
                f"{p['steps']} steps, held-out {self.ds.attrs['n_heldout_prompts']} prompts>")

    @property
    def weights_sha256(self) -> str:
        return self.ds.attrs["weights_sha256"]

    @property
    def depths(self) -> list[int]:
        """The depths that have a translator (the output depth, always the identity, not counted)."""
        return list(self.ds.attrs["params"]["depths"])

    @property
    def eval(self) -> pd.DataFrame:
        """Held-out metrics: a row per (depth, lens) with kl, cross_entropy, entropy (nats)."""
        frame = self.ds[["kl", "cross_entropy", "entropy"]].to_dataframe().reset_index()
        frame["lens"] = frame["lens"].astype(str)
        return frame.sort_values(["depth", "lens"], key=lambda s: s.map(LENSES.index) if s.name == "lens" else s,
                                 kind="stable").reset_index(drop=True)[["depth", "lens", "kl", "cross_entropy",
                                                                         "entropy"]]

    def table(self) -> pd.DataFrame:
        """The held-out metrics by depth, both lenses side by side (what `tuned-lens eval` prints)."""
        wide = self.eval.pivot(index="depth", columns="lens", values=["kl", "cross_entropy", "entropy"])
        wide.columns = [f"{m}_{lens}" for m, lens in wide.columns]
        order = [f"{m}_{lens}" for m in ("kl", "cross_entropy", "entropy") for lens in LENSES]
        return wide[order]

    def check_model(self, run) -> None:
        """Refuse a run of another model: translators only mean something for the weights they were trained on."""
        theirs = run.attrs["model"]["weights_sha256"]
        if theirs != self.weights_sha256:
            raise ConfigError(
                f"the tuned lens in {self.path} was trained for {self.ds.attrs['model']} (weights sha256 "
                f"{self.weights_sha256[:12]}) but {run.path} holds {run.attrs['model']['name']} (weights sha256 "
                f"{theirs[:12]}); train a tuned lens on a run of that model (stratascope tuned-lens train {run.path})")

    def translator(self, depths: list[int], final_depth: int):
        """(weight, bias) torch tensors for these depth values, the identity at `final_depth`."""
        have = [int(d) for d in self.ds["depth"].values]
        missing = [d for d in depths if d not in have and d != final_depth]
        if missing:
            raise ConfigError(f"the tuned lens in {self.path} has no translator for depth {missing[0]} (it was "
                              f"trained for depths {format_ranges(self.depths)}); train it with --depths covering it")
        W, B = self.ds["weight"].values, self.ds["bias"].values
        d = W.shape[1]
        weight = np.stack([W[have.index(k)] if k != final_depth else np.zeros((d, d), np.float32) for k in depths])
        bias = np.stack([B[have.index(k)] if k != final_depth else np.zeros(d, np.float32) for k in depths])
        return torch.from_numpy(weight), torch.from_numpy(bias)

    def identity(self) -> dict:
        """What a lens result computed through these translators is keyed by."""
        return {"kind": "tuned", "run": self.path, "trained": self.ds.attrs["created"],
                "params": self.ds.attrs["params"]}


def tuned_lens(run, depths=None, holdout: float = 0.2, steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR,
               seed: int = 0, batch_rows: int = DEFAULT_BATCH, device: str = "cpu", progress: bool = True,
               recompute: bool = False) -> TunedLens:
    """Train the tuned lens of `run` into analysis/tuned_lens, or reuse the stored one with these parameters."""
    single_stack(run, "the tuned lens")
    params = tuned_params(run, depths, holdout, steps, lr, seed, batch_rows)
    stored = None if recompute else load_result(run, JOB, params)
    if stored is None:
        stored = save_result(run, JOB, tuned_dataset(run, params, device, progress), params)
    return TunedLens(run.path, stored)


def load_tuned_lens(path: str) -> TunedLens:
    """The newest tuned lens stored in the run at `path` (whatever its parameters)."""
    store = Store(path, allow_incomplete=True)  # a stratascope store of a known schema version
    ds = require_result(store, JOB, f"stratascope tuned-lens train {path}")
    return TunedLens(path, ds)


def parse_lens(lens) -> tuple[str, str | None]:
    """'logit' | 'tuned' | 'tuned:RUN' -> (kind, path of the run holding the translators or None)."""
    if isinstance(lens, TunedLens):
        return "tuned", lens.path
    text = str(lens or "logit")
    kind, _, path = text.partition(":")
    if kind not in LENSES or (kind == "logit" and path) or (path == "" and ":" in text):
        raise ConfigError(f"--lens {text!r} is not logit, tuned or tuned:RUN (a run holding a trained tuned lens)")
    return kind, path or None


def resolve_lens(run, lens) -> TunedLens | None:
    """None for the logit lens; else the tuned lens named by `lens`, checked against run's model."""
    kind, path = parse_lens(lens)
    if kind == "logit":
        return None
    tl = lens if isinstance(lens, TunedLens) else load_tuned_lens(path or run.path)
    tl.check_model(run)
    return tl


def heldout_table(tl: TunedLens) -> list[str]:
    """Lines for `stratascope tuned-lens eval`/`train`: the held-out metrics by depth, both lenses."""
    a, p = tl.ds.attrs, tl.ds.attrs["params"]
    lines = [f"tuned lens of {a['model']} in {tl.path}/analysis/{JOB}: {p['steps']} steps of {p['batch_rows']} "
             f"rows, lr {p['lr']}, seed {p['seed']}; trained on {a['n_train_prompts']} prompts "
             f"({a['n_train_tokens']} tokens), held out {a['n_heldout_prompts']} ({a['n_heldout_tokens']} tokens)",
             "held-out, nats:   KL(final||depth)      cross-entropy          entropy",
             f"{'depth':>5}      {'logit':>8} {'tuned':>8}    {'logit':>8} {'tuned':>8}    {'logit':>8} {'tuned':>8}"]
    for depth, r in tl.table().iterrows():
        lines.append(f"{depth:>5}      {r.kl_logit:8.3f} {r.kl_tuned:8.3f}    {r.cross_entropy_logit:8.3f} "
                     f"{r.cross_entropy_tuned:8.3f}    {r.entropy_logit:8.3f} {r.entropy_tuned:8.3f}")
    return lines

