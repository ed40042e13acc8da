"""Input attributions and hidden-state gradients, computed per batch after the capture forward.

Targets. A target is a position r that predicts the token after it: its score is
log p(x[r+1] | x[:r+1]), the log-probability the model gives at position r to the token that
actually follows. The attribution row of target r is stored at token row r and spans keys
0..r (keys after r are 0: a causal model's prediction at r does not depend on them). By
default the targets are the positions that predicted a generated token: for a generated
token at position t, the target is the prediction made at position t-1 (so row t-1). With
`targets="all"` every position but the last is a target. Rows that are not targets are NaN
(and so is their integrated-gradients delta).

Methods, all differentiating w.r.t. the input (token) embeddings E (n, d_model):
- gradient_norm: ||dscore/dE[k]||_2 over d_model;
- grad_x_input: ||dscore/dE[k] * E[k]||_2;
- integrated_gradients: IG[k] = E[k] * sum_s w_s dscore/dE(alpha_s E)[k] from a zero baseline,
  with the quadrature (alpha_s, w_s) of `ig_method`; stored as ||IG[k]||_2; the completeness
  gap sum_k,d IG - (score(E) - score(0)) goes to attribution_integrated_gradients_delta.

Batching. One backward serves many targets: each (target, path point) is a row of a
batch holding the prefix x[:r+1] (right padded); the rows are independent, so the gradient
of the summed scores w.r.t. the batched embeddings gives each row its own gradient. Rows are
sorted by length and packed up to a memory budget, so padding and the number of backward
passes stay small.

grad_hidden: the gradient of the sequence's summed next-token log-likelihood
sum_{t<n-1} log p(x[t+1] | x[:t+1]) w.r.t. the residual stream at each captured depth.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError
from ..schemas import VARIABLES
from .hooks import Recorder

METHODS = ("grad_x_input", "integrated_gradients", "gradient_norm")
TARGETS = ("generated", "all")
DELTA = "attribution_integrated_gradients_delta"
GRADIENT_ARRAYS = tuple(n for n, v in VARIABLES.items() if v.capture in ("attribution", "grad"))
GRAD_BYTES = 1 * 2**30  # activation memory one backward may use (CPU; CUDA uses part of free memory)


def _gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.legendre.leggauss(n)
    return (x + 1) / 2, w / 2


def _trapezoid(n: int) -> tuple[np.ndarray, np.ndarray]:
    if n < 2:
        raise ConfigError("--ig-method riemann_trapezoid needs --ig-steps of at least 2")
    w = np.full(n, 1 / (n - 1))
    w[[0, -1]] /= 2
    return np.linspace(0, 1, n), w


# Quadrature rules on [0, 1]: points alpha and weights, as named in Captum.
IG_METHODS = {
    "gausslegendre": _gauss_legendre,
    "riemann_trapezoid": _trapezoid,
    "riemann_middle": lambda n: ((np.arange(n) + 0.5) / n, np.full(n, 1 / n)),
    "riemann_left": lambda n: (np.arange(n) / n, np.full(n, 1 / n)),
    "riemann_right": lambda n: ((np.arange(n) + 1) / n, np.full(n, 1 / n)),
}


@dataclass(frozen=True)
class GradientConfig:
    """Which gradient arrays to compute: attribution methods (may be empty) and grad_hidden."""

    methods: tuple[str, ...] = ()
    grad_hidden: bool = False
    targets: str = "generated"
    ig_steps: int = 32
    ig_method: str = "gausslegendre"

    def arrays(self, max_len: int, n_depths: int, d_model: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (shape after the token axis, dtype); gradients are always float32."""
        out = {f"attribution_{m}": ((max_len,), "float32") for m in self.methods}
        if "integrated_gradients" in self.methods:
            out[DELTA] = ((), "float32")
        if self.grad_hidden:
            out["grad_hidden"] = ((n_depths, d_model), "float32")
        return out

    def to_attrs(self) -> dict:
        return {"attribution_methods": list(self.methods), "grad_hidden": self.grad_hidden,
                "targets": self.targets, "score": "log-probability of the next token",
                "target_row": "row r holds the attribution of the prediction made at position r of token r+1",
                "non_target_rows": "NaN", "keys_after_target": 0.0, "reduction": "L2 norm over d_model",
                "wrt": "input token embeddings", "ig_steps": self.ig_steps, "ig_method": self.ig_method,
                "ig_baseline": "zero embeddings"}


def parse_gradient_config(capture: tuple[str, ...], attribution="grad_x_input", ig_steps: int = 32,
                          ig_method: str = "gausslegendre", attribute: str | None = None,
                          n_generate: int = 0) -> GradientConfig | None:
    """The gradient settings of a capture, or None when it asks for no gradients."""
    if "attribution" not in capture and "grad" not in capture:
        return None
    methods: tuple[str, ...] = ()
    if "attribution" in capture:
        names = attribution.split(",") if isinstance(attribution, str) else list(attribution or ())
        methods = tuple(dict.fromkeys(n.strip() for n in names if n.strip()))
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise ConfigError(f"--attribution {attribution!r}: choose one or more of {', '.join(METHODS)}")
    if not isinstance(ig_steps, int) or isinstance(ig_steps, bool) or ig_steps < 1:
        raise ConfigError(f"--ig-steps {ig_steps!r} must be a whole number of at least 1")
    if ig_method not in IG_METHODS:
        raise ConfigError(f"--ig-method {ig_method!r}: choose one of {', '.join(IG_METHODS)}")
    if attribute is None:
        attribute = "generated" if n_generate else "all"
    if attribute not in TARGETS:
        raise ConfigError(f"--attribute {attribute!r}: choose generated or all")
    if attribute == "generated" and not n_generate and methods:
        raise ConfigError("--attribute generated needs generated tokens: add --generate N, or use --attribute all")
    if "integrated_gradients" in methods:
        IG_METHODS[ig_method](ig_steps)  # fails early for a bad steps/method pair
    return GradientConfig(methods, "grad" in capture, attribute, ig_steps, ig_method)


def target_positions(length: int, n_generated: int, targets: str) -> np.ndarray:
    """Positions r whose prediction of token r+1 is attributed (see the module docstring)."""
    first = 0 if targets == "all" else length - n_generated - 1
    return np.arange(max(first, 0), length - 1)


def memory_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(min(8 * 2**30, free // 2))
    return GRAD_BYTES


def _row_bytes(model: torch.nn.Module, width: int) -> int:
    """A rough upper bound of the activation memory one row of `width` tokens keeps for backward."""
    c = model.config
    d, layers = c.hidden_size, c.num_hidden_layers
    d_mlp = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * d
    per_token = layers * (16 * d + 4 * d_mlp + 3 * c.num_attention_heads * width) * 4
    return width * per_token + 3 * c.vocab_size * 4


def _score(model: torch.nn.Module, embeds: torch.Tensor, mask: torch.Tensor, at: torch.Tensor,
           token: torch.Tensor) -> torch.Tensor:
    """log p(token | prefix) at position `at` of each row: shape (rows,)."""
    logits = model(inputs_embeds=embeds, attention_mask=mask, use_cache=False, logits_to_keep=at[:, None]).logits
    return torch.log_softmax(logits[:, 0].float(), dim=-1).gather(1, token[:, None])[:, 0]


def _pack(items: list, width_of, row_cost, budget: int) -> list[list]:
    """Consecutive items (sorted by width) grouped so that each group's padded batch fits `budget`."""
    groups, current, widest = [], [], 0
    for item in items:
        w = max(widest, width_of(item))
        if current and (len(current) + 1) * row_cost(w) > budget:
            groups.append(current)
            current, w = [], width_of(item)
        current.append(item)
        widest = w
    return groups + ([current] if current else [])


def attribute(model: torch.nn.Module, seqs: list[list[int]], targets: list[np.ndarray], cfg: GradientConfig,
              device: torch.device, max_rows: int | None = None) -> dict[str, list[np.ndarray]]:
    """Attributions of each sequence's targets: name -> one (n, n) array (or (n,) delta) per sequence.

    max_rows caps the rows of one backward (1 = one backward per target and path point, for
    benchmarks); None packs rows up to the memory budget.
    """
    emb = model.get_input_embeddings()
    with torch.no_grad():
        E = [emb(torch.tensor(s, device=device)).detach() for s in seqs]
    ids = [torch.tensor(s, device=device) for s in seqs]
    plain = bool({"grad_x_input", "gradient_norm"} & set(cfg.methods))
    ig = "integrated_gradients" in cfg.methods
    alphas, weights = IG_METHODS[cfg.ig_method](cfg.ig_steps) if ig else (np.zeros(0), np.zeros(0))
    # A row: (sequence, target r, alpha, weight); weight None marks the plain gradient at alpha 1.
    rows = [(i, int(r), 1.0, None) for i, rs in enumerate(targets) for r in rs] if plain else []
    rows += [(i, int(r), float(a), float(w))
             for i, rs in enumerate(targets) for r in rs for a, w in zip(alphas, weights)]
    rows.sort(key=lambda row: (row[1], row[0]))
    out = {f"attribution_{m}": [np.full((len(s), len(s)), np.nan, dtype=np.float32) for s in seqs] for m in cfg.methods}
    ig_sum = {(i, int(r)): torch.zeros_like(E[i][:r + 1]) for i, rs in enumerate(targets) for r in rs} if ig else {}
    groups = _pack(rows, lambda row: row[1] + 1, lambda w: _row_bytes(model, w), memory_budget(device))
    if max_rows is not None:
        groups = [g[k:k + max_rows] for g in groups for k in range(0, len(g), max_rows)]
    for group in groups:
        width = max(r for _, r, _, _ in group) + 1
        embeds = torch.zeros((len(group), width, E[0].shape[-1]), dtype=E[0].dtype, device=device)
        mask = torch.zeros((len(group), width), dtype=torch.long, device=device)
        for j, (i, r, a, _) in enumerate(group):
            embeds[j, :r + 1] = a * E[i][:r + 1]
            mask[j, :r + 1] = 1
        at = torch.tensor([r for _, r, _, _ in group], device=device)
        token = torch.stack([ids[i][r + 1] for i, r, _, _ in group])
        embeds.requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(_score(model, embeds, mask, at, token).sum(), embeds)
        for j, (i, r, _, w) in enumerate(group):
            g = grad[j, :r + 1]
            if w is None:
                if "gradient_norm" in cfg.methods:
                    out["attribution_gradient_norm"][i][r, :] = 0
                    out["attribution_gradient_norm"][i][r, :r + 1] = g.norm(dim=-1).cpu().numpy()
                if "grad_x_input" in cfg.methods:
                    out["attribution_grad_x_input"][i][r, :] = 0
                    out["attribution_grad_x_input"][i][r, :r + 1] = (g * E[i][:r + 1]).norm(dim=-1).cpu().numpy()
            else:
                ig_sum[(i, r)] += w * g
    if ig:
        out[DELTA] = _finish_ig(model, E, ids, targets, ig_sum, out["attribution_integrated_gradients"], device)
    return out


@torch.no_grad()
def _finish_ig(model, E, ids, targets, ig_sum, rows_out, device) -> list[np.ndarray]:
    """Write each IG row and return each sequence's completeness gap per target row."""
    deltas = []
    for i, rs in enumerate(targets):
        delta = np.full(len(ids[i]), np.nan, dtype=np.float32)
        if len(rs):
            at = torch.as_tensor(rs, device=device)
            n = int(rs.max()) + 1
            full, zero = E[i][None, :n], torch.zeros_like(E[i][None, :n])
            mask = torch.ones((1, n), dtype=torch.long, device=device)
            token = ids[i][at + 1]
            gap = []
            for r, _tok in zip(rs, token):
                attr = ig_sum.pop((i, int(r))) * E[i][:r + 1]
                rows_out[i][r, :] = 0
                rows_out[i][r, :r + 1] = attr.norm(dim=-1).cpu().numpy()
                gap.append(attr.sum())
            logits = model(inputs_embeds=torch.cat([full, zero]), attention_mask=mask.expand(2, -1),
                           use_cache=False, logits_to_keep=at[None].expand(2, -1)).logits
            logp = torch.log_softmax(logits.float(), dim=-1).gather(2, token[None, :, None].expand(2, -1, 1))[..., 0]
            delta[rs] = (torch.stack(gap) - (logp[0] - logp[1])).cpu().numpy()
            if not np.isfinite(delta[rs]).all():
                warnings.warn("integrated gradients gave non-finite values: the gradient at the zero baseline itself "
                              "can be NaN (riemann_trapezoid and riemann_left evaluate it); use --ig-method "
                              "gausslegendre or riemann_middle", RuntimeWarning, stacklevel=2)
        deltas.append(delta)
    return deltas


def hidden_gradients(model: torch.nn.Module, adapter, seqs: list[list[int]], depths: list[int],
                     device: torch.device) -> list[np.ndarray]:
    """grad_hidden per sequence: (n, depth, d_model), gradient of its summed next-token log-likelihood."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out: list[np.ndarray | None] = [None] * len(seqs)
    for group in _pack(order, lambda i: len(seqs[i]), lambda w: _ll_bytes(model, w), memory_budget(device)):
        width = len(seqs[group[0]])
        input_ids = torch.zeros((len(group), width), dtype=torch.long, device=device)
        mask = torch.zeros_like(input_ids)
        for j, i in enumerate(group):
            input_ids[j, :len(seqs[i])] = torch.tensor(seqs[i], device=device)
            mask[j, :len(seqs[i])] = 1
        with torch.enable_grad(), Recorder(adapter, ("hidden",), [], depths) as rec:
            logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(2, input_ids[:, 1:, None])[..., 0]
            ll = (logp * mask[:, 1:]).sum()  # padding targets count for nothing
            states = [rec.out[("hidden", d)] for d in depths]
            grads = torch.autograd.grad(ll, states)
        stacked = torch.stack(grads, dim=2).float().cpu().numpy()
        for j, i in enumerate(group):
            out[i] = stacked[j, :len(seqs[i])]
    return out  # type: ignore[return-value]


def _ll_bytes(model: torch.nn.Module, width: int) -> int:
    return _row_bytes(model, width) + 2 * width * model.config.vocab_size * 4


def gradient_rows(model: torch.nn.Module, adapter, ids: list[list[int]], batch, lengths: np.ndarray, n_new: int,
                  cfg: GradientConfig, depths: list[int], device: torch.device) -> dict[str, list[np.ndarray]]:
    """Every gradient array for the prompts of one batch: name -> one array per prompt (its rows)."""
    model.eval()  # no dropout in gradients
    seqs = [list(ids[p]) for p in batch]
    result: dict[str, list[np.ndarray]] = {}
    with torch.inference_mode(False):  # the capture forward runs under inference mode; gradients cannot
        if cfg.methods:
            targets = [target_positions(int(lengths[p]), n_new, cfg.targets) for p in batch]
            result.update(attribute(model, seqs, targets, cfg, device))
        if cfg.grad_hidden:
            result["grad_hidden"] = hidden_gradients(model, adapter, seqs, depths, device)
    return result


def stage_rows(stage: np.ndarray, start: int, values: np.ndarray) -> None:
    """Copy one prompt's rows into the window's staging array at row `start`.

    Attribution rows (n, n) widen to the store's key axis: keys past the sequence are 0 on
    target rows and stay NaN on the others.
    """
    block = stage[start:start + len(values)]
    if values.ndim == 2:
        block[:, :values.shape[1]] = values
        block[~np.isnan(values[:, 0]), values.shape[1]:] = 0
    else:
        block[...] = values
