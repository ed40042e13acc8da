"""The installed version of stratascope."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("stratascope")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
