"""Capture options, parsed and checked before any model call."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import ConfigError
from ..options import option
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


CAPTURE_DOC = """Capture a corpus into a Zarr store at `out` (a path or fsspec URL).

    Give either `prompts` (a list of strings or dicts, or a DataFrame) or `corpus` (a file path).
    With dry_run=True nothing is written and the Plan (sizes, chunks, bytes) is returned.
    resume=True finishes an interrupted capture of the same corpus, model and options.
    workers=N runs shards on a local dask cluster; scheduler='tcp://...' on an existing one.
    Everything is checked (corpus, model, options, disk) before an existing store is replaced.
    generate=N extends every prompt by exactly N tokens (greedy, or sampled with seed and temperature);
    capture 'attribution' and 'grad' add gradient arrays (capture/generate.py, capture/gradients.py).
    """

CAPTURE_HELP = "comma-separated: " + ", ".join(CAPTURE_NAMES)


@dataclass
class CaptureConfig:
    """What to capture and how: one definition for the CLI, the Python API and the store's attrs."""

    capture: tuple[str, ...] = option(("hidden", "attention", "mlp"), CAPTURE_HELP)
    layers: str | list[int] | None = option(None, "blocks to capture, e.g. 0-5,7 (default: all)")
    dtype: str = option("float32", "storage dtype of the activations", choices=DTYPES)
    batch_size: int = option(16, "prompts per forward pass", type=int)
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    text_column: str = option("text", "the corpus column holding the prompt (encoder-decoder models: the source)")
    target_column: str | None = option(None, "encoder-decoder models: the corpus column holding the decoder text "
                                             "(teacher-forced; else --generate N)")
    max_length: int = option(512, "tokens kept per prompt", type=int)
    shard_tokens: int | None = option(None, "tokens per shard (the unit of work and of resume); "
                                            "default: what fits 256 MiB", type=int, min=1)
    zarr_shards: bool = option(False, "pack each shard's chunks into one stored object (Zarr sharding codec; "
                                      "big runs)")
    # generation and gradients (capture/generate.py, capture/gradients.py); they travel with the config to workers
    generate: int = option(0, "extend each prompt by exactly N generated tokens (no stop at EOS), then capture "
                              "it all", type=int)
    sample: bool = option(False, "sample the generated tokens instead of greedy decoding")
    seed: int = option(0, "sampling seed (per prompt: seed, index)", type=int)
    temperature: float = option(1.0, "sampling temperature", type=float)
    attribution: str = option("grad_x_input", "with --capture attribution: grad_x_input, integrated_gradients, "
                                              "gradient_norm (comma-separated)")
    ig_steps: int = option(32, "integrated gradients path steps", type=int)
    ig_method: str = option("gausslegendre", "gausslegendre, riemann_trapezoid, riemann_middle, riemann_left or "
                                             "riemann_right")
    special_tokens: str = option("text", "special-token strings in the corpus text (e.g. <|im_start|>): text = "
                                         "tokenized as the characters they are; parse = as the tokenizer's control "
                                         "tokens", choices=("text", "parse"))
    attribute: str | None = option(None, "attribution targets: predictions of generated tokens (default with "
                                         "--generate) or of all", choices=("generated", "all"))

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
