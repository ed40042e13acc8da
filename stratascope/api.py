"""The Python API's entry points: capture a corpus, open a run, run the bias probe from a model.

Heavy modules (torch, transformers) are imported when a function is called, so that
`import stratascope` stays light.
"""

from __future__ import annotations

from .capture.config import CAPTURE_DOC, CaptureConfig
from .options import keyword_signature


@keyword_signature(CaptureConfig, CAPTURE_DOC + "Returns the opened Run (the Plan with dry_run=True).\n")
def capture(model: str = "smollm2", prompts=None, out: str = "runs/run.zarr", *, corpus: str | None = None,
            overwrite: bool = False, resume: bool = False, dry_run: bool = False, progress: bool = True,
            workers: int | None = None, scheduler: str | None = None, **options):
    from .capture.runner import capture as run_capture

    result = run_capture(model, prompts, out, corpus=corpus, overwrite=overwrite, resume=resume, dry_run=dry_run,
                         progress=progress, workers=workers, scheduler=scheduler, **options)
    return result if dry_run else open_run(result)


def open_run(path: str, allow_incomplete: bool = False):
    """Open a stored run lazily (a stratascope.Run); the model is never loaded."""
    from .run import Run

    return Run(path, allow_incomplete=allow_incomplete)


def bias_probe(model: str = "smollm2", out: str = "runs/bias.zarr", occupations=None, templates=None, pairs=None,
               strict: bool = False, overwrite: bool = False, corpus: str = "builtin", statistic: str | None = None,
               device: str = CaptureConfig.device, dtype: str = CaptureConfig.dtype,
               batch_size: int = CaptureConfig.batch_size,
               progress: bool = True, dla: bool = False, lens: str = "logit"):
    """Capture the occupation corpus (hidden states only) with `model` into `out`, then run the bias
    probe on it and return its BiasResult; see stratascope.workflows.bias_probe. dla=True also captures
    the residual components and per-head z, for run.bias_dla(). lens: 'logit' or 'tuned:RUN' (the
    tuned lens of another run of `model`)."""
    from .workflows.bias_probe import bias_probe as run_bias_probe

    return run_bias_probe(model, out, occupations, templates, pairs, strict, overwrite, corpus, statistic, device,
                          dtype, batch_size, progress, dla, lens)
