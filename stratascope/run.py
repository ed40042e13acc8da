"""Run: a captured store, reopened without the model."""

from __future__ import annotations

from functools import cached_property

import numpy as np
import pandas as pd
import xarray as xr

from .analyze.stored_rows import every_position, rows_option
from .errors import ConfigError, MissingArrayError, OutOfRangeError
from .store import Store, store_bytes

TL_ATTRS = ("transformer_lens_hook", "transformer_lens_layer", "transformer_lens_depth_0")


class Run(Store):
    """A stored capture, reopened without the model: the user-facing front over the store handle.

    `ds` is the lazy Dataset; nothing is read until asked for. Analyses and views take the
    handle (stratascope.store.Store); the methods here call them.
    """

    def __repr__(self) -> str:
        m, c = self.attrs["model"], self.attrs["corpus"]
        return (f"<stratascope.Run {self.path}: {m['name']} ({m['family']}, {m['n_layers']} layers), "
                f"{c['n_prompts']} prompts, {c['n_tokens']} tokens, captured {', '.join(self.captured)}>")

    def heads(self, top: int = 5, recompute: bool = False, progress: bool = False) -> pd.DataFrame:
        """Every attention head summarized over the corpus (analysis/heads, computed once and reused):
        entropy, first/previous/self scores, a pattern label, the (prompt, position) rows where it
        deviates most. The label rule: stratascope.analyze.heads."""
        from .analyze.heads import heads_frame, summarize_heads

        return heads_frame(summarize_heads(self, top=top, recompute=recompute, progress=progress))

    def attention(self, prompt: int, layer: int, head: int, stack: str | None = None) -> pd.DataFrame:
        """Attention weights of one head on one prompt: query x key, labelled "position: token".
        Encoder-decoder runs take stack='encoder', 'decoder' or 'cross' (decoder query x source key)."""
        from .analyze.views import attention

        return attention(self, prompt, layer, head, stack)

    def qk(self, prompt: int, layer: int, head: int):
        """Queries, keys, q·k scores and weights of one head on one prompt (the neuron view): an analyze.views.QK."""
        from .analyze.views import qk

        return qk(self, prompt, layer, head)

    def generated_text(self, prompt: int) -> str:
        """The text the model generated after `prompt` ('' if the run generated nothing)."""
        from .analyze.views import generated_text

        return generated_text(self, prompt)

    def attributions(self, prompt: int, method: str = "grad_x_input", normalize: bool = True) -> pd.DataFrame:
        """Input attributions of one prompt: a row per target token, a column per source token.

        Row t is the prediction of token t (made at position t-1), its columns the tokens
        0..n-2 of the sequence; sources at or after t are 0. normalize=True scales each row
        to sum to 1 (what Ecco displays); False gives the stored L2 norms.
        For integrated_gradients, df.attrs['completeness_gap'] holds each row's delta.
        Encoder-decoder runs: a row per decoder target token, columns the source tokens then the
        decoder prefix (column level 'stack': 'source' / 'target').
        """
        from .analyze.views import attributions

        return attributions(self, prompt, method, normalize)

    def nmf(self, factors: int = 8, layers=None, iterations: int = 200, seed: int = 0, negative: str = "clip",
            device: str = "cpu", **kwargs) -> xr.Dataset:
        """Non-negative factors of the MLP activations of `layers` (default: the first six captured),
        stored in analysis/nmf; see stratascope.analyze.nmf."""
        from .analyze.nmf import nmf

        return nmf(self, factors=factors, layers=layers, iterations=iterations, seed=seed, negative=negative,
                   device=device, **kwargs)

    def nmf_transform(self, factors_from: Run, device: str = "cpu", **kwargs) -> xr.Dataset:
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
             precision: str = "float32", progress: bool = True, lens: str = "logit", *, positions: str = "all",
             target: str | None = None, target_column: str | None = None, contrast: str | None = None,
             contrast_column: str | None = None, strict: bool = False):
        """Logit lens, stored in analysis/lens/<name> (reused for the same parameters); a LensResult.

        By default every token, scored on the token that came next. A study selects rows and words:
        positions 'last' (each prompt's last prompt token), 'first', 'N,M' or 'label:<name>';
        target a word for every prompt, or target_column a prompt metadata column holding one word
        per prompt (scored through its first token; strict refuses words of several tokens);
        contrast / contrast_column a second word, for the logit difference. `.table` is then one
        row per (prompt row, depth) with the metadata. See stratascope.analyze.targets.
        lens 'tuned' reads every depth through this run's tuned lens (run.tuned_lens), 'tuned:RUN'
        through another run's of the same model.
        """
        from .analyze.lens import run_lens
        from .analyze.targets import LensResult, is_study, run_study

        if is_study(positions, target, target_column, contrast, contrast_column):
            if watch:
                raise ConfigError("watch words belong to the lens of every token; a study scores --target words")
            ds = run_study(self, positions, target, target_column, contrast, contrast_column, strict, topk, depths,
                           norm, device, precision, progress, lens)
        else:
            ds = run_lens(self, topk, watch, depths, norm, device, precision, progress, lens)
        return LensResult(self, ds)

    def rank_of(self, targets, position: int = -1, depths=None, norm: str = "final", device: str = "cpu",
                strict: bool = False) -> pd.DataFrame:
        """Prompt x depth ranks of one word per prompt (or one word for all) at `position` of every
        prompt (-1: its last prompt token), computed now in batches; nothing is stored."""
        from .analyze.targets import rank_of

        return rank_of(self, targets, position, depths, norm, device, strict)

    def layer_predictions(self, prompt: int = 0, position: int = -1, depth: int | None = None, topk: int = 10,
                          norm: str = "final", lens: str = "logit") -> pd.DataFrame:
        """Top-k tokens (token, prob) the lens reads out at `depth` for one position of one prompt."""
        from .analyze.prompt_lens import layer_predictions

        return layer_predictions(self, prompt, position, depth, topk, norm, lens)

    def rankings(self, prompt: int = 0, norm: str = "final", lens: str = "logit") -> pd.DataFrame:
        """Depth x position: rank of the token that came next."""
        from .analyze.prompt_lens import rankings

        return rankings(self, prompt, norm, lens)

    def rankings_watch(self, prompt: int = 0, watch=(" he", " she"), position: int = -1,
                       norm: str = "final", lens: str = "logit") -> pd.DataFrame:
        """Depth x watch token: rank of each watched token at one position."""
        from .analyze.prompt_lens import rankings_watch

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
             device: str = "auto", progress: bool = True, lens: str = "logit"):
        """Bias probe over the prompts with occupation metadata: log p(female) - log p(male) and ranks at
        every depth, and their correlation with `statistic` (analysis/bias); see stratascope.analyze.bias.
        lens: 'logit', 'tuned' (this run's tuned lens) or 'tuned:RUN' (another run's, same model)."""
        from .analyze.bias import bias

        return bias(self, pairs=pairs, strict=strict, statistic=statistic, occupations=occupations, device=device,
                    progress=progress, lens=lens)

    def dla(self, target: str | None = "next", target_column: str | None = None, contrast: str | None = None,
            contrast_column: str | None = None, positions: str = "last", neurons: int = 0, strict: bool = False,
            device: str = "cpu", progress: bool = True):
        """Direct logit attribution (analysis/dla, reused for the same parameters): what the embedding, each
        attention layer, head, MLP layer and top neuron add to the target's logit (minus `contrast`'s).
        target: 'next', 'top' or a word; or target_column, a prompt metadata column of words (contrast and
        contrast_column alike); positions and strict as for the lens. Returns a DLAResult (.by_component,
        .by_head, .top_neurons(layer, k), .rows); see stratascope.analyze.dla."""
        from .analyze.dla import dla

        return dla(self, target=target, target_column=target_column, contrast=contrast,
                   contrast_column=contrast_column, positions=positions, neurons=neurons, strict=strict,
                   device=device, progress=progress)

    def bias_dla(self, pair=None, strict: bool = False, statistic: str | None = None, occupations=None,
                 device: str = "cpu", progress: bool = True):
        """The bias probe decomposed (analysis/bias_dla): per head and MLP layer, the push towards the female word
        of `pair` per occupation and its correlation with `statistic`; see stratascope.analyze.bias_dla."""
        from .analyze.bias_dla import bias_dla

        return bias_dla(self, pair=pair, strict=strict, statistic=statistic, occupations=occupations, device=device,
                        progress=progress)

    def info(self) -> dict:
        """What `stratascope info` prints."""
        m, c, cap = self.attrs["model"], self.attrs["corpus"], self.attrs["capture"]
        arrays = {name: {"dims": dict(zip(v.dims, v.shape)), "dtype": str(v.dtype),
                         **{k: v.attrs[k] for k in TL_ATTRS if k in v.attrs}}
                  for name, v in self.ds.data_vars.items() if "token" in v.dims and v.ndim > 1}
        return {"path": self.path, "model": m["name"], "family": m["family"], "class": m["class"],
                "layers": m["n_layers"], "heads": m["n_heads"], "d_model": m["d_model"], "vocab": m["vocab_size"],
                "captured": cap["arrays"], "dtype": cap["dtype"], "captured_layers": cap["layers"],
                "prompts": c["n_prompts"], "tokens": c["n_tokens"], "metadata_columns": c["metadata_columns"],
                "arrays": arrays, "bytes_on_disk": store_bytes(self.path), "created": self.attrs["created"],
                "schema_version": self.attrs["schema_version"], "results": self.results(),
                "complete": bool(self.attrs.get("complete")), "shards": self._shards(),
                "verified": self.attrs.get("verified"), "failure": self.attrs.get("failure"),
                "truncated_prompts": cap.get("truncated_prompts", 0), "max_length": cap.get("max_length"),
                "skipped_lines": c.get("skipped_lines", {}), "special_token_texts": c.get("special_token_texts", 0),
                "special_tokens": cap.get("special_tokens", "parse"),
                # stores from before --model-dtype ran float32; threads then went unrecorded
                "model_dtype": m.get("dtype", "float32"), "threads": cap.get("threads"),
                "rows": {"stored": self.n_tokens, "option": rows_option(self)} if not every_position(self) else None,
                "source_tokens": int(self.array("n_source_tokens")[:].sum()) if "n_source_tokens" in self.ds else None}

    def _shards(self) -> dict:
        """How many of the capture's shards are recorded complete."""
        if "shard_complete" not in self.ds:
            return {"complete": 0, "total": 0}
        done = np.asarray(self.array("shard_complete")[:])  # one chunk per shard: zarr reads them at once
        return {"complete": int(done.sum()), "total": int(done.size)}

    def results(self) -> list[dict]:
        """Every stored analysis result: job, name, parameters, bytes, when it was created, and whether
        it belongs to this capture. Several results of one job live side by side (analysis/<job>/<name>)."""
        from .analyze.results import stored_results

        rows = stored_results(self)
        for row in rows:
            row["bytes"] = store_bytes(f"{self.path.rstrip('/')}/{row['group']}")
        return rows

    def forget(self, job: str, name: str | None = None) -> list[str]:
        """Remove one stored result (`job`, `name`) or every result of `job`; returns the groups removed."""
        from .analyze.results import forget_result

        return forget_result(self, job, name)

    def linear_probe(self, label: str, at: str = "last", folds: int = 5, depths=None, control: str = "shuffle",
                     seed: int = 0, **options):
        """Linear probes for `label` at every depth, cross-validated by prompt, with a control task.

        Returns a ProbeResult; `.scores` is the per-depth table. See stratascope.analyze.probe.
        """
        from .analyze.probe import linear_probe

        return linear_probe(self, label, at=at, folds=folds, depths=depths, control=control, seed=seed, **options)

    def similarity(self, other=None, method: str = "cka", array: str = "hidden", positions: str = "all",
                   depths=None, max_rows: int | None = None, **options) -> xr.Dataset:
        """Similarity (cka, svcca, pwcca) of every pair of depths of this run, or of this run's depths
        with `other`'s (a Run or a path): analysis/similarity, reused for the same parameters; the
        matrix is `.similarity`. See stratascope.analyze.similarity."""
        from .analyze.similarity import similarity

        if other is not None and not isinstance(other, Run):
            other = Run(other)
        return similarity(self, other, method=method, array=array, positions=positions, depths=depths,
                          max_rows=max_rows, **options)

    def torch_dataset(self, name: str = "hidden", depth: int | None = None, layer: int | None = None,
                      positions: str = "all", shuffle: bool = True, seed: int = 0, row_ids: bool = False,
                      buffer_rows: int | None = None, batch_size: int | None = None):
        """A torch IterableDataset over the rows of array `name` (at one `depth` or `layer`, or all of them):
        chunks in a seeded shuffled order through a bounded shuffle buffer of `buffer_rows` rows, split
        across DataLoader workers without duplicates or gaps; `set_epoch(n)` reshuffles.
        positions as for the lens (all, last, first, N,M, label:<name>). See stratascope.training."""
        from .training import DEFAULT_BUFFER_ROWS, StoreDataset

        return StoreDataset(self, name, depth=depth, layer=layer, positions=positions, shuffle=shuffle, seed=seed,
                            row_ids=row_ids, buffer_rows=buffer_rows or DEFAULT_BUFFER_ROWS, batch_size=batch_size)

    def hook_name(self, name: str, index: int | None = None, *, depth: int | None = None,
                  layer: int | None = None) -> str:
        """The TransformerLens hook equivalent to array `name` at a depth or layer (its coordinate value:
        `index`, or depth= / layer=), from the array's attrs: hook_name('hidden', 12) ->
        'blocks.11.hook_resid_post', hook_name('mlp', layer=3) -> 'blocks.3.mlp.hook_post'."""
        from .schemas import transformer_lens_hook

        var = self.require(name)
        if "transformer_lens_hook" not in var.attrs:
            raise MissingArrayError(f"{name} of {self.path} records no TransformerLens hook (its capture predates "
                                    "them, or the array has none); capture again to record them")
        dim = "depth" if var.attrs["transformer_lens_layer"] == "depth - 1" else "layer"
        given = {"index": index, "depth": depth, "layer": layer}
        wrong = layer if dim == "depth" else depth
        if sum(v is not None for v in given.values()) != 1 or wrong is not None:
            raise ConfigError(f"{name} is indexed by {dim}: give one {dim}, e.g. run.hook_name({name!r}, {dim}=1)")
        index = next(v for v in given.values() if v is not None)
        have = [int(v) for v in var[dim].values]
        if int(index) not in have:
            raise OutOfRangeError(f"{dim} {index} was not captured in {self.path}; its {dim}s: {have}")
        return transformer_lens_hook(var.attrs, int(index))
