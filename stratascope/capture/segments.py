"""BERT segments: tokenizing sentence pairs (a `text_pair` corpus column) and keeping token_type_ids."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .corpus import Corpus

PAIR_COLUMN = "text_pair"


def _pair(value) -> str | None:
    return value if isinstance(value, str) and value else None


def tokenize_segments(tokenizer, data: Corpus, max_length: int,
                      special_tokens: str = "text") -> tuple[list[list[int]], list[list[int]], int]:
    """Token ids and token type ids (0 = sentence A, 1 = sentence B) of every prompt.

    A prompt whose corpus record has a non-empty `text_pair` value is encoded as the pair
    (text, text_pair), as BERT's tokenizer does ([CLS] A [SEP] B [SEP]); other prompts are
    single sentences with type ids all 0. Sequences longer than max_length are cut at the end.
    """
    pairs = data.metadata[PAIR_COLUMN] if PAIR_COLUMN in data.metadata.columns else pd.Series([None] * len(data))
    ids, types, truncated = [], [], 0
    for start in range(0, len(data), 1024):
        stop = min(start + 1024, len(data))
        texts, second = data.texts[start:stop], [_pair(v) for v in pairs.iloc[start:stop]]
        rows: dict[int, tuple[list[int], list[int]]] = {}
        for is_pair in (True, False):  # one batched tokenizer call for the pairs, one for the singles
            idx = [i for i, b in enumerate(second) if (b is not None) == is_pair]
            if not idx:
                continue
            args = ([texts[i] for i in idx],) + (([second[i] for i in idx],) if is_pair else ())
            enc = tokenizer(*args, add_special_tokens=True, return_token_type_ids=True,
                            split_special_tokens=special_tokens == "text")
            for i, seq, typ in zip(idx, enc["input_ids"], enc["token_type_ids"]):
                rows[i] = (list(seq), list(typ))
        for i in range(stop - start):
            seq, typ = rows[i]
            if len(seq) > max_length:
                truncated += 1
                seq, typ = seq[:max_length], typ[:max_length]
            ids.append(seq)
            types.append(typ)
    return ids, types, truncated


def flat_token_types(types: list[list[int]], offsets: np.ndarray, n_rows: int) -> np.ndarray:
    """Every row's token type id in store order (0 on masked padding rows)."""
    flat = np.zeros(n_rows, dtype=np.int8)
    for p, typ in enumerate(types):
        flat[int(offsets[p]):int(offsets[p]) + len(typ)] = typ
    return flat
