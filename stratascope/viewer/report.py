"""One self-contained HTML file: plotly.js, the viewer's CSS/JS and the data of the chosen
prompts and layers, all inline, so it opens offline and can be mailed around."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError, OutOfRangeError
from ..progress import tqdm
from ..ranges import format_ranges
from . import data, registry, render
from .registry import VIEWS, endpoint_of, spread, view_params

DEFAULT_PROMPTS = 10
PREVIEW_CHARS = 80


def choose_layers(run, text: str | list[int] | None) -> list[int]:
    layers = data.captured_layers(run)
    if text is None:
        return layers
    from ..ranges import parse_ranges

    chosen = parse_ranges(text, max(layers, default=-1) + 1, "layers") if layers else []
    missing = [v for v in chosen if v not in layers]
    if missing or not chosen:
        raise OutOfRangeError(f"--layers {text!r}: layer {missing[0] if missing else text} was not captured; "
                              f"this run has layers {format_ranges(layers)}")
    return chosen


def choose_prompts(run, text: str | list[int] | None) -> list[int]:
    from ..ranges import parse_ranges

    n = run.n_prompts
    if text is None:
        return list(range(min(DEFAULT_PROMPTS, n)))
    try:
        chosen = parse_ranges(text, n, "prompts")
    except ConfigError as e:
        raise OutOfRangeError(f"--prompts {text!r}: this run has prompts 0-{n - 1}") from e
    return chosen or []


def choose_views(run, names: str | list[str] | None) -> list:
    if names is None:
        return [v for v in VIEWS.values() if v.unavailable(run) is None]
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in VIEWS]
    if unknown:
        raise ConfigError(f"--views: unknown view {unknown[0]!r}; choose from {', '.join(VIEWS)}")
    for name in names:
        reason = VIEWS[name].unavailable(run)
        if reason:
            raise ConfigError(f"--views: cannot show {name}: {reason}")
    return [VIEWS[n] for n in names]


def prompt_list(run, prompts: list[int]) -> list[dict]:
    texts = run.ds["prompt_text"].isel(prompt=prompts).values if prompts else []
    counts = run.ds["n_tokens"].isel(prompt=prompts).values if prompts else []
    metas = data.prompt_metadata(run, prompts)  # the tokens view filters prompts by these
    return [{"index": p, "preview": str(t)[:PREVIEW_CHARS], "n_tokens": int(c), "meta": m}
            for p, t, c, m in zip(prompts, texts, counts, metas)]


def scripts(views: list, inline: bool) -> str:
    """The <script> elements: plotly (if a view needs it), core.js, one renderer per view."""
    names = ["core.js"] + registry.renderers(views)
    if inline:
        code = ([render.plotly_js()] if any(v.plotly for v in views) else []) + [render.static_text(n) for n in names]
        return "".join(render.inline_script(c) for c in code)
    names = (["plotly.min.js"] if any(v.plotly for v in views) else []) + names
    return "".join(f'<script src="/static/{render.escape(n)}"></script>' for n in names)


def build_report(run, prompts: str | list[int] | None = None, layers: str | list[int] | None = None,
                 views: str | list[str] | None = None, start: dict | None = None, progress: bool = True) -> str:
    """The report's HTML: the chosen views over the chosen prompts (default the first 10) and layers."""
    chosen_prompts = choose_prompts(run, prompts)
    chosen_layers = choose_layers(run, layers)
    chosen_views = choose_views(run, views)
    meta = registry.meta(run)
    meta.update(mode="report", prompt_list=prompt_list(run, chosen_prompts), layers=chosen_layers,
                views=[v for v in meta["views"] if v["name"] in {c.name for c in chosen_views}], start=start or {})
    meta["included_note"] = (
        f"This report includes prompts {format_ranges(chosen_prompts) or 'none'} of {run.n_prompts}"
        + (f" and layers {format_ranges(chosen_layers)} of {len(data.captured_layers(run))}" if chosen_layers else "")
        + f"; `stratascope view {meta['store']}` shows every prompt and layer.")
    view_layers = {v.name: spread(chosen_layers, v.report_layers) for v in chosen_views
                   if layers is None and v.report_layers and len(chosen_layers) > v.report_layers}
    if view_layers:
        meta["view_layers"] = view_layers
        meta["included_note"] += "".join(f" The {VIEWS[n].title.lower()} holds layers {format_ranges(ls)} "
                                         f"(--layers chooses others)." for n, ls in view_layers.items())
    keys = {}
    for view in chosen_views:
        for params in view_params(run, view, chosen_prompts, view_layers.get(view.name, chosen_layers)):
            endpoint = endpoint_of(run, view)
            keys.setdefault(data.data_key(endpoint, params), (endpoint, params))
    payload = {key: data.call(run, endpoint, params)
               for key, (endpoint, params) in tqdm(keys.items(), desc="report", unit="slice",
                                                   disable=not progress or len(keys) < 50)}
    head = f"<style>{render.static_text('viewer.css')}</style>"
    return render.page(f"stratascope · {meta['store']}", meta, head, scripts(chosen_views, inline=True), payload)


def write_report(run, out: str | Path, **kwargs) -> Path:
    out = Path(out)
    if out.exists() and out.is_dir():
        raise ConfigError(f"-o {out} is a directory; give a file name such as report.html")
    html = build_report(run, **kwargs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html, encoding="utf-8")
    return out
