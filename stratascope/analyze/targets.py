"""Studies in one call: the lens at chosen positions, scoring a chosen word per prompt.

`stratascope lens RUN --target-column attribute --positions last` answers "at which depth
does the model rank the answer first?" for a whole corpus: for each selected row (e.g. each
prompt's last token, the position that predicts the answer) and every depth, the rank,
probability and logit of the target word, and with a contrast word the logit difference.
The result is stored as a lens result (analysis/lens/<name>, keyed by these parameters) with
a `row` dim whose coordinates say where each row is (token row, prompt, position); `table()`
turns it into one row per (prompt, depth) with every prompt metadata column.

Words are tokenized with the run's stored tokenizer and scored through their first token
(a warning counts the words of several tokens; strict=True refuses them), the same
mechanism the bias probe uses for its pair words (`first_token_ids`).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch
import xarray as xr

from ..errors import ConfigError, MissingMetadataError, OutOfRangeError
from ..positions import Positions, parse_positions
from ..progress import tqdm
from ..schemas import LABEL_PREFIX, META_PREFIX
from .lens import (
    JOB,
    _check,
    _plan_depths,
    _translate,
    lens_params,
    lens_translator,
    next_ids_at,
    parse_depths,
    readout_for,
    require_hidden,
)
from .lens_kernel import lens_rows, prepare_rows
from .results import load_result, save_result
from .stacks import lens_extents
from .stored_rows import every_position, rows_at

ROWS_PER_STEP = 256  # rows read from the store and scored at a time


# ---------------------------------------------------------------- rows


def last_prompt_rows(run, prompts: np.ndarray | None = None) -> np.ndarray:
    """Each prompt's (all, or those listed) last row that belongs to the prompt (not generated)."""
    if not every_position(run):  # a store of selected rows: the row at that position, if it was kept
        return rows_at(run, Positions("last", "last"), prompts)
    prompts = np.arange(run.n_prompts) if prompts is None else np.asarray(prompts)
    offsets = run.ds["token_offset"].values[prompts].astype(np.int64)
    ends = offsets + run.ds["n_tokens"].values[prompts].astype(np.int64) - 1
    generated = run.ds["is_generated"].isel(token=ends).values
    for p in np.flatnonzero(generated):
        flags = run.ds["is_generated"].isel(token=slice(offsets[p], ends[p] + 1)).values
        ends[p] = offsets[p] + int(np.flatnonzero(~flags)[-1])
    return ends


def select_rows(run, positions: str = "all") -> np.ndarray:
    """The token rows `positions` names (see positions.POSITIONS_HELP), ascending; masked rows never. 'all' is
    every stored row; on a store of selected rows (capture --positions) the others must have been kept."""
    spec = parse_positions(positions)
    offsets = run.ds["token_offset"].values.astype(np.int64)
    lengths = run.ds["n_tokens"].values.astype(np.int64)  # rows stored per prompt
    if spec.kind == "all":
        rows = np.concatenate([np.arange(o, o + n) for o, n in zip(offsets, lengths)]) if len(offsets) else []
    elif spec.kind == "last":
        rows = last_prompt_rows(run)
    elif spec.kind == "label":
        if LABEL_PREFIX + spec.label not in run.ds:
            have = [n[len(LABEL_PREFIX):] for n in run.ds.variables if n.startswith(LABEL_PREFIX)]
            raise MissingMetadataError(f"--positions {spec.text}: this run has no token label {spec.label!r} (its "
                                       f"token labels: {', '.join(have) or 'none'})")
        rows = _labelled_rows(run.ds[LABEL_PREFIX + spec.label])
    else:
        rows = rows_at(run, spec)
    return np.unique(np.asarray(rows, dtype=np.int64))


def _labelled_rows(labels: xr.DataArray) -> np.ndarray:
    found, step = [], 1 << 16
    for start in range(0, labels.sizes["token"], step):
        values = labels.isel(token=slice(start, start + step)).values
        keep = ~np.isnan(values) if values.dtype.kind == "f" else (values != "")  # str, StringDType or object
        found.append(start + np.flatnonzero(keep))
    return np.concatenate(found) if found else np.zeros(0, np.int64)


# ---------------------------------------------------------------- words


def first_token_ids(run, words, strict: bool = False, what: str = "target") -> np.ndarray:
    """The vocabulary id of each word's first token (the stored tokenizer). Words of several
    tokens are scored through their first token with one warning that counts them; strict
    refuses them, naming one."""
    from .lens import _tokenizer

    tokenizer = _tokenizer(run)
    unique = list(dict.fromkeys(str(w) for w in words))
    ids, split = {}, []
    for word in unique:
        pieces = tokenizer.encode(word, add_special_tokens=False)
        if not pieces.ids:
            raise ConfigError(f"{what} word {word!r} tokenizes to nothing; give a non-empty word")
        if len(pieces.ids) > 1:
            split.append((word, pieces.tokens))
        ids[word] = int(pieces.ids[0])
    model = run.attrs["model"]["name"]
    if split and strict:
        word, tokens = split[0]
        raise ConfigError(f"{what} word {word!r} is several tokens for {model} ({tokens}); with --strict every "
                          f"{what} word must be one token: choose another word, or drop --strict to use its "
                          "first token")
    if split:
        word, tokens = split[0]
        count = f"{len(split)} of {len(unique)} {what} words are several tokens; e.g. " if len(unique) > 1 else ""
        warnings.warn(f"{count}{what} word {word!r} is several tokens for {model} ({tokens}); the first token is "
                      "scored", stacklevel=3)
    return np.array([ids[str(w)] for w in words], dtype=np.int64)


def _words_per_row(run, rows: np.ndarray, word, column, what: str) -> np.ndarray | None:
    """One word per row: `word` for all, or the prompt metadata `column` of each row's prompt."""
    if word is not None and column is not None:
        raise ConfigError(f"give --{what} or --{what}-column, not both")
    if column is not None:
        name = META_PREFIX + column
        if name not in run.ds:
            have = [c for c in run.prompts.columns if c not in ("text", "token_offset", "n_tokens")]
            raise MissingMetadataError(f"--{what}-column {column!r} is not a prompt metadata column of {run.path} "
                                       f"(its columns: {', '.join(have) or 'none'})")
        prompt = run.ds["prompt_index"].isel(token=rows).values
        values = run.ds[name].values[prompt]
        empty = [i for i, v in enumerate(values) if v is None or (isinstance(v, float) and np.isnan(v)) or str(v) == ""]
        if empty:
            raise MissingMetadataError(f"--{what}-column {column!r} is empty for prompt {int(prompt[empty[0]])}; "
                                       f"give every prompt a {what} word")
        return np.array([str(v) for v in values], dtype=object)
    if word is not None:
        return np.array([str(word)] * len(rows), dtype=object)
    return None


# ---------------------------------------------------------------- the job


def target_params(run, positions: str = "all", target=None, target_column=None, contrast=None,
                  contrast_column=None, strict: bool = False, topk: int = 10, depths=None, norm: str = "final",
                  precision: str = "float32", lens="logit") -> dict:
    """Every parameter that decides a study's result (the device does not)."""
    if target in ("next",):
        target = None
    if (contrast is not None or contrast_column is not None) and target is None and target_column is None:
        raise ConfigError("--contrast needs a --target or --target-column to compare with")
    params = lens_params(run, topk, (), depths, norm, precision, lens)
    params.update({"positions": str(positions), "target": target, "target_column": target_column,
                   "contrast": contrast, "contrast_column": contrast_column, "strict": bool(strict)})
    return params


def is_study(positions="all", target=None, target_column=None, contrast=None, contrast_column=None) -> bool:
    """Whether a lens call asks for a study (selected rows or chosen words) rather than every token."""
    return str(positions) != "all" or any(v is not None for v in (target, target_column, contrast, contrast_column)) \
        and target != "next"


def run_study(run, positions: str = "all", target=None, target_column=None, contrast=None, contrast_column=None,
              strict: bool = False, topk: int = 10, depths=None, norm: str = "final", device: str = "cpu",
              precision: str = "float32", progress: bool = True, lens="logit") -> xr.Dataset:
    """Score the chosen rows and words at every depth; stored as a lens result, reused for the same parameters."""
    require_hidden(run)
    params = target_params(run, positions, target, target_column, contrast, contrast_column, strict, topk, depths,
                           norm, precision, lens)
    stored = load_result(run, JOB, params)
    if stored is not None:
        return stored
    rows = select_rows(run, positions)
    if not len(rows):
        raise OutOfRangeError(f"--positions {positions} selects no token of {run.path}")
    words = _words_per_row(run, rows, params["target"], target_column, "target")
    contrast_words = _words_per_row(run, rows, contrast, contrast_column, "contrast")
    target_ids = first_token_ids(run, words, strict, "target") if words is not None else _next_ids(run, rows)
    contrast_ids = first_token_ids(run, contrast_words, strict, "contrast") if contrast_words is not None else None
    arrays = score_rows(run, rows, target_ids, contrast_ids, params, device, progress, lens)
    ds = _dataset(run, rows, params, arrays, target_ids, words, contrast_ids, contrast_words)
    return save_result(run, JOB, ds, params)


def _next_ids(run, rows: np.ndarray) -> np.ndarray:
    """The token that came next after each row in its sequence, -1 where there is none."""
    return next_ids_at(run, rows).astype(np.int64)


@torch.inference_mode()
def score_rows(run, rows: np.ndarray, target_ids: np.ndarray, contrast_ids: np.ndarray | None, params: dict,
               device: str = "cpu", progress: bool = True, lens="logit") -> dict[str, np.ndarray]:
    """Per row and depth: top-k, the target's rank / probability / logit, entropy, KL to the output,
    and (with contrast ids) the contrast's logit. Reads ROWS_PER_STEP rows of hidden at a time."""
    hidden = require_hidden(run)
    readout = readout_for(run, device, params["precision"])
    depths = parse_depths(run, params["depths"])
    idx, final = _plan_depths(run, depths)
    translator = lens_translator(run, lens, [run.depths[i] for i in idx], params["norm"])
    D = len(depths)
    parts: dict[str, list[np.ndarray]] = {}
    with tqdm(total=len(rows), unit="row", desc="lens study", disable=not progress) as bar:
        for s in range(0, len(rows), ROWS_PER_STEP):
            part = rows[s:s + ROWS_PER_STEP]
            h = _translate(torch.from_numpy(np.asarray(hidden.isel(token=part, depth=idx).values, dtype=np.float32)),
                           translator)
            tgt = target_ids[s:s + len(part)]
            own_final = final if final is not None and final < D else None  # the output depth, if asked for
            got = lens_rows(h, readout, tgt, (), params["topk"], params["norm"], final)
            block = {"topk_ids": got.topk_ids[:, :D], "topk_probs": got.topk_probs[:, :D],
                     "target_rank": got.target_rank[:, :D], "target_prob": got.target_prob[:, :D],
                     "entropy": got.entropy[:, :D], "kl_final": got.kl_final[:, :D],
                     "target_logit": _logits(readout, h[:, :D], tgt, params["norm"], own_final)}
            if contrast_ids is not None:
                block["contrast_logit"] = _logits(readout, h[:, :D], contrast_ids[s:s + len(part)], params["norm"],
                                                  own_final)
            for name, values in block.items():
                parts.setdefault(name, []).append(values)
            bar.update(len(part))
    return {name: np.concatenate(values) for name, values in parts.items()}


def _logits(readout, h: torch.Tensor, ids: np.ndarray, norm: str, final) -> np.ndarray:
    """The logit of ids[r] at every depth of row r: one gather-dot, not the whole vocabulary."""
    x = prepare_rows(h.to(readout.device), readout, norm, final)  # rows, D, d_model
    ids_t = torch.as_tensor(np.maximum(ids, 0), device=readout.device)
    w = readout.unembed[ids_t].float()  # rows, d_model
    z = torch.einsum("rdm,rm->rd", x.float(), w)
    if readout.unembed_bias is not None:
        z += readout.unembed_bias[ids_t][:, None]
    z[torch.as_tensor(ids < 0, device=z.device)] = float("nan")
    return z.cpu().numpy().astype(np.float32)


def _dataset(run, rows, params, arrays, target_ids, words, contrast_ids, contrast_words) -> xr.Dataset:
    dims = {"topk_ids": ("row", "depth", "k"), "topk_probs": ("row", "depth", "k")}
    data = {name: (dims.get(name, ("row", "depth")), values) for name, values in arrays.items()}
    if "contrast_logit" in arrays:
        data["logit_diff"] = (("row", "depth"), arrays["target_logit"] - arrays["contrast_logit"])
    coords = {"depth": np.array(parse_depths(run, params["depths"]), dtype=np.int32),
              "k": np.arange(arrays["topk_ids"].shape[2], dtype=np.int32),
              "token": ("row", rows.astype(np.int64)),
              "prompt": ("row", run.ds["prompt_index"].isel(token=rows).values.astype(np.int32)),
              "position": ("row", run.ds["position"].isel(token=rows).values.astype(np.int32)),
              "target_id": ("row", target_ids.astype(np.int32))}
    if words is not None:
        coords["target_word"] = ("row", np.asarray(words, dtype=object))
    if contrast_ids is not None:
        coords["contrast_id"] = ("row", contrast_ids.astype(np.int32))
        coords["contrast_word"] = ("row", np.asarray(contrast_words, dtype=object))
    ds = xr.Dataset(data, coords=coords)
    ds.attrs.update({"rank": "1-based: 1 + number of vocabulary entries with a strictly larger logit",
                     "rows": f"positions {params['positions']}: the token rows in coordinate 'token'",
                     "target": ("the token that came next" if params["target"] is None and
                                params["target_column"] is None else "the first token of the target word"),
                     "logit_diff": "target_logit - contrast_logit (where a contrast was given)"})
    return ds


# ---------------------------------------------------------------- tables


def study_table(run, ds: xr.Dataset) -> pd.DataFrame:
    """One row per (selected row, depth): prompt, position, target word and id, rank, probability,
    logit (and contrast, logit difference), the top-1 token, and every prompt metadata column."""
    vocab = run.readout["vocab_str"].values
    R, D = ds.sizes["row"], ds.sizes["depth"]
    frame = pd.DataFrame({
        "prompt": np.repeat(ds["prompt"].values, D), "position": np.repeat(ds["position"].values, D),
        "depth": np.tile(ds["depth"].values, R)})
    if "target_word" in ds.coords:
        frame["target"] = np.repeat(ds["target_word"].values.astype(object), D)
    frame["target_id"] = np.repeat(ds["target_id"].values, D)
    for name in ("target_rank", "target_prob", "target_logit", "contrast_logit", "logit_diff"):
        if name in ds:
            frame[name.removeprefix("target_") if name != "target_logit" else "logit"] = ds[name].values.ravel()
    if "contrast_word" in ds.coords:
        frame.insert(frame.columns.get_loc("target_id") + 1, "contrast", np.repeat(ds["contrast_word"].values, D))
    top = ds["topk_ids"].isel(k=0).values.ravel()
    frame["top1"] = vocab[top].astype(object)
    frame["top1_id"] = top
    frame["top1_prob"] = ds["topk_probs"].isel(k=0).values.ravel()
    meta = run.prompts.drop(columns=["token_offset", "n_tokens"])
    return frame.join(meta, on="prompt")


def first_depth_ranked(table: pd.DataFrame, rank: int = 1) -> pd.Series:
    """Per (prompt, position), the first depth from which the target stays ranked <= rank to the
    last depth (NaN if it is not ranked so at the last depth)."""
    def first(group):
        group = group.sort_values("depth")
        ok = (group["rank"] <= rank).to_numpy() & (group["rank"] > 0).to_numpy()
        stays = np.flip(np.logical_and.accumulate(np.flip(ok)))
        return float(group["depth"].to_numpy()[stays][0]) if stays.any() else np.nan

    return table.groupby(["prompt", "position"])[["depth", "rank"]].apply(first)


def rank_of(run, targets, position: int = -1, depths=None, norm: str = "final", device: str = "cpu",
            strict: bool = False) -> pd.DataFrame:
    """Prompt x depth ranks of one target word per prompt at `position` of each prompt (-1: its last
    prompt token), computed now in batches (nothing stored). `targets`: a word for all prompts, or
    a sequence (e.g. a metadata column) with one word per prompt."""
    _check(norm, "float32", 1)
    n = run.n_prompts
    words = [targets] * n if isinstance(targets, str) else [str(t) for t in targets]
    if len(words) != n:
        raise ConfigError(f"rank_of got {len(words)} targets for {n} prompts; give one word per prompt")
    rows = last_prompt_rows(run) if position == -1 else select_rows_at(run, position)
    ids = first_token_ids(run, words, strict, "target")
    params = {"topk": 1, "depths": parse_depths(run, depths), "norm": norm, "precision": "float32"}
    got = score_rows(run, rows, ids, None, params, device, progress=False)
    return pd.DataFrame(got["target_rank"], index=pd.Index(range(n), name="prompt"),
                        columns=pd.Index(params["depths"], name="depth"))


def select_rows_at(run, position: int) -> np.ndarray:
    """Each prompt's row at `position` (negative from the end); an error names a prompt too short."""
    if not every_position(run):
        return rows_at(run, parse_positions(str(position)))
    offsets, lengths = lens_extents(run)  # an encoder-decoder run's decoder rows
    short = np.flatnonzero(~((-lengths <= position) & (position < lengths)))
    if len(short):
        raise OutOfRangeError(f"position {position} is out of range for prompt {int(short[0])} "
                              f"({int(lengths[short[0]])} tokens)")
    return offsets + np.where(position >= 0, position, lengths + position)


class LensResult:
    """A stored lens result: `.ds` is its lazy Dataset (item and attribute access go to it, so a
    LensResult reads like the Dataset), `.table` the study as one row per (prompt row, depth)."""

    def __init__(self, run, ds: xr.Dataset):
        self.run, self.ds = run, ds

    def __getitem__(self, name):
        return self.ds[name]

    def __contains__(self, name) -> bool:
        return name in self.ds

    def __getattr__(self, name):
        if name in ("run", "ds"):
            raise AttributeError(name)
        return getattr(self.ds, name)

    def __repr__(self) -> str:
        return f"<stratascope LensResult>\n{self.ds!r}"

    @property
    def table(self) -> pd.DataFrame:
        """One row per (selected row, depth) with the target's rank, probability and logit, the top-1
        token and every prompt metadata column (see study_table)."""
        if "row" not in self.ds.dims:
            raise ConfigError("the lens of every token is corpus-sized, so it has no in-memory table; ask for "
                              "positions='last' (or a target), or write it with `stratascope export RUN lens`")
        return study_table(self.run, self.ds)


def study_summary(run, ds: xr.Dataset, max_prompts: int = 10) -> list[str]:
    """Lines for `stratascope lens` on a study: per prompt (the first few) the depth from which its
    target is ranked first, then the median rank at a few depths and where the result is stored."""
    table = study_table(run, ds)
    first = first_depth_ranked(table)
    what = "the target" if "target" in table.columns else "the token that came next"
    lines = [f"{len(ds['row'])} rows (positions {ds.attrs.get('params', {}).get('positions', '?')}); "
             f"the depth from which {what} stays ranked first:"]
    for (prompt, position), depth in list(first.items())[:max_prompts]:
        text = str(run.prompts["text"].iloc[prompt])
        shown = (text[:60] + "…") if len(text) > 60 else text
        lines.append(f"  prompt {prompt} {shown!r} position {position}: "
                     + ("not first at the last depth" if np.isnan(depth) else f"depth {int(depth)}"))
    depths = sorted(table["depth"].unique())
    picks = sorted({depths[0], depths[len(depths) // 2], depths[-1], *depths[-3:]})
    medians = table.groupby("depth")["rank"].median()
    lines.append("median rank by depth: " + ", ".join(f"{d}: {medians[d]:g}" for d in picks))
    lines.append(f"ranked first by the last depth in {int((~first.isna()).sum())} of {len(first)} prompt rows; "
                 f"stored in {run.path}/analysis/lens (export: stratascope export {run.path} lens -o study.parquet)")
    return lines
