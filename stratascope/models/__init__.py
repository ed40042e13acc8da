"""Loading models and finding their parts."""

from .adapters import Adapter, Components, find_adapter, find_components, norm_spec, projection_weights
from .load import BUNDLED, LoadedModel, installed_models, load_model
from .offload import input_device, onloaded

__all__ = [
    "Adapter", "BUNDLED", "Components", "LoadedModel", "find_adapter", "find_components", "input_device",
    "installed_models", "load_model", "norm_spec", "onloaded", "projection_weights"
]
