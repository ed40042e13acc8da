"""The lens views' logit/tuned toggle, data side: each lens's payload holds that stored result's
values (read with zarr directly), the report embeds both, and a run without a tuned lens result
has no toggle and says how to compute one."""

import json
import re

import numpy as np
import pytest
import zarr

import stratascope as ss
from stratascope.errors import MissingArrayError, OutOfRangeError
from stratascope.viewer import data, registry
from stratascope.viewer.render import token_label
from stratascope.viewer.report import build_report
from viewer_fixtures import LENS_WATCH, lens_result, lens_store, viewer_store


def test_each_lens_payload_is_its_stored_result(lens_store):
    run = ss.open_run(lens_store)
    assert data.lens_kinds(run) == ["logit", "tuned"] == registry.meta(run)["lens_kinds"]
    g = zarr.open_group(lens_store, mode="r")
    offsets, lengths = g["token_offset"][:], g["n_tokens"][:]
    vocab = g["readout/vocab_str"][:]
    stored = {kind: lens_result(lens_store, kind) for kind in ("logit", "tuned")}
    for p in (0, 7):
        rows = slice(int(offsets[p]), int(offsets[p] + lengths[p]))
        for kind, res in stored.items():
            d = data.lens(run, p, lens=kind)
            assert d["lens"] == kind
            assert d["topk_labels"] == [[[token_label(str(vocab[i])) for i in k] for k in t]
                                        for t in res["topk_ids"][rows].tolist()]
            np.testing.assert_allclose(d["topk_probs"], res["topk_probs"][rows], atol=1e-4)
            ranks = res["target_rank"][rows].T
            assert d["target_rank"] == np.where(ranks < 0, None, ranks).tolist()
            assert d["watch_rank"] == res["watch_rank"][rows].tolist()
    # the two lenses differ below the output depth, agree at it
    a, b = (stored[k]["target_rank"][:] for k in ("logit", "tuned"))
    assert (a[:, :-1] != b[:, :-1]).mean() > 0.5
    np.testing.assert_array_equal(a[:, -1], b[:, -1])


def test_report_embeds_both_lenses(lens_store):
    run = ss.open_run(lens_store)
    html = build_report(run, prompts="0-1", views="layer_predictions,rankings")
    payload = json.loads(re.search(r'<script type="application/json" id="ss-data">(.*?)</script>', html, re.S)[1])
    for p in (0, 1):
        for kind in ("logit", "tuned"):
            got = payload[data.data_key("lens", {"prompt": p, "lens": kind})]
            want = lens_result(lens_store, kind)["topk_probs"][int(run.ds["token_offset"].values[p])]
            np.testing.assert_allclose(got["topk_probs"][0], want, atol=1e-4)


def test_a_run_without_a_tuned_result(viewer_store):
    run = ss.open_run(viewer_store.path)
    assert data.lens_kinds(run) == ["logit"]
    with pytest.raises(MissingArrayError, match="--lens tuned"):
        data.lens(run, 0, lens="tuned")
    with pytest.raises(OutOfRangeError, match="not one of logit, tuned"):
        data.lens(run, 0, lens="tunned")


def test_notebook_view_starts_on_the_chosen_lens(lens_store):
    page = ss.open_run(lens_store).view.rankings(prompt=1, lens="tuned").html()
    meta = json.loads(re.search(r'<script type="application/json" id="ss-meta">(.*?)</script>', page, re.S)[1])
    assert meta["start"]["lens"] == "tuned" and meta["lens_kinds"] == ["logit", "tuned"]
    payload = json.loads(re.search(r'<script type="application/json" id="ss-data">(.*?)</script>', page, re.S)[1])
    assert sorted(payload) == ["lens?lens=logit&prompt=1", "lens?lens=tuned&prompt=1"]
