"""The one place a device name ('auto', 'cpu', 'cuda', 'cuda:1', 'mps') becomes a torch device.

Below every layer (like errors.py and ranges.py), so model loading, capture and the
analyses all accept the same names and refuse them with the same sentences.
"""

from __future__ import annotations

from .errors import ConfigError, DeviceError


def resolve_device(device: str | None = "auto", option: str = "--device"):
    """The torch.device for `device`; 'auto' (or None) is the first CUDA GPU if there is one, else the CPU.

    A name that is not a device raises ConfigError; a device this machine lacks raises DeviceError.
    `option` names the setting in the messages.
    """
    import torch  # lazily: importing stratascope must not import torch

    name = "auto" if device is None else str(device).strip()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not index.isdigit()) or (index and kind != "cuda"):
        raise ConfigError(f"{option} {name!r} is not a device name; use auto, cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"{option} {name} was asked for, but this machine has no CUDA device; use {option} cpu")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise DeviceError(f"{option} {name}: this machine has CUDA devices 0-{torch.cuda.device_count() - 1}")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"{option} {name} was asked for, but MPS is not available; use {option} cpu")
    return torch.device(name)
