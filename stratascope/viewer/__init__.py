"""The viewer: a self-contained HTML report, a local web app and notebook views, from the store alone.

Never imports torch or transformers.
"""

from .notebook import ViewAccessor
from .registry import VIEWS
from .report import build_report, write_report

__all__ = ["VIEWS", "ViewAccessor", "build_report", "write_report"]
