"""Token positions as users name them (--positions of capture and of the lens study): all, last,
first, N,M (negative from the end) or label:<name>; one parser for both."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError
from .ranges import parse_ranges

POSITIONS_HELP = ("all | last (each prompt's last prompt token) | first | N,M (positions; negative from the end) "
                  "| label:<name> (tokens with that token label)")
KINDS = ("all", "last", "first", "list", "label")


@dataclass(frozen=True)
class Positions:
    """A parsed --positions: its kind, the listed positions (kind 'list') or the label's name."""

    text: str
    kind: str
    values: tuple[int, ...] = ()
    label: str = ""

    def of(self, n: int, n_generated: int = 0, labelled: np.ndarray | None = None) -> np.ndarray:
        """The positions (ascending) this names in a sequence of n tokens whose last n_generated were
        generated; `labelled` (kind 'label') flags the positions that carry the label."""
        if self.kind == "all":
            return np.arange(n, dtype=np.int64)
        if self.kind == "last":
            return np.array([n - n_generated - 1] if n - n_generated > 0 else [], dtype=np.int64)
        if self.kind == "first":
            return np.array([0] if n else [], dtype=np.int64)
        if self.kind == "label":
            return np.flatnonzero(np.asarray(labelled, dtype=bool)).astype(np.int64)
        return np.unique(np.array([p if p >= 0 else n + p for p in self.values if -n <= p < n], dtype=np.int64))


def parse_positions(text) -> Positions:
    """Parse --positions (see POSITIONS_HELP); a bad value is a ConfigError naming it and the choices."""
    text = str(text if text is not None else "all").strip()
    if text in ("all", "last", "first"):
        return Positions(text, text)
    if text.startswith("label:"):
        name = text[len("label:"):].strip()
        if not name:
            raise ConfigError(f"--positions {text!r} names no label; write label:<name>, e.g. label:pos")
        return Positions(text, "label", label=name)
    try:  # negative positions count from the end of each prompt, so no bound here
        wanted = parse_ranges(text, None, "positions", keep_order=True) or []
    except ConfigError:
        raise ConfigError(f"--positions {text!r} is not one of: {POSITIONS_HELP}") from None
    if not wanted:
        raise ConfigError(f"--positions {text!r} names no position; {POSITIONS_HELP}")
    return Positions(text, "list", tuple(wanted))
