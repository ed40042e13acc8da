"""Real SmolLM2 on the built-in occupation corpus: probing the stereotyped gender of the occupation."""

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import stratascope as ss
from stratascope.analyze.bias_corpus import TEMPLATES, builtin_occupations, occupation_prompts
from stratascope.cli import cli


def occupation_corpus() -> pd.DataFrame:
    """Six templates x 60 occupations, gender = female where the BLS share of women is >= 50%."""
    frame = occupation_prompts(builtin_occupations(), list(TEMPLATES[:6]))
    frame["gender"] = np.where(frame["bls_pct_female"] >= 50, "female", "male")
    return frame


@pytest.mark.real
def test_occupation_gender_probe_smollm2(tmp_path):
    corpus = occupation_corpus()
    path = tmp_path / "occ.jsonl"
    corpus.to_json(path, orient="records", lines=True)
    out = str(tmp_path / "occ.zarr")
    ss.capture(model="smollm2", corpus=str(path), out=out, capture=("hidden",), progress=False)
    result = CliRunner().invoke(cli, ["probe", "linear", out, "--label", "gender", "--at", "last", "--epochs", "100"])
    assert result.exit_code == 0, result.output
    assert "control_accuracy" in result.output and "majority" in result.output

    run = ss.open_run(out)
    res = run.linear_probe("gender", at="last", epochs=100, progress=False)  # the stored result, reused
    s = res.scores
    assert list(s["depth"]) == list(range(31)) and (s["n"] == 6 * 60).all()
    # the labels, computed here from the TSV shipped with the package: BLS share of women >= 50%
    stats = pd.read_csv(ss.__path__[0] + "/data/winogender_occupations_stats.tsv", sep="\t")
    female = (stats["bls_pct_female"] >= 50).mean()
    assert s["majority"].iloc[0] == pytest.approx(max(female, 1 - female), abs=0.08)
    # depth 0 at the last token ("that"/"because") holds only that token's embedding: nothing to read
    assert s["accuracy"].iloc[0] < 0.62
    # later depths know the occupation (seen in training with other templates), hence its gender
    assert s["accuracy"].max() > 0.85
    # a random label per prompt text is not learnable: the control stays near chance
    assert (s["control_accuracy"] < 0.65).all()
    assert np.allclose(s["selectivity"], s["accuracy"] - s["control_accuracy"])
