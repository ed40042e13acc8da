"""Index ranges as users write them ('0-5,7') and as messages print them."""

from __future__ import annotations

import numbers

from .errors import ConfigError


def parse_ranges(text, upper: int | None, what: str, *, keep_order: bool = False) -> list[int] | None:
    """Parse '0-5,7' (or an int, or a list of ints) into [0..5, 7]; None/'' means all.

    Every value must lie in [0, upper); upper=None accepts any integer, for callers that check
    the values against what a run holds themselves. The values come back sorted, or with
    keep_order in the order given; repeats are dropped either way.
    """
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if isinstance(text, numbers.Integral):
        values = [int(text)]
    elif not isinstance(text, str):
        values = [int(v) for v in text]
    else:
        values = []
        for part in text.split(","):
            part = part.strip()
            try:
                lo, hi = (part.split("-", 1) if not part.startswith("-") else (part, "")) if "-" in part[1:] \
                    else (part, part)
                lo, hi = int(lo), int(hi)
            except ValueError:
                raise ConfigError(f"--{what} {text!r}: '{part}' is not a number or a range like 0-5") from None
            if hi < lo:  # outside the try: a ConfigError is a ValueError too
                raise ConfigError(f"--{what} {text!r}: the range '{part}' runs backwards; write {hi}-{lo}")
            values.extend(range(lo, hi + 1))
    bad = [v for v in values if upper is not None and not 0 <= v < upper]
    if bad:
        raise ConfigError(f"--{what} {text!r}: {bad[0]} is out of range; this model has {what} 0-{upper - 1}")
    return list(dict.fromkeys(values)) if keep_order else sorted(set(values))


def format_ranges(values) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    parts, start = [], None
    values = list(values)
    for i, v in enumerate(values):
        start = v if start is None else start
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ",".join(parts)
