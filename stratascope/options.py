"""One definition per option: a dataclass field carries its default, help text and CLI form.

The click command (cli.py, `click_options`) and the Python function's signature
(`keyword_signature`) are both built from the same fields, so they cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import inspect


def option(default, help: str, *, type=None, choices=None, min=None, cli: bool = True):
    """A dataclass field that is also a command-line option (--name-with-dashes).

    `type` is the Python type the CLI parses (int, float; default str, or a flag for bool
    defaults); `choices` a tuple of allowed strings; `min` a lower bound for numbers;
    cli=False keeps a field out of the command line (a Python-only setting).
    """
    return dataclasses.field(default=default, metadata={"help": help, "type": type, "choices": choices,
                                                        "min": min, "cli": cli})


def fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def defaults(cls) -> dict:
    return {f.name: f.default for f in fields(cls)}


def keyword_signature(cls, doc: str | None = None):
    """Decorate a function taking `**options` so help() and inspect show every field of `cls` in
    place of **options: a keyword parameter with its default, and a line of the docstring
    (which is `doc` when given, so two functions of one signature share one text)."""

    def decorate(fn):
        if doc is not None:
            fn.__doc__ = doc
        params = [p for p in inspect.signature(fn).parameters.values() if p.kind != p.VAR_KEYWORD]
        params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
                   for f in fields(cls)]
        fn.__signature__ = inspect.Signature(params)
        lines = [f"    {f.name} (default {f.default!r}): {f.metadata['help']}" for f in fields(cls)]
        fn.__doc__ = (fn.__doc__ or "").rstrip() + "\n\n    Options:\n" + "\n".join(lines) + "\n"
        return fn

    return decorate
