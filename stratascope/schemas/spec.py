"""Store schema v1: dimensions, arrays and their dims/dtypes. The prose lives in docs/store-format.md."""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = 1

DIMS = ("prompt", "token", "depth", "layer", "head", "key", "d_model", "neuron", "d_head", "vocab")


@dataclass(frozen=True)
class VariableSpec:
    """One array of the capture: its dims, dtype and the --capture name that produces it.

    dtype None means the capture's activation dtype (float16 or float32).
    capture None means the array is always written.
    """

    name: str
    dims: tuple[str, ...]
    dtype: str | None
    capture: str | None
    description: str


TOKEN_TABLE = (
    VariableSpec("token_id", ("token",), "int32", None, "vocabulary id; -1 on masked padding rows"),
    VariableSpec("position", ("token",), "int32", None, "position within its sequence"),
    VariableSpec("prompt_index", ("token",), "int32", None, "the prompt the row belongs to; -1 on masked rows"),
    VariableSpec("is_generated", ("token",), "bool", None, "true for tokens the model generated"),
    VariableSpec("token_str", ("token",), "str", None, "decoded token text, for display"),
    VariableSpec("token_type_ids", ("token",), "int8", None,
                 "BERT-family models only: segment of the token (0 = sentence A, 1 = sentence B of a text_pair)"),
)

PROMPT_TABLE = (
    VariableSpec("prompt_text", ("prompt",), "str", None, "the prompt as it appeared in the corpus"),
    VariableSpec("token_offset", ("prompt",), "int64", None, "first row of the prompt in the token dimension"),
    VariableSpec("n_tokens", ("prompt",), "int32", None, "number of rows (prompt + generated tokens)"),
)

ACTIVATIONS = (
    VariableSpec("hidden", ("token", "depth", "d_model"), None, "hidden",
                 "residual stream before the final norm; depth 0 = embeddings, depth i = output of block i-1"),
    VariableSpec("attention", ("token", "layer", "head", "key"), None, "attention",
                 "attention weights of this query token over the positions of its sequence"),
    VariableSpec("mlp", ("token", "layer", "neuron"), None, "mlp",
                 "MLP neuron activations: the input of the MLP output projection"),
    VariableSpec("queries", ("token", "layer", "head", "d_head"), None, "qk",
                 "per-head queries as the attention scores use them (after rotary embeddings, if any)"),
    VariableSpec("keys", ("token", "layer", "head", "d_head"), None, "qk",
                 "per-head keys as the scores use them (after rotary; repeated to every query head under GQA)"),
    VariableSpec("attn_out", ("token", "layer", "d_model"), None, "components",
                 "what the block's attention sublayer adds to the residual stream (after any norm the family "
                 "applies to it before the add; post-norm encoders: the output projection, before add and norm)"),
    VariableSpec("mlp_out", ("token", "layer", "d_model"), None, "components",
                 "what the block's MLP sublayer adds to the residual stream (same conventions as attn_out)"),
    VariableSpec("z", ("token", "layer", "head", "d_head"), None, "z",
                 "per-head attention outputs (weights times values), the input of the attention output projection"),
)

# readout/ arrays written with --capture components or z: the output projections of the captured
# layers, as x @ weight + bias (in, out) whatever the family's own layout, so that a head's
# contribution is z[h] @ attn_out_weight[h] and a neuron's is mlp[n] * mlp_out_weight[n].
READOUT_PROJECTIONS = (
    VariableSpec("attn_out_weight", ("layer", "head", "d_head", "d_model"), "float32", None,
                 "attention output projection of each captured layer, split by head"),
    VariableSpec("attn_out_bias", ("layer", "d_model"), "float32", None,
                 "attention output projection bias (zeros where the model has none)"),
    VariableSpec("mlp_out_weight", ("layer", "neuron", "d_model"), "float32", None,
                 "MLP output projection of each captured layer"),
    VariableSpec("mlp_out_bias", ("layer", "d_model"), "float32", None,
                 "MLP output projection bias (zeros where the model has none)"),
)
PROJECTION_CAPTURES = ("components", "z")  # what writes READOUT_PROJECTIONS

# Gradients (float32 whatever --dtype says). Attribution row r: the prediction made at position r
# of token r+1, over keys 0..r; rows that are not targets are NaN. See capture/gradients.py.
GRADIENTS = tuple(
    VariableSpec(f"attribution_{m}", ("token", "key"), "float32", "attribution",
                 f"{m} attribution of the log-probability of the next token over input positions")
    for m in ("grad_x_input", "integrated_gradients", "gradient_norm")
) + (
    VariableSpec("attribution_integrated_gradients_delta", ("token",), "float32", "attribution",
                 "integrated gradients completeness gap: sum of attributions - (score(input) - score(baseline))"),
    VariableSpec("grad_hidden", ("token", "depth", "d_model"), "float32", "grad",
                 "gradient of the sequence's summed next-token log-likelihood w.r.t. hidden"),
)

VARIABLES = {v.name: v for v in TOKEN_TABLE + PROMPT_TABLE + ACTIVATIONS + GRADIENTS}

# --capture names -> the arrays each produces.
CAPTURE_NAMES = {v.capture: v.name for v in ACTIVATIONS}
CAPTURE_NAMES.update({"attribution": "attribution_<method>", "grad": "grad_hidden"})

# Prompt metadata columns from the corpus are stored as meta_<column> with dims (prompt,).
META_PREFIX = "meta_"

# Token-level labels from the corpus (a JSONL field holding a list; see capture/labels.py) are
# stored as label_<field> with dims (token,): text ("" = unlabelled) or float64 (NaN = unlabelled).
LABEL_PREFIX = "label_"

# Root attrs every store carries.
REQUIRED_ATTRS = ("schema_version", "model", "capture", "corpus", "software", "created", "complete")
