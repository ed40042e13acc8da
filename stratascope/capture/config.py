"""Capture options, parsed and checked before any model call."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import ConfigError
from ..ranges import parse_ranges  # noqa: F401 - re-exported for callers
from ..schemas import CAPTURE_NAMES

DTYPES = ("float16", "float32")


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
    # generation and gradients (capture/generate.py, capture/gradients.py); they travel with the config to workers
    generate: int = 0
    sample: bool = False
    seed: int = 0
    temperature: float = 1.0
    attribution: str = "grad_x_input"
    ig_steps: int = 32
    ig_method: str = "gausslegendre"
    attribute: str | None = None

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
        if not isinstance(self.attribution, str):
            self.attribution = ",".join(self.attribution)
        self.generation, self.gradients  # noqa: B018 - validate them now, before any model call

    @property
    def generation(self):
        from .generate import GenerationConfig

        return GenerationConfig(self.generate, self.sample, self.seed, self.temperature)

    @property
    def gradients(self):
        """The GradientConfig, or None when neither attribution nor grad is captured."""
        from .gradients import parse_gradient_config

        return parse_gradient_config(self.capture, self.attribution, self.ig_steps, self.ig_method, self.attribute,
                                     self.generate)

    @property
    def attn_implementation(self) -> str:
        """Eager attention when its weights, queries or keys are captured (the hooks read them there)."""
        return "eager" if {"attention", "qk"} & set(self.capture) else "sdpa"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["capture"] = list(self.capture)
        return d
