"""Adapter arithmetic: weighted combinations of adapters, module by module.

- ``cat`` / ``linear``: exact. Factors are stacked, A' = [A₁; A₂; …], B' = [w₁s₁B₁, w₂s₂B₂, …],
  so B'A' = Σ wᵢ sᵢ Bᵢ Aᵢ with no cross terms, whatever the ranks.
- ``svd``: the optimal rank-k approximation of that sum, from the stacked factors
  (``factor.svd_factored``), never forming the dense matrix.
- ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: these act on the entries of
  each dense ΔWᵢ = sᵢ Bᵢ Aᵢ, one module at a time, then the result is re-factored to rank k.
  ties: keep the top ``density`` fraction of each ΔWᵢ by magnitude, elect each entry's sign as
  the sign of Σ ΔWᵢ (pruned, unweighted, as PEFT does), average the weighted entries that agree.
  dare: keep each entry with probability ``density`` and divide by it (seeded), then sum
  (dare_linear) or elect signs as ties does (dare_ties). magnitude_prune: ties' pruning, then sum.
"""
from __future__ import annotations

import zlib
from typing import Sequence

import torch

from ..adapter import Adapter, LoraModule
from ..errors import IncompatibleError, LoratoolsError, UnsupportedError
from . import factor
from ..formats.peft_experts import gate_up_pairs

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DENSE = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


def _check(adapters: Sequence[Adapter], weights: Sequence[float]) -> None:
    if not adapters:
        raise LoratoolsError("no adapters to combine")
    if len(weights) != len(adapters):
        raise LoratoolsError(f"{len(weights)} weights for {len(adapters)} adapters")
    shapes: dict[str, tuple] = {}
    for a in adapters:
        if a.use_dora:
            raise UnsupportedError("DoRA adapters cannot be combined (their magnitude vectors do not add)", a.source or None)
        if a.modules_to_save:
            raise UnsupportedError(f"adapters with modules_to_save ({', '.join(sorted(a.modules_to_save))}) cannot be combined",
                                   a.source or None)
        for n, m in a.modules.items():
            s = (m.kind, m.weight_shape)
            if shapes.setdefault(n, s) != s:
                raise IncompatibleError(f"module {n!r} is {s} here but {shapes[n]} in another adapter: adapters for different bases",
                                        a.source or None)


def magnitude_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density · n) entries of largest magnitude (PEFT's magnitude pruning)."""
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    if k > 0:
        mask[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = 1
    return t * mask.reshape(t.shape)


def dare_mask(t: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability ``density`` and rescale by 1/density (seeded)."""
    keep = torch.rand(t.shape, generator=gen) < density
    return t * keep.to(t.device, t.dtype) / density


def dense_merge(deltas: list[torch.Tensor], weights: list[float], method: str, density: float,
                gen: torch.Generator | None = None) -> torch.Tensor:
    """Entry-wise merge of task deltas (each already scaled by its LoRA scale), following the
    definitions PEFT uses: the majority sign is elected from the unweighted pruned deltas
    (ties toward +), and the weighted entries that agree with it are averaged."""
    if method in ("ties", "magnitude_prune"):
        ts = [magnitude_mask(d, density) for d in deltas]
    else:
        ts = [dare_mask(d, density, gen) for d in deltas]
    if method in ("magnitude_prune", "dare_linear"):
        return sum(t * w for t, w in zip(ts, weights))
    stacked = torch.stack(ts)
    majority = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = stacked.sign() == majority
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * deltas[0].dim())
    return (stacked * w * agree).sum(0) / agree.sum(0).clamp(min=1.0)


def combine(adapters: Sequence[Adapter], weights: Sequence[float] | None = None, method: str = "linear",
            rank: int | None = None, density: float = 1.0, seed: int = 0, exact: bool = False,
            dtype: torch.dtype = torch.float32) -> Adapter:
    if method not in METHODS:
        raise LoratoolsError(f"unknown method {method!r} (one of {', '.join(METHODS)})")
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    _check(adapters, weights)
    if method in DENSE and not 0 < density <= 1:
        raise LoratoolsError(f"--density must be in (0, 1], got {density}")
    if rank is not None and rank < 1:
        raise LoratoolsError(f"--rank must be >= 1, got {rank}")
    bases = {a.config.get("base_model_name_or_path") for a in adapters} - {None, ""}
    if len(bases) > 1:
        import warnings

        warnings.warn(f"the adapters name different base models ({', '.join(sorted(map(str, bases)))}); their shapes agree, "
                      "but a combination only makes sense for the same base", stacklevel=2)
    names = sorted({n for a in adapters for n in a.modules})
    # an expert's gate and up that share one A in every input (fused gate_up LoRA) are combined as one
    # stacked matrix by the re-factoring methods, so the result is again one fused LoRA with a shared A
    # (linear / cat keep the shared A by themselves: both stack the same A's)
    pairs = {}
    if method not in ("linear", "cat"):
        per = [dict(gate_up_pairs(a.modules, a.family)) for a in adapters]
        for g in {g for p in per for g in p}:
            u = next(p[g] for p in per if g in p)
            if all((g in a.modules or u in a.modules) == (g in p) for a, p in zip(adapters, per)):
                pairs[g] = u
    paired = set(pairs.values())
    out: dict[str, LoraModule] = {}
    for name in names:
        if name in paired:
            continue
        if name in pairs:
            out.update(_combine_pair(name, pairs[name], adapters, weights, method, rank, density, seed, exact, dtype))
            continue
        parts = [(a.modules[name], w) for a, w in zip(adapters, weights) if name in a.modules]
        kind = parts[0][0].kind
        bias = None
        if any(m.bias is not None for m, _ in parts):
            bias = sum((m.bias.float() * m.scale * w for m, w in parts if m.bias is not None))
        A = torch.cat([m.A.float() for m, _ in parts], 0)
        B = torch.cat([m.B.float() * (m.scale * w) for m, w in parts], 1)
        k = rank or max(m.rank for m, _ in parts)
        if method in ("linear", "cat"):
            pass
        elif method == "svd":
            U, S, Vh = factor.svd_factored(B, A)
            B, A = factor.split_sqrt(U, S, Vh, min(k, S.numel()))
        else:
            gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFFFFFF)
            deltas = [(m.B.float() @ m.A.float()) * m.scale for m, _ in parts]
            merged = dense_merge(deltas, [w for _, w in parts], method, density, gen)
            full = min(merged.shape)
            if k > full:
                raise IncompatibleError(f"rank {k} exceeds what module {name!r} ({merged.shape[0]}×{merged.shape[1]}) allows ({full})")
            B, A, _, _ = factor.factorize(merged, factor.RankRule("rank", k), exact=exact, seed=seed)
            if B.shape[1] == 0:
                continue
        out[name] = LoraModule(A=A.to(dtype).contiguous(), B=B.to(dtype).contiguous(), scale=1.0,
                               alpha=float(A.shape[0]), kind=kind,
                               bias=None if bias is None else bias.to(dtype))
    cfg = {k: v for k, v in adapters[0].config.items() if k in ("base_model_name_or_path", "task_type")}
    fam = next((a.family for a in adapters if a.family), None)
    ne = max((a.num_experts for a in adapters if a.num_experts), default=None)
    return Adapter(modules=out, config=cfg, format="peft", family=fam, num_experts=ne)


def _combine_pair(g: str, u: str, adapters, weights, method, rank, density, seed, exact, dtype) -> dict[str, LoraModule]:
    """svd / dense combination of one expert's gate and up as the stacked [gate; up] matrix."""
    parts = [(a.modules[g], a.modules[u], w) for a, w in zip(adapters, weights) if g in a.modules]
    rows = parts[0][0].out_features
    k = rank or max(mg.rank for mg, _, _ in parts)
    if method == "svd":
        A = torch.cat([mg.A.float() for mg, _, _ in parts], 0)
        B = torch.cat([torch.cat([mg.B.float() * (mg.scale * w), mu.B.float() * (mu.scale * w)], 0) for mg, mu, w in parts], 1)
        U, S, Vh = factor.svd_factored(B, A)
        B, A = factor.split_sqrt(U, S, Vh, min(k, S.numel()))
    else:
        gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(g.encode())) & 0x7FFFFFFF)
        deltas = [torch.cat([(mg.B.float() @ mg.A.float()) * mg.scale, (mu.B.float() @ mu.A.float()) * mu.scale], 0)
                  for mg, mu, _ in parts]
        merged = dense_merge(deltas, [w for _, _, w in parts], method, density, gen)
        if k > min(merged.shape):
            raise IncompatibleError(f"rank {k} exceeds what the fused gate/up of {g!r} ({merged.shape[0]}×{merged.shape[1]}) allows")
        B, A, _, _ = factor.factorize(merged, factor.RankRule("rank", k), exact=exact, seed=seed)
        if B.shape[1] == 0:
            return {}
    A = A.to(dtype).contiguous()
    return {g: LoraModule(A=A, B=B[:rows].to(dtype).contiguous(), scale=1.0, alpha=float(A.shape[0])),
            u: LoraModule(A=A, B=B[rows:].to(dtype).contiguous(), scale=1.0, alpha=float(A.shape[0]))}


def scale_adapter(adapter: Adapter, factor_: float) -> Adapter:
    """Multiply every ΔW (and lora bias) by ``factor_``; factors unchanged, scales multiplied."""
    if adapter.use_dora:
        raise UnsupportedError("a DoRA adapter cannot be scaled linearly", adapter.source or None)
    if adapter.modules_to_save:
        raise UnsupportedError("an adapter with modules_to_save cannot be scaled", adapter.source or None)
    mods = {n: LoraModule(A=m.A, B=m.B, scale=m.scale * factor_, alpha=None, bias=m.bias, kind=m.kind)
            for n, m in adapter.modules.items()}
    return Adapter(modules=mods, config=dict(adapter.config), source=adapter.source, format=adapter.format,
                   family=adapter.family, num_experts=adapter.num_experts)
