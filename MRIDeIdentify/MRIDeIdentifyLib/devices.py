"""Choosing the torch device: ``auto`` takes CUDA when present, else the CPU."""
from __future__ import annotations

import torch

from .errors import InputError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA if available, otherwise CPU.

    MPS is used only when asked for: 3-D grid sampling and some pooling operators the engine needs are not
    implemented on every MPS release, and a silent CPU fallback would be slower than the plain CPU path.
    """
    if name not in DEVICE_CHOICES:
        raise InputError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but torch sees no CUDA GPU")
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise InputError("--device mps was asked for but this torch build has no MPS support")
    return torch.device(name)
