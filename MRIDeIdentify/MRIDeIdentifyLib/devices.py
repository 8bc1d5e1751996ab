"""The torch devices every entry point offers (command line, evaluation, training, the Slicer panel) and the
one resolver that turns a choice into a ``torch.device``.

Importing this module does not import torch: the Slicer panel lists the choices before torch is installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict

from .errors import InputError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
# What a panel shows for each choice, in the order of DEVICE_CHOICES.
DEVICE_LABELS: Dict[str, str] = {
    "auto": "Auto (CUDA GPU if available)",
    "cpu": "CPU",
    "cuda": "GPU (CUDA)",
    "mps": "GPU (Apple MPS)",
}
DEVICE_HELP = "torch device: auto (CUDA when available, else CPU), cpu, cuda or mps (default auto)"


def resolve_device(name: str = "auto") -> "torch.device":
    """``auto`` -> CUDA if available, otherwise CPU; ``cpu``/``cuda``/``mps`` as asked, or InputError.

    MPS is used only when asked for: 3-D grid sampling and some pooling operators the engine needs are not
    implemented on every MPS release, and a silent CPU fallback would be slower than the plain CPU path.
    """
    import torch

    if name not in DEVICE_CHOICES:
        raise InputError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but torch sees no CUDA GPU")
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise InputError("--device mps was asked for but this torch build has no MPS support")
    return torch.device(name)
