"""Which rows belong to which stack: encoder-decoder runs hold source and decoder rows in one
token dimension (is_decoder, n_source_tokens); analyses that treat every row alike refuse them."""

from __future__ import annotations

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
