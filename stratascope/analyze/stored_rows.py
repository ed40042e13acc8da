"""Which token rows a store holds: every position of every prompt, or only those a capture's
--positions kept (one mean row per prompt with --pool). Analyses that need whole sequences ask
`require_every_position`; row selections find stored rows by (prompt, position)."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError, OutOfRangeError
from ..positions import Positions


def every_position(run) -> bool:
    """Whether the store holds every token of every sequence (stores before --positions always do)."""
    cap = run.attrs.get("capture", {})
    return cap.get("positions", "all") == "all" and not cap.get("pool")


def rows_option(run) -> str:
    """The capture options that chose the stored rows, as the user wrote them."""
    cap = run.attrs.get("capture", {})
    parts = [f"--positions {cap['positions']}"] if cap.get("positions", "all") != "all" else []
    return " ".join(parts + ([f"--pool {cap['pool']}"] if cap.get("pool") else []))


def require_every_position(run, what: str) -> None:
    if not every_position(run):
        raise ConfigError(f"{what} needs every position of each prompt, but {run.path} stores only the rows of "
                          f"{rows_option(run)}; capture the run again without {rows_option(run)}")


def seq_lengths(run) -> np.ndarray:
    """Tokens of each prompt's sequence (prompt + generated), however many rows were stored."""
    name = "seq_len" if "seq_len" in run.ds else "n_tokens"
    return run.ds[name].values.astype(np.int64)


def rows_at(run, spec: Positions, prompts: np.ndarray | None = None) -> np.ndarray:
    """The stored rows of the positions `spec` names (kinds last, first, list) in each prompt, prompt
    after prompt; on a store of selected rows each must have been kept, or an error says which not."""
    prompts = np.arange(run.n_prompts) if prompts is None else np.asarray(prompts, dtype=np.int64)
    n_gen = int(run.attrs.get("capture", {}).get("generate", 0) or 0)
    seq = seq_lengths(run)
    if run.attrs.get("capture", {}).get("pool"):
        raise ConfigError(f"--positions {spec.text}: {run.path} stores one mean row per prompt "
                          f"({rows_option(run)}), not token positions; use --positions all")
    wanted = [(p, pos) for p in prompts for pos in spec.of(int(seq[p]), n_gen)]
    if not wanted:
        raise OutOfRangeError(f"--positions {spec.text}: no prompt has such a position "
                              f"(prompts have {seq.min()}-{seq.max()} tokens)")
    want_p, want_pos = (np.array(v, dtype=np.int64) for v in zip(*wanted))
    if every_position(run):
        return run.ds["token_offset"].values.astype(np.int64)[want_p] + want_pos
    pidx = run.ds["prompt_index"].values.astype(np.int64)  # 4 bytes a stored row: a selected store is small
    pos = run.ds["position"].values.astype(np.int64)
    width = int(seq.max()) + 1
    real = np.flatnonzero(pidx >= 0)
    keys = pidx[real] * width + pos[real]  # ascending: prompts in order, positions ascending within each
    want = want_p * width + want_pos
    at = np.minimum(np.searchsorted(keys, want), len(keys) - 1)
    missing = keys[at] != want
    if missing.any():
        i = int(np.flatnonzero(missing)[0])
        more = f" (nor {int(missing.sum()) - 1} more)" if missing.sum() > 1 else ""
        raise OutOfRangeError(f"--positions {spec.text}: {run.path} stores only the rows of {rows_option(run)}, "
                              f"not position {int(want_pos[i])} of prompt {int(want_p[i])}{more}; choose positions "
                              "the capture kept")
    return real[at]


def check_prompt_rows(run, at: str, offsets: np.ndarray, counts: np.ndarray) -> None:
    """A prompt-level reading (at 'last': each prompt's last prompt token; 'mean': the mean over its
    prompt tokens) of a store of selected rows: refused unless the stored rows are what it reads.
    `offsets`/`counts` are each prompt's first row and prompt rows as the reader will take them."""
    if every_position(run):
        return
    cap = run.attrs.get("capture", {})
    pooled = bool(cap.get("pool"))
    if at == "mean" and not (pooled and cap.get("positions", "all") == "all" and not cap.get("generate")):
        raise ConfigError(f"--at mean averages every token of each prompt, but {run.path} stores only the rows of "
                          f"{rows_option(run)}; use --at last, or capture with --pool mean alone")
    if at == "last":
        if pooled:
            raise ConfigError(f"--at last reads each prompt's last token, but {run.path} stores one mean row per "
                              f"prompt ({rows_option(run)}); use --at mean")
        last = rows_at(run, Positions("last", "last"))
        if not np.array_equal(last, offsets + counts - 1):
            raise ConfigError(f"--at last: the rows {run.path} kept ({rows_option(run)}) do not end with each "
                              "prompt's last prompt token; capture with --positions last")
