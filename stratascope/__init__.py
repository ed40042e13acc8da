"""stratascope: capture what a transformer computes on a corpus, store it, analyse it without the model."""

from . import capture as _capture_package  # noqa: F401 - bound first, so the function below wins the name
from .api import bias_probe, capture, open_run
from .version import __version__

__all__ = ["__version__", "bias_probe", "capture", "open_run"]
