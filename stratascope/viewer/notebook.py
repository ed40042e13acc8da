"""Views inline in Jupyter: `run.view.head(prompt=0, layer=3)` returns an object whose
`_repr_html_` is the report's page, limited to that view, inside an iframe."""

from __future__ import annotations

from pathlib import Path

from . import render
from .registry import VIEWS
from .report import build_report


class ViewObject:
    """One view of one run, rendered on display (same HTML as the report)."""

    def __init__(self, run, name: str, prompt: int = 0, layers=None, height: int = 720, **state):
        self.run, self.name, self.height = run, name, height
        self.prompt = run.prompt_index(prompt)
        self.layers = layers
        self.state = {"view": name, "prompt": self.prompt, **{k: v for k, v in state.items() if v is not None}}
        if "layer" in state and state["layer"] is not None and layers is None:
            self.layers = [int(state["layer"])]

    def html(self) -> str:
        """The whole page (a standalone document)."""
        return build_report(self.run, prompts=[self.prompt], layers=self.layers, views=[self.name],
                            start=self.state, progress=False)

    def _repr_html_(self) -> str:
        return render.iframe(self.html(), self.height)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.html(), encoding="utf-8")
        return path

    def __repr__(self) -> str:
        return f"<stratascope view {self.name} of {self.run.path}, prompt {self.prompt}>"


class ViewAccessor:
    """`run.view.<name>(prompt=..., ...)` for every registered view; `run.view.names` lists them."""

    def __init__(self, run):
        self._run = run

    @property
    def names(self) -> list[str]:
        return list(VIEWS)

    def __dir__(self):
        return list(VIEWS) + ["names"]

    def __getattr__(self, name: str):
        if name.startswith("_") or name not in VIEWS:
            raise AttributeError(f"no view {name!r}; views: {', '.join(VIEWS)}")

        def make(prompt: int = 0, **kwargs) -> ViewObject:
            return ViewObject(self._run, name, prompt=prompt, **kwargs)

        make.__doc__ = VIEWS[name].description
        return make
