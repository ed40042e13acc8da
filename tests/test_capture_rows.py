"""capture --positions / --pool: only the rows a study needs, equal to those rows of a full capture
(same process, same settings) and, independently, to a direct transformers forward."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import stratascope as ss
from conftest import FAMILIES, PROMPTS, load_reference
from stratascope.cli import cli
from stratascope.errors import ConfigError, OutOfRangeError, ResumeMismatchError

ARRAYS = ("hidden", "attention", "mlp")


@pytest.fixture(scope="module", params=FAMILIES)
def full(request, tiny_model_dirs, tmp_path_factory):
    family = request.param
    out = tmp_path_factory.mktemp("rows") / f"{family}.zarr"
    run = ss.capture(model=str(tiny_model_dirs[family]), prompts=PROMPTS, out=str(out), batch_size=4,
                     device="cpu", progress=False)
    return family, run


def _capture(run, tmp_path, name, **options):
    return ss.capture(model=run.attrs["model"]["source"], prompts=PROMPTS, out=str(tmp_path / name), batch_size=4,
                      device="cpu", progress=False, **options)


def _full_rows(run, positions_of):
    """Rows of the full capture at positions_of(n) of each prompt, prompt after prompt."""
    off, n = run.ds["token_offset"].values, run.ds["n_tokens"].values
    return np.concatenate([o + np.asarray(positions_of(int(k)), dtype=np.int64) for o, k in zip(off, n)])


@pytest.mark.parametrize("positions, positions_of", [
    ("last", lambda n: [n - 1]),
    ("first", lambda n: [0]),
    ("0,-2", lambda n: sorted({0, n - 2})),
])
def test_selected_rows_equal_the_full_capture_bit_for_bit(full, tmp_path, positions, positions_of):
    family, run = full
    sel = _capture(run, tmp_path, "sel.zarr", positions=positions)
    rows = _full_rows(run, positions_of)
    assert sel.n_tokens == len(rows)
    for name in ARRAYS:
        assert np.array_equal(run.ds[name].values[rows], sel.ds[name].values), name
    for name in ("token_id", "position", "prompt_index", "is_generated", "token_str"):
        assert np.array_equal(run.ds[name].values[rows], sel.ds[name].values), name
    # the token that came next: the full capture's next row in the same prompt, -1 after the last
    full_next = np.where(np.isin(rows + 1, run.ds["token_offset"].values) | (rows + 1 >= run.n_tokens), -1,
                         run.ds["token_id"].values[np.minimum(rows + 1, run.n_tokens - 1)])
    assert np.array_equal(sel.ds["next_token_id"].values, full_next)
    assert np.array_equal(sel.ds["seq_len"].values, run.ds["n_tokens"].values)
    assert sel.attrs["capture"]["positions"] == positions and sel.attrs["capture"]["pool"] is None
    assert sel.attrs["corpus"]["n_tokens"] == run.n_tokens


def test_last_rows_equal_a_direct_forward(full, tmp_path, tiny_model_dirs):
    family, run = full
    sel = _capture(run, tmp_path, "last.zarr", positions="last")
    model, tok = load_reference(tiny_model_dirs[family])
    for p, text in enumerate(PROMPTS):
        ids = tok(text, return_tensors="pt")
        with torch.no_grad():
            out = model(**ids, output_hidden_states=True, output_attentions=True)
        n = ids["input_ids"].shape[1]
        assert int(sel.ds["position"].values[p]) == n - 1
        assert int(sel.ds["token_id"].values[p]) == int(ids["input_ids"][0, -1])
        np.testing.assert_allclose(sel.ds["hidden"].values[p, 0], out.hidden_states[0][0, -1].numpy(),
                                   atol=1e-5, rtol=1e-4)
        att = sel.ds["attention"].values[p]  # layer, head, key
        for layer, ref in enumerate(out.attentions):
            np.testing.assert_allclose(att[layer, :, :n], ref[0, :, -1].numpy(), atol=1e-6)
            assert not att[layer, :, n:].any()


def test_pool_mean_equals_the_mean_of_the_full_rows(full, tmp_path, tiny_model_dirs):
    family, run = full
    pooled = _capture(run, tmp_path, "pool.zarr", capture="hidden,mlp", pool="mean")
    assert pooled.n_tokens == len(PROMPTS)
    off, n = run.ds["token_offset"].values, run.ds["n_tokens"].values
    for name in ("hidden", "mlp"):
        full_values = run.ds[name].values
        mean = np.stack([full_values[o:o + k].astype(np.float64).mean(0) for o, k in zip(off, n)])
        np.testing.assert_allclose(pooled.ds[name].values, mean, rtol=1e-5, atol=1e-6)
    assert np.array_equal(pooled.ds["prompt_index"].values, np.arange(len(PROMPTS)))
    assert (pooled.ds["position"].values == -1).all() and (pooled.ds["next_token_id"].values == -1).all()
    model, tok = load_reference(tiny_model_dirs[family])  # and independently of the capture
    ids = tok(PROMPTS[1], return_tensors="pt")
    with torch.no_grad():
        hs = model(**ids, output_hidden_states=True).hidden_states
    np.testing.assert_allclose(pooled.ds["hidden"].values[1, 1], hs[1][0].numpy().mean(0), atol=1e-5, rtol=1e-4)


def test_refusals_name_the_flag_and_the_fix(tiny_model_dirs, tmp_path):
    model = str(tiny_model_dirs["llama"])
    with pytest.raises(ConfigError, match=r"--pool mean .*--capture attention.*--capture hidden,mlp"):
        ss.capture(model=model, prompts=PROMPTS, out=str(tmp_path / "a.zarr"), pool="mean")
    with pytest.raises(ConfigError, match="--pool 'max'"):
        ss.capture(model=model, prompts=PROMPTS, out=str(tmp_path / "a.zarr"), capture="hidden", pool="max")
    with pytest.raises(ConfigError, match="--positions 'lats' is not one of"):
        ss.capture(model=model, prompts=PROMPTS, out=str(tmp_path / "a.zarr"), positions="lats")
    with pytest.raises(ConfigError, match="attribution/grad need every token row"):
        ss.capture(model=model, prompts=PROMPTS, out=str(tmp_path / "a.zarr"), capture="hidden,grad",
                   positions="last")
    with pytest.raises(ConfigError, match="no token label 'pos'"):
        ss.capture(model=model, prompts=PROMPTS, out=str(tmp_path / "a.zarr"), positions="label:pos")
    with pytest.raises(ConfigError, match="selects no token of any prompt"):
        ss.capture(model=model, prompts=PROMPTS, out=str(tmp_path / "a.zarr"), positions="99")
    assert not (tmp_path / "a.zarr").exists()


def test_resume_identity_includes_the_rows(tiny_model_dirs, tmp_path):
    model, out = str(tiny_model_dirs["gpt2"]), str(tmp_path / "r.zarr")
    ss.capture(model=model, prompts=PROMPTS, out=out, capture="hidden", positions="last", progress=False)
    with pytest.raises(ResumeMismatchError, match="--positions was 'last', now 'all'"):
        ss.capture(model=model, prompts=PROMPTS, out=out, capture="hidden", resume=True, progress=False)


def test_label_positions_keep_the_labelled_tokens(tiny_model_dirs, tmp_path):
    records = [{"text": "The cat sat down", "pos": ["DET", "NOUN", None, "ADV"]},
               {"text": "A dog ran", "pos": ["DET", "NOUN", "VERB"]}]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    model = str(tiny_model_dirs["gpt2"])
    full = ss.capture(model=model, corpus=str(corpus), out=str(tmp_path / "f.zarr"), capture="hidden",
                      progress=False)
    sel = ss.capture(model=model, corpus=str(corpus), out=str(tmp_path / "l.zarr"), capture="hidden",
                     positions="label:pos", progress=False)
    labels = np.array([str(v) for v in full.ds["label_pos"].values])
    rows = np.flatnonzero(labels != "")
    assert [str(v) for v in sel.ds["label_pos"].values] == list(labels[rows])
    assert np.array_equal(sel.ds["hidden"].values, full.ds["hidden"].values[rows])
    assert np.array_equal(sel.ds["position"].values, full.ds["position"].values[rows])


def test_dry_run_shows_the_saving(tiny_model_dirs, tmp_path):
    out = tmp_path / "d.zarr"
    r = CliRunner().invoke(cli, ["capture", "--model", str(tiny_model_dirs["llama"]), "--corpus", str(_txt(tmp_path)),
                                 "--out", str(out), "--positions", "last", "--dry-run"])
    assert r.exit_code == 0, r.output
    line = next(li for li in r.output.splitlines() if li.startswith("rows stored"))
    assert f"rows stored {len(PROMPTS)} of" in line and "(--positions last)" in line and "instead of" in line
    plan = ss.capture(model=str(tiny_model_dirs["llama"]), prompts=PROMPTS, out=str(out), positions="last",
                      dry_run=True)
    every = ss.capture(model=str(tiny_model_dirs["llama"]), prompts=PROMPTS, out=str(out), dry_run=True)
    assert plan.full_bytes == every.total_bytes() > plan.total_bytes()
    assert not out.exists()


def _txt(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def test_analyses_on_selected_rows(tiny_model_dirs, tmp_path):
    """The lens (every row and a study), probes and heads read a --positions last store as they read
    those rows of a full one; whole-prompt views refuse in one sentence."""
    model = str(tiny_model_dirs["llama"])
    prompts = [{"text": t, "kind": i % 2} for i, t in enumerate(PROMPTS * 2)]
    full = ss.capture(model=model, prompts=prompts, out=str(tmp_path / "f.zarr"), progress=False)
    last = ss.capture(model=model, prompts=prompts, out=str(tmp_path / "l.zarr"), positions="last", progress=False)
    rows = _full_rows(full, lambda n: [n - 1])
    lens_full, lens_last = full.lens(progress=False).ds, last.lens(progress=False).ds
    for name in ("topk_ids", "target_rank", "entropy"):
        assert np.array_equal(lens_full[name].values[rows], lens_last[name].values), name
    assert (lens_last["target_id"].values == -1).all()  # the last token has no next one
    study_f = full.lens(positions="last", target=" the", progress=False).ds
    study_l = last.lens(positions="last", target=" the", progress=False).ds
    assert np.array_equal(study_f["target_rank"].values, study_l["target_rank"].values)
    assert np.array_equal(study_f["position"].values, study_l["position"].values)
    with pytest.raises(OutOfRangeError, match="stores only the rows of --positions last"):
        last.lens(positions="first", target=" the", progress=False)
    probe_f = full.linear_probe("kind", at="last", folds=2, progress=False)
    probe_l = last.linear_probe("kind", at="last", folds=2, progress=False)
    np.testing.assert_allclose(probe_f.ds["accuracy"].values, probe_l.ds["accuracy"].values)
    with pytest.raises(ConfigError, match="--at mean averages every token"):
        last.linear_probe("kind", at="mean", folds=2, progress=False)
    heads = last.heads()
    assert (heads["n_rows"] == int((last.ds["position"].values >= 2).sum())).all()
    with pytest.raises(ConfigError, match="needs every position of each prompt.*--positions last"):
        last.attention(0, 0, 0)
    with pytest.raises(ConfigError, match="needs every position"):
        last.similarity()
    from stratascope.viewer.registry import meta

    views = {v["name"]: v for v in meta(last)["views"]}
    assert not views["head"]["available"] and "--positions last" in views["head"]["reason"]
    assert views["heads_map"]["available"]  # corpus-wide: it reads the stored rows


@pytest.mark.real
def test_smollm2_last_and_mean_rows(tmp_path):
    """SmolLM2 on the demo prompts: --positions last is the full capture's last rows bit for bit and a
    direct forward's last hidden state; --pool mean the mean of the full rows."""
    from stratascope.models import load_model
    from stratascope.workflows.demo import demo_corpus

    opts = dict(model="smollm2", corpus=demo_corpus(), capture="hidden,mlp", device="cpu", progress=False)
    full = ss.capture(out=str(tmp_path / "full.zarr"), **opts)
    last = ss.capture(out=str(tmp_path / "last.zarr"), positions="last", **opts)
    pooled = ss.capture(out=str(tmp_path / "pool.zarr"), pool="mean", **opts)
    off, n = full.ds["token_offset"].values, full.ds["n_tokens"].values
    rows = off + n - 1
    for name in ("hidden", "mlp"):
        assert np.array_equal(full.ds[name].values[rows], last.ds[name].values), name
        values = full.ds[name].values
        mean = np.stack([values[o:o + k].astype(np.float64).mean(0) for o, k in zip(off, n)])
        np.testing.assert_allclose(pooled.ds[name].values, mean, rtol=1e-5, atol=1e-5)
    loaded = load_model("smollm2", device="cpu")
    text = full.prompts["text"][0]
    ids = loaded.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        hs = loaded.model(**ids, output_hidden_states=True).hidden_states
    for depth in (0, 12, 29):
        np.testing.assert_allclose(last.ds["hidden"].values[0, depth], hs[depth][0, -1].numpy(), atol=1e-4,
                                   rtol=1e-4)
    assert last.ds["position"].values[0] == ids["input_ids"].shape[1] - 1
    assert last.attrs["corpus"]["n_tokens"] == full.n_tokens and last.n_tokens == full.n_prompts


def test_dla_on_selected_rows(tiny_model_dirs, tmp_path):
    """Direct logit attribution of each prompt's last token: a --positions last store gives what a full one gives."""
    model = str(tiny_model_dirs["llama"])
    opts = dict(model=model, prompts=PROMPTS, capture="hidden,components", progress=False)
    full = ss.capture(out=str(tmp_path / "f.zarr"), **opts)
    last = ss.capture(out=str(tmp_path / "l.zarr"), positions="last", **opts)
    a = full.dla(target="top", progress=False).ds
    b = last.dla(target="top", progress=False).ds
    assert np.array_equal(a["target_id"].values, b["target_id"].values)
    np.testing.assert_allclose(a["by_component"].values, b["by_component"].values, rtol=1e-6, atol=1e-6)
    assert np.array_equal(a["position"].values, b["position"].values)


def test_positions_with_generated_tokens(tiny_model_dirs, tmp_path):
    """With --generate, last is each prompt's last prompt token and -1 its last generated one."""
    opts = dict(model=str(tiny_model_dirs["gpt2"]), prompts=PROMPTS, capture="hidden", generate=3, progress=False)
    full = ss.capture(out=str(tmp_path / "f.zarr"), **opts)
    last = ss.capture(out=str(tmp_path / "l.zarr"), positions="last", **opts)
    end = ss.capture(out=str(tmp_path / "e.zarr"), positions="-1", **opts)
    off, n = full.ds["token_offset"].values, full.ds["n_tokens"].values
    for sel, rows in ((last, off + n - 4), (end, off + n - 1)):
        for name in ("hidden", "token_id", "position", "is_generated"):
            assert np.array_equal(full.ds[name].values[rows], sel.ds[name].values), name
    assert not last.ds["is_generated"].values.any() and end.ds["is_generated"].values.all()
    assert np.array_equal(last.ds["next_token_id"].values, full.ds["token_id"].values[off + n - 3])
