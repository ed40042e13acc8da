"""Capture options, parsed and checked before any model call."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from ..errors import ConfigError
from ..options import option
from ..positions import POSITIONS_HELP, parse_positions
from ..schemas import CAPTURE_NAMES

DTYPES = ("float16", "float32")
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
POOLS = ("mean",)
POOLABLE = ("hidden", "mlp")  # one row per prompt has a meaning only for these (attention has a key axis)


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


def parse_device_map(value) -> str | dict | None:
    """A strategy name, or a {module: device} map (a dict, or its JSON text from the command line)."""
    if value is None or isinstance(value, dict):
        return value or None
    text = str(value).strip()
    if text.startswith("{"):
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--device-map {text[:40]!r} is not a JSON object ({e.msg}); write it as "
                              '\'{"model.embed_tokens": 0, "model.layers.0": 0, ...}\'') from e
        if not isinstance(mapping, dict) or not mapping:
            raise ConfigError("--device-map JSON must be a non-empty object of module name -> device")
        return mapping
    if text not in DEVICE_MAPS:
        raise ConfigError(f"--device-map {text!r} is not a placement; use {', '.join(DEVICE_MAPS)} "
                          "or a JSON object of module -> device")
    return text


def parse_max_memory(value) -> dict | None:
    """'0=20GiB,cpu=64GiB' -> {'0': '20GiB', 'cpu': '64GiB'}: string keys, as the store's JSON attrs
    keep them (models/load.py gives accelerate GPU indices as ints)."""
    if isinstance(value, dict):
        value = ",".join(f"{k}={v}" for k, v in value.items())
    if value is None:
        return None
    out = {}
    for part in (p.strip() for p in str(value).split(",") if p.strip()):
        device, sep, amount = part.partition("=")
        device = device.strip()
        if not sep or not amount.strip() or not (device.isdigit() or device in ("cpu", "mps", "disk")):
            raise ConfigError(f"--max-memory {part!r} is not DEVICE=AMOUNT; write e.g. 0=20GiB,1=20GiB,cpu=64GiB")
        out[device] = amount.strip()
    return out or None


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
    model_dtype: str = option("auto", "dtype of the weights and the compute (--dtype is the storage dtype): auto = "
                                      "float32 on the CPU (bfloat16 matmuls are slow on most CPUs) and with "
                                      "--capture attribution/grad; on a CUDA GPU bfloat16 where it is supported "
                                      "(half the memory, the GPU's fast matmuls, float32's range so nothing "
                                      "overflows), else float32", choices=MODEL_DTYPES)
    device_map: str | dict | None = option(None, "spread a model too big for one GPU over the GPUs, then the CPU, "
                                                 "then disk (accelerate): auto, balanced, balanced_low_0, "
                                                 "sequential, or a JSON object module -> device (0, cpu, disk); "
                                                 "with --workers each worker spreads over its own GPUs")
    max_memory: str | dict | None = option(None, "with --device-map: memory per device, e.g. 0=20GiB,1=20GiB,cpu=64GiB")
    threads: int | None = option(None, "torch threads of each process that runs the model (default: torch's own "
                                       "count in-process, 1 per --workers worker, a --scheduler worker's thread "
                                       "count); stored values are bit-identical across runs only at the same "
                                       "count", type=int, min=1)
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
    # which token rows are stored (capture/rows.py); the forward always sees every token
    positions: str = option("all", "token rows to store: " + POSITIONS_HELP)
    pool: str | None = option(None, "mean: store one row per prompt, the mean of the rows --positions selects "
                                    "(--capture hidden,mlp only)", choices=POOLS)

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
        if self.model_dtype not in MODEL_DTYPES:
            raise ConfigError(f"--model-dtype {self.model_dtype!r} is not supported; use "
                              + ", ".join(MODEL_DTYPES))
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(f"--threads {self.threads!r} must be a whole number of at least 1")
        self.device_map, self.max_memory = parse_device_map(self.device_map), parse_max_memory(self.max_memory)
        if self.max_memory and not self.device_map:
            raise ConfigError("--max-memory only applies with --device-map; add --device-map auto")
        if self.device_map and self.device not in ("auto", "cuda"):
            raise ConfigError(f"--device-map places the model's blocks itself, so --device {self.device} cannot "
                              "apply; leave --device auto, or drop --device-map to run on one device")
        if not isinstance(self.attribution, str):
            self.attribution = ",".join(self.attribution)
        self.generation, self.gradients  # noqa: B018 - validate them now, before any model call
        self._check_rows()

    def _check_rows(self) -> None:
        self.positions = parse_positions(self.positions).text
        if self.pool is not None and self.pool not in POOLS:
            raise ConfigError(f"--pool {self.pool!r} is not supported; use --pool mean (or leave it out)")
        if self.pool:
            other = [n for n in self.capture if n not in POOLABLE]
            if other:
                raise ConfigError(f"--pool {self.pool} stores one row per prompt, which --capture {other[0]} (a "
                                  "per-token capture) has no pooled form of; use --capture hidden,mlp with --pool, "
                                  f"or capture {other[0]} without --pool")
        if self.selects_rows and self.gradients is not None:
            raise ConfigError("--capture attribution/grad need every token row; drop --positions/--pool or capture "
                              "the gradients in a separate run")

    @property
    def selects_rows(self) -> bool:
        """Whether only some token rows are stored (--positions other than all, or --pool)."""
        return self.positions != "all" or self.pool is not None

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

    def half_gradients(self) -> bool:
        return self.model_dtype in ("bfloat16", "float16") and self.gradients is not None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["capture"] = list(self.capture)
        return d
