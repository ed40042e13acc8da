"""The main job behind `stratascope demo` / `make demo`."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def demo_corpus() -> str:
    return str(files("stratascope") / "data" / "demo_prompts.jsonl")


def run_demo(out: str = "runs/demo.zarr", model: str = "smollm2", overwrite: bool = False, echo=print) -> None:
    from .capture.runner import capture

    echo(f"capturing the demo corpus with {model} into {out}")
    run = capture(model=model, corpus=demo_corpus(), out=out, capture=("hidden", "attention", "mlp", "qk"),
                  overwrite=overwrite)
    info = run.info()
    echo(f"{info['prompts']} prompts, {info['tokens']} tokens, {info['bytes_on_disk'] / 2**20:.1f} MiB on disk")
    echo(str(run))
    res = run.nmf(factors=8, layers=range(0, 6), progress=False)
    echo(f"NMF: 8 factors of MLP neurons in layers 0-5, relative reconstruction error "
         f"{float(res['relative_error']):.3f}; top tokens per factor:")
    for f in range(8):
        echo(f"  factor {f}: " + " ".join(repr(t) for t in dict.fromkeys(run.factor_tokens(f, top=12)["token"])))
    from .analyze.heads import summary_lines

    echo("attention heads over the corpus (analysis/heads):")
    for line in summary_lines(run.heads(progress=False)):
        echo("  " + line)
    run_generation_demo(gen_out(out), model, overwrite, echo)
    run_bias_demo(str(Path(out).with_name("bias.zarr")), model=model, overwrite=overwrite, echo=echo)


def gen_out(out: str) -> str:
    """runs/demo.zarr -> runs/demo-gen.zarr"""
    path = Path(out)
    return str(path.with_name(f"{path.name.removesuffix('.zarr')}-gen.zarr"))


def run_generation_demo(out: str, model: str = "smollm2", overwrite: bool = False, echo=print) -> None:
    """Greedy generation of 5 tokens per prompt, with grad x input attributions of each new token."""
    from .capture.runner import capture

    echo(f"generating 5 tokens per prompt with attributions into {out}")
    run = capture(model=model, corpus=demo_corpus(), out=out, capture=("hidden", "attribution"), generate=5,
                  overwrite=overwrite)
    for p, text in enumerate(run.prompts["text"]):
        frame = run.attributions(p)
        first = frame.iloc[0]
        source = first.idxmax()[1]
        echo(f"{text!r} -> {run.generated_text(p)!r}  (first new token {frame.index[0][1]!r}: "
             f"most attributed to {source!r}, {first.max():.0%})")


def run_bias_demo(out: str, model: str = "smollm2", overwrite: bool = False, echo=print) -> None:
    """The bias probe on the built-in occupation corpus, stored beside the demo store (reused if there)."""
    from .analyze.bias import bias_probe
    from .run import open_run

    echo(f"bias probe on the built-in occupation corpus with {model} into {out}")
    if Path(out).exists() and not overwrite:
        res = open_run(out).bias()
    else:
        res = bias_probe(model=model, out=out, overwrite=overwrite)
    for line in res.summary():
        echo(line)
