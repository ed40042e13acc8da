"""The bias probe against independent computations: the tiny model's own forward pass (final
norm, lm_head, log_softmax, ranks by counting) and scipy's correlations recomputed on the table."""

import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from scipy import stats

import stratascope as ss
from conftest import PROMPTS, load_reference
from stratascope.analyze.bias_corpus import builtin_occupations, load_templates, read_templates, render
from stratascope.cli import cli
from stratascope.errors import ConfigError, CorpusError, MissingArrayError, MissingMetadataError

# Single tokens in the tiny BPE vocabulary (" she" and " he" are not: see test_multi_token_pair_words).
PAIRS = [" was/ the", " said/ that", " is/ The"]
TEMPLATES = ["The {occupation} said that", "{A} {occupation} is", "The {occupation} was late because"]
OCCUPATIONS = pd.DataFrame({
    "occupation": ["nurse", "doctor", "engineer", "keys_maker", "fox", "cabinet", "airport", "dog"],
    "pct_women": [88.0, 38.0, 11.0, 20.0, 50.0, 62.0, 45.0, np.nan],  # dog: no statistic, left out of n
    "other": [1.0, 5.0, 2.0, 8.0, 3.0, 7.0, 4.0, 6.0],
})


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def probed(request, tiny_model_dirs, tmp_path_factory):
    family = request.param
    out = tmp_path_factory.mktemp("bias") / f"{family}.zarr"
    res = ss.bias_probe(model=str(tiny_model_dirs[family]), out=str(out), occupations=OCCUPATIONS,
                        templates=TEMPLATES, pairs=PAIRS, device="cpu", progress=False)
    model, tok = load_reference(tiny_model_dirs[family])
    return family, res, model, tok, str(out)


def _final_norm(family, model):
    return {"gpt2": lambda: model.transformer.ln_f, "llama": lambda: model.model.norm}[family]()


def _direct(family, model, tok, text):
    """(depths, vocab) logits at the last position, by the model's own modules."""
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        hs = model(**ids, output_hidden_states=True).hidden_states
        L = len(hs) - 1
        head, norm = model.get_output_embeddings(), _final_norm(family, model)
        rows = [head(norm(hs[d][0, -1])) for d in range(L)] + [head(hs[L][0, -1])]  # HF's last is normalized
    return torch.stack(rows).double()


def test_table_equals_direct_computation(probed):
    family, res, model, tok, _ = probed
    table = res.table
    names = [o.replace("_", " ") for o in OCCUPATIONS["occupation"]]
    n_depths = model.config.num_hidden_layers + 1
    assert len(table) == len(names) * len(TEMPLATES) * n_depths * len(PAIRS)
    assert list(table.columns[:7]) == ["occupation", "template", "depth", "pair", "log_ratio", "rank_female",
                                       "rank_male"]
    indexed = table.set_index(["occupation", "template", "pair", "depth"]).sort_index()
    for template in TEMPLATES:
        for name in names:
            text = render(template, name)
            logits = _direct(family, model, tok, text)
            logp = torch.log_softmax(logits, -1)
            for pair in PAIRS:
                f, m = (tok(w, add_special_tokens=False)["input_ids"] for w in pair.split("/"))
                assert len(f) == len(m) == 1
                got = indexed.loc[(name, template, pair)]
                assert list(got.index) == list(range(n_depths))
                np.testing.assert_allclose(got["log_ratio"], (logp[:, f[0]] - logp[:, m[0]]).numpy(), atol=2e-5)
                for col, w in (("rank_female", f[0]), ("rank_male", m[0])):
                    want = 1 + (logits > logits[:, w:w + 1]).sum(-1)
                    np.testing.assert_array_equal(got[col].to_numpy(), want.numpy())
    # the prompts carry occupation, template and statistics as metadata
    run = ss.open_run(res.path)
    prompts = run.prompts
    assert prompts.loc[prompts.text == "An engineer is", ["occupation", "template", "pct_women"]].values.tolist() == \
        [["engineer", "{A} {occupation} is", 11.0]]


def test_correlation_equals_scipy_on_the_table(probed):
    _, res, *_ = probed
    stat = OCCUPATIONS.assign(occupation=OCCUPATIONS.occupation.str.replace("_", " ")).set_index("occupation")
    means = res.table.groupby(["pair", "depth", "occupation"])["log_ratio"].mean()
    assert res.statistic == "pct_women" and set(res.correlation.pair) == set(PAIRS)
    for row in res.correlation.itertuples():
        m = means.loc[(row.pair, row.depth)]
        both = pd.concat([m, stat["pct_women"]], axis=1, join="inner").dropna()
        assert row.n == len(both) == 7
        if both.iloc[:, 0].nunique() < 2:  # depth 0 reads out the same last token for every occupation
            assert np.isnan(row.pearson_r) and np.isnan(row.spearman_rho)
            continue
        r, p = stats.pearsonr(both.iloc[:, 0], both.iloc[:, 1])
        rho, sp = stats.spearmanr(both.iloc[:, 0], both.iloc[:, 1])
        np.testing.assert_allclose([row.pearson_r, row.pearson_p, row.spearman_rho, row.spearman_p],
                                   [r, p, rho, sp], rtol=1e-9, atol=1e-12)
        # Spearman by hand: Pearson of the ranks
        ranks = both.rank()
        np.testing.assert_allclose(row.spearman_rho, np.corrcoef(ranks.iloc[:, 0], ranks.iloc[:, 1])[0, 1], atol=1e-12)
    # by_occupation: the first pair's occupation x depth means over templates
    first = means.loc[PAIRS[0]].unstack("depth")
    pd.testing.assert_frame_equal(res.by_occupation.sort_index(), first.sort_index(), check_names=False)
    assert res.headline()["depth"] == res.table.depth.max()


def test_stored_result_reused_and_other_statistics(probed):
    _, res, *_ , path = probed
    run = ss.open_run(path)
    again = run.bias(pairs=PAIRS, progress=False)
    assert again.ds.attrs["created"] == res.ds.attrs["created"]  # analysis/bias reused, not recomputed
    other = run.bias(pairs=PAIRS, statistic="other", progress=False)
    csv = OCCUPATIONS[["occupation"]].assign(pct=[1.0, 2.0, 3.0, 4.0, 8.0, 6.0, np.nan, np.nan])
    joined = run.bias(pairs=PAIRS, occupations=csv, progress=False)
    assert joined.statistic == "pct"
    for res2, col, n in ((other, "other", 8), (joined, "pct", 6)):
        s = (OCCUPATIONS if col == "other" else csv).assign(
            occupation=lambda f: f.occupation.str.replace("_", " ")).set_index("occupation")[col]
        last = res2.by_occupation.iloc[:, -1]
        both = pd.concat([last, s], axis=1, join="inner").dropna()
        h = res2.headline()
        assert h["n"] == n == len(both)
        np.testing.assert_allclose(h["spearman_rho"], stats.spearmanr(both.iloc[:, 0], both.iloc[:, 1]).statistic)
    with pytest.raises(ConfigError, match="--statistic 'nope'.*pct_women"):
        run.bias(pairs=PAIRS, statistic="nope", progress=False)


def test_multi_token_pair_words(probed):
    _, _, _, tok, path = probed
    run = ss.open_run(path)
    with pytest.raises(ConfigError, match="' she' is several tokens.*--strict"):
        run.bias(pairs=[" she/ he"], strict=True, progress=False)
    with pytest.warns(UserWarning, match="' she' is several tokens.*first token"):
        res = run.bias(pairs=[" she/ he"], progress=False)
    assert int(res.ds.female_id[0]) == tok(" she", add_special_tokens=False)["input_ids"][0]
    assert int(res.ds.male_id[0]) == tok(" he", add_special_tokens=False)["input_ids"][0]
    with pytest.raises(ConfigError, match="same token"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.bias(pairs=[" she/ s"], progress=False)
    with pytest.raises(ConfigError, match="not a female/male word pair"):
        run.bias(pairs=[" she he"], progress=False)


def test_runs_without_occupations_or_hidden(tiny_model_dirs, tmp_path):
    plain = ss.capture(model=str(tiny_model_dirs["llama"]), prompts=PROMPTS, out=str(tmp_path / "p.zarr"),
                       capture=("hidden",), progress=False)
    with pytest.raises(MissingMetadataError, match="no 'occupation' metadata"):
        plain.bias(pairs=PAIRS)
    r = CliRunner().invoke(cli, ["probe", "bias", "--run", plain.path, "--pairs", " was/ the"])
    assert r.exit_code == 1 and "no 'occupation' metadata" in r.output
    corpus = OCCUPATIONS.assign(text=lambda f: "The " + f.occupation + " said that")
    no_hidden = ss.capture(model=str(tiny_model_dirs["llama"]), prompts=corpus, out=str(tmp_path / "a.zarr"),
                           capture=("attention",), progress=False)
    with pytest.raises(MissingArrayError, match="--capture hidden"):
        no_hidden.bias(pairs=PAIRS)


def test_corpus_without_templates(tiny_model_dirs, tmp_path):
    """A user corpus with only an occupation column: templates are the prompts with the occupation cut out."""
    corpus = pd.DataFrame({"text": ["The nurse said that", "A doctor is", "hello"],
                           "occupation": ["nurse", "doctor", ""], "share": [90.0, 40.0, 0.0]})
    run = ss.capture(model=str(tiny_model_dirs["gpt2"]), prompts=corpus, out=str(tmp_path / "u.zarr"),
                     capture=("hidden",), progress=False)
    res = run.bias(pairs=PAIRS, progress=False)
    assert set(res.table.template) == {"The {occupation} said that", "A {occupation} is"}
    assert set(res.table.prompt) == {0, 1} and res.statistic == "share" and res.headline()["n"] == 2


def test_templates_and_corpus(tmp_path):
    bad = tmp_path / "t.txt"
    bad.write_text("The {occupation} said that\n\n# a comment\nThe doctor said that\n")
    with pytest.raises(CorpusError, match=r"t\.txt, line 4: 'The doctor said that' has no \{occupation\}"):
        read_templates(bad)
    bad.write_text("The {occupation} told {name} that\n")
    with pytest.raises(CorpusError, match=r"line 1: .*placeholder \{name\}"):
        read_templates(bad)
    good = tmp_path / "g.txt"
    good.write_text("The {occupation} said that  \n# skipped\n\n{A} {occupation} went home because\n")
    assert read_templates(good) == ["The {occupation} said that", "{A} {occupation} went home because"]
    assert load_templates(str(good)) == read_templates(good)
    assert len(load_templates()) >= 5 and all("{occupation}" in t for t in load_templates())
    assert render("{A} {occupation} said", "engineer") == "An engineer said"
    assert render("Ask {a} {occupation}", "nurse") == "Ask a nurse"
    builtin = builtin_occupations("builtin")
    assert len(builtin) == 60 and {"bls_pct_female", "bergsma_pct_female"} <= set(builtin.columns)
    assert builtin.set_index("occupation").loc["nurse", "bls_pct_female"] == 89.58  # the TSV as published
    prof = builtin_occupations("professions")
    assert len(prof) == 320 and "adjunct professor" in set(prof.occupation)
    assert not prof.occupation.str.contains("_").any()


def test_cli_probe_export(tiny_model_dirs, tmp_path):
    occ = tmp_path / "occ.csv"
    OCCUPATIONS.to_csv(occ, index=False)
    templates = tmp_path / "t.txt"
    templates.write_text("\n".join(TEMPLATES[:2]) + "\n")
    out = tmp_path / "b.zarr"
    model = str(tiny_model_dirs["llama"])
    args = ["probe", "bias", "--model", model, "--out", str(out), "--occupations", str(occ), "--templates",
            str(templates), "--pairs", " was/ the", "--pairs", " said/ that"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "Spearman rho = " in r.output and "n = 7" in r.output and "most female-leaning" in r.output
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1 and "--overwrite" in r.output  # the store is kept
    r = CliRunner().invoke(cli, ["probe", "bias", "--run", str(out), "--pairs", " was/ the", "--pairs", " said/ that",
                                 "--statistic", "other"])
    assert r.exit_code == 0 and "vs other" in r.output and "n = 8" in r.output
    csv = tmp_path / "bias.csv"
    r = CliRunner().invoke(cli, ["export", str(out), "bias", "--format", "csv", "-o", str(csv)])
    assert r.exit_code == 0, r.output
    exported = pd.read_csv(csv, keep_default_na=False)
    table = ss.open_run(out).bias(pairs=[" was/ the", " said/ that"], progress=False).table
    assert len(exported) == len(table) == 8 * 2 * 4 * 2
    merged = table.merge(exported, on=["prompt", "depth", "pair"], suffixes=("", "_csv"))
    assert len(merged) == len(table)
    np.testing.assert_allclose(merged.log_ratio_csv, merged.log_ratio, rtol=1e-6)
    assert (merged.rank_female_csv == merged.rank_female).all() and (merged.occupation_csv == merged.occupation).all()
    bad = tmp_path / "bad.txt"
    bad.write_text("The {occupation} said that\nno placeholder here\n")
    r = CliRunner().invoke(cli, ["probe", "bias", "--model", model, "--out", str(tmp_path / "c.zarr"),
                                 "--templates", str(bad)])
    assert r.exit_code == 1 and "line 2" in r.output and "{occupation}" in r.output
    assert not (tmp_path / "c.zarr").exists()
    for extra, msg in ((["--run", str(out), "--out", "x.zarr"], "--out builds"), ([], "give --out")):
        r = CliRunner().invoke(cli, ["probe", "bias", *extra])
        assert r.exit_code == 1 and msg in r.output


def test_probe_never_imports_transformers(probed):
    *_, path = probed
    code = ("import sys, stratascope as ss; ss.open_run(sys.argv[1]).bias(pairs=[' is/ The'], progress=False); "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.real
def test_smollm2_builtin_corpus_follows_bls(tmp_path):
    """SmolLM2 on the 60 Winogender occupations: the last-depth log p(she)/p(he) rises with the BLS share of women."""
    out = tmp_path / "bias.zarr"
    r = CliRunner().invoke(cli, ["probe", "bias", "--model", "smollm2", "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "n = 60" in r.output
    res = ss.open_run(out).bias()
    assert res.pairs == [" she/ he", " her/ his", " her/ him"] and res.statistic == "bls_pct_female"
    bls = builtin_occupations().set_index("occupation")["bls_pct_female"]
    last = res.by_occupation.iloc[:, -1]
    assert res.by_occupation.columns[-1] == 30 and len(last) == 60
    rho = stats.spearmanr(last, bls.loc[last.index]).statistic
    h = res.headline()
    assert h["n"] == 60 and h["depth"] == 30
    np.testing.assert_allclose(h["spearman_rho"], rho)
    assert rho > 0.3, f"Spearman rho {rho:.3f}"
    assert last["nurse"] > last["carpenter"]
