"""The settings that decide a capture's float results down to the last bit, resolved once.

Model dtype and torch thread count are made concrete where the capture starts and travel in
the config to every worker, so in-process, 1-worker and N-worker shards are computed alike;
with the device kind and the torch version they go into the resume identity, so a resume
never mixes shards computed differently.
"""

from __future__ import annotations

import contextlib
import dataclasses

from ..devices import resolve_device
from ..errors import ConfigError
from .config import CaptureConfig


def auto_model_dtype(device, gradients: bool) -> str:
    """float32 on the CPU and for gradients; bfloat16 on a CUDA GPU that has it, else float32."""
    import torch

    if device.type == "cuda" and not gradients and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def default_threads(workers: int | None, scheduler: str | None) -> int:
    """In-process torch's own count; a LocalCluster worker 1 (one per core); a scheduler's workers
    the fewest threads any of them has, so every shard runs with the same count."""
    import torch

    if scheduler:
        from ..cluster import dask_client

        with dask_client(scheduler=scheduler) as client:
            counts = [w.get("nthreads", 1) for w in client.scheduler_info().get("workers", {}).values()]
        return max(1, min(counts, default=1))
    return 1 if workers else torch.get_num_threads()


def resolve(cfg: CaptureConfig, workers: int | None = None, scheduler: str | None = None) -> CaptureConfig:
    """A copy of cfg with model_dtype and threads concrete; half-precision gradients are refused."""
    device = resolve_device(cfg.device)
    grads = cfg.gradients is not None
    if grads and cfg.model_dtype in ("bfloat16", "float16"):
        raise ConfigError(f"--capture attribution/grad is computed in float32 only (in {cfg.model_dtype} the "
                          "small gradients of distant tokens round away); drop --model-dtype "
                          f"{cfg.model_dtype} or capture the gradients in a separate float32 run")
    dtype = auto_model_dtype(device, grads) if cfg.model_dtype == "auto" else cfg.model_dtype
    threads = cfg.threads or default_threads(workers, scheduler)
    return dataclasses.replace(cfg, model_dtype=dtype, threads=threads)


def numerics(cfg: CaptureConfig) -> dict:
    """What the identity adds to the options: the device kind the model runs on and torch's version
    (a resolved cfg already carries model_dtype, threads and device_map)."""
    import torch

    return {"device": resolve_device(cfg.device).type, "torch": torch.__version__}


@contextlib.contextmanager
def torch_threads(n: int):
    """Run torch with n intra-op threads, then give the process its own count back."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
