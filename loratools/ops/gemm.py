"""fp32 GEMMs on the CPU: oneDNN where it is the faster library, PyTorch's default otherwise.

PyTorch runs a float32 ``x @ wᵀ`` on the CPU through MKL's sgemm. On AMD processors MKL takes
its AVX2 code path even where the CPU has AVX-512, and there PyTorch's bundled oneDNN (which
chooses kernels by instruction set, not vendor) runs the same product about 2.3x faster on the
development machine (AMD EPYC, 2 cores: 230 vs 100 GMAC/s). Both are plain float32 arithmetic;
results differ only in summation order (round-off, ~1e-7 relative).

``LORATOOLS_GEMM`` picks the library: ``auto`` (default: oneDNN when PyTorch reports AVX-512 and
the oneDNN product passes a self-check against float64), ``onednn`` (whenever it passes the
self-check), ``aten`` (never). The choice is made once per process and is the same every run on a
machine, so outputs stay byte-identical run to run.

oneDNN keeps a cache of compiled kernels per problem shape; callers with shapes that change
every step (the number of labelled positions, say) should round them to a few sizes
(``bucket``), since a new shape costs about a millisecond to compile.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

_CHOICE: bool | None = None


def _self_check(op) -> bool:
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g) for s in ((37, 53), (29, 53), (29,)))
    want = (x.double() @ w.double().T + b.double()).float()
    for got in (op(x, w, b, "none", [], ""), op(x, w.T.contiguous().T, None, "none", [], "") + b,
                op(x.T.contiguous().T, w, b, "none", [], "")):
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
            return False
    return True


def onednn() -> bool:
    """Whether float32 CPU products go through oneDNN in this process."""
    global _CHOICE
    if _CHOICE is None:
        mode = os.environ.get("LORATOOLS_GEMM", "auto").strip().lower()
        use = False
        if mode in ("auto", "onednn") and torch.backends.mkldnn.is_available():
            op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
            wanted = mode == "onednn" or torch.backends.cpu.get_cpu_capability() == "AVX512"
            if op is not None and wanted:
                try:
                    with torch.no_grad():
                        use = _self_check(op)
                except Exception:  # an op missing or changed in this PyTorch build: keep aten
                    use = False
        _CHOICE = use
    return _CHOICE


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x wᵀ + bias`` for x (..., in) and w (out, in) of any strides (``linear(dy, w.T)`` is
    ``dy w``; oneDNN reads a bias only when it is contiguous). No autograd: call it under no_grad
    or inside an autograd.Function."""
    if (x.dtype == w.dtype == torch.float32 and x.device.type == "cpu" and w.device.type == "cpu"
            and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous())) and x.numel() and onednn()):
        return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
    return F.linear(x, w, bias)


def bucket(n: int) -> int:
    """n rounded up to one of eight sizes per power of two (at most 12.5% more, and at least 16),
    so a varying count maps to few distinct shapes."""
    if n <= 16:
        return 16
    step = 1 << max(0, n.bit_length() - 4)
    return -(-n // step) * step
