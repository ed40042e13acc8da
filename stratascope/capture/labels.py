"""Token-level labels supplied by the corpus, mapped onto the captured tokens.

A JSONL (or Python list-of-dicts) record gives a token-level label as a field whose value is a list:

    {"text": "The cat sat", "pos": ["DET", "NOUN", "VERB"]}
        one label per whitespace-separated word of the text (``text.split()``); every token
        whose first non-space character lies in word i gets label i (a token of only
        whitespace, such as BPE's lone "Ġ", takes the label of the word after it).
    {"text": "The cat sat", "pos": {"token": [null, "DET", "NOUN", "VERB"]}}
        one label per token, as the model's tokenizer splits the text with its special tokens
        (so a BOS token takes the first entry); null marks an unlabelled token.
    {"text": "The cat sat", "pos": {"word": [...]}}   the same as the plain list.

Tokens with no label (special tokens, null entries, records without the field) are stored as
"" for text labels and NaN for numeric ones. A field is numeric when every label in it is a
number (not a bool); otherwise every label is stored as text. Each field becomes the token-dim
array ``label_<field>`` (schemas.LABEL_PREFIX) instead of a ``meta_`` column.
"""

from __future__ import annotations

import bisect
import math
import re

import numpy as np

from ..errors import CorpusError

UNITS = ("word", "token")


def label_columns(metadata) -> list[str]:
    """Metadata columns whose values are lists (or {'word'|'token': list}): the token-level labels."""
    out = []
    for col in metadata.columns:
        values = [v for v in metadata[col] if not _missing(v)]
        if values and all(isinstance(v, (list, dict)) for v in values):
            out.append(str(col))
    return out


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _unit_and_values(value, source: str, record: int, field: str) -> tuple[str, list]:
    if isinstance(value, list):
        return "word", value
    if len(value) != 1 or next(iter(value)) not in UNITS or not isinstance(next(iter(value.values())), list):
        raise CorpusError(f"corpus {source}, record {record}: field '{field}' must be a list of labels, "
                          "or {\"word\": [...]} or {\"token\": [...]}")
    return next(iter(value.items()))


def _word_of_token(text: str, offsets: list[tuple[int, int]]) -> list[int]:
    """For each token, the index of the whitespace word holding its first non-space character; a
    token of only whitespace (BPE's lone "Ġ") joins the word after it; special tokens get -1."""
    starts = [m.start() for m in re.finditer(r"\S+", text)]
    out = []
    for s, e in offsets:
        if e <= s:  # special token: no characters of the text
            out.append(-1)
            continue
        first = re.compile(r"\S").search(text, s)
        out.append(-1 if first is None else bisect.bisect_right(starts, first.start()) - 1)
    return out


def token_labels(corpus, tokenizer, ids: list[list[int]]) -> dict[str, np.ndarray]:
    """Arrays of one label per captured token (prompts concatenated in order) for every label field.

    `ids` are the captured token ids per prompt (possibly truncated). Raises CorpusError naming the
    record when a list's length does not match the words or tokens of its text.
    """
    columns = label_columns(corpus.metadata)
    if not columns:
        return {}
    if not getattr(tokenizer, "is_fast", False):
        raise CorpusError(f"corpus {corpus.source} has token-level label fields ({', '.join(columns)}), which need a "
                          "fast tokenizer's character offsets; this model's tokenizer is not a fast one")
    n_tokens = sum(len(s) for s in ids)
    offsets_cache: dict[int, list] = {}
    out = {}
    for col in columns:
        per_token: list = []
        for p, value in enumerate(corpus.metadata[col]):
            n = len(ids[p])
            if _missing(value):
                per_token.extend([None] * n)
                continue
            unit, labels = _unit_and_values(value, corpus.source, p + 1, col)
            if p not in offsets_cache:
                enc = tokenizer(corpus.texts[p], add_special_tokens=True, return_offsets_mapping=True)
                if list(enc["input_ids"][:n]) != list(ids[p]):
                    raise CorpusError(f"corpus {corpus.source}, record {p + 1}: the tokenizer gave different "
                                      "tokens with offsets than without; token labels cannot be placed")
                offsets_cache[p] = [tuple(o) for o in enc["offset_mapping"]]
            offsets = offsets_cache[p]
            if unit == "token":
                if len(labels) != len(offsets):
                    raise CorpusError(f"corpus {corpus.source}, record {p + 1}: field '{col}' has {len(labels)} "
                                      f"token labels but the text has {len(offsets)} tokens (special tokens "
                                      "included); give one per token, or a plain list with one per word")
                per_token.extend(labels[:n])
            else:
                n_words = len(corpus.texts[p].split())
                if len(labels) != n_words:
                    raise CorpusError(f"corpus {corpus.source}, record {p + 1}: field '{col}' has {len(labels)} "
                                      f"labels but the text has {n_words} whitespace-separated words; give one "
                                      "label per word (or {\"token\": [...]} for one per token)")
                per_token.extend(None if w < 0 else labels[w] for w in _word_of_token(corpus.texts[p], offsets[:n]))
        assert len(per_token) == n_tokens
        out[col] = _as_array(per_token)
    return out


def _as_array(values: list) -> np.ndarray:
    present = [v for v in values if not _missing(v)]
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return np.array([np.nan if _missing(v) else float(v) for v in values], dtype="float64")
    return np.array(["" if _missing(v) else str(v) for v in values], dtype=object)


def write_token_labels(root, labels: dict[str, np.ndarray], plan, n_generated: int = 0) -> None:
    """Write each label as label_<name> (dim token), chunked like the token table; generated
    tokens and masked padding rows between shards hold NaN or ''."""
    from ..schemas import LABEL_PREFIX
    from .writer import create_array

    seq = plan.seq_lengths - n_generated  # the labelled (prompt) tokens of each sequence
    if plan.keep is None:
        rows = np.concatenate([np.arange(o, o + n) for o, n in zip(plan.offsets, seq)])
        take = slice(None)
    else:  # the kept positions that are prompt tokens: their rows, and their place in `values`
        starts = np.concatenate([[0], np.cumsum(seq)[:-1]])
        rows = np.concatenate([o + np.flatnonzero(k < n) for o, k, n in zip(plan.offsets, plan.keep, seq)])
        take = np.concatenate([s + k[k < n] for s, k, n in zip(starts, plan.keep, seq)]).astype(np.int64)
    for name, values in labels.items():
        kind = "float64" if values.dtype.kind == "f" else "str"
        full = np.full(plan.n_rows, np.nan) if kind == "float64" else np.full(plan.n_rows, "", dtype=object)
        full[rows] = values[take]
        create_array(root, LABEL_PREFIX + name, full.shape, plan.chunk_rows, kind, ("token",))[:] = full
