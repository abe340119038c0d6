"""Plots (matplotlib, an optional extra): singular-value spectra and retained energy vs rank,
per module type and layer, with the chosen ranks marked."""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .errors import UnsupportedError
from .fsutil import atomic_file


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise UnsupportedError("plots need matplotlib: pip install 'loratools[plot]'") from e
    return plt


def plot_spectra(spectra: dict[str, tuple[torch.Tensor, float, int]], out: str | os.PathLike, title: str) -> Path:
    """``spectra[module] = (singular values (descending), total energy ‖ΔW‖², chosen rank)``.
    One panel per module type: retained energy vs rank, one line per layer, the chosen rank
    marked; below, the normalized singular values on a log scale."""
    plt = _plt()
    groups: dict[str, list] = {}
    for name, (S, total, k) in sorted(spectra.items(), key=lambda kv: _layer(kv[0])):
        groups.setdefault(name.rsplit(".", 1)[-1], []).append((_layer(name), S.double(), float(total), k))
    n = max(1, len(groups))
    fig, axes = plt.subplots(2, n, figsize=(3.2 * n, 6), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for j, (leaf, rows) in enumerate(groups.items()):
        top, bottom = axes[0][j], axes[1][j]
        L = max(1, max(r[0] for r in rows) + 1)
        for layer, S, total, k in rows:
            color = cmap(layer / max(L - 1, 1)) if layer >= 0 else "black"
            e = S.pow(2)
            total = max(total, float(e.sum()), 1e-300)
            cum = (torch.cumsum(e, 0) / total).numpy()
            ranks = range(1, len(cum) + 1)
            top.plot(ranks, cum, color=color, lw=1)
            if 0 < k <= len(cum):
                top.plot([k], [cum[k - 1]], "o", color=color, ms=3)
            bottom.semilogy(ranks, (S / S[0].clamp_min(1e-300)).clamp_min(1e-12).numpy(), color=color, lw=1)
        top.set_title(leaf, fontsize=9)
        top.set_ylim(0, 1.02)
        top.set_xlabel("rank", fontsize=8)
        bottom.set_xlabel("index", fontsize=8)
        if j == 0:
            top.set_ylabel("retained energy (dots: chosen rank)", fontsize=8)
            bottom.set_ylabel("σ_i / σ_1", fontsize=8)
        for ax in (top, bottom):
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    fig.suptitle(title + "  (colour: layer, dark = first)", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format=out.suffix.lstrip(".") or "png", dpi=110)
    plt.close(fig)
    return out


def _layer(name: str) -> int:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def adapter_spectra(adapter) -> dict:
    from .ops.factor import svd_factored

    out = {}
    for name, m in adapter.modules.items():
        _, S, _ = svd_factored(m.B, m.A, m.scale)
        out[name] = (S, float(S.double().pow(2).sum()), m.rank)
    return out
