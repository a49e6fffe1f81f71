"""``train.device`` and ``train.dtype``, read one way by the trainer, the benchmarks and sampling.

device: ``auto`` is CUDA when there is one, else the CPU; ``cuda`` without a GPU is a config
error (not a silent fall-back to a CPU run a thousand times slower). dtype: ``auto`` is bf16
autocast on CUDA and fp32 on the CPU (CPU bf16 matmuls are slower than fp32 on most hosts);
``bf16`` asks for autocast on either; ``fp32`` never autocasts.
"""

from __future__ import annotations

import contextlib

import torch

from moe.config import ConfigError

__all__ = ["resolve_device", "autocast_dtype", "autocast_context", "set_threads"]


def resolve_device(name: str) -> torch.device:
    """``train.device`` (auto | cpu | cuda) -> the device this process runs on."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available: use auto or cpu")
    return torch.device(name)


def autocast_dtype(device: torch.device, dtype: str) -> torch.dtype | None:
    """The autocast dtype for ``train.dtype`` on ``device``; None: run in fp32, no autocast."""
    if dtype == "bf16" or (dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast_context(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` per :func:`autocast_dtype`, or a no-op context in fp32."""
    amp = autocast_dtype(device, dtype)
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp)


def set_threads(n: int) -> int:
    """``train.threads`` (and every tool's ``--threads``): ``n`` torch CPU threads; 0 keeps
    torch's default (one per physical core). Returns the number in use."""
    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()
