"""The store contract: names, dims, dtypes, version and validation. Imports no other subpackage."""

from .spec import (
    ACTIVATIONS,
    CAPTURE_NAMES,
    DIMS,
    LABEL_PREFIX,
    META_PREFIX,
    PROJECTION_CAPTURES,
    PROMPT_TABLE,
    READOUT_PROJECTIONS,
    REQUIRED_ATTRS,
    SCHEMA_VERSION,
    TOKEN_TABLE,
    VARIABLES,
    VariableSpec,
)
from .validate import parse_schema_version, validate_root

__all__ = [
    "ACTIVATIONS", "CAPTURE_NAMES", "DIMS", "LABEL_PREFIX", "META_PREFIX", "PROJECTION_CAPTURES", "PROMPT_TABLE", "READOUT_PROJECTIONS",
    "REQUIRED_ATTRS",
    "SCHEMA_VERSION", "TOKEN_TABLE", "VARIABLES", "VariableSpec", "parse_schema_version", "validate_root",
]
