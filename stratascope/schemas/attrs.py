"""The root attrs of a store as a frozen dataclass, with to_dict/from_dict."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import SchemaError, SchemaVersionError
from .spec import REQUIRED_ATTRS, SCHEMA_VERSION, TOKEN_COORDS

# Keys each section carries (docs/store-format.md, "Root attrs", describes every one).
MODEL_KEYS = ("name", "source", "class", "family", "causal", "n_layers", "n_heads", "d_model", "d_mlp", "d_head",
              "vocab_size", "weights_sha256", "attn_implementation", "dtype", "device_map")
CORPUS_KEYS = ("source", "sha256", "n_prompts", "n_tokens", "max_len", "metadata_columns", "token_labels")


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


@dataclass(frozen=True)
class RootAttrs:
    """What a store's root group says about itself. Sections (model, capture, corpus, ...) are
    plain dicts; `extra` keeps keys this version does not know, so a round trip loses nothing."""

    model: dict
    capture: dict
    corpus: dict
    software: dict
    created: str
    complete: bool = False
    schema_version: int = SCHEMA_VERSION
    stratascope_version: str = ""
    generation: dict | None = None
    gradients: dict | None = None
    timing: dict | None = None
    identity: dict | None = None
    integrity: dict | None = None  # the capture's promise to readers: checksums, every chunk written
    verified: dict | None = None  # when `stratascope verify` last checked the store, and its outcome
    failure: str | None = None  # why a capture stopped for good (float16 overflow): what to do instead
    # xarray decodes the listed arrays as non-dimension coordinates of `token`
    coordinates: str = " ".join(TOKEN_COORDS)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        keep = {k: v for k, v in out.items() if v is not None or k in ("generation", "gradients")}
        if not self.coordinates:
            del keep["coordinates"]
        return {**keep, **self.extra}

    @classmethod
    def from_dict(cls, attrs: Mapping, where: str = "the store") -> RootAttrs:
        """Parse root attrs: the schema version first (schemas.validate.parse_schema_version), then
        every required key; unknown keys go to `extra`."""
        parse_schema_version(attrs, where)
        missing = [k for k in REQUIRED_ATTRS if k not in attrs]
        if missing:
            raise SchemaError(f"{where} lacks the root attributes {', '.join(missing)}; capture it again")
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in attrs.items() if k in known}
        kwargs.setdefault("coordinates", "")  # a store of the first schema has no coordinates attribute
        return cls(**kwargs, extra={k: v for k, v in attrs.items() if k not in known})
