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
    One panel pair per module type: retained energy vs rank above, the normalized singular values
    on a log scale below; one line per layer (colour bar: layer), each over the whole spectrum it
    was given, the chosen rank marked on both. At most 4 module types a row, so the image stays
    under ~1600 px wide with readable labels; rank axes have integer ticks."""
    plt = _plt()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator

    groups: dict[str, list] = {}
    for name, (S, total, k) in sorted(spectra.items(), key=lambda kv: _layer(kv[0])):
        groups.setdefault(name.rsplit(".", 1)[-1], []).append((_layer(name), S.double(), float(total), k))
    n = max(1, len(groups))
    cols = min(n, 4)
    rows = -(-n // cols)
    # 3.3 in a column + the colour bar, at 110 dpi: ≤ 1600 px for 4 columns
    fig, axes = plt.subplots(2 * rows, cols, figsize=(3.3 * cols + 1.2, 4.6 * rows + 0.6), squeeze=False,
                             layout="constrained")
    cmap = plt.get_cmap("viridis")
    L = max([1] + [r[0] + 1 for rs in groups.values() for r in rs])
    norm = Normalize(0, max(L - 1, 1))
    for j, (leaf, rows_) in enumerate(groups.items()):
        top, bottom = axes[2 * (j // cols)][j % cols], axes[2 * (j // cols) + 1][j % cols]
        for layer, S, total, k in rows_:
            color = cmap(norm(layer)) if layer >= 0 else "black"
            e = S.pow(2)
            total = max(total, float(e.sum()), 1e-300)
            cum = (torch.cumsum(e, 0) / total).numpy()
            rel = (S / S[0].clamp_min(1e-300)).clamp_min(1e-12).numpy() if S.numel() else cum
            ranks = range(1, len(cum) + 1)
            top.plot(ranks, cum, color=color, lw=1)
            bottom.semilogy(ranks, rel, color=color, lw=1)
            if 0 < k <= len(cum):
                top.plot([k], [cum[k - 1]], "o", color=color, ms=4, mec="black", mew=0.4)
                bottom.plot([k], [rel[k - 1]], "o", color=color, ms=4, mec="black", mew=0.4)
        top.set_title(leaf, fontsize=10)
        top.set_ylim(0, 1.02)
        top.set_xlabel("rank", fontsize=9)
        bottom.set_xlabel("component", fontsize=9)
        if j % cols == 0:
            top.set_ylabel("retained energy", fontsize=9)
            bottom.set_ylabel("σ_i / σ_1", fontsize=9)
        for ax in (top, bottom):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
            ax.set_xlim(left=0.5)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
    for j in range(n, rows * cols):  # empty slots of the last row
        axes[2 * (j // cols)][j % cols].axis("off")
        axes[2 * (j // cols) + 1][j % cols].axis("off")
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes.ravel().tolist(), fraction=0.03, pad=0.02)
    bar.set_label("layer", fontsize=9)
    bar.ax.tick_params(labelsize=8)
    bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title + "  (dots: the chosen rank)", fontsize=10)
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
