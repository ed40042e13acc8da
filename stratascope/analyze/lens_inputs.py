"""What the lens reads, checked: depths, watch words, rows and their next tokens (no torch).

Shared by the corpus job (lens.py, torch) and the one-prompt calls (prompt_lens.py, numpy).
"""

from __future__ import annotations

import warnings

import dask.array as da
import numpy as np
import xarray as xr

from ..errors import ConfigError, MissingArrayError, OutOfRangeError
from ..ranges import format_ranges, parse_ranges
from .stacks import lens_slice

NORMS = ("final", "none")
PRECISIONS = ("float32", "bfloat16")


def require_hidden(run) -> xr.DataArray:
    if "hidden" not in run.ds:
        raise MissingArrayError("this run has no hidden states; capture with --capture hidden")
    return run.ds["hidden"]


def captured_depths(run) -> list[int]:
    return list(run.depths)


def parse_depths(run, depths) -> list[int]:
    """Depth values, in the order given, from None (all captured), a string like '0-5,10', an int
    or a list of ints (a negative depth counts from the end: -1 is the last)."""
    have = captured_depths(run)
    if depths is None:
        return have
    L = int(run.attrs["model"]["n_layers"])
    out = []
    for d in parse_ranges(depths, None, "depths", keep_order=True) or []:
        d = d + L + 1 if d < 0 else d
        if d not in have:
            raise OutOfRangeError(f"depth {d} is out of range; this run holds depths {format_ranges(have)}")
        if d not in out:
            out.append(d)
    if not out:
        raise ConfigError(f"--depths {depths!r} selects no depth; this run holds depths {format_ranges(have)}")
    return out


def watch_ids(run, watch) -> tuple[list[str], list[int]]:
    """(labels, ids) for watch words, tokenized with the run's stored tokenizer.json (the
    `tokenizers` package, not transformers). An int is taken as a vocabulary id. A word that
    is several tokens is watched through its first token, with a warning saying so."""
    words = [watch] if isinstance(watch, (str, int)) else list(watch or [])
    labels, ids = [], []
    tokenizer, vocab = None, None
    V = int(run.attrs["model"]["vocab_size"])
    for w in words:
        if isinstance(w, (int, np.integer)):
            if not 0 <= int(w) < V:
                raise OutOfRangeError(f"watch id {w} is out of range; the vocabulary has ids 0-{V - 1}")
            vocab = vocab if vocab is not None else run.readout["vocab_str"].values
            label, tid = str(vocab[int(w)]), int(w)
        else:
            tokenizer = tokenizer or _tokenizer(run)
            pieces = tokenizer.encode(str(w), add_special_tokens=False)
            if not pieces.ids:
                raise ConfigError(f"watch word {w!r} tokenizes to nothing; give a non-empty word")
            if len(pieces.ids) > 1:
                warnings.warn(f"watch word {w!r} is {len(pieces.ids)} tokens {pieces.tokens}; "
                              f"watching its first token {pieces.tokens[0]!r}", stacklevel=3)
            label, tid = str(w), int(pieces.ids[0])
        if isinstance(w, str) and label in labels:  # the same word asked twice: one column
            continue
        if tid in ids and isinstance(w, str):  # two words, a column each, but the lens tells only tokens apart
            warnings.warn(f"watch words {labels[ids.index(tid)]!r} and {label!r} share their first token (id "
                          f"{tid}); their columns are the same", stacklevel=3)
        labels.append(label)
        ids.append(tid)
    return labels, ids


def _tokenizer(run):
    """The run's stored tokenizer (Store.tokenizer, parsed once per run)."""
    if run.tokenizer is None:
        raise MissingArrayError(f"{run.path} stored no tokenizer.json; give watch tokens as vocabulary ids")
    return run.tokenizer


def _check(norm: str, precision: str, topk: int) -> None:
    if norm not in NORMS:
        raise ConfigError(f"--norm {norm!r} is not one of {', '.join(NORMS)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if int(topk) < 1:
        raise ConfigError(f"--topk {topk} must be at least 1")


def _plan_depths(run, depths: list[int]) -> tuple[list[int], int | None]:
    """Depth indexes to compute (the chosen ones, then depth L if captured and not chosen) and
    the position of depth L among them (the KL reference), or None."""
    have = captured_depths(run)
    L = int(run.attrs["model"]["n_layers"])
    idx = [have.index(d) for d in depths]
    if L not in have:
        return idx, None
    if L in depths:
        return idx, depths.index(L)
    return idx + [have.index(L)], len(idx)


def next_ids_at(run, rows: np.ndarray) -> np.ndarray:
    """The id of the token that came next after each of `rows` in its sequence, -1 where none: the
    stored next_token_id, or (stores before it, which hold every row) the next row's token."""
    rows = np.asarray(rows, dtype=np.int64)
    if "next_token_id" in run.ds:
        return run.ds["next_token_id"].isel(token=rows).values.astype(np.int32)
    n = run.n_tokens
    table = run.ds[["token_id", "prompt_index"]]
    here, ahead = table.isel(token=rows), table.isel(token=np.minimum(rows + 1, n - 1))
    last = rows + 1 >= n
    return targets_of(here["token_id"].values, here["prompt_index"].values,
                      np.where(last, -1, ahead["token_id"].values), np.where(last, -2, ahead["prompt_index"].values))


def next_ids_range(run, start: int, stop: int) -> np.ndarray:
    """next_ids_at for the rows start..stop-1, read straight from zarr."""
    if "next_token_id" in run.ds:
        return np.asarray(run.array("next_token_id")[start:stop]).astype(np.int32)
    end = min(stop + 1, run.n_tokens)
    tid = np.asarray(run.array("token_id")[start:end])
    pidx = np.asarray(run.array("prompt_index")[start:end])
    nid = np.concatenate([tid[1:], [-1] * (stop + 1 - end)])
    npr = np.concatenate([pidx[1:], [-2] * (stop + 1 - end)])
    return targets_of(tid[:stop - start], pidx[:stop - start], nid[:stop - start], npr[:stop - start])


def next_ids_lazy(run):
    """next_ids_at of every row as a dask array chunked like token_id."""
    import dask.array as da

    if "next_token_id" in run.ds:
        return run.ds["next_token_id"].data.astype(np.int32)
    tid, pidx = run.ds["token_id"].data, run.ds["prompt_index"].data
    tail = da.from_array(np.array([-1], dtype=np.int32))
    nid = da.concatenate([tid[1:], tail]).rechunk(tid.chunks)
    npr = da.concatenate([pidx[1:], tail - 1]).rechunk(pidx.chunks)
    return da.map_blocks(targets_of, tid, pidx, nid, npr, dtype=np.int32)


def lens_prompt_index(ds):
    """prompt_index of the rows the lens reads (dask- or numpy-backed, as `ds` is): an encoder-decoder
    run's encoder rows count as masked (-1), since the LM head reads the decoder out; so they get no
    lens and are no one's next token."""
    pidx = ds["prompt_index"].data
    if "is_decoder" not in ds:
        return pidx
    where = da.where if isinstance(pidx, da.Array) else np.where
    return where(ds["is_decoder"].data, pidx, -1).astype(np.int32)


def targets_of(token_id: np.ndarray, prompt_index: np.ndarray, next_id: np.ndarray,
               next_prompt: np.ndarray) -> np.ndarray:
    """The id of the token that came next in the same sequence, or -1 (last token, masked row)."""
    same = (next_prompt == prompt_index) & (prompt_index >= 0)
    return np.where(same, next_id, -1).astype(np.int32)



def _position_row(run, prompt: int, position: int) -> int:
    from ..positions import Positions
    from .stored_rows import every_position, rows_at

    if not every_position(run):  # a store of selected rows: the row of that position, if it was kept
        return int(rows_at(run, Positions(str(position), "list", (position,)), [run.prompt_index(prompt)])[0])
    rows = lens_slice(run, prompt)
    n = rows.stop - rows.start
    if not -n <= position < n:
        raise OutOfRangeError(f"position {position} is out of range; prompt {run.prompt_index(prompt)} "
                              f"has positions 0-{n - 1}")
    return rows.start + position % n
