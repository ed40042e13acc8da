"""Every capture/info error through the CLI: one clear sentence, non-zero exit, nothing lost."""

import json

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from conftest import PROMPTS
from stratascope.cli import cli


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "topic": i % 2}) for i, t in enumerate(PROMPTS)) + "\n")
    return path


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def capture_args(tiny_model_dirs, corpus, out, *extra):
    return ("capture", "--model", tiny_model_dirs["llama"], "--corpus", corpus, "--out", out, "--device", "cpu", *extra)


def test_capture_then_info(tiny_model_dirs, corpus, tmp_path):
    out = tmp_path / "run.zarr"
    code, text = invoke(*capture_args(tiny_model_dirs, corpus, out, "--layers", "0-1", "--capture", "hidden,mlp"))
    assert code == 0, text
    code, text = invoke("info", out)
    assert code == 0 and "6 prompts" in text and "hidden, mlp" in text and "metadata topic" in text
    code, text = invoke("info", out, "--json")
    summary = json.loads(text)
    assert summary["captured_layers"] == [0, 1]
    assert summary["arrays"]["hidden"]["dims"]["depth"] == 3  # embeddings + outputs of blocks 0 and 1


def test_models_lists_bundled():
    code, text = invoke("models")
    assert code == 0 and "smollm2" in text and "minilm" in text


@pytest.mark.parametrize("extra, message", [
    (("--layers", "0-9"), "out of range; this model has layers 0-2"),
    (("--layers", "a-b"), "is not a number or a range"),
    (("--capture", "hidden,logits"), "'logits' is not something stratascope captures"),
    (("--batch-size", "0"), "--batch-size 0 must be a whole number of at least 1"),
    (("--device", "cuda"), "this machine has no CUDA device"),
])
def test_bad_options(tiny_model_dirs, corpus, tmp_path, extra, message):
    import torch

    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, text = invoke(*capture_args(tiny_model_dirs, corpus, tmp_path / "x.zarr", *extra))
    assert code == 1 and message in text, text
    assert text.count("\n") == 1  # one sentence, no traceback
    assert not (tmp_path / "x.zarr").exists()


def test_bad_corpora(tiny_model_dirs, tmp_path):
    cases = {
        "empty.txt": ("\n\n", "is empty"),
        "broken.jsonl": ('{"text": "ok"}\n{"text": oops}\n', "line 2: not valid JSON"),
        "nofield.jsonl": ('{"text": "ok"}\n{"body": "x"}\n', "line 2: no 'text' field"),
        "corpus.docx": ("x", "unknown format '.docx'"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_text(content)
        code, text = invoke(*capture_args(tiny_model_dirs, path, tmp_path / "x.zarr"))
        assert code == 1 and message in text and name in text, (name, text)
    code, text = invoke(*capture_args(tiny_model_dirs, tmp_path / "missing.txt", tmp_path / "x.zarr"))
    assert code != 0 and "missing.txt" in text


def test_text_column_and_csv(tiny_model_dirs, tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("body,label\nThe cat sat,a\nThe dog ran,b\n")
    code, text = invoke(*capture_args(tiny_model_dirs, path, tmp_path / "x.zarr"))
    assert code == 1 and "has no column 'text'" in text and "--text-column" in text
    code, text = invoke(*capture_args(tiny_model_dirs, path, tmp_path / "x.zarr", "--text-column", "body"))
    assert code == 0, text
    import stratascope as ss

    run = ss.open_run(tmp_path / "x.zarr")
    assert list(run.prompts["label"]) == ["a", "b"] and list(run.prompts["text"]) == ["The cat sat", "The dog ran"]


def test_existing_output_is_never_lost(tiny_model_dirs, corpus, tmp_path):
    out = tmp_path / "run.zarr"
    assert invoke(*capture_args(tiny_model_dirs, corpus, out, "--capture", "hidden"))[0] == 0
    before = zarr.open_group(str(out), mode="r")["hidden"][:]
    code, text = invoke(*capture_args(tiny_model_dirs, corpus, out))
    assert code == 1 and "--overwrite" in text
    # a failing command with --overwrite (bad layers) must not delete the old store
    code, text = invoke(*capture_args(tiny_model_dirs, corpus, out, "--overwrite", "--layers", "7"))
    assert code == 1
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["hidden"][:], before)
    # a directory that is not a store is never deleted, even with --overwrite
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    code, text = invoke(*capture_args(tiny_model_dirs, corpus, other, "--overwrite"))
    assert code == 1 and "not a stratascope store" in text and (other / "keep.txt").read_text() == "mine"
    assert invoke(*capture_args(tiny_model_dirs, corpus, out, "--overwrite"))[0] == 0


def test_dry_run_writes_nothing_and_sizes_match(tiny_model_dirs, corpus, tmp_path):
    out = tmp_path / "run.zarr"
    code, text = invoke(*capture_args(tiny_model_dirs, corpus, out, "--dry-run"))
    assert code == 0 and not out.exists()
    assert "free disk" in text and "hidden" in text and "attention" in text and "total" in text
    import stratascope as ss

    plan = ss.capture(model=str(tiny_model_dirs["llama"]), corpus=str(corpus), out=str(out), dry_run=True)
    run = ss.capture(model=str(tiny_model_dirs["llama"]), corpus=str(corpus), out=str(out), progress=False)
    for name, shape in plan.shapes.items():
        assert run.ds[name].shape == shape
    assert plan.bytes_per_array()["hidden"] == run.ds["hidden"].nbytes


def test_refuses_when_disk_too_small(tiny_model_dirs, corpus, tmp_path, monkeypatch):
    from stratascope.capture import runner

    monkeypatch.setattr(runner, "free_disk", lambda out: 1000)
    code, text = invoke(*capture_args(tiny_model_dirs, corpus, tmp_path / "x.zarr"))
    assert code == 1 and "free" in text and not (tmp_path / "x.zarr").exists()


def test_float16_overflow_is_an_error(tiny_model_dirs, corpus, tmp_path):
    """Scale the tiny model's embeddings past the float16 range: float16 refuses, float32 stores."""
    import torch
    import transformers

    path = tmp_path / "big"
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1e6)
    model.save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(tiny_model_dirs["llama"]).save_pretrained(path)
    args = ("capture", "--model", path, "--corpus", corpus, "--device", "cpu", "--capture", "hidden")
    code, text = invoke(*args, "--out", tmp_path / "a.zarr", "--dtype", "float16")
    assert code == 1 and "float16 range" in text and "--dtype float32" in text
    assert invoke(*args, "--out", tmp_path / "b.zarr", "--dtype", "float32")[0] == 0


def test_info_errors(tmp_path):
    code, text = invoke("info", tmp_path / "nothing.zarr")
    assert code == 1 and "does not exist" in text
    g = zarr.open_group(str(tmp_path / "old.zarr"), mode="w")
    g.attrs["schema_version"] = 99
    code, text = invoke("info", tmp_path / "old.zarr")
    assert code == 1 and "schema version 99" in text
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    code, text = invoke("info", tmp_path / "plain.zarr")
    assert code == 1 and "no schema_version" in text


def test_unknown_model_fails_fast(corpus, tmp_path):
    code, text = invoke("capture", "--model", "no-such-org/no-such-model", "--corpus", corpus,
                        "--out", tmp_path / "x.zarr")
    assert code == 1 and "not a bundled name" in text and "smollm2" in text


def test_input_mistakes_are_named(tiny_model_dirs, tmp_path):
    """A JSONL without the text field lists its fields; an unknown model suggests the bundled name
    it resembles; `view` of a non-store says so (not a port problem)."""
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"prompt": "hi", "label": 1}) + "\n")
    code, text = invoke("capture", "--model", tiny_model_dirs["llama"], "--corpus", jsonl, "--out", tmp_path / "o.zarr")
    assert code == 1 and "its fields: prompt, label" in text
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello\n")
    code, text = invoke("capture", "--model", "smolm2", "--corpus", corpus, "--out", tmp_path / "o.zarr")
    assert code == 1 and "did you mean --model smollm2?" in text
    code, text = invoke("view", tmp_path / "nothing.zarr")
    assert code == 1 and "does not exist" in text and "listen" not in text


def test_csv_written_with_its_index_keeps_corpus_columns_in_order(tiny_model_dirs, tmp_path):
    import pandas as pd

    import stratascope as ss

    path = tmp_path / "c.csv"
    pd.DataFrame({"zeta": [3, 4], "text": PROMPTS[:2], "alpha": ["a", "b"]}).to_csv(path)  # index written
    run = ss.capture(model=str(tiny_model_dirs["llama"]), corpus=str(path), out=str(tmp_path / "r.zarr"),
                     capture="hidden", progress=False)
    assert list(run.prompts.columns) == ["text", "token_offset", "n_tokens", "zeta", "alpha"]
    assert run.prompts["zeta"].tolist() == [3, 4]


def test_nothing_changed_silently(tiny_model_dirs, tmp_path):
    """Cut prompts, skipped blank lines and special-token text are counted in the store and in
    `info`; special-token strings are text unless --special-tokens parse (checked against the
    tokenizer itself)."""
    from transformers import AutoTokenizer

    import stratascope as ss

    corpus = tmp_path / "c.txt"
    corpus.write_text("a <|endoftext|> b\n\n   \n" + "word " * 50 + "\nhello\n")
    out = tmp_path / "r.zarr"
    code, text = invoke(*capture_args(tiny_model_dirs, corpus, out, "--capture", "hidden", "--max-length", "16"))
    assert code == 0, text
    assert "1 prompts cut to --max-length 16 tokens" in text and "2 blank corpus lines skipped" in text
    assert "1 prompts hold special-token text, tokenized as text" in text
    tok = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    run = ss.open_run(str(out))
    assert list(run.tokens(0)["token_id"]) == tok("a <|endoftext|> b", split_special_tokens=True)["input_ids"]
    parsed = tmp_path / "p.zarr"
    code, text = invoke(*capture_args(tiny_model_dirs, corpus, parsed, "--capture", "hidden", "--special-tokens",
                                      "parse"))
    assert code == 0 and "read as control tokens" in text
    assert list(ss.open_run(str(parsed)).tokens(0)["token_id"]) == tok("a <|endoftext|> b")["input_ids"]
