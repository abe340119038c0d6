"""Helpers shared by the operations: device choice, dtype names, progress bars."""
from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from ..errors import LoratoolsError

DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
               "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
CONFIG_DTYPE = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise LoratoolsError("--device cuda was asked for but CUDA is not available")
    return torch.device(device)


def parse_dtype(name: str | None, allow_keep: bool = True) -> torch.dtype | None:
    if name in (None, "keep") and allow_keep:
        return None
    if name not in DTYPE_NAMES:
        raise LoratoolsError(f"unknown dtype {name!r} (fp32, fp16, bf16{', keep' if allow_keep else ''})")
    return DTYPE_NAMES[name]


def progress(iterable, desc: str, total: int | None = None, quiet: bool = False):
    return tqdm(iterable, desc=desc, total=total, unit="tensor", leave=False,
                disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True)


def check_finite(t: torch.Tensor, name: str, path) -> None:
    from ..errors import InputError

    if not t.is_floating_point():
        return
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        t = t.float()  # float8 types have no isfinite kernel
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise InputError(f"tensor {name!r} has {bad} NaN/Inf values", path)
