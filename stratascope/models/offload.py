"""Weights accelerate placed elsewhere (--device-map): where the inputs go, and reading offloaded weights.

With a placement that offloads to disk, a module's parameters sit on the meta device between
forwards and accelerate's hook brings them in for each call; the readout, the weights hash
and the norm probe read such weights inside `onloaded`, which brings them in the same way.
"""

from __future__ import annotations

import contextlib

import torch


def _offloaded(module: torch.nn.Module) -> bool:
    return any(p.device.type == "meta" for p in module.parameters())


@contextlib.contextmanager
def onloaded(*modules: torch.nn.Module):
    """While inside, every given module's offloaded weights are real tensors (a no-op otherwise)."""
    with contextlib.ExitStack() as stack:
        for module in modules:
            if module is not None and _offloaded(module):
                from accelerate.utils import align_module_device

                stack.enter_context(align_module_device(module, torch.device("cpu")))
        yield


def input_device(model: torch.nn.Module) -> torch.device:
    """Where the input ids go: the input embedding's device, or the device accelerate runs it on."""
    emb = model.get_input_embeddings()
    if not _offloaded(emb):
        return emb.weight.device
    hook = getattr(emb, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    return torch.device(device if device is not None else "cpu")
