"""Token-level labels from a JSONL corpus land on the right tokens (checked with the tokenizer's word_ids)."""

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

import stratascope as ss
from stratascope.errors import CorpusError

TEXTS = ["The quick brown fox jumps over the lazy dog", "Heathrow airport is located in the city of London",
         "The nurse said that she was tired", "What is your name"]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_word_and_token_labels_land_on_their_tokens(family, tiny_model_dirs, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_dirs[family])
    records = []
    for i, text in enumerate(TEXTS):
        words = text.split()
        rec = {"text": text, "pos": [f"w{j}:{w}" for j, w in enumerate(words)],
               "length": [float(len(w)) for w in words]}
        if i != 3:  # the last record has no per-token field: its tokens stay unlabelled
            n = len(tok(text)["input_ids"])
            rec["tokid"] = {"token": [None] + [f"t{k}" for k in range(1, n)]}
        records.append(rec)
    run = ss.capture(model=str(tiny_model_dirs[family]), corpus=_write(tmp_path / "c.jsonl", records),
                     out=str(tmp_path / "r.zarr"), capture=("hidden",), device="cpu", progress=False)
    assert run.attrs["corpus"]["token_labels"] == ["pos", "length", "tokid"]
    assert not any(v.startswith("meta_") for v in run.ds.data_vars)
    assert run.ds["label_pos"].dims == ("token",) and run.ds["label_length"].dtype == np.float64
    for p, text in enumerate(TEXTS):
        enc = tok(text)
        rows = run.ds.isel(token=run.token_slice(p))
        np.testing.assert_array_equal(rows["token_id"].values, enc["input_ids"])
        words = text.split()  # plain words: the tokenizer's words are the whitespace words
        expected = ["" if w is None else f"w{w}:{words[w]}" for w in enc.word_ids()]
        assert list(rows["label_pos"].values.astype(object)) == expected
        lengths = rows["label_length"].values
        for got, w in zip(lengths, enc.word_ids()):
            assert (np.isnan(got) and w is None) or got == len(words[w])
        tokid = list(rows["label_tokid"].values.astype(object))
        if p == 3:
            assert tokid == [""] * len(tokid)
        else:
            assert tokid == [""] + [f"t{k}" for k in range(1, len(tokid))]


def test_word_with_punctuation_labels_all_its_tokens(tiny_model_dirs, tmp_path):
    text = "the doctor said: hello."
    run = ss.capture(model=str(tiny_model_dirs["llama"]),
                     corpus=_write(tmp_path / "c.jsonl", [{"text": text, "tag": ["A", "B", "C", "D"]}]),
                     out=str(tmp_path / "r.zarr"), capture=("hidden",), device="cpu", progress=False)
    rows = run.ds.isel(token=run.token_slice(0))
    labels = list(rows["label_tag"].values.astype(object))
    pieces = [s.replace("Ġ", " ") for s in rows["token_str"].values.astype(object)]
    # walk the text: each token's first non-space character belongs to whitespace word k
    starts, pos, expect = [text.index(w) for w in text.split()], 0, []
    for piece in pieces:
        at = pos + len(piece) - len(piece.lstrip())
        pos += len(piece)
        expect.append("ABCD"[sum(s <= at for s in starts) - 1])
    assert "".join(pieces) == text and labels == expect
    assert labels.count("C") >= 2 and labels.count("D") >= 2  # "said:" and "hello." span several tokens


def test_wrong_length_names_the_record(tiny_model_dirs, tmp_path):
    corpus = _write(tmp_path / "c.jsonl", [{"text": "a b c", "pos": ["X", "Y", "Z"]}, {"text": "d e", "pos": ["X"]}])
    with pytest.raises(CorpusError, match="record 2: field 'pos' has 1 labels but the text has 2"):
        ss.capture(model=str(tiny_model_dirs["llama"]), corpus=corpus, out=str(tmp_path / "r.zarr"),
                   capture=("hidden",), device="cpu", progress=False)
    assert not (tmp_path / "r.zarr").exists()
