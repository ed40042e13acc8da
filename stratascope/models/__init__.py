"""Loading models and finding their parts."""

from .adapters import Adapter, find_adapter, norm_spec
from .load import BUNDLED, LoadedModel, installed_models, load_model, resolve_device

__all__ = ["Adapter", "BUNDLED", "LoadedModel", "find_adapter", "installed_models", "load_model", "norm_spec",
           "resolve_device"]
