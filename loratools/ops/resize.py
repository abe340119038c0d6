"""Shrink an adapter's ranks optimally without forming any dense ΔW.

For each module, scale·B·A = U S Vh comes from QR of B and Aᵀ plus an SVD of the r × r core
(``factor.svd_factored``); keeping the top k singular triplets is the best rank-k
approximation of the effective ΔW (Eckart-Young). Per-module scales (rank/alpha patterns,
rsLoRA) are folded into the new factors, which carry scale 1.
"""
from __future__ import annotations

import time

import torch

from ..adapter import Adapter, LoraModule
from ..modelinfo import head_name
from ..errors import UnsupportedError
from . import factor
from .common import select_adapter
from ..formats.peft_experts import gate_up_pairs


def _energy(m: LoraModule) -> float:
    """‖s·B·A‖²_F = s²·tr((BᵀB)(AAᵀ)) in float64, without forming B·A."""
    B, A = m.B.double(), m.A.double()
    return float(((B.T @ B) * (A @ A.T)).sum()) * m.scale ** 2


def tied_mirrors(modules: dict[str, LoraModule]) -> dict[str, str]:
    """{embedding module: head module} for each embedding LoRA whose head (``modelinfo.head_name``)
    carries exactly the same delta in its own orientation (B_head = Aᵀ, A_head = Bᵀ, the same scale)."""
    out = {}
    for n, m in modules.items():
        if m.kind != "embedding" or m.magnitude is not None:
            continue
        h = head_name(n + ".weight")[: -len(".weight")]
        hm = modules.get(h)
        if hm is None or hm.kind != "linear" or hm.magnitude is not None or hm.bias is not None or hm.scale != m.scale:
            continue
        if hm.B.shape == m.A.T.shape and hm.A.shape == m.B.T.shape and hm.B.dtype == m.A.dtype and \
                torch.equal(hm.B, m.A.T) and torch.equal(hm.A, m.B.T):
            out[n] = h
    return out


def resize(adapter: Adapter, rule: factor.RankRule, budget_params: int | None = None,
           dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
           include=None, exclude=None) -> tuple[Adapter, dict]:
    """Return (resized adapter, report). ``dtype`` None keeps each module's dtype; ``include`` /
    ``exclude``: regexes selecting modules by name (extract's rule, common.selected)."""
    if adapter.use_dora:
        raise UnsupportedError("resizing a DoRA adapter would change the direction its magnitude vector normalizes; merge it instead",
                               adapter.source or None)
    whole = adapter
    adapter, dropped = select_adapter(adapter, include, exclude)
    report = {"rule": factor.describe_rule(rule, budget_params), "budget_params": budget_params, "dropped": dropped,
              "modules": {}}
    input_energy = sum(_energy(m) for m in whole.modules.values())  # the input adapter's ‖ΔŴ‖², dropped modules included
    kept_energy = 0.0
    svds = {}
    t0 = time.perf_counter()
    # an expert's gate and up LoRA that share one A (a fused gate_up LoRA) are resized as one matrix,
    # [s_g·B_g; s_u·B_u]·A: the optimum for the fused parameter, and the pair keeps one shared A
    pairs = {g: u for g, u in gate_up_pairs(adapter.modules, adapter.family)}
    paired = set(pairs.values())
    # a tied model's embedding LoRA carried on lm_head too (as extract writes it: the head's B is the
    # embedding's Aᵀ, its A the embedding's Bᵀ) is resized once and mirrored, so that the two stay equal
    # (a merge keeps the tie) and each component is paid for twice
    mirrors = tied_mirrors(adapter.modules)
    units: dict[str, LoraModule] = {}
    for name, m in adapter.modules.items():
        if name in paired or name in mirrors.values():
            continue
        if name in pairs:
            u = adapter.modules[pairs[name]]
            B = torch.cat([m.B.float() * m.scale, u.B.float() * u.scale], 0)
            m = LoraModule(A=m.A, B=B, scale=1.0, kind="linear")
        units[name] = m
    for name, m in units.items():
        # --rank N is a cap: a module already at rank ≤ N (or smaller than N) keeps its rank
        U, S, Vh = factor.svd_factored(m.B.to(device), m.A.to(device), m.scale)
        svds[name] = (U, S, Vh)
    if budget_params is not None:
        spectra = {n: (S, (units[n].out_features + units[n].in_features) * (2 if n in mirrors else 1))
                   for n, (_, S, _) in svds.items()}
        if rule.max_rank:
            spectra = {n: (S[:rule.max_rank], c) for n, (S, c) in spectra.items()}
        ranks = factor.allocate_budget(spectra, budget_params)
    else:
        ranks = {n: factor.choose_rank(S, rule) for n, (_, S, _) in svds.items()}
    out: dict[str, LoraModule] = {}
    for name, m in units.items():
        U, S, Vh = svds[name]
        k = min(ranks[name], m.rank, S.numel())
        total = float(S.double().pow(2).sum())
        energy, err = factor.tail_error(S, k, total)
        kept_energy += energy * total * (2 if name in mirrors else 1)  # a mirrored head keeps as much as its embedding
        report["modules"][name] = {"from_rank": m.rank, "rank": k, "energy": energy, "rel_error": err,
                                   "singular_values": [float(x) for x in S[:k]]}
        if k == 0:
            continue
        B, A = factor.split_sqrt(U, S, Vh, k)
        dt = dtype or m.A.dtype
        bias = None if m.bias is None else (m.bias.float() * m.scale).to(dt)
        dt = dtype or adapter.modules[name].A.dtype
        A, B = A.cpu().to(dt).contiguous(), B.cpu().to(dt).contiguous()
        if name in pairs:  # split the pair's B back into gate rows and up rows, one A for both
            rows = adapter.modules[name].out_features
            out[name] = LoraModule(A=A, B=B[:rows].contiguous(), scale=1.0, alpha=float(k), kind="linear")
            out[pairs[name]] = LoraModule(A=A, B=B[rows:].contiguous(), scale=1.0, alpha=float(k), kind="linear")
            report["modules"][pairs[name]] = dict(report["modules"][name], fused_with=name)
            continue
        out[name] = LoraModule(A=A, B=B, scale=1.0, alpha=float(k), bias=bias, kind=m.kind)
        if name in mirrors:  # ΔE = (B A)ᵀ = Aᵀ Bᵀ: the head's linear LoRA is B' = Aᵀ, A' = Bᵀ
            h = mirrors[name]
            dt = dtype or adapter.modules[h].A.dtype
            out[h] = LoraModule(A=B.T.to(dt).contiguous(), B=A.T.to(dt).contiguous(), scale=1.0, alpha=float(k), kind="linear")
            report["modules"][h] = dict(report["modules"][name], tied_to=name)
    cfg = dict(adapter.config)
    cfg.update(use_rslora=False, rank_pattern={}, alpha_pattern={})
    report["seconds"] = time.perf_counter() - t0
    # "retained vs input adapter": not retained energy (common.retained_energy), which is relative to
    # the fine-tune; resize sees only the adapter
    report["retained_vs_input"] = kept_energy / input_energy if input_energy > 0 else 1.0
    report["parameters_before"] = whole.num_parameters()
    res = Adapter(modules=out, modules_to_save=dict(adapter.modules_to_save), config=cfg, source=adapter.source,
                  format=adapter.format, family=adapter.family, num_experts=adapter.num_experts)
    report["parameters_after"] = res.num_parameters()
    return res, report
