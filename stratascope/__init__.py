"""stratascope: capture what a transformer computes on a corpus, store it, analyse it without the model."""

from . import capture as _capture_package
from .api import bias_probe, capture, open_run
from .version import __version__

__all__ = ["__version__", "bias_probe", "capture", "open_run"]
