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
from ..errors import UnsupportedError
from . import factor


def resize(adapter: Adapter, rule: factor.RankRule, budget_params: int | None = None,
           dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> tuple[Adapter, dict]:
    """Return (resized adapter, report). ``dtype`` None keeps each module's dtype."""
    if adapter.use_dora:
        raise UnsupportedError("resizing a DoRA adapter would change the direction its magnitude vector normalizes; merge it instead",
                               adapter.source or None)
    report = {"rule": rule.describe(), "budget_params": budget_params, "modules": {}}
    svds = {}
    t0 = time.perf_counter()
    for name, m in adapter.modules.items():
        # --rank N is a cap: a module already at rank ≤ N (or smaller than N) keeps its rank
        U, S, Vh = factor.svd_factored(m.B.to(device), m.A.to(device), m.scale)
        svds[name] = (U, S, Vh)
    if budget_params is not None:
        spectra = {n: (S, adapter.modules[n].out_features + adapter.modules[n].in_features) for n, (_, S, _) in svds.items()}
        if rule.max_rank:
            spectra = {n: (S[:rule.max_rank], c) for n, (S, c) in spectra.items()}
        ranks = factor.allocate_budget(spectra, budget_params)
    else:
        ranks = {n: factor.choose_rank(S, rule) for n, (_, S, _) in svds.items()}
    out: dict[str, LoraModule] = {}
    for name, m in adapter.modules.items():
        U, S, Vh = svds[name]
        k = min(ranks[name], m.rank, S.numel())
        total = float(S.double().pow(2).sum())
        energy, err = factor.tail_error(S, k, total)
        report["modules"][name] = {"from_rank": m.rank, "rank": k, "energy": energy, "rel_error": err,
                                   "singular_values": [float(x) for x in S[:k]]}
        if k == 0:
            continue
        B, A = factor.split_sqrt(U, S, Vh, k)
        dt = dtype or m.A.dtype
        bias = None if m.bias is None else (m.bias.float() * m.scale).to(dt)
        out[name] = LoraModule(A=A.cpu().to(dt).contiguous(), B=B.cpu().to(dt).contiguous(), scale=1.0,
                               alpha=float(k), bias=bias, kind=m.kind)
    cfg = dict(adapter.config)
    cfg.update(use_rslora=False, rank_pattern={}, alpha_pattern={})
    report["seconds"] = time.perf_counter() - t0
    report["parameters_before"] = adapter.num_parameters()
    res = Adapter(modules=out, modules_to_save=dict(adapter.modules_to_save), config=cfg, source=adapter.source,
                  format=adapter.format)
    report["parameters_after"] = res.num_parameters()
    return res, report
