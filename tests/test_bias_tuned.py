"""The bias probe through the tuned lens, against an independent computation: the stored
hidden states and translators read with zarr, then the tiny model's own final norm and lm_head
(transformers), log_softmax and ranks by counting."""

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from click.testing import CliRunner

import stratascope as ss
from conftest import load_reference
from stratascope.analyze.results import result_groups
from stratascope.cli import cli
from stratascope.errors import ConfigError

PAIRS = [" was/ the", " said/ that"]
TEMPLATES = ["The {occupation} said that", "{A} {occupation} is", "The {occupation} was late because"]
OCCUPATIONS = pd.DataFrame({"occupation": ["nurse", "doctor", "engineer", "fox", "cabinet", "airport"],
                            "pct_women": [88.0, 38.0, 11.0, 50.0, 62.0, 45.0]})


@pytest.fixture(scope="module")
def tuned_bias(tiny_model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("bias_tuned") / "llama.zarr"
    logit = ss.bias_probe(model=str(tiny_model_dirs["llama"]), out=str(out), occupations=OCCUPATIONS,
                          templates=TEMPLATES, pairs=PAIRS, device="cpu", progress=False)
    run = ss.open_run(str(out))
    run.tuned_lens(steps=40, lr=0.05, batch_size=64, holdout=0.25, seed=0, progress=False)
    tuned = run.bias(pairs=PAIRS, lens="tuned", device="cpu", progress=False)
    return run, logit, tuned, load_reference(tiny_model_dirs["llama"])


def test_tuned_table_equals_translators_then_model_head(tuned_bias):
    run, logit, tuned, (model, tok) = tuned_bias
    g = zarr.open_group(run.path, mode="r")
    [group] = result_groups(run, "tuned_lens")
    W, B = g[f"{group}/weight"][:].astype(np.float64), g[f"{group}/bias"][:].astype(np.float64)
    have = [int(d) for d in g[f"{group}/depth"][:]]
    hidden = g["hidden"]
    offset, n_tok = g["token_offset"][:], g["n_tokens"][:]
    L = hidden.shape[1] - 1
    assert have[:L] == list(range(L))  # the output depth (if listed) is the identity
    W, B = W[:L], B[:L]
    table = tuned.table.set_index(["prompt", "pair", "depth"]).sort_index()
    ids = {p: [tok(w, add_special_tokens=False)["input_ids"][0] for w in p.split("/")] for p in PAIRS}
    for prompt in sorted(set(tuned.table["prompt"])):
        h = hidden[int(offset[prompt] + n_tok[prompt] - 1)].astype(np.float64)  # (depth, d): the last prompt token
        h[:L] = h[:L] + np.einsum("kij,kj->ki", W, h[:L]) + B
        with torch.no_grad():
            z = model.lm_head(model.model.norm(torch.from_numpy(h).float())).double()
        logp = torch.log_softmax(z, -1)
        for pair, (f, m) in ids.items():
            got = table.loc[(prompt, pair)]
            np.testing.assert_allclose(got["log_ratio"], (logp[:, f] - logp[:, m]).numpy(), atol=5e-5)
            for col, w in (("rank_female", f), ("rank_male", m)):
                np.testing.assert_array_equal(got[col].to_numpy(), (1 + (z > z[:, w:w + 1]).sum(-1)).numpy())


def test_logit_and_tuned_results_are_kept_apart(tuned_bias):
    run, logit, tuned, _ = tuned_bias
    assert logit.lens == "logit" and tuned.lens == "tuned"
    assert "lens" not in logit.ds.attrs["params"]  # the default stays the logit lens: stored results still match
    assert tuned.ds.attrs["params"]["lens"]["kind"] == "tuned"
    assert len(result_groups(run, "bias")) == 2
    a = logit.table.sort_values(["prompt", "pair", "depth"])
    b = tuned.table.sort_values(["prompt", "pair", "depth"])
    below = a["depth"].to_numpy() < a["depth"].max()
    assert not np.allclose(a["log_ratio"].to_numpy()[below], b["log_ratio"].to_numpy()[below], atol=1e-3)
    # the output depth is read out the same by both lenses
    np.testing.assert_allclose(a["log_ratio"].to_numpy()[~below], b["log_ratio"].to_numpy()[~below], atol=1e-5)
    # asked again, each lens gets its own stored result back
    again = run.bias(pairs=PAIRS, device="cpu", progress=False)
    np.testing.assert_array_equal(again.table["log_ratio"], logit.table["log_ratio"])
    assert run.bias(pairs=PAIRS, lens="tuned", progress=False).ds.attrs["params"] == tuned.ds.attrs["params"]
    assert tuned.summary()[0].startswith("bias probe (tuned lens):") and logit.summary()[0].startswith("bias probe:")


def test_cli_probe_bias_lens(tuned_bias):
    run, _, tuned, _ = tuned_bias
    res = CliRunner().invoke(cli, ["probe", "bias", "--run", run.path, "--pairs", PAIRS[0], "--pairs", PAIRS[1],
                                   "--lens", "tuned", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("bias probe (tuned lens):")
    h = tuned.headline()
    assert f"Spearman rho = {h['spearman_rho']:+.3f}" in res.output
    bad = CliRunner().invoke(cli, ["probe", "bias", "--run", run.path, "--lens", "tunned"])
    assert bad.exit_code == 1 and "is not logit, tuned or tuned:RUN" in bad.output
    dla = CliRunner().invoke(cli, ["probe", "bias", "--run", run.path, "--lens", "tuned", "--dla"])
    assert dla.exit_code == 1 and "--dla decomposes the logit lens" in dla.output


def test_bias_probe_refuses_a_bad_lens_before_capturing(tiny_model_dirs, tmp_path):
    out = tmp_path / "never.zarr"
    with pytest.raises(ConfigError, match="tuned:RUN"):
        ss.bias_probe(model=str(tiny_model_dirs["llama"]), out=str(out), occupations=OCCUPATIONS,
                      templates=TEMPLATES, pairs=PAIRS, device="cpu", progress=False, lens="tuned:")
    assert not out.exists()


def test_bias_view_names_the_lens_of_the_newest_probe(tuned_bias):
    from stratascope.viewer import data

    run, _, tuned, _ = tuned_bias
    d = data.bias(run, PAIRS[0])
    assert d["lens"] == "tuned"  # the tuned probe is the newest result
    t = tuned.table[tuned.table["pair"] == PAIRS[0]]
    want = t.groupby(["occupation", "depth"])["log_ratio"].mean().unstack()
    np.testing.assert_allclose(d["means"], want.loc[d["occupations"]].to_numpy(), atol=1e-4)
