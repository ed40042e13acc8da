"""Checks a store's root attrs and arrays against schema v1 before anything reads it."""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import SchemaError, SchemaVersionError
from .spec import LABEL_PREFIX, META_PREFIX, REQUIRED_ATTRS, SCHEMA_VERSION, VARIABLES


def parse_schema_version(attrs: Mapping, where: str) -> int:
    """Return the schema version, or raise naming the store and what to do."""
    if "schema_version" not in attrs:
        raise SchemaVersionError(
            f"{where} has no schema_version attribute; it was not written by stratascope "
            "(or was written by a pre-release): capture it again"
        )
    version = attrs["schema_version"]
    if version != SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{where} has schema version {version!r}, but this stratascope reads version "
            f"{SCHEMA_VERSION}: open it with the stratascope release that wrote it, or capture again"
        )
    return version


def validate_root(attrs: Mapping, arrays: Mapping[str, tuple[tuple[str, ...], str]], where: str) -> None:
    """Validate root attrs and each array's dims. `arrays` maps name -> (dims, dtype str)."""
    parse_schema_version(attrs, where)
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise SchemaError(f"{where} lacks the root attributes {', '.join(missing)}; capture it again")
    for name in ("token_id", "position", "prompt_index", "is_generated", "prompt_text", "token_offset", "n_tokens"):
        if name not in arrays:
            raise SchemaError(f"{where} has no '{name}' array; it is not a complete stratascope store")
    for name, (dims, _dtype) in arrays.items():
        spec = VARIABLES.get(name)
        if spec is not None and tuple(dims) != spec.dims:
            raise SchemaError(f"{where}: array '{name}' has dims {tuple(dims)}, schema v1 says {spec.dims}")
        if name.startswith(META_PREFIX) and tuple(dims) != ("prompt",):
            raise SchemaError(f"{where}: metadata array '{name}' has dims {tuple(dims)}, expected ('prompt',)")
        if name.startswith(LABEL_PREFIX) and tuple(dims) != ("token",):
            raise SchemaError(f"{where}: token label array '{name}' has dims {tuple(dims)}, expected ('token',)")
