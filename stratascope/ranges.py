"""Index ranges as users write them ('0-5,7') and as messages print them."""

from __future__ import annotations

from .errors import ConfigError


def parse_ranges(text: str | None, upper: int, what: str) -> list[int] | None:
    """Parse '0-5,7' into [0..5, 7]; every value must lie in [0, upper). None/'' means all."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if not isinstance(text, str):
        values = [int(v) for v in text]
    else:
        values = []
        for part in text.split(","):
            part = part.strip()
            try:
                if "-" in part[1:]:
                    lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                    if int(hi) < int(lo):
                        raise ConfigError(f"--{what} {text!r}: the range '{part}' runs backwards; write {hi}-{lo}")
                    values.extend(range(int(lo), int(hi) + 1))
                else:
                    values.append(int(part))
            except ValueError:
                raise ConfigError(f"--{what} {text!r}: '{part}' is not a number or a range like 0-5") from None
    bad = [v for v in values if not 0 <= v < upper]
    if bad:
        raise ConfigError(f"--{what} {text!r}: {bad[0]} is out of range; this model has {what} 0-{upper - 1}")
    return sorted(set(values))


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
