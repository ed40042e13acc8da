"""The main job behind `stratascope demo` / `make demo`: every capture and analysis on SmolLM2,
ending with the reports."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from ..analyze.bias import bias
from ..analyze.heads import heads_frame, summarize_heads, summary_lines
from ..analyze.lens import run_lens, summary
from ..analyze.nmf import factor_tokens, nmf
from ..analyze.probe import linear_probe
from ..analyze.views import attributions, generated_text
from ..capture.runner import capture
from ..errors import ConfigError
from ..store import Store, store_bytes
from ..viewer.report import write_report
from .bias_probe import bias_probe


def demo_corpus() -> str:
    return str(files("stratascope") / "data" / "demo_prompts.jsonl")


def sibling(out: str, suffix: str) -> str:
    """runs/demo.zarr -> runs/demo-<suffix>.zarr (or .html)"""
    path = Path(out)
    stem = path.name.removesuffix(".zarr")
    return str(path.with_name(f"{stem}-{suffix}"))


def run_demo(out: str = "runs/demo.zarr", model: str = "smollm2", overwrite: bool = False, echo=print) -> None:
    echo(f"capturing the demo corpus with {model} into {out}")
    run = Store(capture(model=model, corpus=demo_corpus(), out=out, capture=("hidden", "attention", "mlp", "qk"),
                  overwrite=overwrite))
    echo(f"{run.n_prompts} prompts, {run.n_tokens} tokens, {store_bytes(run.path) / 2**20:.1f} MiB on disk, "
         f"captured {', '.join(run.captured)}")
    if not run.attrs["model"]["causal"]:
        raise ConfigError(f"the demo needs a causal language model (the lens, generation, the bias probe); "
                          f"{model} is an encoder: use --model smollm2")
    run_lens_demo(run, echo)
    run_nmf_demo(run, echo)
    echo("attention heads over the corpus (analysis/heads):")
    for line in summary_lines(heads_frame(summarize_heads(run, progress=False))):
        echo("  " + line)
    gen = run_generation_demo(sibling(out, "gen.zarr"), model, overwrite, echo)
    bias = run_bias_demo(sibling(out, "bias.zarr"), model=model, overwrite=overwrite, echo=echo)
    reports = [write_report(r, sibling(out, f"{name}.html")) for name, r in
               (("report", run), ("gen-report", gen), ("bias-report", bias))]
    echo("reports (open offline in a browser):")
    for path in reports:
        echo(f"  {path}")


def run_lens_demo(run, echo=print) -> None:
    """The logit lens of every token (analysis/lens), watching ' he' and ' she'."""
    ds = run_lens(run, topk=10, watch=[" he", " she"], progress=False)
    echo("logit lens (analysis/lens): the last position's top token at the last depth, and from which depth")
    for line in summary(run, ds):
        echo(line)


def run_nmf_demo(run, echo=print) -> None:
    res = nmf(run, factors=8, progress=False)  # the first six captured layers
    layers = [int(v) for v in res["layer"].values]
    echo(f"NMF: 8 factors of MLP neurons in layers {layers[0]}-{layers[-1]}, relative reconstruction error "
         f"{float(res['relative_error']):.3f}; top tokens per factor:")
    for f in range(8):
        echo(f"  factor {f}: " + " ".join(repr(t) for t in dict.fromkeys(factor_tokens(run, f, top=12)["token"])))


def run_generation_demo(out: str, model: str = "smollm2", overwrite: bool = False, echo=print):
    """Greedy generation of 5 tokens per prompt, with grad x input attributions of each new token."""
    echo(f"generating 5 tokens per prompt with attributions into {out}")
    run = Store(capture(model=model, corpus=demo_corpus(), out=out, capture=("hidden", "attribution"), generate=5,
                        overwrite=overwrite))
    for p, text in enumerate(run.prompts["text"]):
        frame = attributions(run, p)
        first = frame.iloc[0]
        source = first.idxmax()[1]
        echo(f"{text!r} -> {generated_text(run, p)!r}  (first new token {frame.index[0][1]!r}: "
             f"most attributed to {source!r}, {first.max():.0%})")
    run_lens(run, topk=10, progress=False)  # rank trajectories of the generated tokens, for the report
    return run


def run_bias_demo(out: str, model: str = "smollm2", overwrite: bool = False, echo=print):
    """The bias probe on the built-in occupation corpus, then a linear probe for the majority
    gender of each occupation's workers (BLS) from the last token's hidden state at a few depths."""
    echo(f"bias probe on the built-in occupation corpus with {model} into {out}")
    if Path(out).exists() and not overwrite:
        res = bias(Store(out))
    else:
        res = bias_probe(model=model, out=out, overwrite=overwrite)
    for line in res.summary():
        echo(line)
    run = Store(out)
    L = int(run.attrs["model"]["n_layers"])
    depths = sorted(set(range(0, L + 1, max(1, L // 5))) | {L})
    probe = linear_probe(run, "bls_majority", at="last", depths=depths, group_by="occupation",
                             control_by="occupation",
                             progress=False)
    echo("linear probe for the occupation's majority gender (BLS) at the last token, 5 folds by occupation "
         "(test occupations never seen in training), with a shuffled-label control:")
    echo(probe.scores.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return run
