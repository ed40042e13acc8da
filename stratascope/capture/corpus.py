"""Reading a prompt corpus: .txt (a prompt per line), .jsonl, .csv, .parquet, or a Python list."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..errors import CorpusError


@dataclass
class Corpus:
    """Prompt texts plus one metadata row per prompt (every non-text column of the source)."""

    texts: list[str]
    metadata: pd.DataFrame
    source: str
    skipped: dict = field(default_factory=dict)  # reason -> lines of the source left out ("blank")
    special_token_texts: int = 0  # prompts holding a special token's string (set by the capture)

    def __len__(self) -> int:
        return len(self.texts)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for text in self.texts:
            h.update(text.encode("utf-8") + b"\x00")
        h.update(self.metadata.to_json(orient="split", index=False).encode())
        return h.hexdigest()


def from_prompts(prompts, text_column: str = "text", source: str = "<python>") -> Corpus:
    """A corpus from a list of strings, a list of dicts, or a DataFrame."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, pd.DataFrame):
        frame = prompts
    else:
        prompts = list(prompts)
        records = prompts and isinstance(prompts[0], dict)
        frame = pd.DataFrame(prompts) if records else pd.DataFrame({text_column: prompts})
    return _from_frame(frame.reset_index(drop=True), text_column, source)


def _from_frame(frame: pd.DataFrame, text_column: str, source: str) -> Corpus:
    if len(frame) == 0:
        raise CorpusError(f"corpus {source} is empty: give at least one prompt")
    if text_column not in frame.columns:
        raise CorpusError(
            f"corpus {source} has no column '{text_column}' (columns: {', '.join(map(str, frame.columns))}); "
            "choose one with --text-column"
        )
    texts = frame[text_column]
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text:
            raise CorpusError(f"corpus {source}, record {i + 1}: the '{text_column}' value is {text!r}, "
                              "not a non-empty text")
    for col in frame.columns:  # column names become array names in the store
        name = str(col)
        if "/" in name or name.startswith(".") or name.startswith("__") or not name.strip():
            raise CorpusError(f"corpus {source}: the column name {name!r} cannot name a stored array "
                              "(no '/', no leading '.' or '__', not empty); rename the column")
    metadata = frame.drop(columns=[text_column])
    return Corpus(texts=[str(t) for t in texts], metadata=metadata.reset_index(drop=True), source=source)


def _utf8_lines(path: Path) -> list[str]:
    """The file's lines; a byte that is not UTF-8 is an error naming the line."""
    lines = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                lines.append(raw.decode("utf-8").rstrip("\n"))
            except UnicodeDecodeError as e:
                raise CorpusError(f"corpus {path}, line {lineno}: not valid UTF-8 ({e.reason}); "
                                  "save the file as UTF-8") from None
    return lines


def _skipped(data: Corpus, blank: int) -> Corpus:
    if blank:
        data.skipped["blank"] = blank
    return data


def _drop_written_index(frame: pd.DataFrame) -> pd.DataFrame:
    """A CSV written with its index (DataFrame.to_csv's default) has a first, unnamed column
    0, 1, 2, ...: that is the writer's row number, not corpus metadata."""
    first = frame.columns[0] if len(frame.columns) else None
    if isinstance(first, str) and first.startswith("Unnamed: ") and \
            frame[first].tolist() == list(range(len(frame))):
        return frame.drop(columns=[first])
    return frame


def read_corpus(path: str | Path, text_column: str = "text") -> Corpus:
    """Read a corpus file; errors name the file and, where it applies, the line."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"corpus {path} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        lines = [line.rstrip("\r") for line in _utf8_lines(path)]
        kept = [line for line in lines if line.strip()]
        data = _from_frame(pd.DataFrame({text_column: kept}), text_column, str(path))
        return _skipped(data, len(lines) - len(kept))
    if suffix == ".jsonl":
        rows, blank = [], 0
        for lineno, line in enumerate(_utf8_lines(path), 1):
            if not line.strip():
                blank += 1
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"corpus {path}, line {lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise CorpusError(f"corpus {path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
            if text_column not in row:
                raise CorpusError(f"corpus {path}, line {lineno}: no '{text_column}' field (its fields: "
                                  f"{', '.join(map(str, row)) or 'none'}); choose one with --text-column")
            rows.append(row)
        return _skipped(_from_frame(pd.DataFrame(rows), text_column, str(path)), blank)
    try:
        if suffix == ".csv":
            frame = _drop_written_index(pd.read_csv(path))
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            raise CorpusError(f"corpus {path}: unknown format '{suffix}'; use .txt, .jsonl, .csv or .parquet")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError, ValueError) as e:
        if isinstance(e, CorpusError):
            raise
        raise CorpusError(f"corpus {path} could not be read: {e}") from e
    return _from_frame(frame, text_column, str(path))
