"""The views: what each shows, which data endpoint feeds it, and when a run can show it.

Adding a view = one entry here (+ a data function in data.py if it needs new data) and one
JavaScript renderer `static/view_<name>.js` that registers `Stratascope.views.<name>`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..analyze.stored_rows import every_position, rows_option
from . import data


@dataclass(frozen=True)
class View:
    name: str
    title: str
    endpoint: str                              # a key of data.ENDPOINTS
    description: str
    needs: Callable[[object], str | None]      # run -> None if the view can be shown, else why not
    plotly: bool = False                       # the renderer draws with plotly.js
    report_layers: int | None = None           # a report without --layers holds at most this many layers of it
    prompt: bool = True                        # it shows one prompt (False: corpus-wide, no prompt picker)
    uses: tuple[str, ...] = ()                 # other views whose renderer this one calls (their helpers)

    def unavailable(self, run) -> str | None:
        if self.prompt and not every_position(run):  # a prompt view draws whole sequences
            return (f"this view shows whole prompts, but this run stores only the rows of {rows_option(run)}; "
                    "capture again without it")
        return self.needs(run)


def _always(run) -> None:
    return None


def _needs_attention(run) -> str | None:
    return None if "attention" in run.ds else "this run has no attention; capture with --capture attention"


def _needs_lens(name: str) -> Callable[[object], str | None]:
    def check(run) -> str | None:
        return None if data.has_lens(run, name) else f"no {name} in analysis/{data.LENS_JOB}; run the lens job"
    return check


def _needs_qk(run) -> str | None:
    if "queries" in run.ds and "keys" in run.ds:
        return None
    return "this run has no queries/keys; capture with --capture qk"


def _needs_result(job: str, how: str) -> Callable[[object], str | None]:
    def check(run) -> str | None:
        return None if data.has_result(run, job) else f"this run has no analysis/{job}; run {how}"
    return check


def _needs_probe(run) -> str | None:
    return None if data.probe_labels(run) else "this run has no linear probes; run `stratascope probe linear`"


def _needs_attribution(run) -> str | None:
    if data.attribution_methods(run):
        return None
    return "this run has no attribution arrays; capture with --capture attribution"


def _needs_dla_heads(run) -> str | None:
    ds = data.dla_result(run)
    if ds is None:
        return f"this run has no analysis/{data.DLA_JOB}; run `stratascope dla`"
    if data.DLA_BY_HEAD not in ds:
        return "the newest dla result has no per-head contributions; capture with --capture z and run `stratascope dla`"
    return None


def _needs_dla_neurons(run) -> str | None:
    if data.dla_result(run) is None:
        return f"this run has no analysis/{data.DLA_JOB}; run `stratascope dla --neurons K`"
    if "mlp" not in run.ds:
        return "this run has no mlp activations; capture with --capture mlp"
    if data.dla_result(run, neurons=True) is None:
        return "no dla result of this run kept neurons; run `stratascope dla --neurons K`"
    return None


VIEWS: dict[str, View] = {v.name: v for v in (
    View("tokens", "Prompts & tokens", "tokens",
         "each prompt with its metadata and its tokens (invisible characters shown as ␣ ↵ ⇥ or ⟨U+…⟩), generated "
         "tokens marked; filter prompts by a metadata value", _always),
    View("head", "Head view", "attention",
         "one layer: lines from each token to the tokens it attends to, a colour per head", _needs_attention),
    View("model", "Model view", "attention",
         "layers × heads grid of attention thumbnails; click one for the detail", _needs_attention),
    View("layer_predictions", "Layer predictions", "lens",
         "top-k tokens of the lens at every depth for one position (logit or tuned: a toggle when both are stored)",
         _needs_lens(data.LENS_TOPK_IDS), True),
    View("rankings", "Rankings", "lens",
         "rank of the token that came next, at every depth: a column per token that came next",
         _needs_lens(data.LENS_TARGET_RANK), True),
    View("rankings_watch", "Rankings (watch)", "lens",
         "ranks of watched tokens at every depth for one position", _needs_lens(data.LENS_WATCH_RANK), True,
         uses=("rankings",)),  # S.rankHeatmap
    View("saliency", "Saliency", "saliency",
         "the text shaded by each token's attribution to a chosen prediction", _needs_attribution),
    View("neuron", "Neuron view", "qk",
         "one head: the query, the keys and their elementwise products as colour bands, q·k and the softmax",
         _needs_qk, report_layers=3),  # q and k of every head are d_head numbers per token each: keep reports small
    View("heads_map", "Heads map", "heads",
         "layers × heads coloured by pattern label or score; click a head for its lines", _needs_result(
             data.HEADS_JOB, "`stratascope heads`"), True, prompt=False),
    View("nmf", "NMF factors", "nmf",
         "the text coloured by each NMF factor's activation; factor picker, top tokens per factor",
         _needs_result(data.NMF_JOB, "`stratascope nmf`")),
    View("bias", "Bias probe", "bias",
         "occupations × depth heatmap of log p(female)/p(male); scatter against the occupation statistic with "
         "its correlation", _needs_result(data.BIAS_JOB, "`stratascope probe bias`"), True, prompt=False),
    View("probe", "Probe accuracy", "probe",
         "a linear probe's accuracy (or R²) at every depth, ± sd over folds, with the control task and the baseline",
         _needs_probe, True, prompt=False),
    View("dla", "Logit attribution", "dla",
         "one position: what the embedding, each attention and MLP layer add to the target's logit, with the "
         "sum and the true logit", _needs_result(data.DLA_JOB, "`stratascope dla`"), True),
    View("dla_heads", "DLA heads", "dla_heads",
         "layers × heads heatmap of each head's mean contribution to the target's logit over the rows of the dla "
         "result; click a head for its lines", _needs_dla_heads, True, prompt=False),
    View("dla_neurons", "DLA neurons", "dla_neurons",
         "one layer: the neurons with the largest mean |contribution| to the target's logit, and the tokens of the "
         "store on which each fires most", _needs_dla_neurons, True, prompt=False),
    View("similarity", "Similarity", "similarity",
         "depth × depth similarity of representations (CKA, SVCCA or PWCCA); click a cell for its two depths and "
         "value", _needs_result(data.SIMILARITY_JOB, "`stratascope similarity`"), True, prompt=False),
    View("tuned_lens", "Tuned lens", "tuned_lens",
         "held-out KL to the model's output, cross-entropy or entropy at every depth: logit lens vs tuned lens",
         _needs_result(data.TUNED_JOB, "`stratascope tuned-lens train`"), True, prompt=False),
)}


def renderers(views: list[View]) -> list[str]:
    """The renderer files of these views and of the views they use, each once, in a working order."""
    names: list[str] = []
    for view in views:
        for name in (*view.uses, view.name):
            if name not in names:
                names.append(name)
    return [f"view_{name}.js" for name in names]


def spread(values: list[int], n: int) -> list[int]:
    """At most n of values, evenly spaced, first and last included."""
    if len(values) <= n:
        return list(values)
    return sorted({values[round(i * (len(values) - 1) / (n - 1))] for i in range(n)}) if n > 1 else values[:1]


def endpoint_of(run, view: View) -> str:
    """The data endpoint `view` reads for this run: encoder-decoder runs' attention comes per stack."""
    return "attention_stack" if view.endpoint == "attention" and data.encoder_decoder(run) else view.endpoint


def view_params(run, view: View, prompts: list[int], layers: list[int]) -> list[dict]:
    """Every parameter set of `view`'s endpoint (endpoint_of) a report over these prompts and layers needs."""
    if endpoint_of(run, view) == "attention_stack":
        return [{"prompt": p, "layer": layer, "stack": s} for p in prompts for layer in layers
                for s in data.ATTENTION_STACKS]
    if view.endpoint == "attention":
        return [{"prompt": p, "layer": layer} for p in prompts for layer in layers]
    if view.endpoint == "qk":
        heads = range(int(run.ds.sizes["head"]))
        return [{"prompt": p, "layer": layer, "head": h} for p in prompts for layer in layers for h in heads]
    if view.endpoint in ("heads", "similarity", "tuned_lens", "dla_heads"):
        return [{}]
    if view.endpoint == "dla_neurons":
        return [{"layer": layer} for layer in layers]
    if view.endpoint == "bias":
        return [{"pair": pair} for pair in data.bias_pairs(run)]
    if view.endpoint == "probe":
        return [{"label": label} for label in data.probe_labels(run)]
    if view.endpoint == "lens":  # every stored lens (logit, tuned): the report's toggle switches between them
        return [{"prompt": p, "lens": kind} for p in prompts for kind in data.lens_kinds(run)]
    if view.endpoint == "saliency":
        return [{"prompt": p, "method": m} for p in prompts for m in data.attribution_methods(run)]
    return [{"prompt": p} for p in prompts]


def meta(run) -> dict:
    """What every page needs first: the store, the model, sizes, layers, methods, which views exist."""
    m = run.attrs["model"]
    views = []
    for view in VIEWS.values():
        reason = view.unavailable(run)
        views.append({"name": view.name, "title": view.title, "description": view.description,
                      "available": reason is None, "reason": reason, "prompt": view.prompt})
    return {"store": Path(run.path.rstrip("/")).name, "model": {k: m.get(k) for k in ("name", "family", "n_layers",
                                                                                     "n_heads", "causal")},
            "n_prompts": run.n_prompts, "n_tokens": run.n_tokens, "layers": data.captured_layers(run),
            "methods": data.attribution_methods(run), "views": views, "min_weight": data.MIN_WEIGHT,
            "bias_pairs": data.bias_pairs(run), "probe_labels": data.probe_labels(run),
            "lens_kinds": data.lens_kinds(run),
            "stacks": list(data.ATTENTION_STACKS) if data.encoder_decoder(run) else None,
            "metadata_columns": data.metadata_columns(run)}

