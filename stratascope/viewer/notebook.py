"""Views inline in Jupyter: `run.view.head(prompt=0, layer=3)` returns a widget (widget.py) that
fetches each slice from the kernel; front ends without widget support show its static page."""

from __future__ import annotations

from .registry import VIEWS


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

        def make(prompt: int = 0, **kwargs):
            from .widget import ViewWidget  # anywidget and ipywidgets load only when a notebook asks for a view

            return ViewWidget(self._run, name, prompt=prompt, **kwargs)

        make.__doc__ = VIEWS[name].description
        return make
