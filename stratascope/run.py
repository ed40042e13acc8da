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


