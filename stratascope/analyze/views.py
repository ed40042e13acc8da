"""One prompt read from the store: one head's attention matrix (head view) and the queries,
keys and q·k terms behind it (neuron view); the generated text; input attributions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import ConfigError, OutOfRangeError
from ..ranges import format_ranges
from ..schemas import VARIABLES
from .stacks import is_encoder_decoder, lens_slice
from .stored_rows import require_every_position


def token_labels(tokens) -> list[str]:
    """Unique, readable labels: "3: ␣cat" (position, then the token with spaces and newlines shown)."""
    shown = (str(t).replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥") for t in tokens)
    return [f"{i}: {t}" for i, t in enumerate(shown)]


def layer_index(run, layer: int) -> int:
    """Index of model layer `layer` along the stored `layer` axis (a capture may hold a subset)."""
    captured = [int(v) for v in run.ds["layer"].values]
    if layer not in captured:
        n = run.attrs["model"]["n_layers"]
        what = "is out of range" if not 0 <= layer < n else "was not captured"
        raise OutOfRangeError(f"layer {layer} {what}; this run holds layers {format_ranges(captured)}")
    return captured.index(layer)


def check_head(run, head: int) -> int:
    n = int(run.attrs["model"]["n_heads"])
    if not 0 <= head < n:
        raise OutOfRangeError(f"head {head} is out of range; this model has heads 0-{n - 1}")
    return head


def _head_rows(run, name: str, prompt: int, layer: int, head: int) -> tuple[np.ndarray, list[str]]:
    array = run.require(name, "qk" if name in ("queries", "keys") else name)
    require_every_position(run, f"the {name} of one head on one prompt (query x key)")
    rows = run.token_slice(prompt)
    li, h = layer_index(run, layer), check_head(run, head)
    values = array.isel(token=rows, layer=li, head=h).values
    return values, token_labels(run.ds["token_str"].isel(token=rows).values)


STACKS = ("encoder", "decoder", "cross")


def stack_slices(run, prompt: int) -> tuple[slice, slice]:
    """An encoder-decoder run's rows of `prompt`: (its source rows, its decoder rows)."""
    rows, decoder = run.token_slice(prompt), lens_slice(run, prompt)
    return slice(rows.start, decoder.start), decoder


def check_stack(run, stack: str | None) -> str | None:
    """The stack to read: None for single-stack runs; one of STACKS for encoder-decoder runs."""
    if not is_encoder_decoder(run):
        if stack is not None:
            raise ConfigError(f"stack={stack!r} applies to encoder-decoder runs; {run.path} has one stack (drop stack)")
        return None
    if stack not in STACKS:
        raise ConfigError(f"{run.path} holds an encoder-decoder model: give stack='encoder', 'decoder' or 'cross' "
                          f"(got {stack!r})")
    return stack


def attention(run, prompt: int, layer: int, head: int, stack: str | None = None) -> pd.DataFrame:
    """Stored attention weights of one head on one prompt: query rows x key columns. Encoder-decoder
    runs: stack 'encoder' (source x source), 'decoder' (decoder x decoder, causal) or 'cross'
    (decoder query x source key)."""
    stack = check_stack(run, stack)
    if stack is None:
        weights, labels = _head_rows(run, "attention", prompt, layer, head)
        n = len(labels)
        return pd.DataFrame(weights[:, :n], index=pd.Index(labels, name="query"), columns=pd.Index(labels, name="key"))
    source, decoder = stack_slices(run, prompt)
    queries = source if stack == "encoder" else decoder
    keys = decoder if stack == "decoder" else source
    array = run.require("cross_attention" if stack == "cross" else "attention", "attention")
    li, h = layer_index(run, layer), check_head(run, head)
    n_keys = keys.stop - keys.start
    weights = array.isel(token=queries, layer=li, head=h).values[:, :n_keys]
    tokens = run.ds["token_str"]
    return pd.DataFrame(weights, index=pd.Index(token_labels(tokens.isel(token=queries).values), name="query"),
                        columns=pd.Index(token_labels(tokens.isel(token=keys).values), name="key"))


@dataclass
class QK:
    """Queries and keys of one head on one prompt, and how they make the attention weights.

    scores = queries · keysᵀ × scale, with -inf where the mask forbids (future keys of a
    causal model); weights = softmax(scores) along keys, which equals the stored attention.
    `terms(q)` gives the elementwise products queries[q] × keys[k] per d_head dimension,
    whose row sums × scale are scores.loc[q] (the neuron view).
    """

    layer: int
    head: int
    scale: float
    causal: bool
    queries: pd.DataFrame  # token x d_head
    keys: pd.DataFrame  # token x d_head
    scores: pd.DataFrame  # query x key
    weights: pd.DataFrame  # query x key

    def terms(self, query: int) -> pd.DataFrame:
        """key x d_head products queries[query] * keys[key] (future keys too; the mask sets their score to -inf)."""
        n = len(self.queries)
        if not -n <= query < n:
            raise OutOfRangeError(f"query position {query} is out of range; this prompt has positions 0-{n - 1}")
        products = self.keys.to_numpy() * self.queries.to_numpy()[query]
        return pd.DataFrame(products, index=self.keys.index, columns=self.keys.columns)


def qk(run, prompt: int, layer: int, head: int) -> QK:
    """Queries, keys, scores and weights of one head on one prompt, from the stored q and k."""
    q, labels = _head_rows(run, "queries", prompt, layer, head)
    k, _ = _head_rows(run, "keys", prompt, layer, head)
    info = run.attrs["capture"]["qk"]
    scale = float(info["scales"][layer_index(run, layer)])
    causal = bool(run.attrs["model"]["causal"])
    q64, k64 = q.astype(np.float64), k.astype(np.float64)
    scores = q64 @ k64.T * scale
    if causal:
        scores = np.where(np.tril(np.ones(scores.shape, dtype=bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    index, dims = pd.Index(labels, name="token"), pd.Index(range(q.shape[1]), name="d_head")
    qx, kx = pd.Index(labels, name="query"), pd.Index(labels, name="key")
    return QK(layer=layer, head=head, scale=scale, causal=causal,
              queries=pd.DataFrame(q, index=index, columns=dims), keys=pd.DataFrame(k, index=index, columns=dims),
              scores=pd.DataFrame(scores, index=qx, columns=kx), weights=pd.DataFrame(weights, index=qx, columns=kx))


def generated_text(run, prompt: int) -> str:
    """The text the model generated after `prompt` ('' if the run generated nothing)."""
    require_every_position(run, "the generated text")
    rows = run.ds.isel(token=run.token_slice(prompt))
    generated = rows["is_generated"].values
    if run.tokenizer is None:
        return "".join(rows["token_str"].values[generated].astype(object))
    return run.tokenizer.decode(rows["token_id"].values[generated].tolist(), skip_special_tokens=False)


def attributions(run, prompt: int, method: str = "grad_x_input", normalize: bool = True) -> pd.DataFrame:
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
    array = run.require(f"attribution_{method}", f"attribution --attribution {method}")
    if is_encoder_decoder(run):
        return _seq2seq_attributions(run, prompt, method, normalize)
    rows = run.token_slice(prompt)
    n = rows.stop - rows.start
    values = array.isel(token=rows, key=slice(0, n)).values
    targets = np.flatnonzero(~np.isnan(values[:, 0]))  # rows r predicting token r+1
    tokens = run.ds["token_str"].isel(token=rows).values.astype(object)
    block = values[targets, :n - 1].astype(np.float64)
    if normalize:
        block = block / block.sum(axis=1, keepdims=True)
    frame = pd.DataFrame(block,
                         index=pd.MultiIndex.from_arrays([targets + 1, tokens[targets + 1]],
                                                         names=["position", "target"]),
                         columns=pd.MultiIndex.from_arrays([np.arange(n - 1), tokens[:n - 1]],
                                                           names=["position", "source"]))
    if method == "integrated_gradients" and "attribution_integrated_gradients_delta" in run.ds:
        delta = run.ds["attribution_integrated_gradients_delta"].isel(token=rows).values[targets]
        frame.attrs["completeness_gap"] = pd.Series(delta, index=frame.index)
    return frame


def _seq2seq_attributions(run, prompt: int, method: str, normalize: bool) -> pd.DataFrame:
    """Encoder-decoder runs: a row per decoder target token, columns the source tokens then the
    decoder prefix (column level `stack`: 'source' / 'target'), as Ecco shows T5's."""
    source, decoder = stack_slices(run, prompt)
    s, nd = source.stop - source.start, decoder.stop - decoder.start
    prefix = run.ds[f"attribution_{method}"].isel(token=decoder, key=slice(0, nd)).values
    over_source = run.ds[f"attribution_{method}_source"].isel(token=decoder, source=slice(0, s)).values
    targets = np.flatnonzero(~np.isnan(prefix[:, 0]))  # decoder rows r predicting decoder token r+1
    block = np.concatenate([over_source[targets], prefix[targets, :nd - 1]], axis=1).astype(np.float64)
    if normalize:
        block = block / block.sum(axis=1, keepdims=True)
    tokens = run.ds["token_str"]
    src_tok = tokens.isel(token=source).values.astype(object)
    dec_tok = tokens.isel(token=decoder).values.astype(object)
    columns = pd.MultiIndex.from_arrays([["source"] * s + ["target"] * (nd - 1),
                                         np.r_[np.arange(s), np.arange(nd - 1)], np.r_[src_tok, dec_tok[:nd - 1]]],
                                        names=["stack", "position", "token"])
    frame = pd.DataFrame(block, columns=columns, index=pd.MultiIndex.from_arrays(
        [targets + 1, dec_tok[targets + 1]], names=["position", "target"]))
    if method == "integrated_gradients" and "attribution_integrated_gradients_delta" in run.ds:
        delta = run.ds["attribution_integrated_gradients_delta"].isel(token=decoder).values[targets]
        frame.attrs["completeness_gap"] = pd.Series(delta, index=frame.index)
    return frame
