"""probe bias --dla: per-head and per-layer pushes recomputed here from the test model's own sublayers
(hooked), averaged with pandas and correlated with scipy."""

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from scipy import stats
from test_bias import OCCUPATIONS, TEMPLATES
from test_dla import _forward, _reference

import stratascope as ss
from conftest import load_reference
from stratascope.cli import cli
from stratascope.errors import MissingArrayError

PAIR = " was/ the"


@pytest.fixture(scope="module")
def probed(tiny_model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("bias_dla") / "llama.zarr"
    ss.bias_probe(model=str(tiny_model_dirs["llama"]), out=str(out), occupations=OCCUPATIONS, templates=TEMPLATES,
                  pairs=[PAIR], device="cpu", progress=False, dla=True)
    run = ss.open_run(str(out))
    model, tok = load_reference(tiny_model_dirs["llama"], attn="sdpa")
    return run, model, tok


def test_pushes_and_correlations_equal_independent_computation(probed):
    run, model, tok = probed
    res = run.bias_dla(pair=PAIR, statistic="pct_women", progress=False)
    female, male = (tok(w, add_special_tokens=False)["input_ids"][0] for w in PAIR.split("/"))
    rows = []
    for text, occupation in zip(run.prompts["text"], run.prompts["occupation"]):
        got = _forward("llama", model, tok, text)
        contrib, heads, _ = _reference("llama", model, got, -1, female, male)
        logp = torch.log_softmax(got["logits"][-1], -1)
        rows.append({"occupation": occupation, "log_ratio": float(logp[female] - logp[male]),
                     **{f"mlp.{l}": float(contrib[1 + 3 + l]) for l in range(3)},
                     **{(l, h): float(heads[l, h]) for l in range(3) for h in range(4)}})
    means = pd.DataFrame(rows).groupby("occupation", sort=False).mean()
    stat = OCCUPATIONS.assign(occupation=OCCUPATIONS["occupation"].str.replace("_", " ")).set_index("occupation")
    both = means.join(stat["pct_women"]).dropna()
    heads = res.heads
    for l in range(3):
        for h in range(4):
            rho = stats.spearmanr(both[(l, h)], both["pct_women"]).statistic
            np.testing.assert_allclose(heads.loc[(l, h), "spearman_rho"], rho, atol=1e-6)
            np.testing.assert_allclose(heads.loc[(l, h), "mean"], means[(l, h)].mean(), atol=1e-4)
    comps = res.components
    for l in range(3):
        r = stats.pearsonr(both[f"mlp.{l}"], both["pct_women"]).statistic
        np.testing.assert_allclose(comps.loc[f"mlp.{l}", "pearson_r"], r, atol=1e-5)
    rho = stats.spearmanr(both["log_ratio"], both["pct_women"]).statistic
    np.testing.assert_allclose(float(res.ds["log_ratio_spearman_rho"]), rho, atol=1e-6)
    assert int(res.ds["head_n"][0, 0]) == len(both) == 7  # the occupation without a statistic is left out
    assert len(res.top(3)) == 3


def test_cli_probe_bias_dla(probed, tiny_model_dirs, tmp_path):
    run, _, _ = probed
    out = CliRunner().invoke(cli, ["probe", "bias", "--run", run.path, "--pairs", PAIR, "--statistic", "pct_women",
                                   "--dla"])
    assert out.exit_code == 0, out.output
    assert "heads whose push follows pct_women most" in out.output
    plain = ss.bias_probe(model=str(tiny_model_dirs["llama"]), out=str(tmp_path / "p.zarr"), occupations=OCCUPATIONS,
                          templates=TEMPLATES[:1], pairs=[PAIR], device="cpu", progress=False)
    with pytest.raises(MissingArrayError, match="--capture z"):
        ss.open_run(plain.path).bias_dla(pair=PAIR)
