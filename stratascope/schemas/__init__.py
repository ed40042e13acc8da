"""The store contract: names, dims, dtypes, attrs, conventions, version and validation.

Imports no other stratascope subpackage (errors.py aside).
"""

from .attrs import CORPUS_KEYS, MODEL_KEYS, RootAttrs
from .conventions import consolidate, describe, token_coords, upgrade_store
from .groups import (
    ANALYSIS,
    BIAS,
    BIAS_CORRELATION,
    BIAS_DLA,
    DLA,
    GROUPS,
    HEADS,
    LENS,
    NMF,
    NMF_TRANSFORM,
    PROBE,
    READOUT,
    READOUT_ATTRS,
    SIMILARITY,
    SIMILARITY_MLP,
    TUNED_LENS,
    GroupSpec,
    analysis_spec,
    group_path,
)
from .spec import (
    ACTIVATIONS,
    ATTRIBUTION_METHODS,
    ATTRIBUTION_PREFIX,
    CAPTURE_NAMES,
    CORPUS_COLUMNS,
    DIMS,
    GRADIENTS,
    INDEX_COORDS,
    LABEL_PREFIX,
    META_PREFIX,
    OPTIONAL_TOKEN_TABLE,
    PROJECTION_CAPTURES,
    PROMPT_TABLE,
    READOUT_PROJECTIONS,
    RECORDS,
    REQUIRED_ATTRS,
    ROOT_PATTERNS,
    SCHEMA_VERSION,
    STACKS,
    TOKEN_COORDS,
    TOKEN_TABLE,
    VARIABLES,
    VariableSpec,
    root_spec,
    transformer_lens_attrs,
    transformer_lens_hook,
)
from .validate import check_group, dtype_matches, parse_schema_version, validate_root

__all__ = [
    "ACTIVATIONS", "ANALYSIS", "ATTRIBUTION_METHODS", "ATTRIBUTION_PREFIX", "BIAS", "BIAS_CORRELATION", "BIAS_DLA",
    "CAPTURE_NAMES", "CORPUS_COLUMNS", "CORPUS_KEYS", "DIMS", "DLA", "GRADIENTS", "GROUPS", "GroupSpec", "HEADS",
    "INDEX_COORDS", "LABEL_PREFIX", "LENS", "LENS_STUDY", "META_PREFIX", "MODEL_KEYS", "NMF", "NMF_TRANSFORM",
    "OPTIONAL_TOKEN_TABLE", "PROBE", "PROJECTION_CAPTURES", "PROMPT_TABLE", "READOUT", "READOUT_ATTRS",
    "READOUT_PROJECTIONS", "RECORDS",
    "REQUIRED_ATTRS", "ROOT_PATTERNS", "RootAttrs", "SCHEMA_VERSION", "SIMILARITY", "SIMILARITY_MLP", "STACKS",
    "TOKEN_COORDS",
    "TOKEN_TABLE", "TUNED_LENS", "VARIABLES", "VariableSpec", "analysis_spec", "check_group", "consolidate",
    "describe", "dtype_matches", "group_path", "parse_schema_version", "root_spec", "token_coords",
    "transformer_lens_attrs", "transformer_lens_hook", "upgrade_store", "validate_root"
]
