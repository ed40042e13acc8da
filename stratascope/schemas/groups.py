"""Specs of the store's subgroups: readout/ and every analysis/<job> result.

Each job's arrays (data variables and coordinates) with dims and dtypes; save_result checks a
result against its job's spec and gives every array its long_name/description attrs.
"""

from __future__ import annotations

from dataclasses import dataclass

from .spec import READOUT_PROJECTIONS, VariableSpec, _v


@dataclass(frozen=True)
class GroupSpec:
    """A group of the store: its path, data variables and coordinates."""

    path: str  # "readout", "analysis/lens", "analysis/probe_<label>"; results are at <path>/<name>
    variables: tuple[VariableSpec, ...]
    coords: tuple[VariableSpec, ...] = ()
    description: str = ""
    variant: str = ""  # a second layout of the same job (a lens study), told apart by its dims
    row_dim: str = "token"

    @property
    def heading(self) -> str:
        """How docs/store-format.md heads this group's section."""
        return f"`{self.path}`" + (f" ({self.variant})" if self.variant else "")

    @property
    def job(self) -> str:
        return self.path.removeprefix("analysis/")

    @property
    def prefix(self) -> str:
        """analysis/probe_<label> -> 'probe_' (the job name's fixed part)."""
        return self.job.partition("<")[0]

    def all(self) -> tuple[VariableSpec, ...]:
        return self.variables + self.coords

    def names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.variables)

    def __getitem__(self, name: str) -> VariableSpec:
        for v in self.all():
            if v.name == name:
                return v
        raise KeyError(f"{self.path} has no array '{name}' in the schema")

    def get(self, name: str) -> VariableSpec | None:
        try:
            return self[name]
        except KeyError:
            return None


READOUT = GroupSpec("readout", (
    _v("unembed", ("vocab", "d_model"), "float32", None, "unembedding", "the LM head's weight (vocab x d_model)"),
    _v("unembed_bias", ("vocab",), "float32", None, "unembedding bias",
       "the LM head's bias, if the model has one (BART family: its final_logits_bias)"),
    _v("norm_weight", ("d_model",), "float32", None, "final norm weight", "the final norm's weight"),
    _v("norm_bias", ("d_model",), "float32", None, "final norm bias", "the final norm's bias, if it has one"),
    _v("vocab_str", ("vocab",), "str", None, "vocabulary", "each id decoded alone, leading spaces kept"),
    _v("tokenizer_json", ("byte",), "uint8", None, "tokenizer.json", "the tokenizer's tokenizer.json, UTF-8 bytes"),
    *READOUT_PROJECTIONS,
), description="what the logit lens and token decoding need without the model")

# Attrs of the readout group (not arrays).
READOUT_ATTRS = ("lens", "norm_type", "norm_eps", "norm_weight_offset", "has_norm_bias", "has_unembed_bias",
                 "logit_scale")

_DEPTH = _v("depth", ("depth",), "int32", None, "depth", "the depths the result covers")

LENS = GroupSpec("analysis/lens", (
    _v("topk_ids", ("token", "depth", "k"), "int32", None, "top-k ids", "the lens' k most likely vocabulary ids"),
    _v("topk_probs", ("token", "depth", "k"), "float32", None, "top-k probabilities", "their probabilities"),
    _v("target_id", ("token",), "int32", None, "next token id",
       "the token that came next; -1 on a sequence's last token and on padding rows"),
    _v("target_rank", ("token", "depth"), "int32", None, "next-token rank",
       "1-based rank of the next token under the lens; -1 without a target"),
    _v("target_prob", ("token", "depth"), "float32", None, "next-token probability",
       "probability of the next token; NaN without a target"),
    _v("entropy", ("token", "depth"), "float32", None, "entropy", "entropy of the lens distribution (nats)"),
    _v("kl_final", ("token", "depth"), "float32", None, "KL to the output",
       "KL(p_final || p_depth) in nats; NaN if the last depth was not captured"),
    _v("watch_rank", ("token", "depth", "watch"), "int32", None, "watched-token rank",
       "1-based rank of each watched token"),
    _v("watch_prob", ("token", "depth", "watch"), "float32", None, "watched-token probability",
       "probability of each watched token"),
), (
    _DEPTH,
    _v("k", ("k",), "int32", None, "k", "0-based position in the top-k list"),
    _v("watch", ("watch",), "str", None, "watched word", "the watch words (or decoded ids)"),
    _v("watch_id", ("watch",), "int32", None, "watched id", "the vocabulary id each watch word is read through"),
), "logit lens of every token (analyze/lens.py)")

_ROW = ("row", "depth")
LENS_STUDY = GroupSpec("analysis/lens", (
    _v("topk_ids", ("row", "depth", "k"), "int32", None, "top-k ids", "the lens' k most likely vocabulary ids"),
    _v("topk_probs", ("row", "depth", "k"), "float32", None, "top-k probabilities", "their probabilities"),
    _v("target_rank", _ROW, "int32", None, "target rank",
       "1-based rank of the row's target (its word, or the token that came next); -1 without one"),
    _v("target_prob", _ROW, "float32", None, "target probability", "probability of the target; NaN without one"),
    _v("target_logit", _ROW, "float32", None, "target logit", "logit of the target; NaN without one"),
    _v("contrast_logit", _ROW, "float32", None, "contrast logit", "logit of the contrast word"),
    _v("logit_diff", _ROW, "float32", None, "logit difference", "target_logit - contrast_logit"),
    _v("entropy", _ROW, "float32", None, "entropy", "entropy of the lens distribution (nats)"),
    _v("kl_final", _ROW, "float32", None, "KL to the output",
       "KL(p_final || p_depth) in nats; NaN if the last depth was not captured"),
), (
    _DEPTH,
    _v("k", ("k",), "int32", None, "k", "0-based position in the top-k list"),
    _v("token", ("row",), "int64", None, "token row", "the row's index in the capture's token dimension"),
    _v("prompt", ("row",), "int32", None, "prompt", "the row's prompt"),
    _v("position", ("row",), "int32", None, "position", "the row's position in its sequence"),
    _v("target_id", ("row",), "int32", None, "target id", "the vocabulary id scored as the target; -1 without one"),
    _v("target_word", ("row",), "str", None, "target word", "the target word (--target / --target-column)"),
    _v("contrast_id", ("row",), "int32", None, "contrast id", "the vocabulary id of the contrast word"),
    _v("contrast_word", ("row",), "str", None, "contrast word", "the contrast word"),
), "the lens of chosen rows scoring chosen words (analyze/targets.py)", variant="a study", row_dim="row")

_FACTOR = _v("factor", ("factor",), "int64", None, "factor", "factor number, largest share first")
_LAYER = _v("layer", ("layer",), "int32", None, "layer", "the model blocks the result covers")
_TOKEN_FACTOR = _v("token_factor", ("token", "factor"), "float32", None, "token weight",
                   "each token's non-negative weight on each factor (0 on masked rows)")
_FACTOR_NEURON = _v("factor_neuron", ("factor", "layer", "neuron"), "float32", None, "factor",
                    "unit-norm factors over layer x neuron, largest first")
_RELATIVE_ERROR = _v("relative_error", (), "float64", None, "relative error", "|A - W H| / |A| of the fit")

NMF = GroupSpec("analysis/nmf", (
    _TOKEN_FACTOR, _FACTOR_NEURON, _RELATIVE_ERROR,
    _v("objective", ("iteration",), "float64", None, "objective", "|A - W H|² after each iteration"),
    _v("shift", ("layer", "neuron"), "float32", None, "shift",
       "per-feature shift subtracted before the fit (negative='shift'; 0 with 'clip')"),
), (_FACTOR, _LAYER), "NMF of MLP activations (analyze/nmf.py)")

NMF_TRANSFORM = GroupSpec("analysis/nmf_transform", (_TOKEN_FACTOR, _FACTOR_NEURON, _RELATIVE_ERROR),
                          (_FACTOR, _LAYER), "this run's token weights on another run's NMF factors")

_LH, _RLH = ("layer", "head"), ("layer", "head", "rank")
HEADS = GroupSpec("analysis/heads", (
    _v("entropy", _LH, "float64", None, "entropy", "mean attention entropy over scored rows (nats)"),
    _v("entropy_norm", _LH, "float64", None, "normalized entropy", "entropy / log(valid keys): 0 one key, 1 uniform"),
    _v("first_token", _LH, "float64", None, "first-token weight", "mean weight on key 0"),
    _v("previous_token", _LH, "float64", None, "previous-token weight", "mean weight on key p-1"),
    _v("self", _LH, "float64", None, "self weight", "mean weight on key p"),
    _v("n_rows", _LH, "int64", None, "scored rows", "rows averaged over (positions >= 2, not masked)"),
    _v("label", _LH, "str", None, "pattern", "the head's dominant pattern (attrs rule)"),
    _v("top_prompt", _RLH, "int32", None, "top prompt", "prompt of the rows deviating most; -1 where none"),
    _v("top_position", _RLH, "int32", None, "top position", "their positions; -1 where none"),
    _v("top_token", _RLH, "int64", None, "top row", "their token rows; -1 where none"),
    _v("top_deviation", _RLH, "float64", None, "deviation",
       "total-variation distance of the row's profile from the head's mean profile"),
), (
    _v("layer", ("layer",), "int32", None, "layer", "captured blocks"),
    _v("head", ("head",), "int64", None, "head", "attention head number"),
    _v("rank", ("rank",), "int64", None, "rank", "0-based rank of the deviation"),
), "head summaries over the corpus (analyze/heads.py)")

_PDP = ("prompt", "depth", "pair")
_PAIR = _v("pair", ("pair",), "str", None, "word pair", "female/male word pair")
BIAS = GroupSpec("analysis/bias", (
    _v("log_ratio", _PDP, "float32", None, "log p(female) - log p(male)",
       "log p(female word) - log p(male word) at the prompt's last token under the logit lens"),
    _v("rank_female", _PDP, "int32", None, "female word rank", "1-based rank of the female word"),
    _v("rank_male", _PDP, "int32", None, "male word rank", "1-based rank of the male word"),
    _v("occupation", ("prompt",), "str", None, "occupation", "the prompt's occupation"),
    _v("template", ("prompt",), "str", None, "template", "the prompt's template"),
), (
    _v("prompt", ("prompt",), "int64", None, "prompt", "the prompt's index in the capture"),
    _DEPTH, _PAIR,
    _v("female", ("pair",), "str", None, "female word", "the pair's female word"),
    _v("male", ("pair",), "str", None, "male word", "the pair's male word"),
    _v("female_id", ("pair",), "int32", None, "female id", "the vocabulary id the female word is read through"),
    _v("male_id", ("pair",), "int32", None, "male id", "the vocabulary id the male word is read through"),
), "bias probe per prompt (analyze/bias.py)")

_PD = ("pair", "depth")
BIAS_CORRELATION = GroupSpec("analysis/bias_correlation", (
    _v("pearson_r", _PD, "float64", None, "Pearson r", "across occupations, mean log-ratio vs the statistic"),
    _v("pearson_p", _PD, "float64", None, "Pearson p", "two-sided p-value (scipy)"),
    _v("spearman_rho", _PD, "float64", None, "Spearman rho", "rank correlation across occupations"),
    _v("spearman_p", _PD, "float64", None, "Spearman p", "two-sided p-value (scipy)"),
    _v("n", _PD, "int64|float64", None, "occupations", "occupations with both values"),
    _v("statistic_value", ("occupation",), "float64", None, "statistic", "the statistic per occupation"),
), (
    _PAIR, _DEPTH,
    _v("occupation", ("occupation",), "str", None, "occupation", "occupations the statistic covers"),
), "correlation of the bias probe with an occupation statistic")

_DF = ("depth", "fold")
PROBE = GroupSpec("analysis/probe_<label>", (
    _v("accuracy", _DF, "float64", None, "accuracy", "held-out accuracy (classification)"),
    _v("macro_f1", _DF, "float64", None, "macro-F1", "held-out macro-F1 (classification)"),
    _v("control_accuracy", _DF, "float64", None, "control accuracy", "accuracy on the control task"),
    _v("control_macro_f1", _DF, "float64", None, "control macro-F1", "macro-F1 on the control task"),
    _v("r2", _DF, "float64", None, "R²", "held-out R² (regression)"),
    _v("control_r2", _DF, "float64", None, "control R²", "R² on the control task"),
    _v("majority", ("fold",), "float64", None, "majority baseline", "accuracy of the training folds' majority class"),
    _v("n_test", ("fold",), "int64", None, "test rows", "rows held out in each fold"),
    _v("weights", ("depth", "output", "d_model"), "float32", None, "probe weights",
       "the probe trained on every row: logits = hidden @ weights.T + bias"),
    _v("bias", ("depth", "output"), "float32", None, "probe bias", "its bias"),
    _v("feature_mean", ("depth", "d_model"), "float32", None, "feature mean", "mean of the hidden states used"),
    _v("feature_std", ("depth", "d_model"), "float32", None, "feature sd", "their standard deviation"),
), (
    _DEPTH,
    _v("fold", ("fold",), "int64", None, "fold", "cross-validation fold"),
), "linear probe of one label at every depth (analyze/probe.py)")

_RC = ("row", "component")
_COMPONENT = _v("component", ("component",), "str", None, "component",
                "embed, attn.<l>, mlp.<l> per layer, and bias (final-norm and unembedding biases)")
_HEAD = _v("head", ("head",), "int32", None, "head", "attention head number")
DLA = GroupSpec("analysis/dla", (
    _v("target_id", ("row",), "int32", None, "target id", "the id whose logit is attributed"),
    _v("contrast_id", ("row",), "int32", None, "contrast id", "the contrast's id; -1 without a contrast"),
    _v("token", ("row",), "int64", None, "token row", "the row in the capture's token dimension"),
    _v("prompt", ("row",), "int32", None, "prompt", "the row's prompt"),
    _v("position", ("row",), "int32", None, "position", "the row's position in its sequence"),
    _v("by_component", _RC, "float32", None, "contribution",
       "each component's direct contribution to the target's logit (or target - contrast)"),
    _v("total", ("row",), "float32", None, "sum of contributions", "the sum over components"),
    _v("logit", ("row",), "float32", None, "logit", "the target's logit (or difference) through the full final norm"),
    _v("gap", ("row",), "float32", None, "gap", "total - logit"),
    _v("by_head", ("row", "layer", "head"), "float32", None, "head contribution",
       "each head's contribution (with --capture z)"),
    _v("neuron_id", ("row", "layer", "k"), "int32", None, "top neurons", "the k neurons of largest |contribution|"),
    _v("neuron_contribution", ("row", "layer", "k"), "float32", None, "neuron contribution", "their contributions"),
), (_COMPONENT, _v("layer", ("layer",), "int32", None, "layer", "captured blocks"), _HEAD),
    "direct logit attribution of chosen rows (analyze/dla.py)", row_dim="row")

_STATS = ("pearson_r", "pearson_p", "spearman_rho", "spearman_p", "n")
BIAS_DLA = GroupSpec("analysis/bias_dla", (
    _v("component_mean", ("occupation", "component"), "float32", None, "mean push",
       "mean contribution to log p(female) - log p(male) over the occupation's templates"),
    _v("head_mean", ("occupation", "layer", "head"), "float32", None, "mean head push", "the same per head"),
    _v("log_ratio_mean", ("occupation",), "float32", None, "mean log-ratio", "the summed contributions' mean"),
    _v("statistic_value", ("occupation",), "float64", None, "statistic", "the statistic per occupation"),
    *(_v(f"component_{s}", ("component",), "float64", None, f"component {s}", f"{s} of each component's push "
         "against the statistic, across occupations") for s in _STATS),
    *(_v(f"head_{s}", ("layer", "head"), "float64", None, f"head {s}", f"{s} of each head's push") for s in _STATS),
    *(_v(f"log_ratio_{s}", (), "float64", None, f"log-ratio {s}", f"{s} of the summed push") for s in _STATS),
), (_v("occupation", ("occupation",), "str", None, "occupation", "occupations of the probe"), _COMPONENT,
    _v("layer", ("layer",), "int32", None, "layer", "captured blocks"), _HEAD),
    "the bias probe decomposed per head and MLP layer (analyze/bias_dla.py)")

def _similarity(axis: str, variant: str = "") -> GroupSpec:
    a, b = f"{axis}_a", f"{axis}_b"
    return GroupSpec("analysis/similarity", (
        _v("similarity", (a, b), "float64", None, "similarity",
           "CKA, SVCCA or PWCCA of this run's depth (row) with the compared run's (column)"),
        _v("dims_a", (a,), "int32", None, "kept dimensions (a)", "SVCCA/PWCCA: dimensions kept per depth of this run"),
        _v("dims_b", (b,), "int32", None, "kept dimensions (b)", "the same for the compared run"),
    ), (_v(a, (a,), "int32", None, axis, f"this run's {axis}s"),
        _v(b, (b,), "int32", None, f"{axis} (compared)", f"the compared run's {axis}s")),
        "representation similarity across depths and runs (analyze/similarity.py)", variant=variant, row_dim=a)


TUNED_LENS = GroupSpec("analysis/tuned_lens", (
    _v("weight", ("depth", "d_out", "d_in"), "float32", None, "translator", "the affine translator's matrix A"),
    _v("bias", ("depth", "d_out"), "float32", None, "translator bias", "its bias b: h + A h + b"),
    _v("train_kl", ("step", "depth"), "float32", None, "training KL", "mean KL of each training batch (nats)"),
    _v("kl", ("lens", "depth"), "float32|float64", None, "held-out KL", "KL(p_final || p_depth), held-out rows"),
    _v("cross_entropy", ("lens", "depth"), "float32|float64", None, "held-out cross-entropy",
       "of the next token, held-out rows that have one"),
    _v("entropy", ("lens", "depth"), "float32|float64", None, "held-out entropy", "of the lens distribution"),
    _v("heldout", ("prompt",), "bool", None, "held out", "the prompts held out from training"),
), (_v("depth", ("depth",), "int32", None, "depth", "the depths with a translator, then L"),
    _v("lens", ("lens",), "str", None, "lens", "logit, tuned"),
    _v("step", ("step",), "int32", None, "step", "training step")),
    "the tuned lens trained from the store (analyze/tuned_lens.py)")

SIMILARITY = _similarity("depth")
SIMILARITY_MLP = _similarity("layer", "--array mlp")

ANALYSIS = (LENS, LENS_STUDY, NMF, NMF_TRANSFORM, HEADS, BIAS, BIAS_CORRELATION, PROBE, DLA, BIAS_DLA, TUNED_LENS,
            SIMILARITY, SIMILARITY_MLP)
GROUPS = (READOUT,) + ANALYSIS


def analysis_spec(job: str, dims=()) -> GroupSpec | None:
    """The spec of analysis/<job> ('probe_tag' -> analysis/probe_<label>) whose row dim is among the
    result's `dims` (a lens study has 'row', the lens of every token 'token'), or None."""
    found = [spec for spec in ANALYSIS if spec.job == job or
             ("<" in spec.job and job.startswith(spec.prefix) and len(job) > len(spec.prefix))]
    for spec in found:
        if spec.row_dim in dims:
            return spec
    return found[0] if found else None


def group_path(spec: GroupSpec, name: str | None = None) -> str:
    """analysis/probe_<label> with name 'tag' -> 'analysis/probe_tag'; fixed paths unchanged."""
    if "<" not in spec.path:
        return spec.path
    if not name:
        raise ValueError(f"{spec.path} needs a name")
    return spec.path.partition("<")[0] + name
