"""Every view in headless chromium (Debian's package, driven by Playwright), in the report and the
app: expected elements and counts against the raw arrays, interactions, no console errors, no
script from store text ever running, and a screenshot per view in test-artifacts/."""

from __future__ import annotations

import re
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from stratascope.viewer import data
from viewer_fixtures import (
    BIAS_OCCUPATIONS,
    BIAS_PAIRS,
    INVISIBLE,
    PROBE_LABELS,
    WATCH,
    XSS_ALERT,
    XSS_ALERT2,
    XSS_IMG,
    XSS_SCRIPT,
    lens_result,
    lens_store,
    only_result,
    probe_app,
    probe_store,
    viewer_app,
    viewer_store,
)

pytestmark = pytest.mark.browser
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
VIEWS = ("tokens", "head", "model", "layer_predictions", "rankings", "rankings_watch", "saliency", "neuron",
         "heads_map", "nmf")


def label(s: str) -> str:
    """The label a view shows for a token, from the spec: ␣ ↵ ⇥ ␍, ⟨U+XXXX⟩ for any other control, format,
    surrogate or separator character (Unicode categories Cc Cf Cs Z*), ∅ for the empty token."""
    symbols = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}
    escaped = ("Cc", "Cf", "Cs", "Zs", "Zl", "Zp")
    return "".join(symbols.get(c) or (f"⟨U+{ord(c):04X}⟩" if unicodedata.category(c) in escaped else c)
                   for c in s) or "∅"


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM):
        pytest.fail("chromium is missing: apt-get install -y chromium (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def report_url(viewer_store, tmp_path_factory) -> str:
    from click.testing import CliRunner

    from stratascope.cli import cli

    out = tmp_path_factory.mktemp("report") / "report.html"
    res = CliRunner().invoke(cli, ["report", viewer_store.path, "-o", str(out), "--prompts", "0-4"])
    assert res.exit_code == 0, res.output
    return out.as_uri()


@pytest.fixture(params=["report", "app"])
def target(request, report_url, viewer_app) -> tuple[str, str]:
    return request.param, (report_url if request.param == "report" else viewer_app)


@pytest.fixture(scope="module")
def probe_report_url(probe_store, tmp_path_factory) -> str:
    from click.testing import CliRunner

    from stratascope.cli import cli

    out = tmp_path_factory.mktemp("report") / "probes.html"
    res = CliRunner().invoke(cli, ["report", probe_store.path, "-o", str(out), "--views",
                                   "bias,probe,tokens,tuned_lens"])
    assert res.exit_code == 0, res.output
    return out.as_uri()


@pytest.fixture(params=["report", "app"])
def probe_target(request, probe_report_url, probe_app) -> tuple[str, str]:
    return request.param, (probe_report_url if request.param == "report" else probe_app)


class Viewer:
    """A page on one view, collecting console errors; `done` screenshots and checks them."""

    def __init__(self, browser, target, view: str, **state):
        self.kind, base = target
        self.view = view
        self.page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.errors.append("dialog: " + d.message), d.dismiss()))
        frag = "&".join(f"{k}={v}" for k, v in {"view": view, **state}.items())
        self.page.goto(base + "#" + frag)
        self.wait()

    def wait(self):
        self.page.wait_for_selector("#ss-view[data-ready]", timeout=20000)
        assert self.page.get_attribute("#ss-view", "data-ready") == "1", self.page.inner_text("#ss-view")

    def count(self, selector: str) -> int:
        return self.page.evaluate("s => document.querySelectorAll(s).length", selector)

    def text(self) -> str:
        return self.page.evaluate("() => document.getElementById('ss-view').textContent")

    def choose(self, selector: str, value) -> None:
        self.page.select_option(selector, str(value))
        self.wait()

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}_{self.kind}.png"), full_page=True)

    def done(self, shot: str | None = None) -> None:
        if shot:
            self.shot(shot)
        assert self.page.evaluate("window.__pwned") is None
        assert self.count("#ss-view img, #ss-view script, #ss-view iframe") == 0
        assert self.errors == []
        self.page.close()


def lines_expected(att: np.ndarray, heads=None, q=None, keep=None) -> int:
    """Lines the head view should draw: (head, query, key) with weight >= MIN_WEIGHT."""
    mask = att >= data.MIN_WEIGHT  # query, head, key
    if heads is not None:
        mask = mask[:, heads]
    if q is not None:
        mask = mask[q]
    if keep is not None:
        mask = mask & keep
    return int(mask.sum())


def test_tokens_view(browser, target, viewer_store):
    v = Viewer(browser, target, "tokens")
    s = viewer_store
    assert v.count(".ss-prompt") == 5
    for p in range(5):
        assert v.count(f'.ss-prompt[data-prompt="{p}"] .ss-chip') == s.n(p)
    assert v.page.inner_text('.ss-prompt[data-prompt="1"] .ss-text') == XSS_IMG
    assert v.page.inner_text('.ss-prompt[data-prompt="2"] .ss-text') == XSS_SCRIPT
    chips = v.page.eval_on_selector_all('.ss-prompt[data-prompt="0"] .ss-chip', "es => es.map(e => e.textContent)")
    assert chips == [label(t) for t in s.token_str[s.rows(0)]] and chips[1] == "␣quick"
    assert v.page.get_attribute(".ss-current", "data-prompt") == "0"
    v.choose("#ss-prompt", 3)
    assert v.page.get_attribute(".ss-current", "data-prompt") == "3"
    v.done("tokens")


def test_head_view(browser, target, viewer_store):
    s, p = viewer_store, 0
    v = Viewer(browser, target, "head", prompt=p, layer=0)
    att = s.att(p, 0)
    assert v.count(".ss-tok-q") == v.count(".ss-tok-k") == s.n(p)
    assert v.count(".ss-line") == lines_expected(att) > 0
    v.page.hover('.ss-tok-q[data-i="3"]')  # hover filter: only the lines from token 3
    assert v.count(".ss-line") == lines_expected(att, q=3)
    assert set(v.page.eval_on_selector_all(".ss-line", "es => es.map(e => e.dataset.q)")) == {"3"}
    v.page.mouse.move(1, 1)
    assert v.count(".ss-line") == lines_expected(att)
    v.page.click('.ss-head-toggle[data-head="0"]')  # head toggle
    assert v.count(".ss-line") == lines_expected(att, heads=[1, 2, 3])
    seg = s.segments[s.rows(p)]  # sentence B -> A only (causal: A never sees B)
    v.choose(".ss-segment", "BA")
    keep = (seg[:, None, None] == 1) & (seg[None, None, :] == 0)
    assert v.count(".ss-line") == lines_expected(att, heads=[1, 2, 3], keep=keep) > 0
    v.choose(".ss-layer", 2)  # layer selector: redrawn from layer 2, head 0 stays hidden
    assert v.count(".ss-line") == lines_expected(s.att(p, 2), heads=[1, 2, 3])
    assert v.page.get_attribute('.ss-head-toggle[data-head="0"]', "aria-pressed") == "false"
    v.done("head")


def test_head_view_long_prompt_scrolls(browser, target, viewer_store):
    v = Viewer(browser, target, "head", prompt=4, layer=1)
    assert v.count(".ss-tok-q") == viewer_store.n(4) == 100
    box = v.page.evaluate("() => { const e = document.querySelector('.ss-scroll'); "
                          "return [e.clientHeight, e.scrollHeight]; }")
    assert box[1] > box[0]  # the tall drawing scrolls inside its box; rows keep their height
    v.done("head_long")


def test_model_view(browser, target, viewer_store):
    s, p = viewer_store, 3
    v = Viewer(browser, target, "model", prompt=p)
    assert v.count(".ss-thumb") == 3 * 4
    v.page.click('.ss-thumb[data-layer="1"][data-head="2"]')
    assert v.page.get_attribute(".ss-detail", "data-head") == "2"
    assert v.count(".ss-detail .ss-line") == lines_expected(s.att(p, 1), heads=[2])
    assert v.count(".ss-detail .ss-tok-q") == s.n(p)
    v.done("model")


def _plot(v: Viewer, cls: str = ".ss-heat") -> dict:
    return v.page.evaluate("c => { const d = document.querySelector(c).data[0]; return {z: d.z, text: d.text}; }", cls)


def ptext(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def test_layer_predictions_view(browser, target, viewer_store):
    s, p = viewer_store, 1
    rows = s.rows(p)
    v = Viewer(browser, target, "layer_predictions", prompt=p)
    last = s.n(p) - 1
    plot = _plot(v)
    np.testing.assert_allclose(plot["z"], s.topk_probs[rows][last], atol=1e-4)
    shown = v.page.evaluate("() => document.querySelector('.ss-heat').data[0].customdata")
    assert shown == [[ptext(label(str(s.vocab[i]))) for i in d] for d in s.topk_ids[rows][last]]
    assert "<img␣src=x" in v.text()  # the payload shows as text in the chart
    v.choose(".ss-position", 2)
    np.testing.assert_allclose(_plot(v)["z"], s.topk_probs[rows][2], atol=1e-4)
    v.done("layer_predictions")


def test_rankings_view(browser, target, viewer_store):
    s, p = viewer_store, 0
    v = Viewer(browser, target, "rankings", prompt=p)
    ranks = s.target_rank[s.rows(p)].T  # depth, token
    assert (ranks[:, -1] < 0).all()  # the last token has no next token: no column for it
    assert _plot(v)["text"] == [[str(r) for r in row[:-1]] for row in ranks]  # stored 1-based
    v.choose("#ss-prompt", 3)
    assert _plot(v)["text"] == [[str(r) for r in row[:-1]] for row in s.target_rank[s.rows(3)].T]
    v.done("rankings")


def test_rankings_watch_view(browser, target, viewer_store):
    s, p = viewer_store, 3
    v = Viewer(browser, target, "rankings_watch", prompt=p, position=2)
    w = s.watch_rank[s.rows(p)]
    assert _plot(v)["text"] == [[str(r) for r in row] for row in w[2]]
    ticks = v.page.evaluate("() => document.querySelector('.ss-heat').layout.xaxis.ticktext")
    assert ticks == [ptext(label(x)) for x in WATCH]
    assert "<script>window.__pwned=1</script>" in v.text()
    v.choose(".ss-position", 5)
    assert _plot(v)["text"] == [[str(r) for r in row] for row in w[5]]
    v.done("rankings_watch")


@pytest.fixture(scope="module")
def lens_report_url(lens_store, tmp_path_factory) -> str:
    from click.testing import CliRunner

    from stratascope.cli import cli

    out = tmp_path_factory.mktemp("report") / "lens.html"
    res = CliRunner().invoke(cli, ["report", lens_store, "-o", str(out), "--prompts", "0-2", "--views",
                                   "layer_predictions,rankings,tokens"])
    assert res.exit_code == 0, res.output
    return out.as_uri()


@pytest.fixture(scope="module")
def lens_app(lens_store):
    import stratascope as ss
    from stratascope.viewer.app import serve_in_thread

    server, url = serve_in_thread(ss.open_run(lens_store))
    yield url
    server.shutdown()
    server.server_close()


@pytest.fixture(params=["report", "app"])
def lens_target(request, lens_report_url, lens_app) -> tuple[str, str]:
    return request.param, (lens_report_url if request.param == "report" else lens_app)


def test_lens_toggle_switches_the_stored_result(browser, lens_target, lens_store):
    import zarr

    g = zarr.open_group(lens_store, mode="r")
    p = 1
    rows = slice(int(g["token_offset"][p]), int(g["token_offset"][p] + g["n_tokens"][p]))
    stored = {kind: lens_result(lens_store, kind) for kind in ("logit", "tuned")}
    pressed = "() => [...document.querySelectorAll('.ss-lens-toggle')].map(b => [b.dataset.lens, b.ariaPressed])"

    v = Viewer(browser, lens_target, "rankings", prompt=p)
    for i, kind in enumerate(("logit", "tuned", "logit")):  # logit first: the default when both are stored
        if i:
            v.page.click(f".ss-lens-toggle[data-lens={kind}]")
            v.wait()
        assert v.page.evaluate(pressed) == [["logit", str(kind == "logit").lower()],
                                            ["tuned", str(kind == "tuned").lower()]]
        ranks = stored[kind]["target_rank"][rows].T  # depth, token (1-based; -1 on the last token)
        assert _plot(v)["text"] == [[str(r) for r in row[:-1]] for row in ranks]
        if kind == "tuned":
            assert "(tuned lens)" in v.page.evaluate("() => document.querySelector('.ss-heat').layout.title.text")
            v.shot("rankings_tuned")
    v.done()

    v = Viewer(browser, lens_target, "layer_predictions", prompt=p, position=2)
    np.testing.assert_allclose(_plot(v)["z"], stored["logit"]["topk_probs"][rows][2], atol=1e-4)
    v.page.click(".ss-lens-toggle[data-lens=tuned]")
    v.wait()
    np.testing.assert_allclose(_plot(v)["z"], stored["tuned"]["topk_probs"][rows][2], atol=1e-4)
    shown = v.page.evaluate("() => document.querySelector('.ss-heat').data[0].customdata")
    vocab = g["readout/vocab_str"][:]
    assert shown == [[ptext(label(str(vocab[i]))) for i in d] for d in stored["tuned"]["topk_ids"][rows][2]]
    assert "lens=tuned" in v.page.url  # the choice is part of the link
    v.done("layer_predictions_tuned")


def axis_visible(v: Viewer, cls: str) -> None:
    """The chart's x axis (title and tick labels) lies inside the figure, and no box around the chart
    clips it vertically (a chart may scroll sideways, or with the page, but never hide its axis)."""
    got = v.page.evaluate("""c => {
        const gd = document.querySelector(c), fig = gd.getBoundingClientRect();
        const parts = [gd.querySelector('.xtitle')].concat([...gd.querySelectorAll('.xaxislayer-above .xtick text')]);
        const boxes = parts.map(e => e.getBoundingClientRect());
        const clipped = [];
        for (let e = gd.parentElement; e && e !== document.body; e = e.parentElement) {
            const st = getComputedStyle(e);
            if (st.overflowY === 'visible') continue;
            const r = e.getBoundingClientRect();
            if (boxes.some(b => b.top < r.top - 1 || b.bottom > r.top + e.clientHeight + 1)) clipped.push(e.className);
        }
        return {n: parts.length, inside: boxes.every(b => b.top >= fig.top - 1 && b.bottom <= fig.bottom + 1),
                title: parts[0] ? parts[0].textContent : null, clipped: clipped}; }""", cls)
    assert got["title"] and got["n"] > 1 and got["inside"] and got["clipped"] == [], got


def test_rankings_long_prompt_axes_and_labels(browser, target, viewer_store):
    s, p = viewer_store, 4
    v = Viewer(browser, target, "rankings", prompt=p)
    v.page.set_viewport_size({"width": 1280, "height": 520})  # a laptop's short window
    n = s.n(p)
    axis_visible(v, ".ss-heat")
    lay = v.page.evaluate("() => { const gd = document.querySelector('.ss-heat'); return {x: gd.layout.xaxis, "
                          "x2: gd.layout.xaxis2, title: gd.layout.title.text, cb: gd.data[0].colorbar, "
                          "zmax: gd.data[0].zmax}; }")
    labels = [label(t) for t in s.token_str[s.rows(p)]]
    ticks = [ptext(f"{i}: {t}") for i, t in enumerate(labels)]
    assert lay["x"]["ticktext"] == ticks[1:] and lay["x2"]["ticktext"] == ticks[:-1]  # came next; came after
    assert lay["x"]["title"]["text"] == "the token that came next" and "the token that came next" in lay["title"]
    assert "the token that came next" in v.page.inner_text(".ss-rank-caption")
    assert lay["cb"]["title"]["text"] == "rank (1 = top)"
    vocab = len(s.vocab)  # the colour bar spans ranks 1 .. the vocabulary size, on a log scale
    assert lay["zmax"] == pytest.approx(np.log10(vocab)) and lay["cb"]["tickvals"][-1] == pytest.approx(np.log10(vocab))
    assert lay["cb"]["ticktext"][0] == "1" and lay["cb"]["ticktext"][-1] == f"{vocab:,} (vocab)"
    assert np.all(np.diff(lay["cb"]["tickvals"]) >= 0.25)  # ticks far enough apart to read
    shown = v.page.eval_on_selector_all(".ss-heat .colorbar .cbaxis text, .ss-heat .colorbar text",
                                        "es => es.map(e => e.textContent)")
    assert "rank (1 = top)" in shown and f"{vocab:,} (vocab)" in shown
    assert len(_plot(v)["text"][0]) == n - 1
    v.done("rankings_long")


def test_invisible_characters_shown(browser, target, viewer_store):
    """No-break spaces, tabs, control and zero-width characters show as symbols in every token label,
    the same from Python (data.py) and from core.js's twin."""
    from stratascope.viewer.render import token_label

    p = 3
    v = Viewer(browser, target, "tokens", prompt=p)
    chips = v.page.eval_on_selector_all(f'.ss-prompt[data-prompt="{p}"] .ss-chip', "es => es.map(e => e.textContent)")
    assert [chips[i] for i in INVISIBLE] == [shown for _, shown in INVISIBLE.values()]
    samples = [raw for raw, _ in INVISIBLE.values()] + ["", " the", "a\u00a0b", "\u200c\u200d\u2028\u202e", "\u00ad",
                                                       "é你好😀", "\x00\x07\x1f\x7f\x9f", "\u2009\u202f\u205f"]
    assert v.page.evaluate("xs => xs.map(Stratascope.tokenLabel)", samples) == [token_label(x) for x in samples]
    v.shot("tokens_invisible")
    v.page.close()
    v = Viewer(browser, target, "rankings", prompt=p)
    ticks = v.page.evaluate("() => document.querySelector('.ss-heat').layout.xaxis2.ticktext")
    assert [ticks[i] for i in INVISIBLE] == [f"{i}: {shown}" for i, (_, shown) in INVISIBLE.items()]
    v.done("rankings_invisible")
    v = Viewer(browser, target, "head", prompt=p, layer=0)
    left = v.page.eval_on_selector_all(".ss-tok-q", "es => es.map(e => e.firstChild.textContent)")
    assert [left[i] for i in INVISIBLE] == [shown for _, shown in INVISIBLE.values()]
    v.done("head_invisible")


@pytest.fixture
def probe_app_unlisted(probe_store, monkeypatch):
    """The app over the probe store as over a corpus too large to list its prompts in the page."""
    import stratascope as ss
    from stratascope.viewer import app
    from stratascope.viewer.app import serve_in_thread

    monkeypatch.setattr(app, "PROMPT_LIST_MAX", 5)
    server, url = serve_in_thread(ss.open_run(probe_store.path))
    yield "app", url
    server.shutdown()
    server.server_close()


@pytest.fixture(params=["report", "app", "app_unlisted"])
def tokens_target(request, probe_report_url, probe_app):
    if request.param == "app_unlisted":
        return request.getfixturevalue("probe_app_unlisted")
    return request.param, (probe_report_url if request.param == "report" else probe_app)


def test_tokens_metadata_and_filter(browser, tokens_target, probe_store):
    import zarr

    g = zarr.open_group(probe_store.path, mode="r")
    occupation = np.array([str(x) for x in g["meta_occupation"][:]])
    v = Viewer(browser, tokens_target, "tokens")
    listed = (v.page.evaluate("() => (Stratascope.meta.prompt_list || []).map(p => p.index)")
              or list(range(len(occupation))))  # an app too large to list its prompts filters them all
    shown = v.page.eval_on_selector_all('.ss-prompt .ss-meta-item[data-column="occupation"]',
                                        "es => es.map(e => e.textContent)")
    assert shown == [f"occupation: {occupation[i]}" for i in listed[:10]]
    assert v.page.is_visible("#ss-prompt")
    v.choose(".ss-meta-column select, select.ss-meta-column", "occupation")
    v.choose(".ss-meta-value select, select.ss-meta-value", "nurse")
    want = [i for i in listed if occupation[i] == "nurse"]
    got = v.page.eval_on_selector_all(".ss-prompt", "es => es.map(e => +e.dataset.prompt)")
    assert got == want and len(want) >= 1
    options = v.page.eval_on_selector_all("select.ss-meta-value option", "es => es.map(e => e.value)")
    assert sorted(options) == sorted({str(occupation[i]) for i in listed})
    v.done("tokens_metadata")


def test_missing_method_or_view_says_so(browser, target, probe_app):
    v = Viewer(browser, target, "saliency", prompt=0, method="lrp")
    assert v.page.inner_text(".ss-unavailable") == ('Attribution method "lrp" was not captured in this run; it has '
                                                   "grad_x_input, integrated_gradients (capture others with "
                                                   "--capture attribution --attribution NAMES).")
    v.done("saliency_missing_method")
    v = Viewer(browser, ("app", probe_app), "saliency", prompt=0)  # a run without attributions
    assert v.page.inner_text(".ss-unavailable") == ("Saliency cannot be shown: this run has no attribution arrays; "
                                                   "capture with --capture attribution.")
    v.done()


def test_saliency_view(browser, target, viewer_store):
    s, p = viewer_store, 3
    v = Viewer(browser, target, "saliency", prompt=p)
    n = s.n(p)
    assert v.count(".ss-sal-tok") == n
    a = s.attribution["grad_x_input"][s.rows(p), :n].astype(np.float64)
    targets = [r + 1 for r in range(n) if not np.isnan(a[r, 0])]
    assert v.count(".ss-target-ok") == len(targets) == 3  # only attributed predictions can be chosen

    def shown(t):  # the target token t: row t-1 of the stored array over keys 0..t-1, as shares of its sum
        assert v.page.get_attribute(".ss-sal-svg", "data-target") == str(t)
        values = v.page.eval_on_selector_all(".ss-sal-box", "es => es.map(e => e.dataset.value)")
        expect = a[t - 1, :t] / a[t - 1, :t].sum()
        np.testing.assert_allclose([float(x) for x in values[:t]], expect, atol=1.5e-4)
        assert all(x == "" for x in values[t:])

    shown(targets[-1])  # default: the last attributed prediction
    v.page.click(f'.ss-sal-tok[data-i="{targets[0]}"]')  # click: that token's prediction becomes the target
    v.wait()
    shown(targets[0])
    v.page.click('.ss-sal-tok[data-i="1"]')  # not a target: nothing changes
    assert v.page.get_attribute(".ss-sal-svg", "data-target") == str(targets[0])
    v.choose(".ss-method", "integrated_gradients")
    a = s.attribution["integrated_gradients"][s.rows(p), :n].astype(np.float64)
    shown(targets[0])
    assert "completeness gap" in v.text()
    v.done("saliency")


def softmax_rows(q: np.ndarray, k: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    scores = q.astype(np.float64) @ k.astype(np.float64).T * scale
    scores[np.triu(np.ones_like(scores, dtype=bool), 1)] = -np.inf
    w = np.exp(scores - scores.max(1, keepdims=True))
    return scores, w / w.sum(1, keepdims=True)


def test_neuron_view(browser, target, viewer_store):
    s, p, layer, head = viewer_store, 0, 1, 2
    v = Viewer(browser, target, "neuron", prompt=p, layer=layer, head=head)
    n, rows = s.n(p), s.rows(p)
    q, k = s.queries[rows, layer, head], s.keys[rows, layer, head]
    dh = q.shape[1]
    assert v.count(".ss-nv-tok") == n and v.count(".ss-nv-k") == n * dh and v.count(".ss-nv-p") == n * dh
    assert v.count(".ss-nv-q") == dh

    def check(query, q, k, att):
        assert v.page.get_attribute(".ss-nv-svg", "data-query") == str(query)
        scores, w = softmax_rows(q, k, s.qk_scales[layer])
        got = v.page.eval_on_selector_all(".ss-nv-w", "es => es.map(e => +e.dataset.value)")
        np.testing.assert_allclose(got, w[query], atol=1e-3)
        np.testing.assert_allclose(got, att[query], atol=2e-3)  # = the attention the model computed
        sc = v.page.eval_on_selector_all(".ss-nv-score", "es => es.map(e => e.dataset.value)")
        assert all(x == "" for x in sc[query + 1:])  # future keys are masked
        np.testing.assert_allclose([float(x) for x in sc[: query + 1]], scores[query, : query + 1], atol=2e-3)
        fills = v.page.eval_on_selector_all(".ss-nv-q", "es => es.map(e => e.getAttribute('fill'))")
        assert [f.startswith("rgba(230,85,13") for f in fills] == list(q[query] >= 0)  # orange = positive

    check(n - 1, q, k, s.att(p, layer)[:, head])
    v.page.hover('.ss-nv-tok[data-i="2"]')  # hover previews a query
    check(2, q, k, s.att(p, layer)[:, head])
    v.page.click('.ss-nv-tok[data-i="3"]')  # click keeps it
    v.wait()
    check(3, q, k, s.att(p, layer)[:, head])
    v.choose(".ss-head", 0)  # head selector: new q and k, the query stays
    check(3, s.queries[rows, layer, 0], s.keys[rows, layer, 0], s.att(p, layer)[:, 0])
    v.choose(".ss-layer", 2)
    check(3, s.queries[rows, 2, 0], s.keys[rows, 2, 0], s.att(p, 2)[:, 0])
    v.done("neuron")


def test_heads_map_view(browser, target, viewer_store):
    s = viewer_store
    v = Viewer(browser, target, "heads_map")
    assert not v.page.is_visible("#ss-prompt")  # corpus-wide: no prompt picker
    labels = [[str(x) for x in row] for row in s.heads["label"]]
    plot = _plot(v, ".ss-heads-map")
    names = v.page.evaluate("() => document.querySelector('.ss-heads-map').layout.title.text")
    assert "label" in names and np.array(plot["z"]).shape == (3, 4)
    order = v.page.evaluate("() => document.querySelector('.ss-heads-map').data[0].colorbar.ticktext")
    assert [[order[i] for i in row] for row in plot["z"]] == labels
    v.shot("heads_map")
    v.choose(".ss-score", "previous_token")  # score picker
    np.testing.assert_allclose(_plot(v, ".ss-heads-map")["z"], s.heads["previous_token"], atol=1e-4)
    v.choose(".ss-score", "entropy")
    np.testing.assert_allclose(_plot(v, ".ss-heads-map")["z"], s.heads["entropy"], atol=1e-4)
    v.shot("heads_map_entropy")
    # click the cell of layer 2, head 1: the head view opens on layer 2 with only head 1 shown
    xy = v.page.evaluate("""() => { const gd = document.querySelector('.ss-heads-map'), L = gd._fullLayout;
        const r = gd.querySelector('.nsewdrag').getBoundingClientRect();
        return [r.left + L.xaxis.d2p(1), r.top + L.yaxis.d2p(2)]; }""")
    v.page.mouse.click(*xy)
    v.wait()
    assert v.page.get_attribute("#ss-view", "data-view") == "head" and v.page.is_visible("#ss-prompt")
    pressed = v.page.eval_on_selector_all(".ss-head-toggle", "es => es.map(e => e.getAttribute('aria-pressed'))")
    assert pressed == ["false", "true", "false", "false"]
    assert v.page.eval_on_selector(".ss-layer select, select.ss-layer", "e => e.value") == "2"
    assert v.count(".ss-line") == lines_expected(s.att(0, 2), heads=[1])
    v.done("heads_map_clicked")


def test_nmf_view(browser, target, viewer_store):
    s, p = viewer_store, 4
    v = Viewer(browser, target, "nmf", prompt=p)
    w = s.token_factor[s.rows(p)]
    assert v.count(".ss-nmf-tok") == s.n(p) and v.count(".ss-factor") == 3 + 1

    def values():
        return np.array(v.page.eval_on_selector_all(".ss-nmf-box", "es => es.map(e => +e.dataset.value)"))

    np.testing.assert_allclose(values(), w[:, 0], atol=1e-4)
    top = v.page.eval_on_selector_all(".ss-top-row td:nth-child(3)", "es => es.map(e => +e.textContent)")
    valid = np.where(s.prompt_index >= 0, s.token_factor[:, 0], -np.inf)
    order = np.argsort(-valid, kind="stable")[:12]
    assert top == [int(s.prompt_index[r]) for r in order if valid[r] > 0]
    v.page.click('.ss-factor[data-factor="2"]')  # factor picker
    v.wait()
    np.testing.assert_allclose(values(), w[:, 2], atol=1e-4)
    assert v.page.get_attribute('.ss-factor[data-factor="2"]', "aria-pressed") == "true"
    v.page.click('.ss-factor[data-factor="all"]')
    v.wait()
    np.testing.assert_allclose(values(), w.max(1), atol=1e-4)
    assert v.count(".ss-top-row") == 0
    v.done("nmf")


def _trace(v: Viewer, cls: str, meta: str | None = None, key: str = "y") -> list:
    """A plotly chart's trace (the first, or the one whose `meta` is given) values."""
    return v.page.evaluate("([c, m, k]) => { const d = document.querySelector(c).data; "
                           "return (m === null ? d[0] : d.find(t => t.meta === m))[k]; }", [cls, meta, key])


def _bias_means(s, pair: int) -> dict[str, np.ndarray]:
    """Occupation -> mean log-ratio over its prompts at every depth, by numpy on the stored table."""
    return {o: s.log_ratio[s.occupation == o, :, pair].astype(np.float64).mean(0) for o in dict.fromkeys(s.occupation)}


def test_bias_view(browser, probe_target, probe_store):
    from scipy import stats

    s = probe_store
    v = Viewer(browser, probe_target, "bias")
    stat = dict(zip(BIAS_OCCUPATIONS["occupation"], BIAS_OCCUPATIONS["bls_pct_female"]))
    # default rows: by the statistic, highest first, the occupation without one last
    by_stat = sorted(stat, key=lambda o: -stat[o] if np.isfinite(stat[o]) else np.inf)

    def heat(pair: int):
        means = _bias_means(s, pair)
        ticks = v.page.evaluate("() => document.querySelector('.ss-bias-heat').layout.yaxis.ticktext")
        names = [t.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&") for t in ticks]
        np.testing.assert_allclose(_trace(v, ".ss-bias-heat", key="z"), [means[o] for o in names], atol=2e-5)
        return names, means

    def scatter(pair: int, depth: int):
        names, means = heat(pair)
        shown = [o for o in names if np.isfinite(stat[o])]  # dog has no statistic: not a point
        x, y = np.array([stat[o] for o in shown]), np.array([means[o][depth] for o in shown])
        np.testing.assert_allclose(_trace(v, ".ss-bias-scatter", key="x"), x)
        np.testing.assert_allclose(_trace(v, ".ss-bias-scatter"), y, atol=2e-5)
        r, rho = stats.pearsonr(y, x).statistic, stats.spearmanr(y, x).statistic  # scipy on the numpy means
        summary = v.page.inner_text(".ss-bias-summary")
        assert f"Pearson r = {r:.3f}" in summary and f"Spearman ρ = {rho:.3f}" in summary and "n = 7" in summary
        title = v.page.evaluate("() => document.querySelector('.ss-bias-scatter').layout.title.text")
        assert f"r = {r:.3f}" in title and f"depth {depth}" in title
        np.testing.assert_allclose(_trace(v, ".ss-bias-corr", "spearman_rho")[depth], rho, atol=1e-5)
        return names

    assert not v.page.is_visible("#ss-prompt")
    axis_visible(v, ".ss-bias-heat")
    names = scatter(0, 3)  # the last depth by default
    assert names == by_stat and v.count(".ss-pair option") == 2
    assert XSS_ALERT in v.text() and XSS_ALERT2 in v.text()  # occupation names show literally in the chart
    v.shot("bias")
    v.choose(".ss-depth", 2)  # depth picker: the scatter and the correlation follow
    scatter(0, 2)
    v.choose(".ss-pair", BIAS_PAIRS[1])  # pair picker: another table
    assert v.page.eval_on_selector(".ss-pair select, select.ss-pair", "e => e.value") == BIAS_PAIRS[1]
    scatter(1, 2)
    v.choose(".ss-sort", "name")
    assert heat(1)[0] == sorted(stat)
    v.choose(".ss-colour", "centred")  # each depth minus its mean over occupations
    means = _bias_means(s, 1)
    centred = np.array([means[o] for o in sorted(stat)])
    np.testing.assert_allclose(_trace(v, ".ss-bias-heat", key="z"), centred - centred.mean(0), atol=5e-5)
    v.choose(".ss-colour", "raw")
    # click the heatmap's depth-1 column: that depth is picked
    xy = v.page.evaluate("""() => { const gd = document.querySelector('.ss-bias-heat'), L = gd._fullLayout;
        const r = gd.querySelector('.nsewdrag').getBoundingClientRect();
        return [r.left + L.xaxis.d2p(1), r.top + L.yaxis.d2p(0)]; }""")
    v.page.mouse.click(*xy)
    v.wait()
    assert v.page.get_attribute(".ss-bias-summary", "data-depth") == "1"
    scatter(1, 1)
    v.done("bias_pair2")


def test_probe_view(browser, probe_target, probe_store):
    s = probe_store
    v = Viewer(browser, probe_target, "probe")

    def curve(label: str, metric: str):
        p = s.probes[label]
        score = p[metric].astype(np.float64)  # depth, fold
        np.testing.assert_allclose(_trace(v, ".ss-probe-plot", "score"), score.mean(1), atol=1e-4)
        band = np.array(_trace(v, ".ss-probe-plot", "score_hi")) - np.array(_trace(v, ".ss-probe-plot", "score_lo"))
        np.testing.assert_allclose(band, 2 * score.std(1, ddof=1), atol=3e-4)
        np.testing.assert_allclose(_trace(v, ".ss-probe-plot", "control"), p["control_" + metric].mean(1), atol=1e-4)
        baseline = p["majority"].mean() if metric == "accuracy" else 0.0
        np.testing.assert_allclose(_trace(v, ".ss-probe-plot", "baseline"), [baseline] * len(score), atol=1e-4)
        assert _trace(v, ".ss-probe-plot", "score", "x") == list(range(4))

    assert not v.page.is_visible("#ss-prompt")
    ticks = v.page.eval_on_selector_all(".ss-probe-plot .xtick text", "es => es.map(e => e.textContent)")
    assert ticks == ["0", "1", "2", "3"]  # integer depths only
    # the same payload stretched to 31 depths (SmolLM2's): ticks at every 5th depth, as integers
    ticks = v.page.evaluate("""async () => {
        const S = Stratascope, d = await S.get('probe', {label: S.meta.probe_labels[0]});
        const n = 31, f = a => (a ? Array.from({length: n}, (_, i) => a[i % a.length]) : a);
        const e = Object.assign({}, d, {depths: [...Array(n).keys()], score: f(d.score), score_sd: f(d.score_sd),
                                        control: f(d.control), macro_f1: f(d.macro_f1)});
        const body = S.el('div', {id: 'ss-probe31'});
        document.getElementById('ss-root').appendChild(body);
        await S.views.probe.render(body, {meta: S.meta, state: {label: d.label}, get: () => Promise.resolve(e),
                                          set: () => {}, stale: () => false});
        return [...body.querySelectorAll('.xtick text')].map(t => t.textContent); }""")
    assert ticks == [str(d) for d in range(0, 31, 5)]
    v.page.locator("#ss-probe31").screenshot(path=str(ARTIFACTS / f"probe_31_depths_{v.kind}.png"))
    v.page.evaluate("() => document.getElementById('ss-probe31').remove()")
    assert v.page.eval_on_selector("select.ss-label", "e => e.value") == PROBE_LABELS[0]
    curve(PROBE_LABELS[0], "accuracy")
    facts = v.page.inner_text(".ss-probe-facts")
    assert facts.startswith(XSS_ALERT) and f'"{XSS_ALERT2}"' in facts  # label name and class names as text
    assert "2-class" in facts and "24 prompt rows" in facts
    assert XSS_ALERT in v.text()  # the label's name in the chart title, as text
    v.shot("probe")
    v.choose(".ss-label", "bls_pct_female")  # label picker: the regression probe, R²
    curve("bls_pct_female", "r2")
    assert "R²" in v.page.evaluate("() => document.querySelector('.ss-probe-plot').layout.yaxis.title.text")
    assert "21 prompt rows" in v.page.inner_text(".ss-probe-facts")  # dog's 3 prompts have no value
    v.done("probe_regression")


def test_tuned_lens_view(browser, probe_target, probe_store):
    t = probe_store.tuned
    v = Viewer(browser, probe_target, "tuned_lens")
    for metric in ("kl", "cross_entropy"):
        if metric != "kl":
            v.choose(".ss-metric", metric)
        for i, lens in enumerate(("logit", "tuned")):
            np.testing.assert_allclose(_trace(v, ".ss-tuned-plot", lens), t[metric][i], atol=1e-4)
            assert _trace(v, ".ss-tuned-plot", lens, "x") == t["depth"].tolist()
        v.shot(f"tuned_lens_{metric}")
    facts = v.page.inner_text(".ss-tuned-facts")
    assert "30 steps" in facts and "held-out prompts" in facts
    v.done()


@pytest.mark.parametrize("view", VIEWS)
def test_xss_prompt_shows_as_text(browser, target, view):
    for p, needle in ((1, "<img␣src=x"), (2, "<script>window.")):
        v = Viewer(browser, target, view, prompt=p, layer=0)
        if view == "model":
            v.page.click('.ss-thumb[data-layer="0"][data-head="0"]')
        if view == "rankings_watch":
            needle = "<script>window.__pwned=1</script>"
        if view == "heads_map":  # no prompt text in it: the payload as a top token of the NMF view instead
            v.done()
            break
        assert needle in v.text()
        v.done()


def test_save_buttons_write_files(browser, report_url):
    v = Viewer(browser, ("report", report_url), "head", prompt=0, layer=0)
    with v.page.expect_download() as dl:
        v.page.click(".ss-save-svg")
    svg = Path(dl.value.path()).read_text()
    assert dl.value.suggested_filename.endswith(".svg") and svg.startswith("<svg") and "ss-line" in svg
    with v.page.expect_download() as dl:
        v.page.click(".ss-save-png")
    assert Path(dl.value.path()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    v.done()
    v = Viewer(browser, ("report", report_url), "rankings", prompt=0)
    with v.page.expect_download() as dl:
        v.page.click(".ss-save-svg")
    assert re.search(r"<svg", Path(dl.value.path()).read_text()[:500])
    v.done()


@pytest.mark.real
def test_real_smollm2_rankings_view(browser, tmp_path):
    """SmolLM2 through the CLI: capture, `lens`, `report`; the rankings view shows the stored ranks of
    the token that came next at 31 depths, its colour bar spans ranks 1 to 49,152, its axis stays in sight,
    and the no-break space and tab of the prompt show as symbols."""
    from click.testing import CliRunner

    import stratascope as ss
    from stratascope.cli import cli

    store, out, runner = str(tmp_path / "smol.zarr"), tmp_path / "smol.html", CliRunner()
    ss.capture(model="smollm2", prompts=["The Eiffel Tower is in\u00a0Paris,\tthe capital of France"], out=store,
               capture=("hidden",), device="cpu", progress=False)
    for args in (["lens", store, "--device", "cpu"], ["report", store, "-o", str(out), "--views", "rankings,tokens"]):
        res = runner.invoke(cli, args)
        assert res.exit_code == 0, res.output
    ranks = only_result(store, "lens")["target_rank"][:].T  # depth, token (1-based; -1 at the last token)
    v = Viewer(browser, ("report", out.as_uri()), "rankings", prompt=0)
    assert _plot(v)["text"] == [[str(r) for r in row[:-1]] for row in ranks] and len(ranks) == 31
    cb = v.page.evaluate("() => document.querySelector('.ss-heat').data[0].colorbar")
    assert cb["ticktext"] == ["1", "10", "100", "1k", "10k", "49,152 (vocab)"]
    axis_visible(v, ".ss-heat")
    ticks = " ".join(v.page.evaluate("() => document.querySelector('.ss-heat').layout.xaxis.ticktext"))
    assert "⇥" in ticks and "⟨U+00A0⟩" in ticks, ticks
    v.done("real_smollm2_rankings")


@pytest.mark.real
def test_real_smollm2_report_head_view(browser, tmp_path):
    """SmolLM2 end to end: capture attention, `stratascope report` through the CLI, the head view's
    lines equal the captured weights above the threshold."""
    import zarr
    from click.testing import CliRunner

    import stratascope as ss
    from stratascope.cli import cli

    store = str(tmp_path / "smol.zarr")
    ss.capture(model="smollm2", prompts=["The capital of France is", XSS_IMG], out=store, capture=("attention",),
               layers=[0, 5, 29], device="cpu", progress=False)
    out = tmp_path / "smol.html"
    res = CliRunner().invoke(cli, ["report", store, "-o", str(out), "--layers", "5,29"])
    assert res.exit_code == 0 and res.output.strip() == str(out), res.output
    g = zarr.open_group(store, mode="r")
    n = int(g["n_tokens"][0])
    layer_index = list(g["layer"][:]).index(29)
    att = g["attention"][:n, layer_index, :, :n]
    v = Viewer(browser, ("report", out.as_uri()), "head", prompt=0, layer=29)
    assert v.count(".ss-head-toggle") == 9 and v.count(".ss-tok-q") == n
    assert v.count(".ss-line") == lines_expected(att)
    v.done("real_smollm2_head")
    v = Viewer(browser, ("report", out.as_uri()), "model", prompt=1)
    assert v.count(".ss-thumb") == 2 * 9
    v.done()


@pytest.mark.real
def test_real_smollm2_neuron_heads_nmf(browser, tmp_path):
    """SmolLM2 end to end through the CLI: capture attention, qk and mlp, run the heads and nmf jobs,
    `stratascope report`; the neuron view's softmax equals the captured attention (GQA keys, rotary),
    the heads map shows analysis/heads, the NMF view the stored token weights."""
    import json

    import zarr
    from click.testing import CliRunner

    from stratascope.cli import cli

    store = str(tmp_path / "smol.zarr")
    runner = CliRunner()
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in ["The capital of France is", XSS_IMG]))
    res = runner.invoke(cli, ["capture", "--model", "smollm2", "--corpus", str(corpus), "--out", store,
                              "--capture", "attention,qk,mlp", "--layers", "0,5,29", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    for args in (["heads", store], ["nmf", store, "--factors", "4", "--layers", "0,5", "--iterations", "20"]):
        res = runner.invoke(cli, args)
        assert res.exit_code == 0, res.output
    out = tmp_path / "smol.html"
    res = runner.invoke(cli, ["report", store, "-o", str(out), "--views", "neuron,heads_map,nmf,head"])
    assert res.exit_code == 0 and res.stdout.strip() == str(out), res.output  # (the progress bar is on stderr)
    g = zarr.open_group(store, mode="r")
    n = int(g["n_tokens"][0])
    li = list(g["layer"][:]).index(29)
    att = g["attention"][:n, li, :, :n]
    v = Viewer(browser, ("report", out.as_uri()), "neuron", prompt=0, layer=29, head=4)
    assert v.count(".ss-nv-k") == n * 64 and v.count(".ss-nv-tok") == n
    got = v.page.eval_on_selector_all(".ss-nv-w", "es => es.map(e => +e.dataset.value)")
    np.testing.assert_allclose(got, att[n - 1, 4], atol=3e-3)
    v.page.click('.ss-nv-tok[data-i="2"]')
    v.wait()
    got = v.page.eval_on_selector_all(".ss-nv-w", "es => es.map(e => +e.dataset.value)")
    np.testing.assert_allclose(got, att[2, 4], atol=3e-3)
    v.done("real_smollm2_neuron")
    v = Viewer(browser, ("report", out.as_uri()), "heads_map")
    labels = only_result(store, "heads")["label"][:]
    plot = _plot(v, ".ss-heads-map")
    order = v.page.evaluate("() => document.querySelector('.ss-heads-map').data[0].colorbar.ticktext")
    assert [[order[i] for i in row] for row in plot["z"]] == [[str(x) for x in row] for row in labels]
    v.done("real_smollm2_heads_map")
    v = Viewer(browser, ("report", out.as_uri()), "nmf", prompt=0, factor=1)
    w = only_result(store, "nmf")["token_factor"][:n]
    values = v.page.eval_on_selector_all(".ss-nmf-box", "es => es.map(e => +e.dataset.value)")
    np.testing.assert_allclose(values, w[:, 1], atol=1e-4)
    v.done("real_smollm2_nmf")


@pytest.mark.real
def test_real_smollm2_bias_and_probe_views(browser, tmp_path):
    """SmolLM2 end to end through the CLI on 12 occupations x 2 templates: `probe bias` (she/he ...),
    `probe linear` on the share of women, `report`; the heatmap equals the stored table's per-occupation
    means (numpy), the scatter's correlation scipy's, the probe curve the stored folds' mean."""
    import zarr
    from click.testing import CliRunner
    from scipy import stats

    from stratascope.analyze.bias_corpus import builtin_occupations
    from stratascope.cli import cli

    occ = builtin_occupations().head(12)
    csv, templates = tmp_path / "occ.csv", tmp_path / "t.txt"
    occ.to_csv(csv, index=False)
    templates.write_text("The {occupation} said that\n{A} {occupation} is here because\n")
    store, out, runner = str(tmp_path / "smol.zarr"), tmp_path / "smol.html", CliRunner()
    for args in (["probe", "bias", "--model", "smollm2", "--out", store, "--occupations", str(csv), "--templates",
                  str(templates), "--device", "cpu"],
                 ["probe", "linear", store, "--label", "bls_pct_female", "--folds", "3", "--epochs", "20"],
                 ["report", store, "-o", str(out), "--views", "bias,probe"]):
        res = runner.invoke(cli, args)
        assert res.exit_code == 0, res.output
    g = only_result(store, "bias")
    names = np.array([str(o) for o in g["occupation"][:]])
    lr = g["log_ratio"][:, :, 0].astype(np.float64)  # " she/ he"
    v = Viewer(browser, ("report", out.as_uri()), "bias")
    ticks = v.page.evaluate("() => document.querySelector('.ss-bias-heat').layout.yaxis.ticktext")
    assert sorted(ticks) == sorted(occ["occupation"]) and len(_trace(v, ".ss-bias-heat", key="z")[0]) == 31
    np.testing.assert_allclose(_trace(v, ".ss-bias-heat", key="z"), [lr[names == o].mean(0) for o in ticks], atol=2e-5)
    stat = dict(zip(occ["occupation"], occ["bls_pct_female"]))
    y = np.array([lr[names == o, 30].mean() for o in ticks])
    rho = stats.spearmanr(y, [stat[o] for o in ticks]).statistic
    assert f"Spearman ρ = {rho:.3f}" in v.page.inner_text(".ss-bias-summary") and "n = 12" in v.text()
    v.done("real_smollm2_bias")
    v = Viewer(browser, ("report", out.as_uri()), "probe")
    r2 = only_result(store, "probe_bls_pct_female")["r2"][:]
    np.testing.assert_allclose(_trace(v, ".ss-probe-plot", "score"), r2.mean(1), atol=1e-4)
    v.done("real_smollm2_probe")


@pytest.fixture(scope="module")
def similarity_targets(tiny_model_dirs, tmp_path_factory):
    """A tiny llama capture with its depth × depth CKA stored, as a report and in the app."""
    import stratascope as ss
    from stratascope.viewer.app import serve_in_thread
    from viewer_fixtures import VIEWER_PROMPTS

    root = tmp_path_factory.mktemp("viewer-similarity")
    run = ss.capture(model=str(tiny_model_dirs["llama"]), prompts=VIEWER_PROMPTS, out=str(root / "sim.zarr"),
                     capture=("hidden",), device="cpu", progress=False)
    run.similarity(progress=False)
    from click.testing import CliRunner

    from stratascope.cli import cli

    out = root / "sim.html"
    res = CliRunner().invoke(cli, ["report", run.path, "-o", str(out), "--views", "similarity"])
    assert res.exit_code == 0, res.output
    server, url = serve_in_thread(ss.open_run(run.path))
    yield run.path, {"report": out.as_uri(), "app": url}
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("kind", ["report", "app"])
def test_similarity_view(browser, similarity_targets, kind):
    import zarr

    path, urls = similarity_targets
    g = only_result(path, "similarity")
    m = g["similarity"][:]
    v = Viewer(browser, (kind, urls[kind]), "similarity")
    np.testing.assert_allclose(_trace(v, ".ss-sim-heat", key="z"), m, atol=1e-6)
    assert _trace(v, ".ss-sim-heat", key="x") == [0, 1, 2, 3] and _trace(v, ".ss-sim-heat", key="y") == [0, 1, 2, 3]
    i, j = np.unravel_index(np.argmin(m), m.shape)  # the default cell: the least similar pair
    assert (v.page.get_attribute(".ss-sim-cell", "data-a"), v.page.get_attribute(".ss-sim-cell", "data-b")) == \
        (str(i), str(j))
    assert "linear CKA" in v.page.inner_text(".ss-sim-facts") and f"{int(g.attrs['n_rows'])} rows" in v.text()
    v.shot("similarity")
    # click the cell of depth 1 (row) x depth 3 (column): its depths and value, and depth 1's row below
    xy = v.page.evaluate("""() => { const gd = document.querySelector('.ss-sim-heat'), L = gd._fullLayout;
        const r = gd.querySelector('.nsewdrag').getBoundingClientRect();
        return [r.left + L.xaxis.d2p(3), r.top + L.yaxis.d2p(1)]; }""")
    v.page.mouse.click(*xy)
    v.wait()
    text = v.page.inner_text(".ss-sim-cell")
    assert text.startswith("depth 1 of sim.zarr × depth 3 of sim.zarr") and f"linear CKA = {m[1, 3]:.3f}" in text
    np.testing.assert_allclose(_trace(v, ".ss-sim-row", "row"), m[1], atol=1e-6)
    assert "cell=1%2C3" in v.page.url or "cell=1,3" in v.page.url
    v.done("similarity_clicked")


# ---- encoder-decoder runs (a tiny T5): the attention selectors of the head and model views
@pytest.fixture(scope="module")
def seq2seq_store(tiny_model_dirs, tmp_path_factory):
    import stratascope as ss

    rows = [{"text": "The quick brown fox jumps over the lazy dog.", "target": "a fox jumps"},
            {"text": "Heathrow airport is located in the city of London.", "target": "London"}]
    out = tmp_path_factory.mktemp("s2s") / "t5.zarr"
    run = ss.capture(model=str(tiny_model_dirs["t5"]), prompts=rows, out=str(out),
                     target_column="target", capture=["hidden", "attention", "attribution"], device="cpu",
                     progress=False)
    run.lens(topk=5)
    return run


@pytest.fixture(scope="module", params=["report", "app"])
def seq2seq_target(request, seq2seq_store, tmp_path_factory):
    if request.param == "report":
        from click.testing import CliRunner

        from stratascope.cli import cli

        out = tmp_path_factory.mktemp("report") / "t5.html"
        res = CliRunner().invoke(cli, ["report", seq2seq_store.path, "-o", str(out)])
        assert res.exit_code == 0, res.output
        yield "report", out.as_uri()
        return
    import stratascope as ss
    from stratascope.viewer.app import serve_in_thread

    server, url = serve_in_thread(ss.open_run(seq2seq_store.path))
    yield "app", url
    server.shutdown()
    server.server_close()


def test_seq2seq_head_view_stacks(browser, seq2seq_target, seq2seq_store):
    import zarr

    root = zarr.open_group(seq2seq_store.path, mode="r")
    p, layer = 1, 2
    lo, n, s = (int(root[a][p]) for a in ("token_offset", "n_tokens", "n_source_tokens"))
    att, cross = root["attention"][lo:lo + n, layer], root["cross_attention"][lo:lo + n, layer]
    tokens = [label(t) for t in root["token_str"][lo:lo + n]]
    expected = {"encoder": (att[:s, :, :s], tokens[:s], tokens[:s]),
                "decoder": (att[s:, :, :n - s], tokens[s:], tokens[s:]),
                "cross": (cross[s:, :, :s], tokens[s:], tokens[:s])}
    v = Viewer(browser, seq2seq_target, "head", prompt=p, layer=layer)
    for stack, (weights, queries, keys) in expected.items():
        v.choose(".ss-stack", stack)
        assert v.page.eval_on_selector_all(".ss-tok-q", "es => es.map(e => e.firstChild.nodeValue)") == queries
        assert v.page.eval_on_selector_all(".ss-tok-k", "es => es.map(e => e.firstChild.nodeValue)") == keys
        assert v.count(".ss-line") == lines_expected(weights) > 0
        v.shot(f"seq2seq_head_{stack}")
    v.page.hover('.ss-tok-k[data-i="0"]')  # cross: only the lines into source token 0
    assert v.count(".ss-line") == int((expected["cross"][0][:, :, 0] >= data.MIN_WEIGHT).sum())
    v.done()


def test_seq2seq_model_view_stacks(browser, seq2seq_target, seq2seq_store):
    import zarr

    root = zarr.open_group(seq2seq_store.path, mode="r")
    p = 0
    lo, n, s = (int(root[a][p]) for a in ("token_offset", "n_tokens", "n_source_tokens"))
    v = Viewer(browser, seq2seq_target, "model", prompt=p, stack="cross")
    assert v.count(".ss-thumb") == 3 * 4
    v.page.click('.ss-thumb[data-layer="1"][data-head="2"]')
    cross = root["cross_attention"][lo + s:lo + n, 1, :, :s]
    assert v.count(".ss-detail .ss-line") == lines_expected(cross, heads=[2]) > 0
    assert (v.count(".ss-detail .ss-tok-q"), v.count(".ss-detail .ss-tok-k")) == (n - s, s)
    v.shot("seq2seq_model_cross")
    v.choose(".ss-stack", "encoder")
    v.page.click('.ss-thumb[data-layer="0"][data-head="1"]')
    assert v.count(".ss-detail .ss-line") == lines_expected(root["attention"][lo:lo + s, 0, :, :s], heads=[1])
    v.done("seq2seq_model_encoder")


def test_seq2seq_saliency_and_lens_views(browser, seq2seq_target, seq2seq_store):
    import zarr

    root = zarr.open_group(seq2seq_store.path, mode="r")
    p = 0
    n, s = (int(root[a][p]) for a in ("n_tokens", "n_source_tokens"))
    v = Viewer(browser, seq2seq_target, "saliency", prompt=p)
    assert v.count(".ss-sal-tok") == n  # source then decoder tokens, shaded together
    assert v.count(".ss-target-ok") == n - s - 1
    v.done("seq2seq_saliency")
    v = Viewer(browser, seq2seq_target, "tokens", prompt=p)
    chips = f'.ss-prompt[data-prompt="{p}"] .ss-chips'
    assert v.count(f"{chips} .ss-chip") == n
    marks = v.page.eval_on_selector_all(f"{chips} > *", "es => es.map(e => e.className)")
    assert marks[0] == marks[s + 1] == "ss-stack-sep" and marks.count("ss-stack-sep") == 2
    v.done("seq2seq_tokens")
    v = Viewer(browser, seq2seq_target, "rankings", prompt=p)
    assert "cannot be shown" not in v.text()
    v.done("seq2seq_rankings")
