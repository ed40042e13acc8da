"""Studies: per-prompt target words at chosen positions, against the model's own final norm and
lm_head applied to transformers' output_hidden_states (plain torch ranks), exactly in float32."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import stratascope as ss
from conftest import load_reference
from stratascope.cli import cli
from stratascope.errors import ConfigError, MissingMetadataError

# answers and foils that are one token (or have distinct first tokens) in the tiny vocabulary
FACTS = [("Heathrow airport is located in the city of", " the", " that"),
         ("The nurse said that", " was", " The"),
         ("The keys to the cabinet are", " said", " city"),
         ("The quick brown fox", " is", " she")]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def study(request, tiny_model_dirs, tmp_path_factory):
    family = request.param
    corpus = tmp_path_factory.mktemp("study") / "facts.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "attribute": a, "foil": f, "n": i}) + "\n"
                              for i, (t, a, f) in enumerate(FACTS)))
    run = ss.capture(model=str(tiny_model_dirs[family]), corpus=str(corpus), out=str(corpus.with_suffix(".zarr")),
                     capture="hidden", progress=False)
    model, tok = load_reference(tiny_model_dirs[family])
    return family, run, model, tok


def _direct_last(family, model, tok, text):
    """(D, V) logits of the last prompt token at every depth, by the model's own modules."""
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        hs = model(**ids, output_hidden_states=True).hidden_states
        norm = model.transformer.ln_f if family == "gpt2" else model.model.norm
        head = model.get_output_embeddings()
        L = len(hs) - 1
        return torch.stack([head(norm(hs[d][0, -1])) for d in range(L)] + [head(hs[L][0, -1])])


def test_target_column_at_last_position_equals_direct(study):
    family, run, model, tok = study
    res = run.lens(target_column="attribute", contrast_column="foil", positions="last", topk=3, progress=False)
    table = res.table
    assert len(table) == len(FACTS) * run.ds.sizes["depth"]
    assert {"attribute", "foil", "n", "text", "rank", "prob", "logit", "logit_diff", "top1"} <= set(table.columns)
    for p, (text, answer, foil) in enumerate(FACTS):
        logits = _direct_last(family, model, tok, text)
        a, f = (tok(w, add_special_tokens=False)["input_ids"][0] for w in (answer, foil))
        rows = table[table.prompt == p].sort_values("depth")
        want_rank = (1 + (logits > logits[:, a, None]).sum(-1)).numpy()
        np.testing.assert_array_equal(rows["rank"].to_numpy(), want_rank)
        np.testing.assert_allclose(rows["prob"].to_numpy(), torch.softmax(logits, -1)[:, a].numpy(), rtol=1e-5,
                                   atol=1e-7)
        np.testing.assert_allclose(rows["logit"].to_numpy(), logits[:, a].numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(rows["logit_diff"].to_numpy(), (logits[:, a] - logits[:, f]).numpy(),
                                   rtol=1e-5, atol=1e-5)
        assert set(rows["attribute"]) == {answer} and rows["top1_id"].iloc[-1] == int(logits[-1].argmax())
    ranks = run.rank_of(targets=run.prompts["attribute"], position=-1)
    np.testing.assert_array_equal(ranks.to_numpy(), table.pivot(index="prompt", columns="depth", values="rank"))


def test_results_of_studies_live_beside_the_full_lens(study):
    family, run, *_ = study
    full = run.lens(topk=2, progress=False)
    last = run.lens(topk=2, positions="last", progress=False)  # the token that came next, last rows only
    one = run.lens(topk=2, target=" the", positions="0,-1", progress=False)
    assert full.sizes["token"] == run.n_tokens and last.sizes["row"] == len(FACTS)
    assert one.sizes["row"] == 2 * len(FACTS) and set(one["target_word"].values) == {" the"}
    rows = last["token"].values
    np.testing.assert_array_equal(last["target_rank"].values, full["target_rank"].values[rows])
    assert len(run.results()) >= 3


def test_study_errors(study):
    family, run, *_ = study
    with pytest.raises(MissingMetadataError, match="'missing' is not a prompt metadata column"):
        run.lens(target_column="missing", progress=False)
    with pytest.raises(ConfigError, match="--positions 'middle'"):
        run.lens(positions="middle", progress=False)
    with pytest.raises(ConfigError, match="with --strict"):
        run.lens(target=" zyxwvut", strict=True, positions="last", progress=False)
    with pytest.warns(UserWarning, match="target word ' zyxwvut' is several tokens.*first token"):
        run.lens(target=" zyxwvut", positions="last", progress=False)
    with pytest.raises(ConfigError, match="--contrast needs"):
        run.lens(contrast=" the", positions="last", progress=False)


def test_cli_study_and_export_with_metadata(study, tmp_path):
    family, run, *_ = study
    out = CliRunner().invoke(cli, ["lens", run.path, "--target-column", "attribute", "--positions", "last",
                                   "--topk", "2"])
    assert out.exit_code == 0, out.output
    assert "the depth from which the target stays ranked first" in out.output and "median rank by depth" in out.output
    path = tmp_path / "facts.parquet"
    exported = CliRunner().invoke(cli, ["export", run.path, "lens", "-o", str(path)])
    assert exported.exit_code == 0, exported.output
    frame = pd.read_parquet(path)
    assert {"prompt", "depth", "target_rank", "attribute", "text", "topk_token[0]"} <= set(frame.columns)
    assert len(frame) == len(FACTS) * run.ds.sizes["depth"]
