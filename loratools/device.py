"""The one device picker: ``--device auto|cpu|cuda`` (or a torch.device) -> torch.device."""
from __future__ import annotations

import torch

from .errors import LoratoolsError


def pick_device(device: "str | torch.device | None") -> torch.device:
    """auto (or None): CUDA when available, else CPU. An explicit cuda without CUDA is refused."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise LoratoolsError("--device cuda was asked for but CUDA is not available")
    return torch.device(device)
