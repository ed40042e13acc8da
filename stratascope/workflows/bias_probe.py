"""The bias probe from a model: capture the occupation corpus, then probe it (analyze/bias.py)."""

from __future__ import annotations

from ..analyze.bias import BiasResult, bias, parse_pairs
from ..analyze.bias_corpus import load_occupations, load_templates, occupation_prompts
from ..analyze.tuned_lens import parse_lens
from ..capture.config import CaptureConfig
from ..capture.runner import capture
from ..store import Store


def bias_probe(model: str = "smollm2", out: str = "runs/bias.zarr", occupations=None, templates=None, pairs=None,
               strict: bool = False, overwrite: bool = False, corpus: str = "builtin", statistic: str | None = None,
               device: str = CaptureConfig.device, dtype: str = CaptureConfig.dtype,
               batch_size: int = CaptureConfig.batch_size,
               progress: bool = True, dla: bool = False, lens: str = "logit") -> BiasResult:
    """Capture the occupation corpus (hidden states only) with `model` into `out`, then probe it.

    occupations: None (the built-in `corpus`: 'builtin' = 60 Winogender occupations with BLS
    statistics, 'professions' = Bolukbasi et al.'s 320), a CSV path, a DataFrame or a list of
    names. templates: None (the eight built-in ones), a text file (one per line) or a list.
    dla: also capture the residual components and per-head z (for Run.bias_dla). lens: 'logit' or
    'tuned:RUN' (translators trained on another run of `model`; a fresh capture has none of its own).
    """
    pairs = parse_pairs(pairs)  # syntax errors before any model work
    parse_lens(lens)
    prompts = occupation_prompts(load_occupations(occupations, corpus), load_templates(templates))
    path = capture(model=model, prompts=prompts, out=out,
                   capture=("hidden", "components", "z") if dla else ("hidden",), dtype=dtype, batch_size=batch_size,
                   device=device, overwrite=overwrite, progress=progress)
    return bias(Store(path), pairs, strict, statistic, device=device, progress=progress, lens=lens)
