"""Direct logit attribution from the store: how much the embedding, each attention layer, each head,
each MLP layer and each neuron push the logit of a target token (or target - contrast).

Needs a run captured with `--capture hidden,components` over every layer (z for heads, mlp for
neurons) from a pre-norm model, where the residual before the final norm is
h_L = embedding + sum of attn_out + sum of mlp_out.

Frozen final-norm scale (the standard convention, TransformerLens' `apply_ln_to_stack`): the
final norm is linear once its scale is fixed, so it is fixed at its value on the whole residual
at the last depth, and every component c contributes

    RMSNorm:    c * w / rms(h_L)                . (U[target] - U[contrast])
    LayerNorm:  (c - mean(c)) * w / sigma(h_L)  . (U[target] - U[contrast])

LayerNorm's centring is linear (the mean of a sum is the sum of the means), so each component
is centred by its own mean. What no component writes, the final norm's bias and the unembedding
bias, is the `bias` component. The contributions then add up to the model's logit (difference)
exactly, up to float error: `total` is their sum, `logit` the logit read out through the full
final norm (as the lens does), `gap` = total - logit.

Heads: z[h] @ W_O[h] through the same direction; they sum to attn.<layer> minus the output
projection's bias. Neurons: mlp[n] * W_out[n], the k largest by absolute contribution per layer.

The job streams the store's token chunks (dask, torch inside each task) and writes analysis/dla,
keyed by its parameters.
"""

from __future__ import annotations

import json

import dask
import dask.array as da
import numpy as np
import pandas as pd
import torch
import xarray as xr

from ..errors import ConfigError, MissingArrayError, OutOfRangeError
from .lens import _local_scheduler, readout_for
from .readout import Readout
from .results import job_progress, load_result, save_result
from .targets import _next_ids, _words_per_row, first_token_ids
from .targets import select_rows as target_rows

JOB = "dla"
TARGETS = ("next", "top")  # anything else is a word
CONVENTION = "final-norm scale frozen at the last depth"
ROW_CHUNK = 1024  # rows per chunk of the stored result
TOP_ROWS = 64  # rows read out over the full vocabulary at once (target top): bounded memory


# ---------------------------------------------------------------- inputs


def _check_run(run, neurons: int) -> None:
    """Refuse runs whose logit does not decompose, or that lack what the job needs, in one sentence."""
    comp = run.attrs["capture"].get("components")
    if (comp is not None and not comp["pre_norm"]) or not run.attrs["model"]["causal"]:
        raise ConfigError(f"{run.path} was captured from {run.attrs['model']['name']}, a post-norm encoder "
                          "(each block's LayerNorm rescales the residual after the add, and there is no LM head), "
                          "so it has no logit that decomposes into layer contributions; direct logit attribution "
                          "needs a pre-norm causal LM such as smollm2")
    for name, flag in (("hidden", "hidden"), ("attn_out", "components"), ("mlp_out", "components")):
        run.require(name, flag)
    if neurons:
        run.require("mlp", "mlp")
    L = int(run.attrs["model"]["n_layers"])
    if list(run.attrs["capture"]["layers"]) != list(range(L)):
        raise ConfigError(f"{run.path} captured only layers {run.attrs['capture']['layers']}; direct logit "
                          "attribution needs every layer: capture again without --layers")


def dla_params(run, target: str | None = "next", target_column: str | None = None, contrast: str | None = None,
               contrast_column: str | None = None, positions: str = "last", neurons: int = 0,
               strict: bool = False) -> dict:
    """The parameters that decide a dla result (checked before anything is computed). Rows, words and
    columns mean what they mean for the lens (analyze/targets.py)."""
    target = None if target_column is not None and target == "next" else target
    target = "next" if target is None and target_column is None else target
    if target is not None and target_column is not None:
        raise ConfigError("give --target or --target-column, not both")
    if not isinstance(neurons, (int, np.integer)) or neurons < 0:
        raise ConfigError(f"--neurons {neurons!r} must be a whole number of at least 0")
    d_mlp = int(run.attrs["model"]["d_mlp"])
    if neurons > d_mlp:
        raise OutOfRangeError(f"--neurons {neurons} exceeds the MLP width {d_mlp}")
    return {"positions": str(positions), "target": target, "target_column": target_column, "contrast": contrast,
            "contrast_column": contrast_column, "strict": bool(strict), "neurons": int(neurons),
            "convention": CONVENTION}


def select_rows(run, params: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token rows, target ids, contrast ids) of the rows the job attributes. A target id of -1 means
    'top' (found in the task), a contrast id of -1 no contrast. With target next, rows whose sequence
    ends there (no next token) are left out."""
    rows = target_rows(run, params["positions"])
    if not len(rows):
        raise OutOfRangeError(f"--positions {params['positions']} selects no token of {run.path}")
    target, column = params["target"], params["target_column"]
    if target in TARGETS and column is None:
        ids = _next_ids(run, rows) if target == "next" else np.full(len(rows), -1, np.int64)
    else:
        ids = first_token_ids(run, _words_per_row(run, rows, target, column, "target"), params["strict"], "target")
    words = _words_per_row(run, rows, params["contrast"], params["contrast_column"], "contrast")
    contrast = (first_token_ids(run, words, params["strict"], "contrast") if words is not None
                else np.full(len(rows), -1, np.int64))
    if target == "next" and column is None:
        keep = ids >= 0
        if not keep.any():
            raise ConfigError(f"--positions {params['positions']} selects rows that end their sequences, so there is "
                              "no next token to attribute; use --target top, a word, or other --positions")
        rows, ids, contrast = rows[keep], ids[keep], contrast[keep]
    return rows.astype(np.int64), ids.astype(np.int32), contrast.astype(np.int32)


# ---------------------------------------------------------------- the arithmetic


def _minus(table: torch.Tensor, target: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """table[target] - table[contrast] per row (float64), nothing subtracted where contrast is -1."""
    has = (contrast >= 0).double()
    other = table[contrast.clamp(min=0)].double()
    return table[target].double() - (other * has[:, None] if other.dim() > 1 else other * has)


def directions(readout: Readout, h_last: torch.Tensor, target: torch.Tensor, contrast: torch.Tensor) -> tuple:
    """Per row, the vector d with contribution(c) = c . d (frozen scale, centring folded in), and
    the constant no component writes (norm bias, unembedding bias), both float64."""
    u = _minus(readout.unembed, target, contrast)
    x = h_last.double()
    const = torch.zeros(len(x), dtype=torch.float64, device=x.device)
    if readout.unembed_bias is not None:
        const += _minus(readout.unembed_bias, target, contrast)
    if readout.norm_type == "none":
        return u, const
    g = u * readout.norm_weight.double()
    if readout.norm_type == "layernorm":  # (c - mean c) . g = c . (g - mean g)
        scale = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + readout.eps)
        g = g - g.mean(-1, keepdim=True)
    else:
        scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + readout.eps)
    if readout.norm_bias is not None:
        const += u @ readout.norm_bias.double()
    return g * scale, const


def true_logit(readout: Readout, h_last: torch.Tensor, target: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """The logit (difference) through the full final norm, as the lens reads it out."""
    out = (readout.normalize(h_last).double() * _minus(readout.unembed, target, contrast)).sum(-1)
    return out + _minus(readout.unembed_bias, target, contrast) if readout.unembed_bias is not None else out


def top_ids(readout: Readout, h_last: torch.Tensor) -> torch.Tensor:
    """The model's top-1 token of each row, TOP_ROWS rows over the full vocabulary at a time."""
    out = [readout.logits(readout.normalize(h_last[i:i + TOP_ROWS])).argmax(-1)
           for i in range(0, len(h_last), TOP_ROWS)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


class _ChunkDLA:
    """The dask task: the attribution of the selected rows of one token chunk."""

    def __init__(self, readout: Readout, w_heads: torch.Tensor | None, w_neurons: torch.Tensor | None, k: int):
        dev = readout.device
        self.readout, self.k = readout, k
        self.w_heads = w_heads.to(dev) if w_heads is not None else None
        self.w_neurons = w_neurons.to(dev) if w_neurons is not None else None

    @torch.inference_mode()
    def __call__(self, local, target, contrast, hidden, attn, mlp_out, *rest) -> tuple[np.ndarray, ...]:
        dev = self.readout.device
        f = lambda a: torch.from_numpy(np.ascontiguousarray(a[local], dtype=np.float32)).to(dev)  # noqa: E731
        z = rest[0] if self.w_heads is not None else None
        mlp = rest[-1] if self.k else None
        h0, hl = f(hidden[:, 0]), f(hidden[:, -1])
        target = torch.from_numpy(np.asarray(target, dtype=np.int64)).to(dev)
        contrast = torch.from_numpy(np.asarray(contrast, dtype=np.int64)).to(dev)
        if (target < 0).any():  # --target top
            target = top_ids(self.readout, hl)
        d, const = directions(self.readout, hl, target, contrast)
        comps = torch.cat([h0[:, None], f(attn), f(mlp_out)], 1).double()  # (row, 1 + 2L, d_model)
        by_component = torch.cat([torch.einsum("rcd,rd->rc", comps, d), const[:, None]], 1)
        total = by_component.sum(1)
        logit = true_logit(self.readout, hl, target, contrast)
        host = lambda t: t.cpu().numpy()  # noqa: E731
        out = [host(target).astype(np.int32), host(by_component.float()), host(total.float()),
               host(logit.float()), host((total - logit).float())]
        d32 = d.float()
        if self.w_heads is not None:  # z[h] . (W_O[h] @ d): (row, layer, head)
            through = torch.einsum("lhed,rd->rlhe", self.w_heads, d32)
            out.append(host((f(z) * through).sum(-1)))
        if self.k:
            a = f(mlp)  # (row, layer, neuron)
            contrib = torch.stack([a[:, l] * (d32 @ self.w_neurons[l].T) for l in range(a.shape[1])], 1)
            top = contrib.abs().topk(self.k, dim=-1).indices
            out += [host(top).astype(np.int32), host(contrib.gather(-1, top))]
        return tuple(out)


# ---------------------------------------------------------------- the job


def dla_dataset(run, params: dict, device: str = "cpu") -> xr.Dataset:
    """The attribution of every selected row as a lazy Dataset (computed chunk by chunk when written)."""
    rows, target, contrast = select_rows(run, params)
    readout = readout_for(run, device, "float32")
    L, H = int(run.attrs["model"]["n_layers"]), int(run.attrs["model"]["n_heads"])
    heads, k = "z" in run.ds, params["neurons"]
    w_heads = torch.from_numpy(np.asarray(run.readout["attn_out_weight"].values, np.float32)) if heads else None
    w_neurons = torch.from_numpy(np.asarray(run.readout["mlp_out_weight"].values, np.float32)) if k else None
    task = _ChunkDLA(readout, w_heads, w_neurons, k)
    depth = [0, len(run.ds["depth"]) - 1]
    arrays = [run.ds["hidden"].data[:, depth], run.ds["attn_out"].data, run.ds["mlp_out"].data]
    arrays += [run.ds["z"].data] if heads else []
    arrays += [run.ds["mlp"].data] if k else []
    chunks = arrays[0].chunks[0]
    arrays = [a.rechunk((chunks,) + a.shape[1:]) for a in arrays]
    bounds = np.cumsum((0,) + chunks)
    fields = ["target_id", "by_component", "total", "logit", "gap"] + (["by_head"] if heads else []) + \
             (["neuron_id", "neuron_contribution"] if k else [])
    shapes = {"target_id": (), "by_component": (2 * L + 2,), "total": (), "logit": (), "gap": (),
              "by_head": (L, H), "neuron_id": (L, k), "neuron_contribution": (L, k)}
    token = dask.base.tokenize(run.path, run.attrs["created"], json.dumps(params, sort_keys=True), device)
    columns: dict[str, list] = {f: [] for f in fields}
    blocks = zip(*(a.to_delayed().reshape(len(chunks), -1)[:, 0] for a in arrays))
    for i, parts in enumerate(blocks):
        lo, hi = np.searchsorted(rows, [bounds[i], bounds[i + 1]])
        if lo == hi:
            continue
        got = dask.delayed(task, name=f"dla-fn-{token}", pure=True, nout=len(fields))(
            rows[lo:hi] - bounds[i], target[lo:hi], contrast[lo:hi], *parts, dask_key_name=f"dla-{token}-{i}")
        for f, part in zip(fields, got):
            dtype = np.int32 if f in ("target_id", "neuron_id") else np.float32
            columns[f].append(da.from_delayed(part, (hi - lo,) + shapes[f], dtype=dtype))
    dims = {"by_component": ("row", "component"), "by_head": ("row", "layer", "head"),
            "neuron_id": ("row", "layer", "k"), "neuron_contribution": ("row", "layer", "k")}
    # Zarr wants uniform chunks; the per-chunk row counts are not, so the rows are regrouped
    data = {f: (dims.get(f, ("row",)), _uniform(da.concatenate(columns[f]))) for f in fields}
    table = run.ds[["prompt_index", "position"]].isel(token=rows)
    data.update(token=(("row",), rows), contrast_id=(("row",), contrast),
                prompt=(("row",), table["prompt_index"].values.astype(np.int32)),
                position=(("row",), table["position"].values.astype(np.int32)))
    components = ["embed"] + [f"attn.{l}" for l in range(L)] + [f"mlp.{l}" for l in range(L)] + ["bias"]
    coords = {"component": np.array(components, dtype=object), "layer": np.arange(L, dtype=np.int32),
              "head": np.arange(H, dtype=np.int32)}
    ds = xr.Dataset(data, coords=coords)
    ds.attrs.update(_describe(run, params, heads))
    return ds


def _uniform(x: da.Array) -> da.Array:
    return x.rechunk((min(ROW_CHUNK, max(1, x.shape[0])),) + x.shape[1:])


def _describe(run, params: dict, heads: bool) -> dict:
    norm = run.readout.attrs.get("norm_type", "none")
    scale = {"rmsnorm": "c * w / rms(h_L)", "layernorm": "(c - mean(c)) * w / sigma(h_L)"}.get(norm, "c")
    comp = run.attrs["capture"].get("components") or {}
    return {
        "convention": f"{CONVENTION}: contribution(c) = {scale} . (U[target] - U[contrast]); h_L the residual "
                      "before the final norm at the last depth, so the contributions add up to the logit",
        "centring": ("LayerNorm's mean subtraction is linear: each component is centred by its own mean"
                     if norm == "layernorm" else "none (RMSNorm does not centre)"),
        "bias_component": "the final norm's bias and the unembedding bias, which no component writes",
        "gap": "total - logit: float error (float16 captures: the rounding of the stored arrays)",
        "heads": ("z[h] @ attn_out_weight[h] through the same direction; per layer they sum to attn.<layer> minus "
                  "the output projection bias" + (" (linearised: the family normalizes the attention output "
                                                  "before the add)" if comp.get("sublayer_norm") else "")
                  if heads else "not computed: capture z"),
        "neurons": ("the k neurons with the largest |mlp[n] * mlp_out_weight[n] . d| per layer"
                    + (" (linearised: the family normalizes the MLP output before the add)"
                       if comp.get("sublayer_norm") else "") if params["neurons"] else "not computed"),
        "norm_type": norm,
    }


def dla(run, target: str | None = "next", target_column: str | None = None, contrast: str | None = None,
        contrast_column: str | None = None, positions: str = "last", neurons: int = 0, strict: bool = False,
        device: str = "cpu", progress: bool = True) -> DLAResult:
    """Direct logit attribution of the selected rows (see the module docstring), stored in analysis/dla
    and reused when asked again with the same parameters."""
    _check_run(run, neurons)
    params = dla_params(run, target, target_column, contrast, contrast_column, positions, neurons, strict)
    stored = load_result(run, JOB, params)
    if stored is None:
        ds = dla_dataset(run, params, device)
        with dask.config.set(**_local_scheduler()), job_progress(progress):
            stored = save_result(run, JOB, ds, params)
    return DLAResult(run, stored)


# ---------------------------------------------------------------- the result


class DLAResult:
    """One dla result. Rows are labelled by (prompt, position); see the module docstring for the convention."""

    def __init__(self, run, ds: xr.Dataset):
        self.run, self.ds = run, ds

    def _index(self) -> pd.MultiIndex:
        return pd.MultiIndex.from_arrays([self.ds["prompt"].values, self.ds["position"].values],
                                         names=["prompt", "position"])

    @property
    def by_component(self) -> pd.DataFrame:
        """Row x component (embed, attn.0 ... attn.L-1, mlp.0 ... mlp.L-1, bias): logit contribution."""
        return pd.DataFrame(self.ds["by_component"].values, index=self._index(),
                            columns=pd.Index([str(c) for c in self.ds["component"].values], name="component"))

    @property
    def by_head(self) -> xr.DataArray:
        """Row x layer x head: each head's contribution (z @ W_O, without the projection bias)."""
        if "by_head" not in self.ds:
            raise MissingArrayError(f"{self.run.path} has no per-head z; capture with --capture z for head "
                                    "contributions")
        return self.ds["by_head"].assign_coords(prompt=("row", self.ds["prompt"].values),
                                                position=("row", self.ds["position"].values)).load()

    @property
    def rows(self) -> pd.DataFrame:
        """Per row: token, target, contrast, the sum of contributions, the true logit (difference) and the gap."""
        vocab = self.run.readout["vocab_str"]
        tid, cid = self.ds["target_id"].values, self.ds["contrast_id"].values
        contrast = np.where(cid >= 0, vocab.isel(vocab=np.maximum(cid, 0)).values.astype(object), None)
        return pd.DataFrame({"token": self.ds["token"].values,
                             "target": vocab.isel(vocab=tid).values.astype(object), "target_id": tid,
                             "contrast": contrast, "contrast_id": cid, "total": self.ds["total"].values,
                             "logit": self.ds["logit"].values, "gap": self.ds["gap"].values}, index=self._index())

    def top_neurons(self, layer: int, k: int | None = None) -> pd.DataFrame:
        """The k neurons of `layer` with the largest |contribution| per row: (prompt, position, rank) ->
        neuron, contribution."""
        stored = self.ds.attrs["params"]["neurons"]
        if not stored:
            raise MissingArrayError("this dla result kept no neurons; run dla again with --neurons K")
        k = stored if k is None else k
        if not 1 <= k <= stored:
            raise OutOfRangeError(f"k {k} is out of range; this result kept the top {stored} neurons per layer")
        L = self.ds.sizes["layer"]
        if not -L <= layer < L:
            raise OutOfRangeError(f"layer {layer} is out of range; this run has layers 0-{L - 1}")
        ids = self.ds["neuron_id"].isel(layer=layer, k=slice(0, k)).values
        vals = self.ds["neuron_contribution"].isel(layer=layer, k=slice(0, k)).values
        index = pd.MultiIndex.from_arrays([np.repeat(self.ds["prompt"].values, k),
                                           np.repeat(self.ds["position"].values, k),
                                           np.tile(np.arange(1, k + 1), len(ids))],
                                          names=["prompt", "position", "rank"])
        return pd.DataFrame({"neuron": ids.ravel(), "contribution": vals.ravel()}, index=index)

    def summary(self, max_rows: int = 10, top: int = 4) -> list[str]:
        """Lines for `stratascope dla`: per row the target, logit, gap and the components that push most."""
        p = self.ds.attrs["params"]
        what = f"column {p['target_column']!r}" if p["target_column"] else repr(p["target"]) \
            if p["target"] not in TARGETS else p["target"]
        against = p["contrast"] if p["contrast"] is not None else p["contrast_column"]
        vs = "" if against is None else f" - {against!r}" if p["contrast"] is not None else f" - column {against!r}"
        rows, comp = self.rows, self.by_component
        gap = float(np.abs(rows["gap"]).max()) if len(rows) else 0.0
        lines = [f"dla of {len(rows)} rows ({p['positions']} positions), target {what}{vs}; {CONVENTION}; "
                 f"max |sum of contributions - logit| = {gap:.2g} (stored in {self.run.path}/analysis/dla)"]
        for i in range(min(len(rows), max_rows)):
            r, c = rows.iloc[i], comp.iloc[i].drop("bias")
            best = c.reindex(c.abs().sort_values(ascending=False).index[:top])
            prompt, pos = rows.index[i]
            minus = f" - {r['contrast']!r}" if r["contrast"] is not None else ""
            lines.append(f"  prompt {prompt} pos {pos} -> {r['target']!r}{minus}: logit {r['logit']:+.2f}; "
                         + ", ".join(f"{n} {v:+.2f}" for n, v in best.items()))
        if len(rows) > max_rows:
            lines.append(f"  ... {len(rows) - max_rows} more rows")
        return lines
