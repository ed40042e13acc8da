"""Views as Jupyter widgets (anywidget): `run.view.head(prompt=0, layer=3)` in a notebook.

The widget's JavaScript is the report's and the app's renderers (static/core.js, view_<name>.js)
with static/widget.js, all package data: nothing comes from a CDN and nothing needs require.js.
Its state holds the run's meta and the view's settings, not data: on every interaction the
browser asks the kernel for one slice (a custom message naming a data.ENDPOINTS endpoint and its
parameters, parsed by the app's own parser) and the widget answers with that data function's JSON.
A front end without widget support shows the text/html fallback instead: the static report page
of the slice on show, the page w.save("x.html") writes.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from urllib.parse import urlencode

import anywidget
import traitlets

from ..errors import ConfigError, OutOfRangeError, StratascopeError
from ..ranges import format_ranges
from . import data, registry, render
from .app import PROMPT_LIST_MAX, BadRequest, parse_params
from .registry import VIEWS
from .report import build_report, choose_layers, prompt_list

# Endpoints whose slices are one layer's: the static page holds just the layer on show.
LAYER_ENDPOINTS = ("attention", "qk", "dla_neurons")
WIDGET_CSS = """
.ss-widget { padding: 6px 10px 10px; border: 1px solid #ddd; border-radius: 4px; }
.ss-widget-head { font-size: 13px; color: #333; margin: 2px 0 4px; }
"""


@functools.cache
def _plotly() -> str:
    """plotly.js read once per kernel (4.8 MB): each plotly view's module is a copy with its renderer."""
    return render.plotly_js()


def bundle(name: str) -> str:
    """The widget's ES module for view `name`: plotly.js (if the view draws with it), then core.js and the
    view's renderers inside makeStratascope() (a fresh namespace per call), then widget.js."""
    view = VIEWS[name]
    files = ["core.js", *registry.renderers([view])]
    inner = "\n".join(render.static_text(f) for f in files)
    # plotly.js sets window.Plotly itself; a page that already has it (another widget) skips the second copy.
    plotly = f"if (!globalThis.Plotly) {{\n{_plotly()}\n}}\n" if view.plotly else ""
    return (plotly + "function makeStratascope() {\n  const window = {Plotly: globalThis.Plotly};\n" + inner
            + "\n  return window.Stratascope;\n}\n" + render.static_text("widget.js"))


@functools.cache
def widget_css() -> str:
    """viewer.css with its page-wide rules (body, main) scoped to the widget, so the notebook keeps its own."""
    css = render.static_text("viewer.css")
    css, n_body = re.subn(r"^body \{", ".ss-widget {", css, flags=re.M)
    css, n_main = re.subn(r"^main \{[^}]*\}\n?", "", css, flags=re.M)
    if (n_body, n_main) != (1, 1):  # the stylesheet changed shape: fail here, not as a restyled notebook
        raise RuntimeError("viewer.css: expected one body and one main rule to scope for the notebook widget")
    return css + WIDGET_CSS


class ViewWidget(anywidget.AnyWidget):
    """One view of one run as a Jupyter widget; the browser fetches each slice from the kernel on demand.

    `w.state` is the view's current settings (prompt, layer, head, ...), updated as the user clicks;
    `w.save("x.html")` writes the static page, `w.save("x.svg")` the drawing the front end shows.
    """

    _css = widget_css()
    meta = traitlets.Dict().tag(sync=True)
    state = traitlets.Dict().tag(sync=True)

    def __init__(self, run, name: str, prompt: int = 0, layers=None, height: int = 720, fallback: bool = True,
                 **state):
        view = VIEWS[name]
        reason = view.unavailable(run)
        if reason:
            raise ConfigError(f"run.view.{name}(): cannot show the {view.title.lower()}: {reason}")
        self.run, self.name, self.height, self.fallback = run, name, height, fallback
        self.layers = choose_layers(run, layers)
        layer = state.get("layer")
        if layer is not None and layer not in self.layers:
            raise OutOfRangeError(f"run.view.{name}(layer={layer!r}): that layer is not among this view's layers "
                                  f"{format_ranges(self.layers) or '(none captured)'}; pick one of them")
        meta = registry.meta(run)
        meta.update(mode="widget", layers=self.layers, views=[v for v in meta["views"] if v["name"] == name])
        if run.n_prompts <= PROMPT_LIST_MAX:  # as the app: a list to pick from, else a number box
            meta["prompt_list"] = prompt_list(run, list(range(run.n_prompts)))
        start = {"view": name, "prompt": run.prompt_index(prompt), **{k: v for k, v in state.items() if v is not None}}
        self.drawing: dict | None = None  # the front end's last drawing: {"svg": text or None, "state": ...}
        super().__init__(_esm=bundle(name), meta=meta, state=start)
        self.on_msg(self._on_message)

    # ---- the browser's requests -------------------------------------------------------------------
    def _on_message(self, _widget, content, _buffers) -> None:
        if not isinstance(content, dict):
            return
        if content.get("type") == "get":
            self.send(self.answer(content.get("id"), content.get("endpoint"), content.get("params")))
        elif content.get("type") == "svg":
            self.drawing = {"svg": content.get("svg"), "state": content.get("state") or {},
                            "error": content.get("error")}

    def answer(self, request_id, endpoint, params) -> dict:
        """The reply to one request: the endpoint's slice, or one sentence saying why there is none."""
        try:
            if endpoint not in data.ENDPOINTS:
                raise BadRequest(404, f"no endpoint {str(endpoint)[:80]!r}; endpoints: {', '.join(data.ENDPOINTS)}")
            if not isinstance(params, dict):
                raise BadRequest(400, f"{endpoint}: parameters must be an object")
            parsed = parse_params(endpoint, urlencode({k: str(v) for k, v in params.items()}))
            return {"type": "data", "id": request_id, "data": data.call(self.run, endpoint, parsed)}
        except (BadRequest, StratascopeError) as e:
            return {"type": "error", "id": request_id, "error": str(e)}

    # ---- static copies ----------------------------------------------------------------------------
    def html(self) -> str:
        """The static report page of what the widget shows (a standalone document): its prompt, and for the
        views of one layer that layer (the model view: every chosen layer)."""
        state, layers = dict(self.state), self.layers
        if VIEWS[self.name].endpoint in LAYER_ENDPOINTS and self.name != "model" and state.get("layer") in layers:
            layers = [int(state["layer"])]
        return build_report(self.run, prompts=[int(state.get("prompt", 0))], layers=layers, views=[self.name],
                            start=state, progress=False)

    def _repr_mimebundle_(self, **kwargs):
        """The widget, and for front ends that cannot run widgets the static page of what it shows
        (fallback=False leaves that out, e.g. to keep plotly.js out of a notebook file twice)."""
        bundle_data, metadata = super()._repr_mimebundle_(**kwargs)
        if self.fallback:
            bundle_data["text/html"] = render.iframe(self.html(), self.height)
        return bundle_data, metadata

    def save(self, path: str | Path) -> Path:
        """`x.html`: the static page of what it shows (opens offline); `x.svg`: the drawing on show."""
        path = Path(path)
        title = VIEWS[self.name].title.lower()
        if path.suffix.lower() == ".html":
            path.write_text(self.html(), encoding="utf-8")
            return path
        if path.suffix.lower() != ".svg":
            raise ConfigError(f"save({str(path)!r}): give a file name ending in .html (the page) or .svg (the drawing)")
        if self.drawing is None:
            raise ConfigError(f"save({str(path)!r}): the {title} is drawn by the browser and this widget has not been "
                              "drawn in a notebook front end yet; display it first, or save .html")
        if self.drawing["svg"] is None:
            why = self.drawing.get("error") or f"the {title} is HTML text, not a drawing"
            raise ConfigError(f"save({str(path)!r}): no SVG to save: {why}; save it as .html instead")
        path.write_text(self.drawing["svg"], encoding="utf-8")
        return path

    def __repr__(self) -> str:
        return f"<stratascope view {self.name} of {self.run.path}, prompt {self.state.get('prompt')}>"
