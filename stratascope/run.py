"""Run: a captured store, reopened without the model."""

from __future__ import annotations

from functools import cached_property

import numpy as np
import pandas as pd
import xarray as xr

from .errors import ConfigError, MissingArrayError, OutOfRangeError
from .schemas import META_PREFIX, VARIABLES
from .store import open_capture, open_dataset, store_bytes


class Run:
    """A stored capture. `ds` is the lazy Dataset; nothing is read until asked for."""

    def __init__(self, path: str, allow_incomplete: bool = False):
        self.path = str(path)
        self.attrs, self.ds = open_capture(self.path, allow_incomplete=allow_incomplete)

    def __repr__(self) -> str:
        m, c = self.attrs["model"], self.attrs["corpus"]
        return (f"<stratascope.Run {self.path}: {m['name']} ({m['family']}, {m['n_layers']} layers), "
                f"{c['n_prompts']} prompts, {c['n_tokens']} tokens, captured {', '.join(self.captured)}>")

    @property
    def captured(self) -> list[str]:
        return list(self.attrs["capture"]["arrays"])

    @property
    def n_prompts(self) -> int:
        return int(self.ds.sizes["prompt"])

    @property
    def n_tokens(self) -> int:
        return int(self.ds.sizes["token"])

    @cached_property
    def readout(self) -> xr.Dataset:
        return open_dataset(self.path, "readout")

    @cached_property
    def prompts(self) -> pd.DataFrame:
        """One row per prompt: text, token offset and count, and the corpus metadata columns."""
        cols = {"text": self.ds["prompt_text"].values.astype(object),
                "token_offset": self.ds["token_offset"].values, "n_tokens": self.ds["n_tokens"].values}
        for name in self.ds.data_vars:
            if name.startswith(META_PREFIX):
                values = self.ds[name].values
                cols[name[len(META_PREFIX):]] = values.astype(object) if values.dtype.kind in "TUO" else values
        return pd.DataFrame(cols)

    def require(self, name: str, flag: str | None = None) -> xr.DataArray:
        """The array `name`, or a clear error naming the capture flag that produces it."""
        if name not in self.ds:
            flag = flag or name
            raise MissingArrayError(f"this run has no {name} array; capture with --capture {flag}")
        return self.ds[name]

    def prompt_index(self, prompt: int) -> int:
        n = self.n_prompts
        if not -n <= prompt < n:
            raise OutOfRangeError(f"prompt {prompt} is out of range; this run has prompts 0-{n - 1}")
        return prompt % n

    def token_slice(self, prompt: int) -> slice:
        """The rows of `prompt` in the token dimension."""
        p = self.prompt_index(prompt)
        start = int(self.ds["token_offset"][p])
        return slice(start, start + int(self.ds["n_tokens"][p]))

    def tokens(self, prompt: int) -> pd.DataFrame:
        """The tokens of one prompt: id, text, position, whether generated."""
        rows = self.ds.isel(token=self.token_slice(prompt))
        frame = pd.DataFrame({"token_id": rows["token_id"].values, "token": rows["token_str"].values.astype(object),
                              "position": rows["position"].values, "is_generated": rows["is_generated"].values})
        if "token_type_ids" in rows:  # BERT: sentence A (0) or B (1)
            frame["token_type"] = rows["token_type_ids"].values
        return frame

    def heads(self, top: int = 5, recompute: bool = False, progress: bool = False) -> pd.DataFrame:
        """Every attention head summarized over the corpus (analysis/heads, computed once and reused):
        entropy, first/previous/self scores, a pattern label, the (prompt, position) rows where it
        deviates most. The label rule: stratascope.analyze.heads."""
        from .analyze.heads import heads_frame, summarize_heads

        return heads_frame(summarize_heads(self, top=top, recompute=recompute, progress=progress))

    def attention(self, prompt: int, layer: int, head: int) -> pd.DataFrame:
        """Attention weights of one head on one prompt: query x key, labelled "position: token"."""
        from .analyze.views import attention

        return attention(self, prompt, layer, head)

    def qk(self, prompt: int, layer: int, head: int):
        """Queries, keys, q·k scores and weights of one head on one prompt (the neuron view): an analyze.views.QK."""
        from .analyze.views import qk

        return qk(self, prompt, layer, head)

    @cached_property
    def _tokenizer(self):
        """The stored tokenizer (the `tokenizers` library, not transformers), or None if none was stored."""
        blob = self.readout["tokenizer_json"].values.astype(np.uint8).tobytes()
        if not blob.strip(b"\x00"):
            return None
        from tokenizers import Tokenizer

        return Tokenizer.from_str(blob.decode("utf-8"))

    def generated_text(self, prompt: int) -> str:
        """The text the model generated after `prompt` ('' if the run generated nothing)."""
        rows = self.ds.isel(token=self.token_slice(prompt))
        generated = rows["is_generated"].values
        if self._tokenizer is None:
            return "".join(rows["token_str"].values[generated].astype(object))
        return self._tokenizer.decode(rows["token_id"].values[generated].tolist(), skip_special_tokens=False)

    def attributions(self, prompt: int, method: str = "grad_x_input", normalize: bool = True) -> pd.DataFrame:
        """Input attributions of one prompt: a row per target token, a column per source token.

        Row t is the prediction of token t (made at position t-1), its columns the tokens
        0..n-2 of the sequence; sources at or after t are 0. normalize=True scales each row
        to sum to 1 (what Ecco displays); False gives the stored L2 norms.
        For integrated_gradients, df.attrs['completeness_gap'] holds each row's delta.
        """
        methods = [n[len("attribution_"):] for n in VARIABLES if n.startswith("attribution_") and
                   not n.endswith("_delta")]
        if method not in methods:
            raise ConfigError(f"attribution method {method!r} is unknown; choose from {', '.join(methods)}")
        array = self.require(f"attribution_{method}", f"attribution --attribution {method}")
        rows = self.token_slice(prompt)
        n = rows.stop - rows.start
        values = array.isel(token=rows, key=slice(0, n)).values
        targets = np.flatnonzero(~np.isnan(values[:, 0]))  # rows r predicting token r+1
        tokens = self.ds["token_str"].isel(token=rows).values.astype(object)
        block = values[targets, :n - 1].astype(np.float64)
        if normalize:
            block = block / block.sum(axis=1, keepdims=True)
        frame = pd.DataFrame(block,
                             index=pd.MultiIndex.from_arrays([targets + 1, tokens[targets + 1]],
                                                             names=["position", "target"]),
                             columns=pd.MultiIndex.from_arrays([np.arange(n - 1), tokens[:n - 1]],
                                                               names=["position", "source"]))
        if method == "integrated_gradients" and "attribution_integrated_gradients_delta" in self.ds:
            delta = self.ds["attribution_integrated_gradients_delta"].isel(token=rows).values[targets]
            frame.attrs["completeness_gap"] = pd.Series(delta, index=frame.index)
        return frame

    def nmf(self, factors: int = 8, layers=None, iterations: int = 200, seed: int = 0, negative: str = "clip",
            device: str = "cpu", **kwargs) -> xr.Dataset:
        """Non-negative factors of the MLP activations of `layers` (default: the first six captured),
        stored in analysis/nmf; see stratascope.analyze.nmf."""
        from .analyze.nmf import nmf

        return nmf(self, factors=factors, layers=layers, iterations=iterations, seed=seed, negative=negative,
                   device=device, **kwargs)

    def nmf_transform(self, factors_from: "Run", device: str = "cpu", **kwargs) -> xr.Dataset:
        """This run's token weights on the factors another run's nmf stored (analysis/nmf_transform)."""
        from .analyze.nmf import nmf_transform

        return nmf_transform(self, factors_from, device=device, **kwargs)

    def factor_tokens(self, factor: int, top: int = 20, job: str = "nmf") -> pd.DataFrame:
        """The tokens weighing most on an NMF factor: token text, prompt, position, weight."""
        from .analyze.nmf import factor_tokens

        return factor_tokens(self, factor, top=top, job=job)

    def factor_activations(self, prompt: int, job: str = "nmf") -> pd.DataFrame:
        """Position x factor weights of one prompt, with a token column (for colouring its text)."""
        from .analyze.nmf import factor_activations

        return factor_activations(self, prompt, job=job)

    @cached_property
    def view(self):
        """Views that render inline in Jupyter: run.view.head(prompt=0, layer=3), run.view.rankings(prompt=0)."""
        from .viewer.notebook import ViewAccessor

        return ViewAccessor(self)

    # The logit lens (analyze/lens.py): a stored corpus job, and direct one-prompt views.
    # lens: "logit", "tuned" (this run's analysis/tuned_lens) or "tuned:RUN" (another run's, same model).
    def lens(self, topk: int = 10, watch=(), depths=None, norm: str = "final", device: str = "cpu",
             precision: str = "float32", progress: bool = True, lens: str = "logit") -> xr.Dataset:
        """Logit (or tuned) lens of every token, stored in analysis/lens (reused for the same parameters)."""
        from .analyze.lens import run_lens

        return run_lens(self, topk, watch, depths, norm, device, precision, progress, lens)

    def layer_predictions(self, prompt: int = 0, position: int = -1, depth: int | None = None, topk: int = 10,
                          norm: str = "final", lens: str = "logit") -> pd.DataFrame:
        """Top-k tokens (token, prob) the lens reads out at `depth` for one position of one prompt."""
        from .analyze.lens import layer_predictions

        return layer_predictions(self, prompt, position, depth, topk, norm, lens)

    def rankings(self, prompt: int = 0, norm: str = "final", lens: str = "logit") -> pd.DataFrame:
        """Depth x position: rank of the token that came next."""
        from .analyze.lens import rankings

        return rankings(self, prompt, norm, lens)

    def rankings_watch(self, prompt: int = 0, watch=(" he", " she"), position: int = -1,
                       norm: str = "final", lens: str = "logit") -> pd.DataFrame:
        """Depth x watch token: rank of each watched token at one position."""
        from .analyze.lens import rankings_watch

        return rankings_watch(self, prompt, watch, position, norm, lens)

    def tuned_lens(self, depths=None, holdout: float = 0.2, steps: int | None = None, lr: float | None = None,
                   seed: int = 0, batch_size: int | None = None, device: str = "cpu", progress: bool = True,
                   recompute: bool = False):
        """Train the tuned lens from the store (analysis/tuned_lens; reused when the parameters match).
        Returns a TunedLens; `.eval` is the held-out KL / cross-entropy / entropy by depth for both lenses."""
        from .analyze import tuned_lens as tl

        return tl.tuned_lens(self, depths=depths, holdout=holdout, steps=steps or tl.DEFAULT_STEPS,
                             lr=lr or tl.DEFAULT_LR, seed=seed, batch_rows=batch_size or tl.DEFAULT_BATCH,
                             device=device, progress=progress, recompute=recompute)

    def bias(self, pairs=None, strict: bool = False, statistic: str | None = None, occupations=None,
             device: str = "cpu", progress: bool = True):
        """Bias probe over the prompts with occupation metadata: log p(female) - log p(male) and ranks at
        every depth, and their correlation with `statistic` (analysis/bias); see stratascope.analyze.bias."""
        from .analyze.bias import bias

        return bias(self, pairs=pairs, strict=strict, statistic=statistic, occupations=occupations, device=device,
                    progress=progress)

    def info(self) -> dict:
        """What `stratascope info` prints."""
        m, c, cap = self.attrs["model"], self.attrs["corpus"], self.attrs["capture"]
        arrays = {name: {"dims": dict(zip(v.dims, v.shape)), "dtype": str(v.dtype)}
                  for name, v in self.ds.data_vars.items() if "token" in v.dims and v.ndim > 1}
        return {"path": self.path, "model": m["name"], "family": m["family"], "class": m["class"],
                "layers": m["n_layers"], "heads": m["n_heads"], "d_model": m["d_model"], "vocab": m["vocab_size"],
                "captured": cap["arrays"], "dtype": cap["dtype"], "captured_layers": cap["layers"],
                "prompts": c["n_prompts"], "tokens": c["n_tokens"], "metadata_columns": c["metadata_columns"],
                "arrays": arrays, "bytes_on_disk": store_bytes(self.path), "created": self.attrs["created"],
                "schema_version": self.attrs["schema_version"]}

    def linear_probe(self, label: str, at: str = "last", folds: int = 5, depths=None, control: str = "shuffle",
                     seed: int = 0, **options):
        """Linear probes for `label` at every depth, cross-validated by prompt, with a control task.

        Returns a ProbeResult; `.scores` is the per-depth table. See stratascope.analyze.probe.
        """
        from .analyze.probe import linear_probe

        return linear_probe(self, label, at=at, folds=folds, depths=depths, control=control, seed=seed, **options)


def open_run(path: str, allow_incomplete: bool = False) -> Run:
    """Open a stored run lazily; the model is never loaded."""
    return Run(path, allow_incomplete=allow_incomplete)


