"""Helpers shared by the operations: dtype names, progress bars (the device picker is loratools.device)."""
from __future__ import annotations

import re
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


def progress(iterable, desc: str, total: int | None = None, quiet: bool = False, unit: str = "tensor"):
    """The one progress mechanism: a bar on a terminal; when stderr is not a terminal (piped, a log
    file) one line for the stage instead of a bar that vanishes; nothing when ``quiet``."""
    if quiet:
        return iterable
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)
    n = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    stage(desc + (f": {n} {unit}{'s' if n != 1 else ''}" if n is not None else ""))
    return iterable


def stage(message: str, quiet: bool = False) -> None:
    """One progress line on stderr (``loratools: [stage] ...``) for a step that has no bar."""
    if not quiet:
        name, _, rest = message.partition(": ")
        print(f"loratools: [{name}]" + (f" {rest}" if rest else ""), file=sys.stderr, flush=True)


def natural_key(name: str) -> list:
    """Sort key that orders numbers by value: layers 1, 2, ..., 10, 11 (not 1, 10, 11, 2)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def is_finite(t: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN/Inf: one ``aminmax`` pass (a NaN propagates into both, an
    infinity is the minimum or the maximum), without the temporaries and the slow bf16 kernel of
    ``isfinite(t).sum()``. A file-backed (mapped) tensor stays file-backed."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return count_nonfinite(t) == 0  # float8: no aminmax kernel
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def count_nonfinite(t: torch.Tensor, chunk: int = 1 << 22) -> int:
    """The number of NaN/Inf values, a block at a time (for messages: run after is_finite said no)."""
    if not t.is_floating_point():
        return 0
    bad = 0
    for c in t.reshape(-1).split(chunk):
        if c.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            c = c.float()  # float8 types have no isfinite kernel
        bad += int(c.numel() - torch.isfinite(c).sum())
    return bad


def check_finite(t: torch.Tensor, name: str, path, chunk: int = 1 << 22) -> None:
    """Refuse NaN/Inf (exit 2, the tensor and the count named)."""
    from ..errors import InputError

    if not is_finite(t):
        raise InputError(f"tensor {name!r} has {count_nonfinite(t, chunk)} NaN/Inf values", path)


def check_output_finite(t: torch.Tensor, name: str, what: str, hint: str, path=None) -> None:
    """Refuse a result that is not finite although its inputs are (they were checked): values
    beyond the output type's range (``what``, e.g. "float16") — exit 3, the tensor and the count
    named, with ``hint`` (the wider types to write instead)."""
    from ..errors import IncompatibleError

    if not is_finite(t):
        raise IncompatibleError(f"tensor {name!r}: {count_nonfinite(t)} values overflow {what} (the result is outside "
                                f"its range and would be written as Inf); {hint}", path)


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


# -- module selection (extract, resize, convert: --include / --exclude) -------------------------
def _patterns(pats) -> list[str]:
    if pats is None:
        return []
    return [pats] if isinstance(pats, str) else [p for p in pats if p]


def check_patterns(*pats) -> None:
    """Refuse a pattern that is not a valid regex (one line, before anything runs)."""
    for group in pats:
        for pat in _patterns(group):
            try:
                re.compile(pat)
            except re.error as e:
                raise LoratoolsError(f"invalid regex {pat!r}: {e}") from e


def selected(name: str, include=None, exclude=None) -> bool:
    """The one --include/--exclude rule: a module is kept when its name matches (``re.search``)
    one of the include regexes (any, when none is given) and none of the exclude regexes.
    ``include``/``exclude``: None, one regex or several."""
    inc, exc = _patterns(include), _patterns(exclude)
    if inc and not any(re.search(p, name) for p in inc):
        return False
    return not any(re.search(p, name) for p in exc)


def select_adapter(adapter, include=None, exclude=None):
    """(the adapter restricted to the selected modules, the names dropped): LoRA modules by module
    name, modules_to_save tensors by the name of their module (``lm_head`` for ``lm_head.weight``).
    Nothing left is a one-line error."""
    from dataclasses import replace

    check_patterns(include, exclude)
    if not _patterns(include) and not _patterns(exclude):
        return adapter, []
    mods = {n: m for n, m in adapter.modules.items() if selected(n, include, exclude)}
    mts = {k: t for k, t in adapter.modules_to_save.items() if selected(k.rpartition(".")[0] or k, include, exclude)}
    dropped = sorted(set(adapter.modules) - set(mods)) + sorted(set(adapter.modules_to_save) - set(mts))
    if not mods and not mts:
        rules = " ".join([f"--include {p!r}" for p in _patterns(include)] + [f"--exclude {p!r}" for p in _patterns(exclude)])
        raise LoratoolsError(f"{rules} leave(s) no module of the adapter's {len(adapter.modules) + len(adapter.modules_to_save)}; "
                             "nothing to write")
    return replace(adapter, modules=mods, modules_to_save=mts), dropped


# -- retained energy: the one definition --------------------------------------------------------
def retained_energy(residual_sq: float, total_sq: float) -> float:
    """**Retained energy**, the one quantity loratools reports under that name (``retained_energy``):
    the share of the fine-tune's weight change ΔW, all its tensors together, that an adapter
    reproduces, 1 − ‖ΔW − ΔŴ‖²_F / ‖ΔW‖²_F. Tensors the adapter does not carry count whole in
    the residual. For truncated SVDs (extract) the residual is the dropped σ², so it is
    Σ kept σ² / Σ all σ² across modules, energy-weighted. Other ratios are named apart: "mean
    per-module retention" (validate-extraction, an unweighted mean) and "retained vs input
    adapter" (resize, which does not see the fine-tune)."""
    if total_sq <= 0:
        return 1.0
    return max(0.0, 1.0 - residual_sq / total_sq)
