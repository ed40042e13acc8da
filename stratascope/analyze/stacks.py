"""Which rows belong to which stack: encoder-decoder runs hold source and decoder rows in one
token dimension (is_decoder, n_source_tokens); analyses that treat every row alike refuse them."""

from __future__ import annotations

import numpy as np

from ..errors import UnsupportedModelError


def is_encoder_decoder(run) -> bool:
    return "n_source_tokens" in run.ds


def single_stack(run, what: str) -> None:
    """Refuse `what` on an encoder-decoder run, whose encoder and decoder rows are not comparable."""
    if is_encoder_decoder(run):
        raise UnsupportedModelError(
            f"{what} reads every row alike, but {run.path} holds an encoder-decoder model whose rows come from two "
            "stacks (is_decoder); it is not available for encoder-decoder runs (the lens, attention, attribution "
            "and their views are)")


def lens_slice(run, prompt: int) -> slice:
    """The rows of `prompt` the LM head reads out: all of them, or an encoder-decoder run's decoder rows
    (positions of per-prompt lens calls count within these)."""
    rows = run.token_slice(prompt)
    if not is_encoder_decoder(run):
        return rows
    return slice(rows.start + int(run.array("n_source_tokens")[run.prompt_index(prompt)]), rows.stop)


def lens_extents(run) -> tuple[np.ndarray, np.ndarray]:
    """(first row, row count) of every prompt's rows the LM head reads out (see lens_slice)."""
    offsets = np.asarray(run.array("token_offset")[:], dtype=np.int64)
    lengths = np.asarray(run.array("n_tokens")[:], dtype=np.int64)
    if not is_encoder_decoder(run):
        return offsets, lengths
    source = np.asarray(run.array("n_source_tokens")[:], dtype=np.int64)
    return offsets + source, lengths - source
