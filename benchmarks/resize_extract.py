"""Resize and extract against the peers' method, side by side in one run.

    .venv/bin/python benchmarks/resize_extract.py [--quick]

resize: a rank-64 adapter module of each 7B shape (4096×4096, 4096×11008, 11008×4096) shrunk to
rank 16. Peer method (PEFT/kohya/mergekit scripts): form the dense ΔW = s·B@A and take its full
SVD. loratools: QR of B and Aᵀ, SVD of the 64×64 core. Prints times, the speed-up, and the largest
difference of the 16 kept singular values relative to σ₁ (target ≤ 1e-4).

extract: a synthetic full fine-tune delta of each shape with a slowly decaying spectrum
(σᵢ ∝ 1/√i plus noise), rank 16 and 32. Peer method: full SVD of ΔW, truncate. loratools: seeded
randomized SVD (16 oversampling columns, 4 power iterations). Prints times and the relative
Frobenius errors (loratools' error relative to the optimal one: target ≤ 1.01).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._peak import machine  # noqa: E402
from loratools.ops import factor  # noqa: E402
from loratools.ops.factor import RankRule  # noqa: E402


def timed(fn, *a, **k):
    t = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t


def slow_delta(m, n, seed, k=1024):
    """ΔW = U diag(σ) Vᵀ + noise, σᵢ = 1/√(i+1) over k components: a flat, realistic spectrum."""
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(m, k, generator=g) / math.sqrt(m)
    V = torch.randn(k, n, generator=g) / math.sqrt(n)
    s = torch.tensor([1 / math.sqrt(i + 1) for i in range(k)])
    return (U * s) @ V + 0.002 * torch.randn(m, n, generator=g)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small shapes; checks the script works")
    args = ap.parse_args()
    shapes = [(512, 512), (512, 1376), (1376, 512)] if args.quick else [(4096, 4096), (4096, 11008), (11008, 4096)]
    print(f"machine: {machine()}")
    print("\n## resize rank 64 -> 16")
    print(f"{'shape':>14} {'dense+SVD s':>12} {'loratools s':>12} {'speed-up':>9} {'max|Δσ|/σ1':>11}")
    for i, (m, n) in enumerate(shapes):
        g = torch.Generator().manual_seed(i)
        B, A = torch.randn(m, 64, generator=g) * 0.01, torch.randn(64, n, generator=g) * 0.01
        scale = 2.0

        def peer():
            return torch.linalg.svd((B @ A) * scale, full_matrices=False)

        def ours():
            U, S, Vh = factor.svd_factored(B, A, scale)
            return factor.split_sqrt(U, S, Vh, 16), S

        (Up, Sp, Vp), tp = timed(peer)
        ours()  # warm-up (first-call allocations)
        ((Bn, An), So), to = timed(ours)
        err = float((Sp[:16] - So[:16]).abs().max() / Sp[0])
        print(f"{m:>6}x{n:<7} {tp:>12.3f} {to:>12.4f} {tp / to:>8.0f}x {err:>11.2e}")

    print("\n## extract: randomized SVD vs full SVD of the delta")
    print(f"{'shape':>14} {'rank':>5} {'full SVD s':>11} {'loratools s':>12} {'speed-up':>9} {'opt err':>9} {'our err':>9} {'ratio':>7}")
    for i, (m, n) in enumerate(shapes):
        M = slow_delta(m, n, 100 + i, k=min(1024, m, n))
        (U, S, Vh), tp = timed(torch.linalg.svd, M, full_matrices=False)
        total = float(M.double().pow(2).sum())
        for k in (16, 32):
            opt = math.sqrt(max(total - float(S[:k].double().pow(2).sum()), 0) / total)
            (B, A, _, info), to = timed(factor.factorize, M, RankRule("rank", k))
            err = float((M.double() - B.double() @ A.double()).norm() / math.sqrt(total))
            print(f"{m:>6}x{n:<7} {k:>5} {tp:>11.2f} {to:>12.3f} {tp / to:>8.1f}x {opt:>9.5f} {err:>9.5f} {err / opt:>7.4f}")


if __name__ == "__main__":
    main()
