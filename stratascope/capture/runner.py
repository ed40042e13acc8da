"""The capture: tokenize everything, size the store, run length-bucketed batches, write regions."""

from __future__ import annotations

import datetime
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

from .. import __version__
from ..errors import ConfigError, DiskSpaceError, OverflowError16
from ..models import find_adapter, load_model
from ..schemas import META_PREFIX, SCHEMA_VERSION, VARIABLES
from .config import CaptureConfig, parse_ranges
from .corpus import Corpus, from_prompts, read_corpus
from .generate import GenerationConfig, generate_window, generated_mask, require_lm
from .gradients import GradientConfig, gradient_rows, parse_gradient_config, stage_rows
from .hooks import Recorder
from .readout import unembed_hash, vocab_strings, write_readout
from .writer import ChunkWriter, create_array, prepare_output, remove_store, token_chunk_rows

WINDOW_BYTES = 256 * 2**20  # staging memory for one window of prompts (bounded RAM)
TOKEN_TABLE = ("token_id", "position", "prompt_index", "is_generated", "token_str")
GRADIENT_ARRAYS = tuple(n for n, v in VARIABLES.items() if v.capture in ("attribution", "grad"))


@dataclass
class Plan:
    """Everything known before the first model call: sizes, chunks, bytes."""

    n_prompts: int
    n_tokens: int
    max_len: int
    layers: list[int]
    depths: list[int]
    shapes: dict[str, tuple[int, ...]]  # token-dim arrays: name -> full shape
    dtypes: dict[str, str]
    chunk_rows: int
    truncated: int

    def bytes_per_array(self) -> dict[str, int]:
        out = {}
        for name, shape in self.shapes.items():
            item = 16 if self.dtypes[name] == "str" else np.dtype(self.dtypes[name]).itemsize
            out[name] = int(np.prod(shape, dtype=np.int64)) * item
        return out

    def chunk_counts(self) -> dict[str, int]:
        return {name: -(-shape[0] // self.chunk_rows) for name, shape in self.shapes.items()}

    def total_bytes(self) -> int:
        return sum(self.bytes_per_array().values())

    def summary(self, out: str) -> str:
        free = free_disk(out)
        lines = [f"prompts {self.n_prompts}, tokens {self.n_tokens}, longest sequence {self.max_len}"
                 + (f", {self.truncated} prompts truncated to --max-length" if self.truncated else ""),
                 f"token chunk {self.chunk_rows} rows", f"{'array':<14}{'shape':<28}{'bytes':>14}{'chunks':>9}"]
        counts = self.chunk_counts()
        for name, nbytes in self.bytes_per_array().items():
            lines.append(f"{name:<14}{str(self.shapes[name]):<28}{_human(nbytes):>14}{counts[name]:>9}")
        lines.append(f"{'total':<42}{_human(self.total_bytes()):>14}  (uncompressed)")
        lines.append(f"free disk at {out}: {_human(free) if free is not None else 'unknown'}")
        return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def free_disk(out: str) -> int | None:
    if "://" in out:
        return None
    p = Path(out).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def tokenize(tokenizer, texts: list[str], max_length: int) -> tuple[list[list[int]], int]:
    ids, truncated = [], 0
    for start in range(0, len(texts), 1024):
        batch = tokenizer(texts[start:start + 1024], add_special_tokens=True)["input_ids"]
        for seq in batch:
            if len(seq) > max_length:
                truncated += 1
                seq = seq[:max_length]
            ids.append(list(seq))
    return ids, truncated


def make_plan(adapter, cfg: CaptureConfig, lengths: np.ndarray, truncated: int,
              grads: GradientConfig | None = None) -> Plan:
    L = adapter.n_layers
    layers = parse_ranges(cfg.layers, L, "layers") or list(range(L))
    depths = list(range(L + 1)) if len(layers) == L else sorted({0} | {l + 1 for l in layers})
    n_tokens, max_len = int(lengths.sum()), int(lengths.max())
    shapes = {"token_id": (n_tokens,), "position": (n_tokens,), "prompt_index": (n_tokens,),
              "is_generated": (n_tokens,), "token_str": (n_tokens,)}
    dtypes = {"token_id": "int32", "position": "int32", "prompt_index": "int32", "is_generated": "bool",
              "token_str": "str"}
    if "hidden" in cfg.capture:
        shapes["hidden"] = (n_tokens, len(depths), adapter.d_model)
    if "attention" in cfg.capture:
        shapes["attention"] = (n_tokens, len(layers), adapter.n_heads, max_len)
    if "mlp" in cfg.capture:
        shapes["mlp"] = (n_tokens, len(layers), adapter.d_mlp)
    for name in ("hidden", "attention", "mlp"):
        if name in shapes:
            dtypes[name] = cfg.dtype
    for name, (tail, dtype) in (grads.arrays(max_len, len(depths), adapter.d_model) if grads else {}).items():
        shapes[name], dtypes[name] = (n_tokens,) + tail, dtype
    row_bytes = [int(np.prod(s[1:], dtype=np.int64)) * np.dtype(dtypes[n]).itemsize
                 for n, s in shapes.items() if dtypes[n] != "str"]
    return Plan(len(lengths), n_tokens, max_len, layers, depths, shapes, dtypes,
                token_chunk_rows(row_bytes, n_tokens), truncated)


def _windows(lengths: np.ndarray, row_bytes: int, chunk_rows: int, batch_size: int):
    """Contiguous runs of prompts whose staging buffers fit in WINDOW_BYTES."""
    budget = max(chunk_rows, WINDOW_BYTES // max(row_bytes, 1))
    start, tokens = 0, 0
    for i, n in enumerate(lengths):
        if i > start and (tokens + n > budget):
            yield start, i
            start, tokens = i, 0
        tokens += int(n)
    yield start, len(lengths)


def _batches(lengths: np.ndarray, lo: int, hi: int, batch_size: int):
    """Length-bucketed batches: sort the window's prompts by length so padding stays small."""
    order = lo + np.argsort(-lengths[lo:hi], kind="stable")
    for i in range(0, len(order), batch_size):
        yield order[i:i + batch_size]


def _metadata_array(values) -> tuple[np.ndarray, str]:
    arr = np.asarray(values)
    if arr.dtype.kind in "iub":
        return arr.astype("int64" if arr.dtype.kind != "b" else "bool"), ("int64" if arr.dtype.kind != "b" else "bool")
    if arr.dtype.kind == "f":
        return arr.astype("float64"), "float64"
    return np.array(["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in values],
                    dtype=object), "str"


def _to_dtype(t: torch.Tensor, dtype: str, name: str) -> torch.Tensor:
    if dtype == "float16":
        half = t.to(torch.float16)
        if torch.isinf(half).any() and torch.isfinite(t).all():
            raise OverflowError16(f"a '{name}' value exceeds the float16 range (|x| > 65504); capture with --dtype float32")
        return half
    return t.to(torch.float32)


def capture(model: str = "smollm2", prompts=None, out: str = "runs/run.zarr", *, corpus: str | None = None,
            capture=("hidden", "attention", "mlp"), layers=None, dtype: str = "float32", batch_size: int = 16,
            device: str = "auto", text_column: str = "text", max_length: int = 512, overwrite: bool = False,
            dry_run: bool = False, progress: bool = True, generate: int = 0, sample: bool = False, seed: int = 0,
            temperature: float = 1.0, attribution="grad_x_input", ig_steps: int = 32,
            ig_method: str = "gausslegendre", attribute: str | None = None):
    """Capture a corpus into a Zarr store at `out` and return the opened Run.

    Give either `prompts` (a list of strings or dicts, or a DataFrame) or `corpus` (a file path).
    With dry_run=True nothing is written and the Plan (sizes, chunks, bytes) is returned.
    Everything is checked (corpus, model, options, disk) before an existing store is replaced.
    generate=N extends every prompt by exactly N tokens (greedy, or sampled with seed and
    temperature); capture 'attribution' and 'grad' add gradient arrays (see capture/gradients.py).
    """
    cfg = CaptureConfig(capture=capture, layers=layers, dtype=dtype, batch_size=batch_size, device=device,
                        text_column=text_column, max_length=max_length)
    gen = GenerationConfig(generate, sample, seed, temperature)
    grads = parse_gradient_config(cfg.capture, attribution, ig_steps, ig_method, attribute, generate)
    if (prompts is None) == (corpus is None):
        raise ConfigError("give either prompts or a corpus file, not both or neither")
    data = read_corpus(corpus, text_column) if corpus is not None else from_prompts(prompts, text_column)
    if not dry_run:
        prepare_output(out, overwrite)
    loaded = load_model(model, device=cfg.device, attn="eager" if "attention" in cfg.capture else "sdpa")
    adapter = find_adapter(loaded.model)
    if gen.n_new or grads:
        require_lm(loaded.model, adapter.causal, "--generate" if gen.n_new else "--capture attribution/grad")
    limit = min(cfg.max_length, getattr(loaded.model.config, "max_position_embeddings", None) or cfg.max_length)
    if gen.n_new >= limit:
        raise ConfigError(f"--generate {gen.n_new} leaves no room for the prompt within {limit} tokens; "
                          "generate fewer tokens or raise --max-length")
    ids, truncated = tokenize(loaded.tokenizer, data.texts, limit - gen.n_new)  # room for the new tokens
    lengths = np.array([len(s) for s in ids], dtype=np.int64) + gen.n_new
    plan = make_plan(adapter, cfg, lengths, truncated, grads)
    if dry_run:
        return plan
    free = free_disk(out)
    if free is not None and plan.total_bytes() > free:
        raise DiskSpaceError(f"the capture needs up to {_human(plan.total_bytes())} but {out} has "
                             f"{_human(free)} free; capture fewer arrays or layers, use --dtype float16, or free disk")
    if overwrite:
        remove_store(out)
    vocab = vocab_strings(loaded.tokenizer, adapter.vocab_size)
    root = _create(out, loaded, adapter, cfg, data, plan, lengths, vocab)
    _record_extras(root, plan, gen, grads)
    started = time.perf_counter()
    _run(loaded, adapter, cfg, plan, ids, lengths, root, np.array(vocab, dtype=object), progress, gen, grads)
    seconds = time.perf_counter() - started
    root.attrs.update({"complete": True, "timing": {"seconds": seconds, "tokens_per_s": plan.n_tokens / seconds}})
    from ..run import Run

    return Run(out)


def _create(out, loaded, adapter, cfg: CaptureConfig, data: Corpus, plan: Plan, lengths, vocab) -> zarr.Group:
    import transformers
    import xarray

    root = zarr.open_group(out, mode="w")
    root.attrs.update({
        "schema_version": SCHEMA_VERSION,
        "stratascope_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "complete": False,
        "model": {"name": loaded.name, "source": loaded.source, "class": type(loaded.model).__name__,
                  "family": adapter.family, "causal": adapter.causal, **adapter.sizes(),
                  "weights_sha256": unembed_hash(adapter, loaded.model),
                  "attn_implementation": loaded.model.config._attn_implementation},
        "capture": {**cfg.to_dict(), "arrays": [n for n in ("hidden", "attention", "mlp") if n in plan.shapes],
                    "layers": plan.layers, "depths": plan.depths, "token_chunk": plan.chunk_rows,
                    "truncated_prompts": plan.truncated, "padding": "right, stripped before writing"},
        "corpus": {"source": data.source, "sha256": data.fingerprint(), "n_prompts": plan.n_prompts,
                   "n_tokens": plan.n_tokens, "max_len": plan.max_len,
                   "metadata_columns": [str(c) for c in data.metadata.columns]},
        "software": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "zarr": zarr.__version__,
                     "xarray": xarray.__version__, "numpy": np.__version__},
    })
    P = plan.n_prompts
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    create_array(root, "prompt_text", (P,), P, "str")[:] = np.array(data.texts, dtype=object)
    create_array(root, "token_offset", (P,), P, "int64")[:] = offsets
    create_array(root, "n_tokens", (P,), P, "int32")[:] = lengths.astype(np.int32)
    for col in data.metadata.columns:
        values, kind = _metadata_array(data.metadata[col].to_numpy())
        create_array(root, META_PREFIX + str(col), (P,), P, kind, ("prompt",))[:] = values
    for name, coords in (("depth", plan.depths), ("layer", plan.layers)):
        create_array(root, name, (len(coords),), len(coords), "int32", (name,))[:] = np.array(coords, dtype=np.int32)
    for name, shape in plan.shapes.items():
        create_array(root, name, shape, plan.chunk_rows, plan.dtypes[name])
    write_readout(root, adapter, loaded.tokenizer, vocab)
    return root


def _record_extras(root: zarr.Group, plan: Plan, gen: GenerationConfig, grads: GradientConfig | None) -> None:
    """Generation and gradient settings in the root attrs, and the gradient arrays in capture.arrays."""
    capture_attrs = dict(root.attrs["capture"])
    capture_attrs["arrays"] = list(capture_attrs["arrays"]) + [n for n in plan.shapes if n in GRADIENT_ARRAYS]
    root.attrs.update({"capture": capture_attrs, "generation": gen.to_attrs(),
                       "gradients": grads.to_attrs() if grads else None})


def _run(loaded, adapter, cfg: CaptureConfig, plan: Plan, ids, lengths, root, vocab: np.ndarray, progress: bool,
         gen: GenerationConfig | None = None, grads: GradientConfig | None = None):
    """Run every window of prompts through the model and hand its rows to the writer."""
    model, device = loaded.model, next(loaded.model.parameters()).device
    base = getattr(model, model.base_model_prefix, model)  # skip the LM head: capture needs no logits
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    acts = [n for n in ("hidden", "attention", "mlp") if n in plan.shapes]
    grad_arrays = [n for n in plan.shapes if n in GRADIENT_ARRAYS]
    n_new = gen.n_new if gen else 0
    row_bytes = sum(int(np.prod(plan.shapes[n][1:])) * np.dtype(plan.dtypes[n]).itemsize
                    for n in acts + grad_arrays) + 32
    writer = ChunkWriter({n: root[n] for n in plan.shapes}, plan.chunk_rows, plan.n_tokens)
    bar = tqdm(total=plan.n_tokens, unit="tok", unit_scale=True, desc="capture", disable=not progress,
               mininterval=0.5, dynamic_ncols=True)
    done_prompts = 0
    try:
        with torch.inference_mode(), Recorder(adapter, cfg.capture, plan.layers, plan.depths) as rec:
            for lo, hi in _windows(lengths, row_bytes, plan.chunk_rows, cfg.batch_size):
                w0, w1 = int(offsets[lo]), int(offsets[hi - 1] + lengths[hi - 1])
                if n_new:  # generated ids join the sequences before their token rows are staged
                    bar.set_postfix_str(f"generating for prompts {lo}-{hi - 1}", refresh=True)
                    generate_window(model, ids, lo, hi, gen, device, cfg.batch_size)
                    rec.out.clear()
                stage = _token_table(ids, lengths, offsets, lo, hi, vocab)
                if n_new:
                    stage["is_generated"] = generated_mask(lengths, lo, hi, n_new)
                for n in acts:
                    stage[n] = np.zeros((w1 - w0,) + plan.shapes[n][1:], dtype=plan.dtypes[n])
                for n in grad_arrays:  # NaN marks attribution rows that are not targets
                    stage[n] = np.full((w1 - w0,) + plan.shapes[n][1:], np.nan, dtype=plan.dtypes[n])
                for batch in _batches(lengths, lo, hi, cfg.batch_size):
                    _forward(base, rec, ids, batch, device, adapter.causal)
                    tensors = {n: _to_dtype(t, cfg.dtype, n).cpu().numpy() for n, t in rec.stacked().items()}
                    rec.out.clear()
                    for b, p in enumerate(batch):
                        n, o = int(lengths[p]), int(offsets[p]) - w0
                        for name, values in tensors.items():
                            if name == "attention":
                                stage[name][o:o + n, :, :, :n] = values[b, :n, :, :, :n]
                            else:
                                stage[name][o:o + n] = values[b, :n]
                    if grads is not None:
                        for name, per_prompt in gradient_rows(model, adapter, ids, batch, lengths, n_new, grads,
                                                              plan.depths, device).items():
                            for p, values in zip(batch, per_prompt):
                                stage_rows(stage[name], int(offsets[p]) - w0, values)
                        rec.out.clear()  # the capture hooks also saw the gradient forwards
                    done_prompts += len(batch)
                    bar.update(int(lengths[batch].sum()))
                    bar.set_postfix_str(f"prompts {done_prompts}/{plan.n_prompts}", refresh=False)
                writer.put(w0, stage)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()


def _token_table(ids, lengths, offsets, lo, hi, vocab) -> dict[str, np.ndarray]:
    token_id = np.concatenate([np.asarray(ids[p], dtype=np.int32) for p in range(lo, hi)])
    position = np.concatenate([np.arange(lengths[p], dtype=np.int32) for p in range(lo, hi)])
    prompt = np.concatenate([np.full(lengths[p], p, dtype=np.int32) for p in range(lo, hi)])
    return {"token_id": token_id, "position": position, "prompt_index": prompt,
            "is_generated": np.zeros(len(token_id), dtype=bool),
            "token_str": vocab[np.clip(token_id, 0, len(vocab) - 1)]}


def _forward(base, rec: Recorder, ids, batch, device, causal: bool) -> None:
    """One padded forward of the batch's prompts (right padding: real tokens never see it)."""
    width = max(len(ids[p]) for p in batch)
    input_ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for b, p in enumerate(batch):
        input_ids[b, :len(ids[p])] = torch.tensor(ids[p])
        mask[b, :len(ids[p])] = 1
    kwargs = {"use_cache": False} if causal else {}
    base(input_ids=input_ids.to(device), attention_mask=mask.to(device), **kwargs)
