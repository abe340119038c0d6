"""Helpers shared by the operations: dtype names, progress bars (the device picker is loratools.device)."""
from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from ..device import pick_device  # noqa: F401 - the one device picker, re-exported
from ..errors import LoratoolsError

DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
               "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
CONFIG_DTYPE = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def parse_dtype(name: str | None, allow_keep: bool = True) -> torch.dtype | None:
    if name in (None, "keep") and allow_keep:
        return None
    if name not in DTYPE_NAMES:
        raise LoratoolsError(f"unknown dtype {name!r} (fp32, fp16, bf16{', keep' if allow_keep else ''})")
    return DTYPE_NAMES[name]


def progress(iterable, desc: str, total: int | None = None, quiet: bool = False):
    return tqdm(iterable, desc=desc, total=total, unit="tensor", leave=False,
                disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True)


def check_finite(t: torch.Tensor, name: str, path, chunk: int = 1 << 22) -> None:
    """Refuse NaN/Inf, a block at a time (isfinite on a bf16 tensor works through a float32 copy)."""
    from ..errors import InputError

    if not t.is_floating_point():
        return
    bad = 0
    for c in t.reshape(-1).split(chunk):
        if c.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            c = c.float()  # float8 types have no isfinite kernel
        bad += int(c.numel() - torch.isfinite(c).sum())
    if bad:
        raise InputError(f"tensor {name!r} has {bad} NaN/Inf values", path)


def sum_sq(t: torch.Tensor, chunk: int = 1 << 22) -> float:
    """‖t‖²_F accumulated in float64, about ``chunk`` elements at a time, in blocks of rows (a
    whole-tensor float64 copy of a 32000 × 4096 embedding would be 1 GB, and its square another;
    row blocks of a transposed view need no copy of the whole either)."""
    if t.dim() == 0:
        return float(t.double() ** 2)
    rows = t if t.dim() == 2 else t.reshape(t.shape[0], -1) if t.dim() > 2 else t.reshape(-1, 1)
    step = max(1, chunk // max(1, rows.shape[1]))
    return sum(float(c.double().pow(2).sum()) for c in rows.split(step))


def delta_sq(wb: torch.Tensor, wt: torch.Tensor, device, transposed: bool = False,
             chunk: int = 1 << 22) -> tuple[torch.Tensor, float]:
    """(ΔW = wt − wb in float32 on ``device``, ‖ΔW‖²_F), built a block of rows at a time: no whole-tensor
    temporary beside the result (``delta -= wb`` with a bf16 ``wb`` would promote it to a whole float32
    copy). ``transposed``: ΔW (2-D) is returned as the transpose of a contiguous ΔWᵀ. Element by element
    the same fp32 arithmetic as ``wt.float() - wb.float()``, and the norm is ``sum_sq(ΔW)`` exactly (the
    same row blocks, summed in the same order)."""
    if wt.dim() == 0:
        d = wt.to(device, torch.float32, copy=True)
        d -= wb.to(device)
        return d, sum_sq(d, chunk)
    if transposed:
        assert wt.dim() == 2
        delta = torch.empty(wt.shape[1], wt.shape[0], dtype=torch.float32, device=device).T
    else:
        delta = torch.empty(wt.shape, dtype=torch.float32, device=device)

    def rows(t):  # the row view sum_sq uses
        return t if t.dim() == 2 else t.reshape(t.shape[0], -1) if t.dim() > 2 else t.reshape(-1, 1)

    rb, rt, rd = rows(wb), rows(wt), rows(delta)
    step = max(1, chunk // max(1, rd.shape[1]))
    e = 0
    for i in range(0, rd.shape[0], step):
        blk = rt[i:i + step].to(device, torch.float32, copy=True)
        blk -= rb[i:i + step].to(device)
        e += float(blk.double().pow(2).sum())
        rd[i:i + step].copy_(blk)
    return delta, e
