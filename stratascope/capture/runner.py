"""The capture: tokenize everything, size the store, run length-bucketed batches, write regions."""

from __future__ import annotations

import datetime
import platform
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr

from ..errors import ConfigError, DiskSpaceError, OverflowError16, ResumeMismatchError
from ..formatting import human_bytes
from ..locks import hold
from ..models import find_adapter, input_device, load_model
from ..options import defaults, keyword_signature
from ..progress import tqdm
from ..ranges import parse_ranges
from ..schemas import (
    META_PREFIX,
    OPTIONAL_TOKEN_TABLE,
    PROJECTION_CAPTURES,
    TOKEN_TABLE,
    VARIABLES,
    RootAttrs,
    consolidate,
    transformer_lens_attrs,
)
from ..version import __version__
from . import seq2seq
from .buffers import StageBuffers
from .config import CAPTURE_DOC, CaptureConfig
from .corpus import Corpus, from_prompts, read_corpus
from .durable import open_for_writing
from .generate import generate_seq2seq_window, generate_window, require_lm
from .gradients import GRADIENT_ARRAYS, gradient_rows, stage_rows
from .hooks import Recorder, qk_attrs, stack
from .labels import token_labels, write_token_labels
from .memory import keep_freed_memory
from .numerics import numerics, torch_threads
from .numerics import resolve as resolve_numerics
from .readout import components_attrs, unembed_hash, vocab_strings, write_projections, write_readout
from .rows import kept_positions, row_counts, row_table, select_rows
from .segments import flat_token_types, tokenize_segments
from .shards import Shard, completed, create_records, plan_shards
from .writer import ShardWriter, create_array, prepare_output, remove_store, token_chunk_rows

WINDOW_BYTES = 256 * 2**20  # staging memory for one shard's rows (bounded RAM)
# token-dim arrays in the capture dtype
ACTS = ("hidden", "attention", "cross_attention", "mlp", "queries", "keys", "attn_out", "mlp_out", "z")


@dataclass
class Plan:
    """Everything known before the first model call: sizes, chunks, bytes."""

    n_prompts: int
    n_tokens: int  # rows stored for real tokens (every token, unless --positions/--pool select rows)
    n_rows: int  # size of the token dimension: real rows + masked padding at shard ends
    max_len: int
    layers: list[int]
    depths: list[int]
    shapes: dict[str, tuple[int, ...]]  # token-dim arrays: name -> full shape
    dtypes: dict[str, str]
    chunk_rows: int
    truncated: int
    shards: list[Shard]
    offsets: np.ndarray  # each prompt's first row
    lengths: np.ndarray  # each prompt's stored rows (its token count unless rows are selected)
    zarr_shard_rows: int | None  # rows per Zarr shard object when the sharding codec is on
    readout_bytes: int = 0  # the readout group: unembedding, final norm, vocabulary strings
    token_types: np.ndarray | None = None  # BERT: token_type_ids of every row (int8, 0 on padding rows)
    types: list | None = None  # BERT: each sequence's token_type_ids, as the forward takes them
    seq_lengths: np.ndarray | None = None  # each prompt's token count (prompt + generated)
    keep: list | None = None  # each prompt's stored positions; None: every position (capture/rows.py)
    pool: str | None = None  # 'mean': one row per prompt, the mean of its kept positions
    full_bytes: int | None = None  # with rows selected: what storing every row would take
    rows_option: str = ""  # with rows selected: the option that selected them, as the user wrote it

    def __post_init__(self):
        if self.seq_lengths is None:
            self.seq_lengths = self.lengths
    n_source: np.ndarray | None = None  # encoder-decoder: each prompt's source (encoder) token count

    def shard_tokens(self, shard: Shard) -> int:
        """Tokens the shard runs through the model (what progress and tokens/s count)."""
        return int(self.seq_lengths[shard.lo:shard.hi].sum())

    def bytes_per_array(self) -> dict[str, int]:
        out = {}
        for name, shape in self.shapes.items():
            item = 16 if self.dtypes[name] == "str" else np.dtype(self.dtypes[name]).itemsize
            out[name] = int(np.prod(shape, dtype=np.int64)) * item
        return out

    def chunk_counts(self) -> dict[str, int]:
        return {name: -(-shape[0] // self.chunk_rows) for name, shape in self.shapes.items()}

    def total_bytes(self) -> int:
        return sum(self.bytes_per_array().values()) + self.readout_bytes

    def summary(self, out: str) -> str:
        free = free_disk(out)
        tokens = int(self.seq_lengths.sum())
        lines = [f"prompts {self.n_prompts}, tokens {tokens}, longest sequence {self.max_len}"
                 + (f", {self.truncated} prompts truncated to --max-length" if self.truncated else "")]
        if self.full_bytes is not None:
            kept, full = self.total_bytes() - self.readout_bytes, self.full_bytes - self.readout_bytes
            lines.append(f"rows stored {self.n_tokens} of {tokens} tokens ({self.rows_option}): "
                         f"{human_bytes(kept)} instead of {human_bytes(full)} for every row "
                         f"({full / max(1, kept):.1f}x less; readout/ is the same either way)")
        lines += [
                 f"token chunk {self.chunk_rows} rows, {len(self.shards)} shards, "
                 f"{self.n_rows - self.n_tokens} padding rows"
                 + (f", Zarr shards of {self.zarr_shard_rows} rows" if self.zarr_shard_rows else ""),
                 f"{'array':<14}{'shape':<28}{'bytes':>14}{'chunks':>9}"]
        counts = self.chunk_counts()
        for name, nbytes in self.bytes_per_array().items():
            lines.append(f"{name:<14}{str(self.shapes[name]):<28}{human_bytes(nbytes):>14}{counts[name]:>9}")
        lines.append(f"{'readout/':<42}{human_bytes(self.readout_bytes):>14}")
        lines.append(f"{'total':<42}{human_bytes(self.total_bytes()):>14}  (uncompressed)")
        lines.append(f"free disk at {out}: {human_bytes(free) if free is not None else 'unknown'}")
        return "\n".join(lines)


def free_disk(out: str) -> int | None:
    if "://" in out:
        return None
    p = Path(out).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def tokenize(tokenizer, texts: list[str], max_length: int,
             special_tokens: str = "text") -> tuple[list[np.ndarray], int]:
    """Token ids of every prompt (int32 arrays: 4 bytes a token, not a Python int's 28+8).
    special_tokens 'text' keeps a special-token string in the text as its characters."""
    ids, truncated = [], 0
    for start in range(0, len(texts), 1024):
        batch = tokenizer(texts[start:start + 1024], add_special_tokens=True,
                          split_special_tokens=special_tokens == "text")["input_ids"]
        for seq in batch:
            if len(seq) > max_length:
                truncated += 1
                seq = seq[:max_length]
            ids.append(np.asarray(seq, dtype=np.int32))
    return ids, truncated


def special_token_texts(tokenizer, texts: list[str]) -> tuple[int, str | None]:
    """How many texts hold a special token's string (e.g. '<|im_start|>'), and one such string."""
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if len(t) > 1]
    count, example = 0, None
    for text in texts:
        hit = next((t for t in specials if t in text), None)
        if hit:
            count, example = count + 1, example or hit
    return count, example


def make_plan(adapter, cfg: CaptureConfig, lengths: np.ndarray, truncated: int, keep: list | None = None,
              n_source: np.ndarray | None = None) -> Plan:
    """The plan for sequences of `lengths` tokens, storing the positions `keep` of each (None: all);
    encoder-decoder runs give each sequence's source token count `n_source`."""
    L = adapter.n_layers
    layers = parse_ranges(cfg.layers, L, "layers") or list(range(L))
    depths = list(range(L + 1)) if len(layers) == L else sorted({0} | {l + 1 for l in layers})
    seq_lengths, pool = lengths, cfg.pool if keep is not None else None
    lengths = row_counts(keep, seq_lengths, pool)
    n_tokens, max_len = int(lengths.sum()), int(seq_lengths.max())
    table = [v for v in TOKEN_TABLE if v.name not in OPTIONAL_TOKEN_TABLE]  # written by every capture
    widths = {v.name: () for v in table}
    dtypes = {v.name: v.dtype for v in table}
    if "hidden" in cfg.capture:
        widths["hidden"] = (len(depths), adapter.d_model)
    if "attention" in cfg.capture:
        widths["attention"] = (len(layers), adapter.n_heads, max_len)
    if "mlp" in cfg.capture:
        widths["mlp"] = (len(layers), adapter.d_mlp)
    if "qk" in cfg.capture:
        widths["queries"] = widths["keys"] = (len(layers), adapter.n_heads, adapter.d_head)
    if "components" in cfg.capture:
        widths["attn_out"] = widths["mlp_out"] = (len(layers), adapter.d_model)
    if "z" in cfg.capture:
        widths["z"] = (len(layers), adapter.n_heads, adapter.d_head)
    if adapter.has_token_types:
        widths["token_type_ids"], dtypes["token_type_ids"] = (), VARIABLES["token_type_ids"].dtype
    grads = cfg.gradients
    grad_arrays = grads.arrays(max_len, len(depths), adapter.d_model) if grads else {}
    if n_source is not None:  # both stacks' rows: keys span the longer stack, cross-attention the source
        max_src = int(n_source.max())
        keys = max(max_src, int((lengths - n_source).max()))  # one `key` axis: the longer stack's
        widths["is_decoder"], dtypes["is_decoder"] = (), VARIABLES["is_decoder"].dtype
        if "attention" in cfg.capture:
            widths["attention"] = (len(layers), adapter.n_heads, keys)
            widths["cross_attention"] = (len(layers), adapter.n_heads, max_src)
        grad_arrays = {n: ((keys,) if tail else tail, dt) for n, (tail, dt) in grad_arrays.items()}
        grad_arrays.update({f"{n}_source": ((max_src,), dt) for n, (tail, dt) in grad_arrays.items() if tail})
    for name in ACTS:
        if name in widths:
            dtypes[name] = cfg.dtype
    for name, (tail, dtype) in grad_arrays.items():
        widths[name], dtypes[name] = tail, dtype
    row_bytes = {n: int(np.prod(w, dtype=np.int64)) * (16 if dtypes[n] == "str" else np.dtype(dtypes[n]).itemsize)
                 for n, w in widths.items()}
    chunk_rows = token_chunk_rows([b for n, b in row_bytes.items() if dtypes[n] != "str"], n_tokens)
    if cfg.shard_tokens:  # a chunk never spans two shards
        chunk_rows = min(chunk_rows, 1 << (cfg.shard_tokens.bit_length() - 1))
    target = cfg.shard_tokens or max(chunk_rows, WINDOW_BYTES // sum(row_bytes.values()))
    zarr_rows = max(chunk_rows, target // chunk_rows * chunk_rows) if cfg.zarr_shards else None
    shards, offsets, n_rows = plan_shards(lengths, zarr_rows or chunk_rows, target)
    shapes = {n: (n_rows,) + w for n, w in widths.items()}
    readout = adapter.vocab_size * (16 + (4 * adapter.d_model if adapter.unembed is not None else 0))
    if set(PROJECTION_CAPTURES) & set(cfg.capture):  # the output projections (readout/attn_out_*, mlp_out_*)
        readout += 4 * len(layers) * (adapter.n_heads * adapter.d_head + adapter.d_mlp + 2) * adapter.d_model
    return Plan(len(lengths), n_tokens, n_rows, max_len, layers, depths, shapes, dtypes, chunk_rows, truncated,
                shards, offsets, lengths, zarr_rows, readout, seq_lengths=seq_lengths, keep=keep, pool=pool,
                n_source=n_source)


def _batches(lengths: np.ndarray, lo: int, hi: int, batch_size: int, keep: list | None = None):
    """Length-bucketed batches: sort the shard's prompts by length so padding stays small; prompts
    with no kept row (--positions) need no forward."""
    order = lo + np.argsort(-lengths[lo:hi], kind="stable")
    if keep is not None:
        order = order[[len(keep[p]) > 0 for p in order]]
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


F16_MAX = float(torch.finfo(torch.float16).max)


def _check_range(t: torch.Tensor, dtype: str, name: str) -> None:
    """Stop before a finite value beyond float16's range would be stored as an infinity. The
    test is one aminmax pass over the source; isinf on the converted values costs ~6x as much on a CPU."""
    if dtype != "float16":
        return
    lo, hi = (float(v) for v in torch.aminmax(t))  # NaN compares False: NaN is stored as NaN
    if max(-lo, hi) > F16_MAX and torch.isinf(t.to(torch.float16)).any() and torch.isfinite(t).all():
        raise OverflowError16(f"a '{name}' value exceeds the float16 range (|x| > 65504); capture again "
                              "with --dtype float32 --overwrite (--resume would stop here again)")


def _to_dtype(t: torch.Tensor, dtype: str, name: str) -> torch.Tensor:
    _check_range(t, dtype, name)
    return t.to(torch.float16 if dtype == "float16" else torch.float32)


def _stage_batch(stage: dict[str, np.ndarray], views: dict[str, list[torch.Tensor]],
                 rows: list[tuple[int, int, int]], dtype: str) -> None:
    """Copy one batch's recorded tensors into the shard's staging arrays, padding stripped.

    views: per array, one (batch, seq, ...) tensor per depth/layer (Recorder.views); rows: for
    each batch row b its first staging row o and token count n. On the CPU every tensor is
    copied straight into the staging arrays, converting to the storage dtype in the same pass
    (stacking, converting, then copying cost ~7x as much: ~14% of SmolLM2's forward). From a GPU
    each array is stacked and converted there and copied to the host in one go (_to_host).
    """
    if not views:
        return
    if next(iter(views.values()))[0].device.type == "cpu":
        for name, tensors in views.items():
            target = torch.from_numpy(stage[name])
            for i, t in enumerate(tensors):
                _check_range(t, dtype, name)
                for b, o, n in rows:
                    if name == "attention":
                        target[o:o + n, i, :, :n].copy_(t[b, :n, :, :n])
                    else:
                        target[o:o + n, i].copy_(t[b, :n])
        return
    tensors = _to_host({n: _to_dtype(stack(v, dim=2), dtype, n) for n, v in views.items()})
    for b, o, n in rows:
        for name, values in tensors.items():
            if name == "attention":
                stage[name][o:o + n, :, :, :n] = values[b, :n, :, :, :n]
            else:
                stage[name][o:o + n] = values[b, :n]


@keyword_signature(CaptureConfig, CAPTURE_DOC + "Returns the store's path (the Plan with dry_run=True).\n")
def capture(model: str = "smollm2", prompts=None, out: str = "runs/run.zarr", *, corpus: str | None = None,
            overwrite: bool = False, resume: bool = False, dry_run: bool = False, progress: bool = True,
            workers: int | None = None, scheduler: str | None = None, **options):
    unknown = sorted(set(options) - set(defaults(CaptureConfig)))
    if unknown:
        raise TypeError(f"capture() got an unknown option {unknown[0]!r}; see help(stratascope.capture)")
    cfg = CaptureConfig(**options)
    text_column = cfg.text_column
    if (prompts is None) == (corpus is None):
        raise ConfigError("give either prompts or a corpus file, not both or neither")
    if overwrite and resume:
        raise ConfigError("--overwrite and --resume contradict each other; choose one")
    data = read_corpus(corpus, text_column) if corpus is not None else from_prompts(prompts, text_column)
    if dry_run:
        return _capture(model, out, cfg, data, overwrite, resume, dry_run, progress, workers, scheduler)
    with hold(out, "capture", exclusive=True):  # one writer at a time (locks.py)
        return _capture(model, out, cfg, data, overwrite, resume, dry_run, progress, workers, scheduler)


def _capture(model: str, out: str, cfg: CaptureConfig, data: Corpus, overwrite: bool, resume: bool, dry_run: bool,
             progress: bool, workers: int | None, scheduler: str | None):
    if not dry_run:
        prepare_output(out, overwrite, resume)
    if scheduler:
        from ..cluster import check_scheduler

        check_scheduler(scheduler)
    cfg = resolve_numerics(cfg, workers, scheduler)  # model dtype and threads concrete, the same on every worker
    # on a cluster the workers run the model; here it only gives tokenizer, sizes and readout
    cluster = bool(workers or scheduler)
    loaded = load_model(model, device="cpu" if cluster else cfg.device, attn=cfg.attn_implementation,
                        dtype=cfg.model_dtype, device_map=None if cluster else cfg.device_map,
                        max_memory=cfg.max_memory)
    adapter = find_adapter(loaded.model)
    n_new = cfg.generate
    if adapter.encoder_decoder:
        seq2seq.check_options(cfg, adapter)
    elif cfg.target_column:
        raise ConfigError(f"--target-column {cfg.target_column}: {type(loaded.model).__name__} is not an "
                          "encoder-decoder model, so there is no decoder text to give; drop --target-column")
    if n_new or cfg.gradients:
        require_lm(loaded.model, adapter.causal, "--generate" if n_new else "--capture attribution/grad")
    limit = min(cfg.max_length, getattr(loaded.model.config, "max_position_embeddings", None) or cfg.max_length)
    if n_new >= limit:
        raise ConfigError(f"--generate {n_new} leaves no room for the prompt within {limit} tokens; "
                          "generate fewer tokens or raise --max-length")
    types = n_source = None
    if adapter.encoder_decoder:  # each stack within the limit: the source, the decoder start token + its text
        ids, n_source, truncated = seq2seq.sequences(loaded.tokenizer, adapter, data, cfg, limit, tokenize)
    elif adapter.has_token_types:  # segments (a text_pair column) for BertViz's sentence A/B split
        ids, types, truncated = tokenize_segments(loaded.tokenizer, data, limit, cfg.special_tokens)
    else:
        ids, truncated = tokenize(loaded.tokenizer, data.texts, limit - n_new, cfg.special_tokens)  # room to generate
    data.special_token_texts, example = special_token_texts(loaded.tokenizer, data.texts)
    if data.special_token_texts:
        how = ("tokenized as text (--special-tokens parse reads them as control tokens)"
               if cfg.special_tokens == "text" else "read as control tokens (--special-tokens parse)")
        warnings.warn(f"{data.special_token_texts} prompts contain special-token text such as {example!r}; {how}",
                      stacklevel=3)
    # list-valued corpus fields -> label_<name> (of the source text; not for encoder-decoder runs)
    labels = {} if adapter.encoder_decoder else token_labels(data, loaded.tokenizer, ids)
    lengths = np.array([len(s) for s in ids], dtype=np.int64) + n_new  # generated ids join per shard
    if n_source is not None and cfg.selects_rows:
        raise ConfigError("--positions/--pool select rows of one stack, and an encoder-decoder run stores two; "
                          "capture every row (drop --positions/--pool) and select positions in the analysis")
    keep = kept_positions(cfg, lengths, n_new, labels)
    plan = make_plan(adapter, cfg, lengths, truncated, keep, n_source)
    if keep is not None:
        plan.full_bytes = make_plan(adapter, cfg, lengths, truncated).total_bytes()
        plan.rows_option = " ".join(([f"--positions {cfg.positions}"] if cfg.positions != "all" else [])
                                    + ([f"--pool {cfg.pool}"] if cfg.pool else []))
    if types is not None:
        plan.types = [np.asarray(t, dtype=np.int8) for t in types]
        kept = types if keep is None else [np.zeros(1, np.int8) if cfg.pool else np.asarray(t)[k]
                                           for t, k in zip(types, keep)]
        plan.token_types = flat_token_types(kept, plan.offsets, plan.n_rows)
    if cfg.pool and labels:
        warnings.warn(f"--pool {cfg.pool} stores one row per prompt, so the token labels "
                      f"({', '.join(labels)}) are not stored", stacklevel=3)
        labels = {}
    if dry_run:
        return plan
    vocab = vocab_strings(loaded.tokenizer, adapter.vocab_size)
    root = _reopen_for_resume(out, loaded, adapter, cfg, data, plan) if resume else None
    if root is None:
        free = free_disk(out)
        if free is not None and plan.total_bytes() > free:
            raise DiskSpaceError(f"the capture needs up to {human_bytes(plan.total_bytes())} but {out} has "
                                 f"{human_bytes(free)} free; capture fewer arrays or layers, use --dtype float16, "
                                 "or free disk")
        if overwrite or resume:  # resume: a store whose creation was interrupted starts over
            remove_store(out)
        root = _create(out, loaded, adapter, cfg, data, plan, vocab, labels, cluster)
    done = completed(root)  # read once: one flag (one chunk) per shard
    todo = [s for s in plan.shards if not done[s.index]]
    started = time.perf_counter()
    try:
        if workers or scheduler:
            from .cluster import run_on_cluster

            del loaded, adapter  # workers load their own copy
            with progress_bar(plan, todo, progress) as bar:
                run_on_cluster(ShardCapturer, out, model, root.attrs["model"]["weights_sha256"], cfg, plan, ids,
                               np.array(vocab, dtype=object), todo, workers=workers, scheduler=scheduler,
                               on_shard=bar.update)
        else:
            with torch_threads(cfg.threads):
                _run(ShardCapturer(loaded, adapter, cfg, plan, ids, np.array(vocab, dtype=object)), out, todo,
                     progress)
    except OverflowError16 as e:  # no resume can get past it: say so in the store too (info shows it)
        root.attrs["failure"] = str(e)
        raise
    seconds = time.perf_counter() - started
    tokens = sum(plan.shard_tokens(s) for s in todo)
    root.attrs.update({"complete": bool(completed(root).all()),
                       "timing": {"seconds": seconds, "tokens_per_s": tokens / seconds if seconds else 0.0,
                                  "workers": workers or (scheduler and "cluster") or "in-process"}})
    consolidate(out)  # last: `xr.open_zarr(out)` then opens in one read, without a warning
    return out


def _identity(loaded, adapter, cfg: CaptureConfig, data: Corpus) -> dict:
    """What must match for a resume to continue a store: corpus, weights, options, and what decides
    the values' last bits (device kind, model dtype, threads, device map: options; torch version)."""
    return {"corpus_sha256": data.fingerprint(), "weights_sha256": unembed_hash(adapter, loaded.model),
            "capture": {k: v for k, v in cfg.to_dict().items() if k != "device"}, "numerics": numerics(cfg)}


def _reopen_for_resume(out, loaded, adapter, cfg, data, plan) -> zarr.Group | None:
    """The store to continue, or None when its creation was interrupted (no identity yet: no
    shard can be complete, so the capture starts over)."""
    root = zarr.open_group(open_for_writing(out), mode="r+")
    stored, now = root.attrs.get("identity"), _identity(loaded, adapter, cfg, data)
    if root.attrs.get("failure"):
        raise ResumeMismatchError(f"cannot resume {out}: {root.attrs['failure']}")
    if stored is None:
        return None
    if stored != now:
        raise ResumeMismatchError(
            f"cannot resume {out}: {_differences(stored or {}, now)}; rerun with the original corpus, model and "
            "options, or use --overwrite (nothing was changed)")
    return root


def _differences(stored: dict, now: dict) -> str:
    """'--batch-size was 8, now 16; the corpus differs': what a resume found changed, named as the user gives it."""
    parts = []
    for key in ("corpus_sha256", "weights_sha256"):
        if stored.get(key) != now.get(key):
            parts.append(f"the {'corpus' if key.startswith('corpus') else 'model weights'} differ")
    was, new = stored.get("capture", {}), now.get("capture", {})
    for key in sorted(set(was) | set(new)):
        if was.get(key) != new.get(key):
            parts.append(f"--{key.replace('_', '-')} was {was.get(key)!r}, now {new.get(key)!r}")
    was, new = stored.get("numerics", {}), now.get("numerics", {})
    for key, said in (("device", "the model ran on {}, now on {}"), ("torch", "torch was {}, now {}")):
        if key in was and was.get(key) != new.get(key):
            parts.append(said.format(was.get(key), new.get(key)))
    return "; ".join(parts) or "the store layout differs"


def _placement(model, cfg: CaptureConfig, cluster: bool) -> dict | str | None:
    """Where accelerate put each module (in-process), the strategy each worker applies, or None (one device)."""
    if cfg.device_map is None:
        return None
    if cluster:
        return cfg.device_map
    # accelerate names no map when everything landed on one device: then the map as given, or that device
    placed = (getattr(model, "hf_device_map", None) or (cfg.device_map if isinstance(cfg.device_map, dict) else None)
              or {"": input_device(model)})
    return {k: str(v) for k, v in placed.items()}


def _create(out, loaded, adapter, cfg: CaptureConfig, data: Corpus, plan: Plan, vocab,
            labels: dict | None = None, cluster: bool = False) -> zarr.Group:
    import transformers
    import xarray

    labels = labels or {}
    identity = _identity(loaded, adapter, cfg, data)  # hashes the weights, once
    # the attrs go in with the group itself: a creation killed a moment later is still a store
    # of ours (an identity-less one, which --overwrite replaces and --resume starts over)
    root = zarr.open_group(open_for_writing(out), mode="w", attributes=RootAttrs(
        stratascope_version=__version__,
        created=datetime.datetime.now(datetime.UTC).isoformat(),
        complete=False,
        # every chunk of every capture array is written and ends with a checksum (capture/writer.py):
        # readers can then tell damage from data (checked_store.py, stratascope verify)
        integrity={"checksum": "crc32c", "every_chunk_written": True},
        model={"name": loaded.name, "source": loaded.source, "class": type(loaded.model).__name__,
                  "family": adapter.family, "causal": adapter.causal, **adapter.sizes(),
                  "weights_sha256": identity["weights_sha256"],
                  "attn_implementation": loaded.model.config._attn_implementation,
                  "dtype": cfg.model_dtype, "device_map": _placement(loaded.model, cfg, cluster),
                  **({"encoder_decoder": True, "decoder_start_token_id": adapter.decoder_start_token_id,
                      "stacks": "a prompt's first n_source_tokens rows are its encoder (source) tokens, then "
                                "its decoder tokens (is_decoder)"} if adapter.encoder_decoder else {})},
        capture={**cfg.to_dict(), "arrays": [n for n in ACTS + GRADIENT_ARRAYS if n in plan.shapes],
                    "layers": plan.layers, "depths": plan.depths, "token_chunk": plan.chunk_rows,
                    "n_shards": len(plan.shards), "zarr_shard_rows": plan.zarr_shard_rows,
                    "truncated_prompts": plan.truncated, "padding": "right, stripped before writing",
                    "rows": "every token" if plan.keep is None else
                    "one per prompt (mean of the kept positions)" if plan.pool else "the kept positions",
                    **({"qk": qk_attrs(adapter, plan.layers)} if "qk" in cfg.capture else {}),
                    **({"components": components_attrs(adapter)}
                       if set(PROJECTION_CAPTURES) & set(cfg.capture) else {})},
        corpus={"source": data.source, "sha256": data.fingerprint(), "n_prompts": plan.n_prompts,
                   "n_tokens": int(plan.seq_lengths.sum()), "max_len": plan.max_len,
                   "metadata_columns": [str(c) for c in data.metadata.columns if str(c) not in labels],
                   "skipped_lines": dict(data.skipped), "special_token_texts": data.special_token_texts,
                   "token_labels": list(labels)},
        generation=cfg.generation.to_attrs() if cfg.generate else None,
        gradients=({**cfg.gradients.to_attrs(), **(seq2seq.GRADIENT_ATTRS if adapter.encoder_decoder else {})}
                   if cfg.gradients else None),
        software={"python": platform.python_version(), "torch": torch.__version__,
                  "transformers": transformers.__version__, "zarr": zarr.__version__,
                  "xarray": xarray.__version__, "numpy": np.__version__},
    ).to_dict())
    P = plan.n_prompts
    create_array(root, "prompt_text", (P,), P, "str")[:] = np.array(data.texts, dtype=object)
    create_array(root, "token_offset", (P,), P, "int64")[:] = plan.offsets
    create_array(root, "n_tokens", (P,), P, "int32")[:] = plan.lengths.astype(np.int32)
    create_array(root, "seq_len", (P,), P, "int32")[:] = plan.seq_lengths.astype(np.int32)
    if plan.n_source is not None:
        create_array(root, "n_source_tokens", (P,), P, "int32")[:] = plan.n_source.astype(np.int32)
    for col in [c for c in data.metadata.columns if str(c) not in labels]:
        values, kind = _metadata_array(data.metadata[col].to_numpy())
        create_array(root, META_PREFIX + str(col), (P,), P, kind, ("prompt",))[:] = values
    index = [("depth", plan.depths), ("layer", plan.layers)]
    if any("head" in VARIABLES[n].dims for n in plan.shapes if n in VARIABLES):
        index.append(("head", list(range(adapter.n_heads))))
    for name, coords in index:
        create_array(root, name, (len(coords),), len(coords), "int32", (name,))[:] = np.array(coords, dtype=np.int32)
    for name, shape in plan.shapes.items():
        create_array(root, name, shape, plan.chunk_rows, plan.dtypes[name], shard_rows=plan.zarr_shard_rows,
                     extra_attrs=transformer_lens_attrs(name, adapter.rotary, adapter.post_norm))
    create_records(root, len(plan.shards))
    write_readout(root, adapter, loaded.tokenizer, vocab)
    if set(PROJECTION_CAPTURES) & set(cfg.capture):
        write_projections(root["readout"], adapter, plan.layers)
    write_token_labels(root, labels, plan, cfg.generate)
    # last: --resume accepts a store only once it carries its identity, so a store whose
    # creation was interrupted is never continued
    root.attrs["identity"] = identity
    return root


class ShardCapturer:
    """Runs one shard's prompts through the model and returns its rows, padding included.

    `ids` maps prompt index -> token ids (a list, or a dict holding only some prompts).
    """

    ARRAYS = ACTS  # the arrays staged in reused buffers (buffers.py)

    def __init__(self, loaded, adapter, cfg: CaptureConfig, plan: Plan, ids, vocab: np.ndarray,
                 buffers: StageBuffers | None = None):
        self.model, self.adapter, self.cfg, self.plan, self.ids, self.vocab = \
            loaded.model, adapter, cfg, plan, ids, vocab
        # the activations' staging arrays; whoever writes a shard gives them back (buffers.give)
        self.buffers = buffers or StageBuffers.for_plan(plan, self.ARRAYS)
        # the inputs go where the embedding lives (with --device-map accelerate moves them on from there)
        self.device = input_device(loaded.model)
        self.base = getattr(self.model, self.model.base_model_prefix, self.model)  # no LM head: no logits needed

    def __call__(self, shard: Shard, on_batch=None) -> dict[str, np.ndarray]:
        plan, lengths, n_new, grads = self.plan, self.plan.seq_lengths, self.cfg.generate, self.cfg.gradients
        seq2seq_model = plan.n_source is not None
        if n_new and seq2seq_model:
            generate_seq2seq_window(self.model, self.ids, plan.n_source, shard.lo, shard.hi,
                                    self.adapter.decoder_start_token_id, self.cfg.generation, self.device,
                                    self.cfg.batch_size)
        elif n_new:  # the generated ids join the shard's sequences before anything is staged
            generate_window(self.model, self.ids, shard.lo, shard.hi, self.cfg.generation, self.device,
                            self.cfg.batch_size)
        stage = row_table(self.ids, lengths, plan.offsets, plan.keep, plan.pool, n_new, shard, self.vocab,
                          plan.n_source)
        if plan.token_types is not None:
            stage["token_type_ids"] = plan.token_types[shard.start:shard.stop]
        stage.update(self.buffers.take(shard.stop - shard.start))
        for n in (n for n in GRADIENT_ARRAYS if n in plan.shapes):  # NaN: attribution rows that are not targets
            stage[n] = np.full((shard.stop - shard.start,) + plan.shapes[n][1:], np.nan, dtype=plan.dtypes[n])
        if seq2seq_model:
            return self._seq2seq(shard, stage, on_batch)
        with torch.inference_mode(), Recorder(self.adapter, self.cfg.capture, plan.layers, plan.depths) as rec:
            for batch in _batches(lengths, shard.lo, shard.hi, self.cfg.batch_size, plan.keep):
                _forward(self.base, rec, self.ids, batch, self.device, self.adapter.causal, plan)
                if plan.keep is not None:  # only the kept rows (or their mean) leave the device
                    tensors = select_rows(rec.stacked(), batch, plan.keep, plan.pool)
                    rec.out.clear()
                    tensors = _to_host({n: _to_dtype(t, self.cfg.dtype, n) for n, t in tensors.items()})
                    self._stage_rows(stage, tensors, batch, shard)
                    if on_batch:
                        on_batch(len(batch), int(lengths[batch].sum()))
                    continue
                rows = [(b, int(plan.offsets[p]) - shard.start, int(lengths[p])) for b, p in enumerate(batch)]
                _stage_batch(stage, rec.views(), rows, self.cfg.dtype)
                rec.out.clear()
                if grads is not None:
                    rec.paused = True  # the gradient forwards keep nothing in the recorder
                    try:
                        rows = gradient_rows(self.model, self.adapter, self.ids, batch, lengths, n_new, grads,
                                             plan.depths, self.device)
                    finally:
                        rec.paused = False
                    for name, per_prompt in rows.items():
                        for p, values in zip(batch, per_prompt):
                            stage_rows(stage[name], int(plan.offsets[p]) - shard.start, values)
                if on_batch:
                    on_batch(len(batch), int(lengths[batch].sum()))
        return stage

    def _stage_rows(self, stage: dict, tensors: dict[str, np.ndarray], batch, shard: Shard) -> None:
        """Put select_rows' output (the batch's kept rows, prompt after prompt) at each prompt's rows."""
        plan, at = self.plan, 0
        for p in batch:
            o, k = int(plan.offsets[p]) - shard.start, int(plan.lengths[p])
            for name, values in tensors.items():
                if name == "attention":
                    width = int(plan.seq_lengths[p])
                    stage[name][o:o + k, :, :, :width] = values[at:at + k, :, :, :width]
                else:
                    stage[name][o:o + k] = values[at:at + k]
            at += k

    def _seq2seq(self, shard: Shard, stage: dict, on_batch=None) -> dict[str, np.ndarray]:
        """Both stacks of an encoder-decoder model: one recorder per stack, one forward per batch."""
        plan, cfg, grads = self.plan, self.cfg, self.cfg.gradients
        names = [n for n in GRADIENT_ARRAYS if n in plan.shapes]
        with torch.inference_mode(), \
                Recorder(self.adapter.encoder, cfg.capture, plan.layers, plan.depths) as enc, \
                Recorder(self.adapter, cfg.capture, plan.layers, plan.depths) as dec:
            for batch in _batches(plan.lengths, shard.lo, shard.hi, cfg.batch_size):
                seq2seq.forward(self.model, self.ids, plan.n_source, batch, self.device)
                for stack, rec in enumerate((enc, dec)):
                    tensors = _to_host({n: _to_dtype(t, cfg.dtype, n) for n, t in rec.stacked().items()})
                    rec.out.clear()
                    seq2seq.stage_batch(stage, tensors, batch, plan, shard.start, stack)
                if grads is not None:
                    enc.paused = dec.paused = True  # the gradient forwards keep nothing in the recorders
                    try:
                        rows = seq2seq.gradient_rows(self.model, self.ids, plan.n_source, batch, cfg.generate, grads,
                                                     self.device)
                    finally:
                        enc.paused = dec.paused = False
                    for name in names:  # each prompt's decoder rows
                        for p, values in zip(batch, rows[name]):
                            start = int(plan.offsets[p] + plan.n_source[p]) - shard.start
                            stage_rows(stage[name], start, values)
                if on_batch:
                    on_batch(len(batch), int(plan.lengths[batch].sum()))
        return stage


def _to_host(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Copy a batch's tensors to the host; from a GPU into pinned buffers with non-blocking
    copies and a single synchronization, so the copies run back to back."""
    if not tensors or next(iter(tensors.values())).device.type != "cuda":
        return {n: t.cpu().numpy() for n, t in tensors.items()}
    host = {n: torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for n, t in tensors.items()}
    for n, t in tensors.items():
        host[n].copy_(t, non_blocking=True)
    torch.cuda.current_stream().synchronize()
    return {n: h.numpy() for n, h in host.items()}


def _run(capturer: ShardCapturer, out: str, todo: list[Shard], progress: bool) -> None:
    """In-process: compute shard after shard while the writer thread flushes (and on a GPU writes) the last."""
    plan = capturer.plan
    keep_freed_memory()
    rows_here = capturer.device.type == "cpu"  # ShardWriter: on the CPU only the flush overlaps the compute
    root = zarr.open_group(open_for_writing(out, deferred=rows_here), mode="r+")
    bar = progress_bar(plan, todo, progress)
    writer = ShardWriter(root, rows_here=rows_here, on_written=capturer.buffers.give)
    try:
        for shard in todo:
            writer.put(shard, capturer(shard, on_batch=lambda n, t: _advance(bar, n, t, plan)))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()


def progress_bar(plan: Plan, todo: list[Shard], enabled: bool):
    """Tokens done, tokens/s, and prompts done, for the shards still to capture."""
    bar = tqdm(total=sum(plan.shard_tokens(s) for s in todo), unit="tok", unit_scale=True, desc="capture",
               disable=not enabled, mininterval=0.5, dynamic_ncols=True)
    bar.prompts = plan.n_prompts - sum(s.hi - s.lo for s in todo)
    return bar


def _advance(bar, prompts: int, tokens: int, plan: Plan) -> None:
    bar.prompts += prompts
    bar.update(tokens)
    bar.set_postfix_str(f"prompts {bar.prompts}/{plan.n_prompts}", refresh=False)


def _forward(base, rec: Recorder, ids, batch, device, causal: bool, plan: Plan | None = None) -> None:
    """One padded forward of the batch's prompts (right padding: real tokens never see it)."""
    width = max(len(ids[p]) for p in batch)
    input_ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for b, p in enumerate(batch):
        input_ids[b, :len(ids[p])] = torch.tensor(ids[p])
        mask[b, :len(ids[p])] = 1
    kwargs = {"use_cache": False} if causal else {}
    if plan is not None and plan.types is not None:  # BERT segments: sentence A = 0, B = 1
        types = torch.zeros((len(batch), width), dtype=torch.long)
        for b, p in enumerate(batch):
            types[b, :len(ids[p])] = torch.from_numpy(plan.types[p].astype(np.int64))
        kwargs["token_type_ids"] = types.to(device)
    base(input_ids=input_ids.to(device), attention_mask=mask.to(device), **kwargs)
