"""A fact-recall study on the real SmolLM2: the answer's rank at the last prompt token and every
depth equals the model's own final norm and lm_head, applied to the stored residual and to
transformers' `output_hidden_states` of a fresh forward, up to the logits that lie within float
rounding of the answer's (among 49,152 logits a rank in the thousands has neighbours 1e-5 away;
another matmul order, or a batched forward, can swap them); the CLI prints the study and exports
it with the metadata."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import stratascope as ss
from stratascope.cli import cli

pytestmark = pytest.mark.real

CAPITALS = [("France", " Paris"), ("Japan", " Tokyo"), ("Italy", " Rome"), ("Germany", " Berlin"),
            ("Spain", " Madrid"), ("Russia", " Moscow"), ("Egypt", " Cairo"), ("Greece", " Athens"),
            ("Austria", " Vienna"), ("Portugal", " Lisbon"), ("Poland", " Warsaw"), ("Ireland", " Dublin"),
            ("Norway", " Oslo"), ("Sweden", " Stockholm"), ("Finland", " Helsinki"), ("Denmark", " Copenhagen"),
            ("Hungary", " Budapest"), ("Kenya", " Nairobi"), ("Peru", " Lima"), ("Chile", " Santiago"),
            ("Cuba", " Havana"), ("Thailand", " Bangkok"), ("China", " Beijing"), ("India", " New"),
            ("Canada", " Ottawa"), ("Australia", " Canberra"), ("Argentina", " Buenos"), ("Turkey", " Ankara"),
            ("Iran", " Tehran"), ("Belgium", " Brussels")]


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("facts") / "facts.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"The capital of {c} is the city of", "country": c,
                                          "attribute": a}) + "\n" for c, a in CAPITALS))
    out = corpus.with_suffix(".zarr")
    run = ss.capture(model="smollm2", corpus=str(corpus), out=str(out), capture="hidden", progress=False)
    return run


def test_answer_ranks_equal_a_direct_forward(facts):
    from stratascope.models import load_model

    res = facts.lens(target_column="attribute", positions="last", topk=1, progress=False)
    table = res.table
    loaded = load_model("smollm2", device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    ranks = table.pivot(index="prompt", columns="depth", values="rank").to_numpy()
    for p, (country, answer) in enumerate(CAPITALS):
        ids = tok(f"The capital of {country} is the city of", return_tensors="pt")
        a = tok(answer, add_special_tokens=False)["input_ids"][0]
        row = facts.token_slice(p).stop - 1
        stored = torch.from_numpy(facts.ds["hidden"].isel(token=row).values)  # depth, d_model
        with torch.no_grad():
            own = model.lm_head(model.model.norm(stored))  # every stored depth is before the final norm
            hs = model(**ids, output_hidden_states=True).hidden_states
            L = len(hs) - 1
            fresh = torch.stack([model.lm_head(model.model.norm(hs[d][0, -1])) for d in range(L)]
                                + [model.lm_head(hs[L][0, -1])])
        for logits, tol in ((own, 1e-4), (fresh, 2e-3)):
            expected = (1 + (logits > logits[:, a, None]).sum(-1)).numpy()
            gap = (logits - logits[:, a, None]).abs()
            gap[:, a] = np.inf
            ties = (gap < tol).sum(-1).numpy()  # entries whose order against the answer is float rounding
            assert (np.abs(ranks[p] - expected) <= ties).all(), (answer, ranks[p], expected, ties)
        assert ranks[p][-1] == expected[-1] or ties[-1] > 0
    assert (ranks[:, -1] <= 10).mean() > 0.5  # the model knows most capitals at the output


def test_cli_study_and_export(facts, tmp_path):
    out = CliRunner().invoke(cli, ["lens", facts.path, "--target-column", "attribute", "--positions", "last",
                                   "--topk", "1"])
    assert out.exit_code == 0, out.output
    assert "median rank by depth" in out.output
    path = tmp_path / "facts.parquet"
    assert CliRunner().invoke(cli, ["export", facts.path, "lens", "-o", str(path)]).exit_code == 0
    frame = pd.read_parquet(path)
    assert len(frame) == len(CAPITALS) * 31 and {"country", "attribute", "target_rank", "target_token"} <= set(frame)
