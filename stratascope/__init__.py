"""stratascope: capture what a transformer computes on a corpus, store it, analyse it without the model."""

from importlib.metadata import PackageNotFoundError, version

from . import capture as _capture_package  # bound first, so the function below wins the name

try:
    __version__ = version("stratascope")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"


def capture(*args, **kwargs):
    """Capture a corpus into a store and return the Run; see stratascope.capture.runner.capture."""
    from .capture.runner import capture as _capture

    return _capture(*args, **kwargs)


def open_run(path: str, allow_incomplete: bool = False):
    """Open a stored run lazily, without loading the model."""
    from .run import open_run as _open_run

    return _open_run(path, allow_incomplete=allow_incomplete)


def bias_probe(*args, **kwargs):
    """Capture the occupation corpus with a model and run the bias probe; see stratascope.analyze.bias.bias_probe."""
    from .analyze.bias import bias_probe as _bias_probe

    return _bias_probe(*args, **kwargs)


__all__ = ["__version__", "bias_probe", "capture", "open_run"]
