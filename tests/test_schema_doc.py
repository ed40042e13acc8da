"""docs/store-format.md and stratascope/schemas/ say the same: every array of every group with its
dims and dtype in both, every dimension and root attr documented."""

import re
from dataclasses import fields
from pathlib import Path

import pytest

from stratascope.schemas import (
    ANALYSIS,
    CORPUS_KEYS,
    DIMS,
    MODEL_KEYS,
    READOUT,
    ROOT_PATTERNS,
    VARIABLES,
    RootAttrs,
)

DOC = (Path(__file__).resolve().parents[1] / "docs" / "store-format.md").read_text()


def _section(heading: str) -> str:
    """The text under the heading containing `heading` up to the next heading of the same or a higher level."""
    match = re.search(rf"^(#+) [^\n]*{re.escape(heading)}[^\n]*$", DOC, re.M)
    assert match, f"docs/store-format.md has no heading with {heading!r}"
    level = len(match.group(1))
    rest = DOC[match.end():]
    stop = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[:stop.start()] if stop else rest


def _table(section: str) -> dict[str, tuple[tuple[str, ...], frozenset]]:
    """name -> (dims, dtypes) from the section's first table (array | dims | dtype | ...)."""
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert rows, "no table"
    out = {}
    for line in rows[2:]:  # header and rule
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        dims = () if cells[1] == "scalar" else tuple(d.strip() for d in cells[1].split(","))
        dtype = frozenset(t for t in re.split(r",\s*|\s+or\s+", cells[2]) if t)
        names = re.findall(r"`([^`]+)`", cells[0])
        # "head / rank": one dim per name, in order
        per_name = [tuple(d.strip() for d in part.split(",")) for part in cells[1].split("/")]
        for i, name in enumerate(names):
            assert name not in out, f"{name} documented twice"
            out[name] = (per_name[i] if len(per_name) == len(names) > 1 else dims, dtype)
    return out


def _spec_table(specs) -> dict[str, tuple[tuple[str, ...], frozenset]]:
    return {v.name: (v.dims, frozenset(v.dtypes or ("capture dtype",))) for v in specs}


GROUPS = [("## Arrays (root group)", list(VARIABLES.values()) + list(ROOT_PATTERNS)),
          ("`readout/` group", READOUT.all())] + [(g.heading, g.all()) for g in ANALYSIS]


@pytest.mark.parametrize("heading, specs", GROUPS, ids=[g[0] for g in GROUPS])
def test_doc_and_spec_list_the_same_arrays(heading, specs):
    section = _section(heading.lstrip("# "))
    if "nmf_transform" in heading:  # documented with analysis/nmf: same arrays, a subset
        doc = _table(_section("`analysis/nmf`"))
        assert set(v.name for v in specs) <= set(doc)
        doc = {k: v for k, v in doc.items() if k in {s.name for s in specs}}
    else:
        doc = _table(section)
    spec = _spec_table(specs)
    assert set(doc) == set(spec), (f"in the doc only: {sorted(set(doc) - set(spec))}; "
                                   f"in the spec only: {sorted(set(spec) - set(doc))}")
    for name in spec:
        assert doc[name] == spec[name], f"{heading} {name}: doc says {doc[name]}, spec says {spec[name]}"


def test_every_dimension_and_root_attr_is_documented():
    first_cells = [line.split("|")[1] for line in _section("Dimensions").splitlines() if line.startswith("| `")]
    dims = {d for cell in first_cells for d in re.findall(r"`([^`]+)`", cell)}
    assert set(DIMS) <= dims, sorted(set(DIMS) - dims)
    attrs = _section("Root attrs")
    for key in [f.name for f in fields(RootAttrs) if f.name != "extra"] + list(MODEL_KEYS) + list(CORPUS_KEYS):
        assert f"`{key}`" in attrs, f"root attr {key} is not documented"
