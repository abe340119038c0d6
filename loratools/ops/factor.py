"""Factorizations and rank rules.

All math in fp32 on the chosen device; randomness from an explicit seed.

- ``svd_exact(M)``: the full thin SVD.
- ``svd_randomized(M, l, ...)``: Halko-Martinsson-Tropp range finder with power iterations
  (re-orthonormalized each time), then an exact SVD of the small projected matrix.
- ``svd_factored(B, A, scale)``: the SVD of ``scale · B @ A`` without forming it: QR of B and
  Aᵀ, SVD of the r × r core. Cost O((out + in) · r²) instead of O(out · in · min(out, in)).
- ``choose_rank(S, rule, total_energy)``: the rank rules (rank, energy, fro, ratio, threshold).
- ``split_sqrt``: B = U·√S, A = √S·Vh, so both factors carry half the spectrum.
- ``DeltaBlocks``: a vocabulary-sized delta ΔW = W_tuned − W_base (or its transpose) that is never
  whole in memory: built a block of rows at a time for each product. ``factorize`` takes one in
  place of a tensor and runs the same randomized SVD on it (its products summed block by block,
  so round-off differs from the one-shot products), and in place of the exact SVD the
  eigendecomposition of the float64 Gram matrix ΔWᵀΔW (hidden × hidden).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import LoratoolsError
from . import gemm
from .common import sum_sq


@dataclass(frozen=True)
class RankRule:
    """One of: rank=N, energy=F, fro=F, ratio=F, threshold=T; plus an optional max_rank cap."""

    kind: str = "rank"
    value: float = 16
    max_rank: int | None = None

    def __post_init__(self):
        k, v = self.kind, self.value
        if k not in ("rank", "energy", "fro", "ratio", "threshold"):
            raise LoratoolsError(f"unknown rank rule {k!r}")
        if k == "rank" and (v != int(v) or v < 1):
            raise LoratoolsError(f"--rank must be a positive integer, got {v}")
        if k in ("energy", "fro") and not 0 < v <= 1:
            raise LoratoolsError(f"--{k} must be in (0, 1], got {v}")
        if k == "ratio" and v < 1:
            raise LoratoolsError(f"--ratio must be >= 1 (keep σ_i >= σ_1 / ratio), got {v}")
        if k == "threshold" and v < 0:
            raise LoratoolsError(f"--threshold must be >= 0, got {v}")
        if self.max_rank is not None and self.max_rank < 1:
            raise LoratoolsError(f"--max-rank must be >= 1, got {self.max_rank}")

    def describe(self) -> str:
        s = f"{self.kind}={self.value:g}"
        return s + (f", max_rank={self.max_rank}" if self.max_rank else "")


def describe_rule(rule: RankRule, budget_params: int | None) -> str:
    """The rule a run used, as reports and plot titles say it: the budget when there is one."""
    if budget_params is None:
        return rule.describe()
    return f"budget={budget_params:,} parameters" + (f", max_rank={rule.max_rank}" if rule.max_rank else "")


def choose_rank(S: torch.Tensor, rule: RankRule, total_energy: float | None = None) -> int:
    """Rank chosen by ``rule`` from singular values ``S`` (descending). ``total_energy`` is
    ‖M‖_F² when ``S`` is a truncated spectrum (default: Σ S²). Returns at least 1 when any
    singular value is positive; 0 for a zero matrix."""
    S = S.double().cpu()
    n = S.numel()
    if n == 0 or float(S[0]) <= 0:
        return 0
    e = S.pow(2)
    total = float(e.sum()) if total_energy is None else max(float(total_energy), float(e.sum()))
    if rule.kind == "rank":
        k = int(rule.value)
    elif rule.kind in ("energy", "fro"):
        target = rule.value if rule.kind == "energy" else rule.value**2
        cum = torch.cumsum(e, 0) / total
        hit = (cum >= target - 1e-12).nonzero()
        k = int(hit[0]) + 1 if hit.numel() else n + 1  # n + 1: the computed spectrum is not enough
    elif rule.kind == "ratio":
        k = int((S >= S[0] / rule.value).sum())
    else:
        k = int((S >= rule.value).sum())
    if rule.max_rank:
        k = min(k, rule.max_rank)
    return max(k, 1) if rule.kind != "threshold" else k


BLOCK_BYTES = 32 << 20  # float32 bytes of a DeltaBlocks row block (a module constant: tests lower it)


class DeltaBlocks:
    """M = ΔW = wt − wb (``transposed``: M = ΔWᵀ) for 2-D ``wb``, ``wt`` (file-backed maps, any float
    dtype) with at least as many rows as columns, read a block of rows of ΔW at a time: each block
    is the fp32 arithmetic of ``wt.float() - wb.float()``, on ``device``. Peak memory is one block
    (BLOCK_BYTES) plus the products' small operands, whatever the number of rows."""

    def __init__(self, wb: torch.Tensor, wt: torch.Tensor, device, transposed: bool = False):
        assert wb.dim() == 2 and wb.shape == wt.shape and wb.shape[0] >= wb.shape[1]
        self.wb, self.wt, self.device, self.transposed = wb, wt, torch.device(device), transposed
        r, c = wb.shape
        self.shape = torch.Size((c, r) if transposed else (r, c))
        self.step = max(1, BLOCK_BYTES // (4 * c))
        self._sum_sq = None

    def blocks(self):
        """(first row, fp32 block of ΔW's rows) for the rows of ΔW in order."""
        for i in range(0, self.wt.shape[0], self.step):
            blk = self.wt[i:i + self.step].to(self.device, torch.float32, copy=True)
            blk -= self.wb[i:i + self.step].to(self.device)
            yield i, blk

    def sum_sq(self) -> float:
        """‖ΔW‖²_F in float64, block by block (cached: a pass over the tensor)."""
        if self._sum_sq is None:
            self._sum_sq = sum(float(b.double().pow(2).sum()) for _, b in self.blocks())
        return self._sum_sq

    def _d_x(self, X):  # ΔW X: the blocks' products stacked
        out = torch.empty(self.wt.shape[0], X.shape[1], dtype=X.dtype, device=X.device)
        for i, b in self.blocks():
            torch.matmul(b.to(X.dtype), X, out=out[i:i + b.shape[0]])
        return out

    def _dt_y(self, Y):  # ΔWᵀ Y: the blocks' products summed
        out = torch.zeros(self.wt.shape[1], Y.shape[1], dtype=Y.dtype, device=Y.device)
        for i, b in self.blocks():
            out.addmm_(b.T.to(Y.dtype), Y[i:i + b.shape[0]])
        return out

    def mm(self, X):
        """M X."""
        return self._dt_y(X) if self.transposed else self._d_x(X)

    def rmm(self, Y):
        """Mᵀ Y."""
        return self._d_x(Y) if self.transposed else self._dt_y(Y)

    def gram(self) -> torch.Tensor:
        """ΔWᵀ ΔW (columns × columns) accumulated in float64."""
        c = self.wt.shape[1]
        G = torch.zeros(c, c, dtype=torch.float64, device=self.device)
        for _, b in self.blocks():
            b = b.double()
            G.addmm_(b.T, b)
        return G


def svd_exact(M):
    if isinstance(M, DeltaBlocks):
        return svd_gram(M)  # the float64 Gram matrix's eigendecomposition
    return torch.linalg.svd(M.float(), full_matrices=False)


def _gram_eig(M: DeltaBlocks):
    """(V, S) of ΔW = U S Vᵀ from the eigendecomposition of the float64 Gram matrix, S descending."""
    lam, V = torch.linalg.eigh(M.gram())
    lam, V = lam.flip(0), V.flip(1)
    return V, lam.clamp_min(0).sqrt()


def svd_gram(M: DeltaBlocks, rank=None):
    """Thin SVD of a DeltaBlocks matrix through ΔWᵀΔW = V S² Vᵀ in float64, then the other side
    ΔW V / S a block at a time, in float64. The Gram matrix squares the condition number: singular
    values below ~1e-7 of the largest are not resolved (float64: 1e-14 of the largest σ²), and
    their vectors are zero here. Returns fp32 U, S, Vh of M: all singular values, the vectors of
    the top ``rank`` only (a callable: ``rank(S)`` chooses it from the spectrum; None: all), so
    that no whole-delta-sized factor is formed unless asked for."""
    V, S = _gram_eig(M)
    k = S.numel() if rank is None else rank(S.float()) if callable(rank) else rank
    k = max(0, min(int(k), S.numel()))
    V, s = V[:, :k], S[:k]
    keep = s > S[0] * 1e-7 if S.numel() and S[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
    inv = torch.where(keep, 1 / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(s))
    X = V * inv
    W = torch.empty(M.wt.shape[0], k, dtype=torch.float32, device=M.device)  # ΔW V S⁻¹
    for i, b in M.blocks():
        W[i:i + b.shape[0]] = b.double() @ X
    V, S = V.float(), S.float()
    return (V, S, W.T.contiguous()) if M.transposed else (W, S, V.T.contiguous())


def svdvals(M) -> torch.Tensor:
    """All singular values of M (a tensor or DeltaBlocks, then from the float64 Gram matrix)."""
    if isinstance(M, DeltaBlocks):
        return _gram_eig(M)[1].float()
    return torch.linalg.svdvals(M.float())


def svd_randomized(M: torch.Tensor, l: int, power_iters: int = 4, seed: int = 0):
    """Approximate top-``l`` SVD of M (out × in). Returns U (out × l), S (l,), Vh (l × in)."""
    M = M.float()
    m, n = M.shape
    l = min(l, m, n)
    g = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, l, generator=g).to(M.device)
    # the products with M are written as gemm.linear(a, b) = a bᵀ (oneDNN on AVX-512 CPUs), M
    # always the second operand: Mᵀ Q is computed as (Qᵀ M)ᵀ, the faster order
    Q, _ = torch.linalg.qr(gemm.linear(M, omega.T))
    for _ in range(power_iters):
        Z, _ = torch.linalg.qr(gemm.linear(Q.T, M.T).T)
        Q, _ = torch.linalg.qr(gemm.linear(M, Z.T))
    Ub, S, Vh = torch.linalg.svd(gemm.linear(Q.T, M.T), full_matrices=False)
    return Q @ Ub, S, Vh


def svd_randomized_blocks(M: DeltaBlocks, l: int, power_iters: int = 4, seed: int = 0):
    """``svd_randomized`` of a DeltaBlocks matrix: the same sketch (same seed, same Ω) and steps,
    each product with M a pass over ΔW's row blocks."""
    m, n = M.shape
    l = min(l, m, n)
    g = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, l, generator=g).to(M.device)
    Q, _ = torch.linalg.qr(M.mm(omega))
    for _ in range(power_iters):
        Z, _ = torch.linalg.qr(M.rmm(Q))
        Q, _ = torch.linalg.qr(M.mm(Z))
    Ub, S, Vh = torch.linalg.svd(M.rmm(Q).T, full_matrices=False)
    return Q @ Ub, S, Vh


def svd_factored(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0):
    """Thin SVD of ``scale · B @ A`` (B: out × r, A: r × in) from the factors alone.
    Returns U (out × r'), S (r',), Vh (r' × in) with r' = min(r, out, in).

    Computed in fp64 (cheap at these sizes) so that nearly equal singular values, common in
    random-init or rsLoRA adapters, still give the right truncation subspace; returned in fp32."""
    B, A = B.double(), A.double()
    Qb, Rb = torch.linalg.qr(B)            # out × r', r' × r
    Qa, Ra = torch.linalg.qr(A.T)          # in × r'', r'' × r
    core = (Rb @ Ra.T) * scale              # r' × r''
    Uc, S, Vch = torch.linalg.svd(core, full_matrices=False)
    return (Qb @ Uc).float(), S.float(), (Vch @ Qa.T).float()


def split_sqrt(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int):
    """B (out × k) = U_k √S_k, A (k × in) = √S_k Vh_k."""
    r = S[:k].clamp_min(0).sqrt()
    return U[:, :k] * r, r[:, None] * Vh[:k]


def tail_error(S: torch.Tensor, k: int, total_energy: float) -> tuple[float, float]:
    """(retained energy fraction, relative Frobenius error) of keeping the top k of S."""
    kept = float(S[:k].double().pow(2).sum())
    if total_energy <= 0:
        return 1.0, 0.0
    kept = min(kept, total_energy)
    return kept / total_energy, math.sqrt(max(total_energy - kept, 0.0) / total_energy)


def _exact(M, rule: RankRule, total: float):
    """(U, S, Vh, chosen rank) of the exact SVD; of a DeltaBlocks, the vectors of the chosen rank only."""
    if isinstance(M, DeltaBlocks):
        U, S, Vh = svd_gram(M, lambda S: choose_rank(S, rule, total))
    else:
        U, S, Vh = svd_exact(M)
    return U, S, Vh, choose_rank(S, rule, total)


def factorize(M: torch.Tensor, rule: RankRule, exact: bool = False, oversample: int = 16,
              power_iters: int = 4, seed: int = 0, start_rank: int = 64):
    """Low-rank factorization of M chosen by ``rule``. Returns (B, A, S_kept, info) where
    ``B @ A`` approximates M, and info holds rank, retained energy and relative error.

    The randomized path sizes its sketch from the rule: ``rank`` and ``max_rank`` cap it; other
    rules start at ``start_rank`` and double the sketch until the rule is decided within it
    (the total energy ‖M‖_F² is exact, so energy rules need only the head of the spectrum)."""
    blocked = isinstance(M, DeltaBlocks)  # a vocabulary-sized delta, never whole
    randomized = svd_randomized_blocks if blocked else svd_randomized
    if not blocked:
        M = M.float()
    m, n = M.shape
    full = min(m, n)
    total = M.sum_sq() if blocked else sum_sq(M)
    if total == 0.0:
        z = (lambda *s: torch.zeros(*s, device=M.device)) if blocked else M.new_zeros
        return z(m, 0), z(0, n), z(0), {"rank": 0, "energy": 1.0, "rel_error": 0.0, "method": "zero"}
    if rule.kind == "rank" and int(rule.value) > full:
        raise LoratoolsError(f"rank {int(rule.value)} exceeds what a {m}×{n} matrix allows ({full})")
    cap = full
    if rule.kind == "rank":
        cap = int(rule.value)
    if rule.max_rank:
        cap = min(cap, rule.max_rank)
    method = "exact"
    if exact or cap + oversample >= full * 0.5:
        U, S, Vh, k = _exact(M, rule, total)
    else:
        l = cap if rule.kind == "rank" or rule.max_rank else min(start_rank, cap)
        while True:
            U, S, Vh = randomized(M, l + oversample, power_iters, seed)
            k = choose_rank(S[:l], rule, total)
            if k <= min(l, cap) and (k < l or l >= cap):
                method = "randomized"
                break
            if 2 * l + oversample >= full * 0.5:
                U, S, Vh, k = _exact(M, rule, total)
                break
            l = min(2 * l, cap)
    k = min(k, S.numel())
    B, A = split_sqrt(U, S, Vh, k)
    energy, err = tail_error(S, k, total)
    info = {"rank": k, "energy": energy, "rel_error": err, "method": method, "spectrum": S.cpu()}
    if blocked:
        info["row_blocks"] = True
    return B, A, S[:k], info


def allocate_budget(spectra: dict[str, tuple[torch.Tensor, int]], budget_params: int, min_rank: int = 1) -> dict[str, int]:
    """Spend a parameter budget across modules to retain the most energy.

    ``spectra[name] = (S, cost)``: singular values of the module's delta (descending) and the
    parameters one rank-1 component costs (in + out). Each component is an item of value σ²
    and weight ``cost``; taking them greedily by σ²/cost (which is optimal for this knapsack up
    to the last item, since within a module values only decrease) gives the ranks. Every
    module with a non-zero spectrum first gets ``min_rank`` components so it stays present."""
    ranks = {n: 0 for n in spectra}
    spent = 0
    items = []
    for n, (S, cost) in spectra.items():
        s2 = S.double().pow(2).tolist()
        nz = [x for x in s2 if x > 0]
        base = min(min_rank, len(nz))
        ranks[n] = base
        spent += base * cost
        items += [(x / cost, n, i) for i, x in enumerate(nz) if i >= base]
    if spent > budget_params:
        raise LoratoolsError(f"budget of {budget_params:,} parameters is below the {spent:,} needed for rank {min_rank} on every module")
    # within a module σ² decreases with i, so sorting by density keeps each module's prefix order
    items.sort(key=lambda t: (-t[0], t[1], t[2]))
    for _, n, i in items:
        cost = spectra[n][1]
        if i != ranks[n]:
            continue  # a later component of a module whose earlier one did not fit
        if spent + cost > budget_params:
            continue
        ranks[n] += 1
        spent += cost
    return ranks


def parse_budget(text: str, bytes_per_param: int) -> int:
    """'5M' / '1.5G' parameters, or '20MB' / '1GiB' bytes (divided by the output dtype size)."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*", str(text), re.I)
    if not m:
        raise LoratoolsError(f"cannot parse budget {text!r}: use parameters (5M) or bytes (20MB)")
    num, unit, byt = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if byt and byt.lower() == "ib" else 1000
    n = num * base ** "_KMGT".index(unit or "_")
    return int(n // bytes_per_param) if byt else int(n)
