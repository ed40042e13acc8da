"""Run: a captured store, reopened without the model."""

from __future__ import annotations

from functools import cached_property

import numpy as np
import pandas as pd
import xarray as xr

from .errors import MissingArrayError, OutOfRangeError
from .schemas import META_PREFIX
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
        return pd.DataFrame({"token_id": rows["token_id"].values, "token": rows["token_str"].values.astype(object),
                             "position": rows["position"].values, "is_generated": rows["is_generated"].values})

    # The logit lens (analyze/lens.py): a stored corpus job, and direct one-prompt views.
    def lens(self, topk: int = 10, watch=(), depths=None, norm: str = "final", device: str = "cpu",
             precision: str = "float32", progress: bool = True) -> xr.Dataset:
        """Logit lens of every token, stored in analysis/lens (reused for the same parameters)."""
        from .analyze.lens import run_lens

        return run_lens(self, topk, watch, depths, norm, device, precision, progress)

    def layer_predictions(self, prompt: int = 0, position: int = -1, depth: int | None = None, topk: int = 10,
                          norm: str = "final") -> pd.DataFrame:
        """Top-k tokens (token, prob) the lens reads out at `depth` for one position of one prompt."""
        from .analyze.lens import layer_predictions

        return layer_predictions(self, prompt, position, depth, topk, norm)

    def rankings(self, prompt: int = 0, norm: str = "final") -> pd.DataFrame:
        """Depth x position: rank of the token that came next."""
        from .analyze.lens import rankings

        return rankings(self, prompt, norm)

    def rankings_watch(self, prompt: int = 0, watch=(" he", " she"), position: int = -1,
                       norm: str = "final") -> pd.DataFrame:
        """Depth x watch token: rank of each watched token at one position."""
        from .analyze.lens import rankings_watch

        return rankings_watch(self, prompt, watch, position, norm)

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


def open_run(path: str, allow_incomplete: bool = False) -> Run:
    """Open a stored run lazily; the model is never loaded."""
    return Run(path, allow_incomplete=allow_incomplete)


