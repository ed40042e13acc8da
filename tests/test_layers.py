"""The layers import one way (DESIGN.md, "Layers"), with no import circles, checked on the source.

Every import counts, also those inside functions: a lazy import against the order is still a
dependency against it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "stratascope"

# lowest first; a module may import its own layer and the ones below
LAYERS = [
    {"errors", "ranges", "positions", "options", "formatting", "version", "progress", "locks", "worker_setup",
     "devices", "caching", "cluster"},
    {"schemas"},
    {"models"},
    {"capture"},
    {"store", "checked_store", "verify"},
    {"analyze"},
    {"training"},
    {"viewer"},
    {"workflows"},
    {"run", "api", "__init__", "__main__", "cli", "testing"},
]
FORBIDDEN = {"analyze": {"transformers"}, "viewer": {"torch", "transformers"}, "store": {"torch", "transformers"},
             "training": {"transformers"}, "schemas": {"torch", "transformers"}}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(stratascope modules imported, third-party top-level names imported) by one module."""
    package = name.split(".")[:-1] if not name.endswith("__init__") else name.split(".")[:-1]
    inside, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("stratascope"):
                    inside.add(_resolve(alias.name.split(".")[1:], modules))
                else:
                    outside.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if (node.module or "").startswith("stratascope"):
                    base = node.module.split(".")[1:]
                else:
                    outside.add((node.module or "").split(".")[0])
                    continue
            else:
                base = package[:len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            for alias in node.names:  # `from . import data` names a module; `from .x import f` a member
                sub = ".".join(base + [alias.name])
                inside.add(sub if sub in modules else _resolve(base, modules))
    inside.discard(None)
    return inside, outside


def _resolve(parts: list[str], modules: dict[str, Path]) -> str | None:
    dotted = ".".join(parts)
    if dotted in modules:
        return dotted
    if f"{dotted}.__init__" in modules or not parts:
        return f"{dotted}.__init__" if parts else "__init__"
    return None


def _layer(module: str) -> int:
    top = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"stratascope/{module.replace('.', '/')}.py is in no layer of tests/test_layers.py")


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_imports_go_down_the_layers_only():
    wrong = []
    for module, (inside, outside) in _graph().items():
        for target in inside:
            if target != "__init__" and not target.startswith("__init__") and _layer(target) > _layer(module):
                wrong.append(f"{module} imports {target}")
            if target == "__init__" and _layer(module) < len(LAYERS) - 1:
                wrong.append(f"{module} imports the stratascope package itself")
        for lib in FORBIDDEN.get(module.split(".")[0], set()) & outside:
            wrong.append(f"{module} imports {lib}")
    assert not wrong, "imports against the layer order:\n" + "\n".join(sorted(wrong))


def test_no_import_circles():
    graph = {m: {t for t in inside if t != m} for m, (inside, _) in _graph().items()}
    # Tarjan's strongly connected components: any component of two or more modules is a circle
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_the_checker_sees_a_violation(tmp_path):
    """The checker itself: an upward import and a circle in a scratch package are found."""
    modules = {"capture.a": tmp_path / "a.py", "run": tmp_path / "run.py"}
    modules["capture.a"].write_text("def f():\n    from ..run import Run\n")
    modules["run"].write_text("from .capture.a import f\n")
    inside, _ = _imports("capture.a", modules["capture.a"], modules)
    assert inside == {"run"} and _layer("run") > _layer("capture.a")
