"""Capture options, parsed and checked before any model call."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import ConfigError
from ..schemas import CAPTURE_NAMES

DTYPES = ("float16", "float32")


def parse_ranges(text: str | None, upper: int, what: str) -> list[int] | None:
    """Parse '0-5,7' into [0..5, 7]; every value must lie in [0, upper). None/'' means all."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if not isinstance(text, str):
        values = [int(v) for v in text]
    else:
        values = []
        for part in text.split(","):
            part = part.strip()
            try:
                if "-" in part[1:]:
                    lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                    values.extend(range(int(lo), int(hi) + 1))
                else:
                    values.append(int(part))
            except ValueError:
                raise ConfigError(f"--{what} {text!r}: '{part}' is not a number or a range like 0-5") from None
    bad = [v for v in values if not 0 <= v < upper]
    if bad:
        raise ConfigError(f"--{what} {text!r}: {bad[0]} is out of range; this model has {what} 0-{upper - 1}")
    return sorted(set(values))


def parse_capture(names) -> tuple[str, ...]:
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    names = tuple(n.strip() for n in names)
    unknown = [n for n in names if n not in CAPTURE_NAMES]
    if unknown:
        raise ConfigError(f"--capture {unknown[0]!r} is not something stratascope captures; choose from "
                          f"{', '.join(CAPTURE_NAMES)}")
    if not names:
        raise ConfigError("--capture is empty; choose from " + ", ".join(CAPTURE_NAMES))
    return names


@dataclass
class CaptureConfig:
    """What to capture and how. `layers` None means every layer."""

    capture: tuple[str, ...] = ("hidden", "attention", "mlp")
    layers: str | list[int] | None = None
    dtype: str = "float32"
    batch_size: int = 16
    device: str = "auto"
    text_column: str = "text"
    max_length: int = 512
    shard_tokens: int | None = None  # rows per shard (None: what fits a 256 MiB staging buffer)
    zarr_shards: bool = False  # pack each shard's chunks into one stored object (Zarr sharding codec)

    def __post_init__(self):
        self.capture = parse_capture(self.capture)
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r} is not supported; use float16 or float32")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size!r} must be a whole number of at least 1")
        if self.shard_tokens is not None and (not isinstance(self.shard_tokens, int) or self.shard_tokens < 1):
            raise ConfigError(f"--shard-tokens {self.shard_tokens!r} must be a whole number of at least 1")
        if not isinstance(self.max_length, int) or self.max_length < 1:
            raise ConfigError(f"--max-length {self.max_length!r} must be a whole number of at least 1")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["capture"] = list(self.capture)
        return d
