"""Store schema v1, root group: dimensions, arrays, coordinates and their dims/dtypes.

The prose lives in docs/store-format.md (tests/test_schema_doc.py keeps the two in step).
readout/ and analysis/<job> are in schemas/groups.py, the root attrs in schemas/attrs.py.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = 1

DIMS = ("prompt", "token", "depth", "layer", "head", "key", "source", "d_model", "neuron", "d_head", "vocab")

CAPTURE_DTYPE = None  # a VariableSpec dtype: the capture's activation dtype (float16 or float32)


@dataclass(frozen=True)
class VariableSpec:
    """One array: its dims, dtype, the --capture name that produces it and what it means.

    dtype None means the capture's activation dtype (float16 or float32); several allowed
    dtypes are written "int64|float64". capture None means the array is always written.
    long_name is the short label xarray puts on plot axes; description the full meaning.
    """

    name: str
    dims: tuple[str, ...]
    dtype: str | None
    capture: str | None
    description: str
    long_name: str = ""

    @property
    def dtypes(self) -> tuple[str, ...] | None:
        return None if self.dtype is None else tuple(self.dtype.split("|"))

    @property
    def is_pattern(self) -> bool:
        """A family of arrays such as meta_<column>: the name holds a <placeholder>."""
        return "<" in self.name

    def matches(self, name: str) -> bool:
        if not self.is_pattern:
            return name == self.name
        prefix, _, rest = self.name.partition("<")
        suffix = rest.partition(">")[2]
        return name.startswith(prefix) and name.endswith(suffix) and len(name) > len(prefix) + len(suffix)

    def attrs(self, name: str | None = None) -> dict[str, str]:
        """The array attrs the store carries for it (CF/xarray conventions); an array of a pattern
        such as meta_<column> is labelled with its own column name."""
        if self.is_pattern and name:
            prefix, _, rest = self.name.partition("<")
            suffix = rest.partition(">")[2]
            return {"long_name": name[len(prefix):len(name) - len(suffix)], "description": self.description}
        return {"long_name": self.long_name or self.name.replace("_", " "), "description": self.description}


def _v(name, dims, dtype, capture, long_name, description) -> VariableSpec:
    return VariableSpec(name, tuple(dims), dtype, capture, description, long_name)


TOKEN_TABLE = (
    _v("token_id", ("token",), "int32", None, "token id", "vocabulary id; -1 on masked padding rows"),
    _v("position", ("token",), "int32", None, "position", "position within its sequence"),
    _v("prompt_index", ("token",), "int32", None, "prompt", "the prompt the row belongs to; -1 on masked rows"),
    _v("is_generated", ("token",), "bool", None, "generated", "true for tokens the model generated"),
    _v("token_str", ("token",), "str", None, "token", "decoded token text, for display"),
    _v("token_type_ids", ("token",), "int8", None, "segment",
       "BERT-family models only: segment of the token (0 = sentence A, 1 = sentence B of a text_pair)"),
    _v("next_token_id", ("token",), "int32", None, "next token id",
       "the id of the token that came next in the sequence; -1 on its last token, masked and pooled rows"),
    _v("is_decoder", ("token",), "bool", None, "decoder token",
       "encoder-decoder models only: true for a decoder token, false for an encoder (source) token and on "
       "masked rows (prompt_index -1)"),
)
# Written only for some models: token_type_ids (BERT family), is_decoder (encoder-decoder models).
OPTIONAL_TOKEN_TABLE = ("token_type_ids", "is_decoder")
STACKS = ("encoder", "decoder", "cross")  # the attention of each (`attention` rows by is_decoder, `cross_attention`)

# The token table rides along every token-dim array as non-dimension coordinates of `token`:
# the root group's "coordinates" attribute lists them (the CF convention xarray decodes).
TOKEN_COORDS = tuple(v.name for v in TOKEN_TABLE)

PROMPT_TABLE = (
    _v("prompt_text", ("prompt",), "str", None, "prompt text", "the prompt as it appeared in the corpus"),
    _v("token_offset", ("prompt",), "int64", None, "first row", "first row of the prompt in the token dimension"),
    _v("n_tokens", ("prompt",), "int32", None, "tokens",
       "number of rows stored (prompt + generated tokens; fewer with --positions, 1 with --pool)"),
    _v("seq_len", ("prompt",), "int32", None, "sequence length",
       "tokens of the prompt's sequence (prompt + generated), however many rows were stored"),
    _v("n_source_tokens", ("prompt",), "int32", None, "source tokens",
       "encoder-decoder models only: the prompt's first n_source_tokens rows are its encoder (source) tokens, "
       "the rest its decoder tokens"),
)

# Index coordinates of the root group (dimension coordinates in xarray's terms).
INDEX_COORDS = (
    _v("depth", ("depth",), "int32", None, "depth",
       "captured depths: 0 = embedding output, i = output of block i-1, before the final norm"),
    _v("layer", ("layer",), "int32", None, "layer", "captured blocks (--layers)"),
    _v("head", ("head",), "int32", None, "head", "attention head number (written with attention or qk)"),
)

ACTIVATIONS = (
    _v("hidden", ("token", "depth", "d_model"), None, "hidden", "residual stream",
       "residual stream before the final norm; depth 0 = embeddings, depth i = output of block i-1"),
    _v("attention", ("token", "layer", "head", "key"), None, "attention", "attention weight",
       "attention weights of this query token over the positions of its sequence (encoder-decoder models: "
       "the self-attention of its stack, over that stack's positions)"),
    _v("cross_attention", ("token", "layer", "head", "source"), None, "attention", "cross-attention weight",
       "encoder-decoder models only: a decoder token's attention over its prompt's source (encoder) positions; "
       "0 on encoder rows"),
    _v("mlp", ("token", "layer", "neuron"), None, "mlp", "MLP activation",
       "MLP neuron activations: the input of the MLP output projection"),
    _v("queries", ("token", "layer", "head", "d_head"), None, "qk", "query",
       "per-head queries as the attention scores use them (after rotary embeddings, if any)"),
    _v("keys", ("token", "layer", "head", "d_head"), None, "qk", "key",
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
ATTRIBUTION_PREFIX = "attribution_"
ATTRIBUTION_METHODS = ("grad_x_input", "integrated_gradients", "gradient_norm")
GRADIENTS = tuple(
    _v(f"{ATTRIBUTION_PREFIX}{m}", ("token", "key"), "float32", "attribution", f"{m.replace('_', ' ')} attribution",
       f"{m} attribution of the log-probability of the next token over input positions")
    for m in ATTRIBUTION_METHODS
) + (
    *(_v(f"{ATTRIBUTION_PREFIX}{m}_source", ("token", "source"), "float32", "attribution",
         f"{m.replace('_', ' ')} attribution over the source",
         f"encoder-decoder models only: {m} attribution of the next decoder token over the source (encoder) "
         "positions; the decoder prefix is in attribution_" + m) for m in ATTRIBUTION_METHODS),
    _v(f"{ATTRIBUTION_PREFIX}integrated_gradients_delta", ("token",), "float32", "attribution", "IG completeness gap",
       "integrated gradients completeness gap: sum of attributions - (score(input) - score(baseline))"),
    _v("grad_hidden", ("token", "depth", "d_model"), "float32", "grad", "gradient of hidden",
       "gradient of the sequence's summed next-token log-likelihood w.r.t. hidden"),
)

# The equivalent TransformerLens hook of each activation array, so SAE and probe tools can map
# a stored array onto theirs. Written into each array's attrs by the capture (transformer_lens_attrs):
#   transformer_lens_hook   the hook name, with {layer} for the block number
#   transformer_lens_layer  how {layer} follows from the array's index: "layer" (the layer
#                           coordinate) or "depth - 1" (depth d is the output of block d-1)
#   transformer_lens_depth_0  for depth arrays: the hook of depth 0 (the embedding output)
# Compare values with the unprocessed model (HookedTransformer.from_pretrained_no_processing):
# TransformerLens's default weight processing (fold_ln, center_writing_weights) changes the values.
TRANSFORMER_LENS_HOOKS = {
    "hidden": "blocks.{layer}.hook_resid_post",
    "grad_hidden": "blocks.{layer}.hook_resid_post",  # the gradient at that hook
    "attention": "blocks.{layer}.attn.hook_pattern",
    "mlp": "blocks.{layer}.mlp.hook_post",
    "queries": "blocks.{layer}.attn.hook_q",
    "keys": "blocks.{layer}.attn.hook_k",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "z": "blocks.{layer}.attn.hook_z",
}
TRANSFORMER_LENS_DEPTH_0 = "blocks.0.hook_resid_pre"
# Where the model changes the name: rotary models record q/k after the rotation (TransformerLens's
# hook_rot_q/k); post-norm encoders (BERT, HookedEncoder) hand the normalized output to the next block.
TRANSFORMER_LENS_ROTARY = {"queries": "blocks.{layer}.attn.hook_rot_q", "keys": "blocks.{layer}.attn.hook_rot_k"}
TRANSFORMER_LENS_POST_NORM = {"hidden": "blocks.{layer}.hook_normalized_resid_post",
                              "grad_hidden": "blocks.{layer}.hook_normalized_resid_post"}


def transformer_lens_attrs(name: str, rotary: bool = False, post_norm: bool = False) -> dict[str, str]:
    """The transformer_lens_* attrs of the root array `name` ({} for arrays without a hook)."""
    hook = (TRANSFORMER_LENS_ROTARY if rotary else {}).get(name) or \
        (TRANSFORMER_LENS_POST_NORM if post_norm else {}).get(name) or TRANSFORMER_LENS_HOOKS.get(name)
    if hook is None:
        return {}
    if "depth" in VARIABLES[name].dims:
        return {"transformer_lens_hook": hook, "transformer_lens_layer": "depth - 1",
                "transformer_lens_depth_0": TRANSFORMER_LENS_DEPTH_0}
    return {"transformer_lens_hook": hook, "transformer_lens_layer": "layer"}


def transformer_lens_hook(attrs: dict, index: int) -> str:
    """The hook name of one depth or layer (its coordinate value) from an array's transformer_lens_* attrs."""
    if attrs["transformer_lens_layer"] == "depth - 1":
        return attrs["transformer_lens_depth_0"] if index == 0 else attrs["transformer_lens_hook"].format(
            layer=index - 1)
    return attrs["transformer_lens_hook"].format(layer=index)


# Prompt metadata columns from the corpus are stored as meta_<column> with dims (prompt,).
META_PREFIX = "meta_"

# Token-level labels from the corpus (a JSONL field holding a list; see capture/labels.py) are
# stored as label_<field> with dims (token,): text ("" = unlabelled) or float64 (NaN = unlabelled).
LABEL_PREFIX = "label_"

CORPUS_COLUMNS = (
    _v(META_PREFIX + "<column>", ("prompt",), "int64|float64|bool|str", None, "metadata",
       "a non-text corpus column, one value per prompt"),
    _v(LABEL_PREFIX + "<name>", ("token",), "float64|str", None, "token label",
       "a JSONL list field: one label per word or token; NaN / '' on generated and padding rows"),
)

RECORDS = (
    _v("shard_complete", ("shard",), "bool", None, "shard complete",
       "one flag per shard, each in its own chunk; true only after all the shard's rows were written"),
)

VARIABLES = {v.name: v for v in TOKEN_TABLE + PROMPT_TABLE + INDEX_COORDS + ACTIVATIONS + GRADIENTS + RECORDS}
ROOT_PATTERNS = CORPUS_COLUMNS

# --capture names -> the arrays each produces.
CAPTURE_NAMES = {v.capture: v.name for v in ACTIVATIONS if v.name != "cross_attention"}
CAPTURE_NAMES.update({"attribution": ATTRIBUTION_PREFIX + "<method>", "grad": "grad_hidden"})

# Root attrs every store carries (the RootAttrs dataclass in schemas/attrs.py has them all).
REQUIRED_ATTRS = ("schema_version", "model", "capture", "corpus", "software", "created", "complete")


def root_spec(name: str) -> VariableSpec | None:
    """The spec of a root array by name (meta_<column> and label_<name> included), or None."""
    if name in VARIABLES:
        return VARIABLES[name]
    return next((p for p in ROOT_PATTERNS if p.matches(name)), None)
