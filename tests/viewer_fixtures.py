"""A small viewer test store: a tiny llama capture (real attention, queries/keys and MLP activations)
with XSS prompts, the real heads and NMF jobs run on it, plus synthetic lens and attribution results
laid out as the lens job and the attribution capture write them; and an app serving it."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

XSS_IMG = '<img src=x onerror="window.__pwned=1">'
XSS_SCRIPT = "<script>window.__pwned=1</script>"
LONG = ("The keys to the cabinet are on the table and the quick brown fox jumps over the lazy dog "
        "while the nurse said that she was tired. ") * 3
VIEWER_PROMPTS = ["The quick brown fox", XSS_IMG, XSS_SCRIPT, "Heathrow airport is located in the city of", LONG]
WATCH = [" the", XSS_SCRIPT, XSS_IMG, " fox"]
# Tokens of prompt 3 (by position) replaced by invisible characters, and the labels every view must show.
INVISIBLE = {1: ("\u00a0airport", "⟨U+00A0⟩airport"), 2: ("\t\r\n", "⇥␍↵"), 3: ("\u200b\ufeff", "⟨U+200B⟩⟨U+FEFF⟩"),
             4: ("\x85\u3000 x", "⟨U+0085⟩⟨U+3000⟩␣x")}
METHODS = ("grad_x_input", "integrated_gradients")


def only_result(path: str, job: str, mode: str = "r") -> zarr.Group:
    """The one stored result of `job` (analysis/<job>/<name>), opened with zarr directly."""
    names = list(zarr.open_group(path, mode="r", path=f"analysis/{job}", use_consolidated=False).group_keys())
    assert len(names) == 1, f"expected one {job} result, found {names}"
    return zarr.open_group(path, mode=mode, path=f"analysis/{job}/{names[0]}", use_consolidated=False)


class Store:
    """The store's path and raw arrays read with zarr directly (independent of stratascope.viewer.data)."""

    def __init__(self, path: str):
        self.path = path
        g = zarr.open_group(path, mode="r")
        self.offsets, self.lengths = g["token_offset"][:], g["n_tokens"][:]
        self.token_str, self.positions = g["token_str"][:], g["position"][:]
        self.attention = g["attention"][:]  # token, layer, head, key
        self.segments = g["token_type_ids"][:]
        self.vocab = g["readout/vocab_str"][:]
        lens = only_result(path, "lens")
        self.topk_ids, self.topk_probs = lens["topk_ids"][:], lens["topk_probs"][:]
        self.target_rank, self.watch_rank = lens["target_rank"][:], lens["watch_rank"][:]
        self.attribution = {m: g[f"attribution_{m}"][:] for m in METHODS}
        self.queries, self.keys = g["queries"][:], g["keys"][:]  # token, layer, head, d_head
        self.qk_scales = dict(g.attrs)["capture"]["qk"]["scales"]
        heads = only_result(path, "heads")
        self.heads = {name: heads[name][:] for name in ("label", "first_token", "previous_token", "self",
                                                         "entropy_norm", "entropy")}
        self.token_factor = only_result(path, "nmf")["token_factor"][:]
        self.prompt_index = g["prompt_index"][:]

    def rows(self, p: int) -> slice:
        return slice(int(self.offsets[p]), int(self.offsets[p] + self.lengths[p]))

    def n(self, p: int) -> int:
        return int(self.lengths[p])

    def att(self, p: int, layer: int) -> np.ndarray:
        """(query, head, key) of prompt p at a layer, keys cut to the prompt."""
        return self.attention[self.rows(p), layer, :, : self.n(p)]


@pytest.fixture(scope="session")
def viewer_store(tiny_model_dirs, tmp_path_factory) -> Store:
    import stratascope as ss
    from stratascope.viewer import synthetic

    path = str(tmp_path_factory.mktemp("viewer") / "run.zarr")
    ss.capture(model=str(tiny_model_dirs["llama"]), prompts=VIEWER_PROMPTS, out=path,
               capture=("attention", "qk", "mlp"),
               batch_size=8, device="cpu", max_length=100, progress=False)
    g = zarr.open_group(path, mode="r+")
    offsets, lengths = g["token_offset"][:], g["n_tokens"][:]
    # Whole payloads as single tokens too (a tokenizer could produce anything): every view must show them as text.
    tok = g["token_str"][:]
    tok[offsets[1]], tok[offsets[2]] = XSS_IMG, XSS_SCRIPT
    tok[offsets[0] + 1] = " quick"  # a leading space, shown as ␣
    for position, (raw, _) in INVISIBLE.items():
        tok[offsets[3] + position] = raw
    g["token_str"][:] = tok
    n_tokens, vocab_size = int(lengths.sum()), int(g["readout/vocab_str"].shape[0])
    segments = np.zeros(n_tokens, dtype=np.int8)  # sentence A/B: the second half of prompt 0 is B
    segments[offsets[0] + lengths[0] // 2: offsets[0] + lengths[0]] = 1
    synthetic.write_token_column(path, "token_type_ids", segments)
    lens = synthetic.write_lens(path, g["token_id"][:], g["prompt_index"][:], depths=[0, 1, 2, 3], k=5,
                                vocab_size=vocab_size, watch=WATCH)
    vocab = g["readout/vocab_str"][:]
    for row in range(offsets[1], offsets[1] + lengths[1]):  # top predictions at prompt 1 are payloads
        vocab[int(lens["topk_ids"].values[row, 0, 0])] = XSS_IMG
        vocab[int(lens["topk_ids"].values[row, 1, 0])] = XSS_SCRIPT
    g["readout/vocab_str"][:] = vocab
    positions = g["position"][:]
    # Targets as `--attribute all` makes them (every position but each prompt's last), except prompt 3
    # where only the last 3 predictions are targets (as with --generate 3).
    last = np.append(g["prompt_index"][1:] != g["prompt_index"][:-1], True)
    targets = ~last
    targets[offsets[3]: offsets[3] + lengths[3] - 4] = False
    for i, method in enumerate(METHODS):
        synthetic.write_attribution(path, method, n_tokens, int(g["attention"].shape[-1]), positions, targets, seed=i)
    delta = np.where(targets, 0.01, np.nan).astype(np.float32)  # the (token,) IG gap: not a method of its own
    synthetic.write_token_column(path, "attribution_integrated_gradients_delta", delta)
    run = ss.open_run(path)
    run.heads(top=2)
    run.nmf(factors=3, layers="0-2", iterations=30, progress=False)
    return Store(path)


@pytest.fixture(scope="session")
def viewer_app(viewer_store):
    import stratascope as ss
    from stratascope.viewer.app import serve_in_thread

    server, url = serve_in_thread(ss.open_run(viewer_store.path))
    yield url
    server.shutdown()
    server.server_close()


# ---- the bias probe and linear probes: real jobs on a tiny llama, occupation names and a label carrying payloads
XSS_ALERT = "<img src=x onerror=alert(1)>"   # (the occupation table turns '_' into ' ': no __pwned here;
XSS_ALERT2 = "<script>alert(2)</script>"     #  an alert is caught as a dialog by the browser tests)
BIAS_PAIRS = [" was/ the", " said/ that"]  # single tokens of the tiny BPE vocabulary (see test_bias.py)
BIAS_TEMPLATES = ["The {occupation} said that", "{A} {occupation} is", "The {occupation} was late because"]
BIAS_OCCUPATIONS = {
    "occupation": ["nurse", "doctor", XSS_ALERT, "engineer", "fox", XSS_ALERT2, "airport", "dog"],
    "bls_pct_female": [88.0, 38.0, 11.0, 20.0, 50.0, 62.0, 45.0, float("nan")],  # dog: no statistic, not in n
    # a label whose name and classes are payloads
    XSS_ALERT: ["a", XSS_ALERT2, "a", XSS_ALERT2, "a", XSS_ALERT2, "a", XSS_ALERT2],
}
PROBE_LABELS = (XSS_ALERT, "bls_pct_female")  # classification (text classes) and regression


class ProbeStore:
    """The bias and probe results read with zarr directly (independent of stratascope.viewer.data)."""

    def __init__(self, path: str):
        self.path = path
        b = only_result(path, "bias")
        self.log_ratio = b["log_ratio"][:]  # prompt, depth, pair
        self.occupation = np.array([str(o) for o in b["occupation"][:]])
        self.pairs, self.depths = [str(p) for p in b["pair"][:]], b["depth"][:].tolist()
        c = only_result(path, "bias_correlation")
        self.correlation = {k: c[k][:] for k in ("pearson_r", "spearman_rho", "n")}  # pair, depth
        self.probes = {}
        for label in PROBE_LABELS:
            g = only_result(path, f"probe_{label}")
            self.probes[label] = {k: g[k][:] for k in ("accuracy", "control_accuracy", "majority", "r2", "control_r2")
                                  if k in g}
            self.probes[label]["attrs"] = dict(g.attrs)
        t = only_result(path, "tuned_lens")
        # (lens, depth), lens logit/tuned
        self.tuned = {k: t[k][:] for k in ("kl", "cross_entropy", "entropy", "depth")}


@pytest.fixture(scope="session")
def probe_store(tiny_model_dirs, tmp_path_factory) -> ProbeStore:
    import pandas as pd

    import stratascope as ss

    path = str(tmp_path_factory.mktemp("viewer-probes") / "bias.zarr")
    ss.bias_probe(model=str(tiny_model_dirs["llama"]), out=path, occupations=pd.DataFrame(BIAS_OCCUPATIONS),
                  templates=BIAS_TEMPLATES, pairs=BIAS_PAIRS, device="cpu", progress=False)
    run = ss.open_run(path)
    for label in PROBE_LABELS:
        run.linear_probe(label, at="last", folds=3, seed=0, epochs=30, progress=False)
    run.tuned_lens(steps=30, holdout=0.3, lr=0.01, progress=False)
    return ProbeStore(path)


@pytest.fixture(scope="session")
def probe_app(probe_store):
    import stratascope as ss
    from stratascope.viewer.app import serve_in_thread

    server, url = serve_in_thread(ss.open_run(probe_store.path))
    yield url
    server.shutdown()
    server.server_close()


# ---- the lens views' logit/tuned toggle: the real lens job of every token through both lenses on a tiny llama
LENS_WATCH = [" the", " fox"]


@pytest.fixture(scope="session")
def lens_store(tiny_model_dirs, tmp_path_factory) -> str:
    """A tiny llama capture with a trained tuned lens and two lens results of every token: logit and tuned."""
    import stratascope as ss
    from conftest import TEXT

    words = TEXT.split()
    prompts = [" ".join(words[(5 * i) % (len(words) - 12):][:5 + i % 6]) for i in range(24)]
    path = str(tmp_path_factory.mktemp("viewer-lens") / "lens.zarr")
    ss.capture(model=str(tiny_model_dirs["llama"]), prompts=prompts, out=path, capture=("hidden",), batch_size=8,
               device="cpu", progress=False)
    run = ss.open_run(path)
    run.tuned_lens(steps=40, lr=0.05, batch_size=64, holdout=0.25, seed=0, progress=False)
    for lens in ("logit", "tuned"):
        run.lens(topk=5, watch=LENS_WATCH, lens=lens, progress=False)
    return path


def lens_result(path: str, kind: str) -> zarr.Group:
    """The stored lens result read out through `kind` (its params name a tuned lens or not), opened with zarr."""
    base = zarr.open_group(path, mode="r", path="analysis/lens", use_consolidated=False)
    groups = [base[name] for name in base.group_keys()]
    found = [g for g in groups if ("lens" in dict(g.attrs)["params"]) == (kind == "tuned")]
    assert len(found) == 1, f"expected one {kind} lens result, found {len(found)}"
    return found[0]
