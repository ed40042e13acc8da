"""Checks a store's root attrs and arrays, and analysis results, against schema v1."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import SchemaError
from .attrs import RootAttrs, parse_schema_version  # noqa: F401 - parse_schema_version is part of this API
from .groups import GroupSpec
from .spec import LABEL_PREFIX, META_PREFIX, VariableSpec, root_spec


def dtype_matches(spec: VariableSpec, dtype) -> bool:
    """Whether a numpy dtype is one the spec allows ('str' covers object, unicode and StringDType)."""
    allowed = spec.dtypes or ("float16", "float32")
    dt = np.dtype(dtype)
    if dt.kind in "OUT":
        return "str" in allowed
    return dt.name in allowed


def validate_root(attrs: Mapping, arrays: Mapping[str, tuple[tuple[str, ...], str]], where: str) -> None:
    """Validate root attrs and each array's dims. `arrays` maps name -> (dims, dtype str)."""
    RootAttrs.from_dict(attrs, where)
    for name in ("token_id", "position", "prompt_index", "is_generated", "prompt_text", "token_offset", "n_tokens"):
        if name not in arrays:
            raise SchemaError(f"{where} has no '{name}' array; it is not a complete stratascope store")
    for name, (dims, _dtype) in arrays.items():
        spec = root_spec(name)
        if spec is not None and tuple(dims) != spec.dims:
            kind = ("metadata array" if name.startswith(META_PREFIX) else
                    "token label array" if name.startswith(LABEL_PREFIX) else "array")
            raise SchemaError(f"{where}: {kind} '{name}' has dims {tuple(dims)}, schema v1 says {spec.dims}")


def check_group(spec: GroupSpec, arrays: Mapping[str, tuple[tuple[str, ...], object]], where: str) -> None:
    """Every array of a group (name -> (dims, dtype)) must be in its spec with those dims and a dtype
    the spec allows: the check that keeps a job's output and schemas/groups.py the same."""
    for name, (dims, dtype) in arrays.items():
        var = spec.get(name)
        if var is None:
            raise SchemaError(f"{where}: array '{name}' is not in the schema of {spec.path}; "
                              "add it to stratascope/schemas/groups.py and docs/store-format.md")
        if tuple(dims) != var.dims:
            raise SchemaError(f"{where}: array '{name}' has dims {tuple(dims)}, the schema of {spec.path} says "
                              f"{var.dims}")
        if not dtype_matches(var, dtype):
            raise SchemaError(f"{where}: array '{name}' has dtype {np.dtype(dtype)}, the schema of {spec.path} "
                              f"says {var.dtype}")
