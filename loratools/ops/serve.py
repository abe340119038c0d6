"""Serving-ready adapters: ``convert --for RUNTIME`` and ``inspect --for RUNTIME``.

``lint(adapter, profile)`` lists what a runtime (loratools.runtimes.profiles) would refuse in an
adapter as it is, or read differently from PEFT. ``convert_for`` writes one it accepts:

- per-module scales (rank_pattern, alpha_pattern, rsLoRA) folded into B, so that the runtime's one
  reading of the scale gives PEFT's ΔW (exact up to one rounding); for a PEFT output every module
  gets the same rank r (zero rows / columns, which change nothing) and lora_alpha = r, so that a
  runtime reading one ``lora_alpha / r`` and PEFT read the same scale 1;
- ranks above the cap cut by the optimal factored resize (Eckart-Young on s·B·A);
- DoRA turned into plain LoRA: ΔW = m / ‖W + sBA‖_row · (W + sBA) − W (PEFT's DoRA: the norm of
  each output row of the combined weight), factored optimally at the cap (default: the module's rank);
- modules_to_save copies of embed_tokens / lm_head turned into LoRA of their delta from the base,
  where the runtime takes LoRA there (else refused by name); unchanged copies are dropped.

Each lossy step reports per module and in total the retained energy 1 − ‖ΔW − ΔŴ‖² / ‖ΔW‖² (the
quantity of ops.common.retained_energy, here relative to the module's exact ΔW); with a base, the
cost is also measured as KL(original ‖ converted) and top-1 agreement of the reference decoder
on a few prompts, and ``max_kl`` refuses to write a conversion that costs more.
"""
from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import torch

from ..adapter import Adapter, LoraModule, lora_scale
from ..errors import InputError, LoratoolsError, UnsupportedError
from ..runtimes.profiles import Profile, profile as get_profile
from . import factor
from .common import retained_energy


class CostExceeded(LoratoolsError):
    """The conversion costs more than --max-kl allows (exit 1, as a failed validate)."""

    exit_code = 1


SPECIAL = ("embed_tokens", "lm_head")


def _special(name: str) -> str | None:
    """'embed_tokens' / 'lm_head' when the module (or modules_to_save tensor) is one of them."""
    leaf = name.removesuffix(".weight").rsplit(".", 1)[-1]
    return leaf if leaf in SPECIAL else None


def _runtime_scale(a: Adapter, m: LoraModule, prof: Profile) -> float:
    """The scale ``prof``'s runtime applies to module ``m`` of a PEFT adapter loaded as it is."""
    cfg = a.config if a.format == "peft" else {}
    r_cfg = int(cfg.get("r", m.rank))
    alpha = float(cfg.get("lora_alpha", m.alpha if m.alpha is not None else m.rank))
    rs = prof.reads_rslora and a.use_rslora
    if prof.scale == "config":
        return lora_scale(alpha, r_cfg, rs)
    if prof.scale == "per_file_alpha":  # llama.cpp's converter: one lora_alpha over each tensor's rank
        return alpha / m.rank
    return m.scale


def lint(a: Adapter, prof: Profile | str) -> list[dict]:
    """Each thing the runtime would refuse (``"action": "refuse"``) or read differently from PEFT
    (``"differs"``) in adapter ``a`` as it is; ``fix`` says what ``convert --for`` does about it."""
    prof = get_profile(prof) if isinstance(prof, str) else prof
    out = []

    def add(action, what, msg, fix):
        out.append({"action": action, "what": what, "message": msg, "fix": fix})

    rt = prof.runtime
    if prof.output == "peft" and a.format != "peft":
        add("refuse", "format", f"{rt} loads PEFT adapter folders, this is a {a.format} file", "written as PEFT")
    dora = sorted(n for n, m in a.modules.items() if m.magnitude is not None)
    if dora and not prof.dora:
        add("refuse", "dora", f"{rt} does not apply DoRA (use_dora; {len(dora)} modules, e.g. {dora[0]})",
            "DoRA's exact ΔW factored into plain LoRA (needs --base)")
    for key in sorted(a.modules_to_save):
        sp = _special(key)
        if key.removesuffix(".weight") in a.modules:  # PEFT's save_embedding_layers copy of a LoRA-targeted layer
            add("differs", "modules_to_save", f"{rt} ignores the saved copy of {key} (PEFT's save_embedding_layers); "
                "it changes nothing when it equals the base", "dropped when it equals the base (--base)")
            continue
        how = (f"LoRA of its delta from the base (needs --base)" if sp in prof.lora_on
               else f"none: {rt} takes no LoRA on {key.removesuffix('.weight')}; merge the adapter instead")
        add("refuse", "modules_to_save", f"{rt} does not load modules_to_save ({key}: a whole replacement tensor)", how)
    bias = sorted(n for n, m in a.modules.items() if m.bias is not None)
    if bias and not prof.lora_bias:
        add("refuse", "lora_bias", f"{rt} drops lora_bias (lora_B.bias on {len(bias)} modules, e.g. {bias[0]})",
            "none: refused; merge the adapter instead")
    for n, m in sorted(a.modules.items()):
        sp = _special(n)
        if sp and sp not in prof.lora_on:
            add("refuse", sp, f"{rt} takes no LoRA on {sp} (module {n})", "none: refused; merge the adapter instead")
        elif prof.output == "onnx_adapter" and not sp and not re.search(r"(^|\.)layers\.\d+\.", n):
            add("refuse", "module", f"{rt} adapters have slots on the blocks' linear layers only (module {n})",
                "none: refused; use a merged export")
    ranks = [m.rank for m in a.modules.values()]
    rmax = max(ranks, default=0)
    if prof.ranks is not None and rmax > max(prof.ranks):
        add("refuse", "rank", f"rank {rmax} is above {rt}'s largest max LoRA rank {max(prof.ranks)}",
            f"cut to --max-rank (default {prof.default_rank}) by the optimal resize")
    elif prof.default_rank is not None and rmax > prof.default_rank:
        ok = min(r for r in prof.ranks if r >= rmax) if prof.ranks else rmax
        add("refuse", "rank", f"rank {rmax} is above {rt}'s default max LoRA rank {prof.default_rank} "
            f"(start it with a max LoRA rank of {ok})", f"cut to --max-rank (default {prof.default_rank}) by the optimal resize")
    if prof.scale != "folded":
        wrong = [(n, m.scale, _runtime_scale(a, m, prof)) for n, m in sorted(a.modules.items()) if m.magnitude is None]
        wrong = [(n, s, r) for n, s, r in wrong if abs(s - r) > 1e-9 * max(abs(s), 1e-30)]
        if wrong:
            why = []
            if a.use_rslora and not prof.reads_rslora:
                why.append("use_rslora is not read")
            if (a.config.get("rank_pattern") or a.config.get("alpha_pattern")) and not prof.reads_patterns:
                why.append("rank_pattern / alpha_pattern do not change its scale")
            if prof.scale == "per_file_alpha":
                why.append("one lora_alpha per file over each tensor's rank")
            n, s, r = wrong[0]
            add("differs", "scale", f"{rt} reads a different scale on {len(wrong)} modules ({'; '.join(why) or 'one scale for all'}): "
                f"e.g. {n} gets {r:.6g} instead of PEFT's {s:.6g}", "each module's scale folded into B (exact)")
    if prof.output == "peft" and len(set(ranks)) > 1:
        add("differs", "rank_pattern", f"modules have different ranks {sorted(set(ranks))}: {rt} sizes and scales by the "
            "config's one r", "every module padded to one rank with zeros (exact)")
    return out


# -- convert --for ---------------------------------------------------------------------------
def _pad(B: torch.Tensor, A: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = A.shape[0]
    if k == r:
        return B, A
    return (torch.cat([B, B.new_zeros(B.shape[0], r - k)], 1).contiguous(),
            torch.cat([A, A.new_zeros(r - k, A.shape[1])], 0).contiguous())


def _cut(B: torch.Tensor, A: torch.Tensor, scale: float, k: int):
    """The best rank-k (B', A') of scale·B·A (scale folded), and (kept, total) energy."""
    U, S, Vh = factor.svd_factored(B, A, scale)
    total = float(S.double().pow(2).sum())
    k = min(k, S.numel())
    kept = float(S[:k].double().pow(2).sum())
    Bn, An = factor.split_sqrt(U, S, Vh, k)
    return Bn, An, kept, total


def _factor_dense(D: torch.Tensor, k: int):
    """The best rank-k factors of a dense ΔW, and (kept, total) energy: extract's SVD (exact when k is
    not small against the matrix, else the seeded randomized SVD with power iterations)."""
    from .common import sum_sq

    total = sum_sq(D)
    if total == 0:
        return D.new_zeros(D.shape[0], 0), D.new_zeros(0, D.shape[1]), 0.0, 0.0
    k = min(k, *D.shape)
    B, A, S, info = factor.factorize(D, factor.RankRule("rank", k))
    kept = float(S.double().pow(2).sum())
    return B, A, min(kept, total), total


def dora_delta(W: torch.Tensor, m: LoraModule) -> torch.Tensor:
    """PEFT's DoRA as an additive ΔW (fp32): W' = m / ‖W + sBA‖_row · (W + sBA), ΔW = W' − W. The
    norm is taken over each output row (dim=1 of the (out, in) weight), as PEFT's DoraLinearLayer
    does; PEFT detaches it for training only, the forward value is this."""
    W = W.float()
    comb = W + m.scale * (m.B.float() @ m.A.float())
    norm = torch.linalg.norm(comb, dim=1)
    return (m.magnitude.float() / norm)[:, None] * comb - W


class _BaseWeights:
    """The base model's weights by HF name, read one at a time in fp32 (a tied head is its embedding)."""

    def __init__(self, base):
        from ..checkpoint import Checkpoint
        from ..modelinfo import read_model_info, tied_pair

        self.base = base
        self.ck = Checkpoint.open(base)
        info = read_model_info(base) if Path(base).is_dir() else None
        self.pair = tied_pair(info, self.ck.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        from ..modelinfo import head_source

        src = head_source(name, self.pair)
        if src not in self.ck:
            raise InputError(f"the base model has no tensor {name!r}", self.base)
        return self.ck.get(src).float()

    def close(self):
        self.ck.close()


def convert_for(a: Adapter, prof: Profile | str, max_rank: int | None = None, base=None) -> tuple[Adapter, dict]:
    """The adapter ``prof``'s runtime accepts (in memory, scale 1 per module) and the report of what
    each step cost. Raises before any work for what cannot be converted."""
    prof = get_profile(prof) if isinstance(prof, str) else prof
    src = a.source or None
    if max_rank is not None:
        prof.check_cap(int(max_rank))
    cap = int(max_rank) if max_rank is not None else prof.default_rank
    rt = prof.runtime
    from ..formats.peft import expert_modules

    experts = expert_modules(a)
    if experts or a.config.get("target_parameters"):
        raise UnsupportedError(f"convert --for does not convert mixture-of-experts expert LoRA (e.g. "
                               f"{(experts or a.config['target_parameters'])[0]}): each runtime reads its own expert form "
                               "(inspect lists what it does); write that form with convert --to peft --expert-form", src)
    bias = sorted(n for n, m in a.modules.items() if m.bias is not None)
    if bias and not prof.lora_bias:
        raise UnsupportedError(f"{rt} drops lora_bias (lora_B.bias on {bias[0]}); merge the adapter instead", src)
    for n in sorted(a.modules):
        sp = _special(n)
        if sp and sp not in prof.lora_on:
            raise UnsupportedError(f"{rt} takes no LoRA on {sp} (module {n}); merge the adapter instead", src)
        if prof.output == "onnx_adapter" and not sp and not re.search(r"(^|\.)layers\.\d+\.", n):
            raise UnsupportedError(f"{rt} adapters have slots on the blocks' linear layers only (module {n})", src)
    for key in sorted(a.modules_to_save):
        sp = _special(key)
        if sp is None or sp not in prof.lora_on:
            raise UnsupportedError(f"{rt} does not load modules_to_save and takes no LoRA on "
                                   f"{key.removesuffix('.weight')}: {key} cannot be served; merge the adapter instead", src)
    dora = sorted(n for n, m in a.modules.items() if m.magnitude is not None)
    if dora and base is None:
        raise LoratoolsError(f"{rt} does not apply DoRA: turning it into plain LoRA needs the base weights for the "
                             f"magnitude's norm (module {dora[0]}); pass --base", src)
    if a.modules_to_save and base is None:
        raise LoratoolsError(f"{rt} does not load modules_to_save: turning {sorted(a.modules_to_save)[0]} into LoRA of its "
                             "delta needs the base weights; pass --base", src)
    if prof.needs_base and base is None:
        raise LoratoolsError(f"a {rt} adapter needs the base model for its tensor names; pass --base", src)

    W = _BaseWeights(base) if (dora or a.modules_to_save) else None
    try:
        return _convert(a, prof, cap, W, src)
    finally:
        if W is not None:
            W.close()


def _convert(a: Adapter, prof: Profile, cap: int | None, W, src) -> tuple[Adapter, dict]:
    steps = {"rank_cap": {}, "dora": {}, "modules_to_save": {}}
    sums = {k: [0.0, 0.0] for k in steps}
    mods: dict[str, LoraModule] = {}
    folded = 0
    for n, m in sorted(a.modules.items()):
        dt = m.A.dtype
        if m.magnitude is not None:
            k = min(cap or m.rank, *m.weight_shape)
            B, A, kept, total = _factor_dense(dora_delta(W[f"{n}.weight"], m), k)
            step = "dora"
        elif cap is not None and m.rank > cap:
            B, A, kept, total = _cut(m.B, m.A, m.scale, cap)
            step = "rank_cap"
        else:
            folded += m.scale != 1.0
            B = (m.B.float() * m.scale) if m.scale != 1.0 else m.B
            mods[n] = LoraModule(A=m.A, B=B.to(dt).contiguous(), scale=1.0, alpha=float(m.rank), kind=m.kind)
            continue
        steps[step][n] = {"from_rank": m.rank, "rank": int(A.shape[0]), "retained": retained_energy(total - kept, total)}
        sums[step][0] += kept
        sums[step][1] += total
        if A.shape[0] == 0:
            continue
        mods[n] = LoraModule(A=A.to(dt).contiguous(), B=B.to(dt).contiguous(), scale=1.0, alpha=float(A.shape[0]), kind=m.kind)
    dt0 = a.dtype() or torch.float32
    dropped = []
    for key, t in sorted(a.modules_to_save.items()):
        D = t.float() - W[key]
        name = key.removesuffix(".weight")
        if not bool(D.any()):
            dropped.append(key)  # PEFT saved an unchanged copy: it replaces nothing
            continue
        k = cap or max((m.rank for m in a.modules.values()), default=16)
        if name in mods:
            raise UnsupportedError(f"{name} has both a LoRA and a modules_to_save copy; merge the adapter instead", src)
        if _special(key) == "embed_tokens":  # ΔE (vocab × dim) = (B A)ᵀ with A: (r × vocab), B: (dim × r)
            B, A, kept, total = _factor_dense(D.T.contiguous(), k)
            kind = "embedding"
        else:
            B, A, kept, total = _factor_dense(D, k)
            kind = "linear"
        steps["modules_to_save"][name] = {"from_rank": None, "rank": int(A.shape[0]),
                                          "retained": retained_energy(total - kept, total)}
        sums["modules_to_save"][0] += kept
        sums["modules_to_save"][1] += total
        if A.shape[0]:
            mods[name] = LoraModule(A=A.to(dt0).contiguous(), B=B.to(dt0).contiguous(), scale=1.0,
                                    alpha=float(A.shape[0]), kind=kind)
    if not mods:
        raise LoratoolsError("nothing to write: no LoRA module is left after the conversion", src)
    padded = 0
    if prof.output == "peft":
        r = max(m.rank for m in mods.values())
        for n, m in list(mods.items()):
            if m.rank != r:
                padded += 1
                B, A = _pad(m.B, m.A, r)
                mods[n] = replace(m, A=A, B=B, alpha=float(r))
    cfg = {k: v for k, v in a.config.items() if a.format == "peft"}
    cfg.update(use_rslora=False, use_dora=False, rank_pattern={}, alpha_pattern={}, modules_to_save=None, lora_bias=False)
    res = Adapter(modules=mods, modules_to_save={}, config=cfg, source=a.source, format="peft", family=a.family,
                  num_experts=a.num_experts)
    report = {"runtime": prof.runtime, "profile": prof.version, "notes": prof.notes, "output": prof.output, "max_rank": cap,
              "ranks": sorted({m.rank for m in mods.values()}), "scales_folded": folded, "padded_modules": padded,
              "dropped_unchanged": dropped, "steps": {}}
    for s, per in steps.items():
        if per:
            kept, total = sums[s]
            report["steps"][s] = {"modules": per, "retained": retained_energy(total - kept, total)}
    kept = sum(v[0] for v in sums.values())
    total = sum(v[1] for v in sums.values())
    report["lossy"] = bool(report["steps"])
    report["retained_lossy_modules"] = retained_energy(total - kept, total)
    return res, report


def measure(base, original: Adapter, converted: Adapter, prompts=None, device: str = "cpu") -> dict:
    """KL(original ‖ converted) of the next-token distributions, averaged over every position of
    the prompts (the reference decoder, fp32, adapters applied unmerged), and top-1 agreement."""
    import numpy as np

    from ..models.decoder import load_model
    from ..validate import DEFAULT_PROMPTS, kl_rows, prompt_ids

    prompts = list(prompts) if prompts else DEFAULT_PROMPTS
    ids = [prompt_ids(base, p) for p in prompts]
    outs = []
    for ad in (original, converted):
        model = load_model(base, adapters=[ad], device=device)
        with torch.no_grad():
            outs.append([model(torch.tensor([i], device=model.inv_freq.device))[0][0].double().cpu().numpy() for i in ids])
        del model
    kl = np.concatenate([kl_rows(r, c) for r, c in zip(*outs)])
    top1 = np.concatenate([r.argmax(-1) == c.argmax(-1) for r, c in zip(*outs)])
    return {"prompts": len(ids), "positions": int(kl.size), "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
            "top1": float(top1.mean())}


def convert_for_runtime(src, runtime: str, out, max_rank: int | None = None, base=None, max_kl: float | None = None,
                        prompts=None, overwrite: bool = False, device: str = "cpu") -> dict:
    """``convert ADAPTER --for RUNTIME``: check, convert, measure, then write (nothing is written when
    a step refuses or the cost is above ``max_kl``)."""
    from .. import api
    from ..fsutil import check_output

    prof = get_profile(runtime)
    if max_rank is not None:
        prof.check_cap(int(max_rank))
    if max_kl is not None and base is None:
        raise LoratoolsError("--max-kl needs --base (the KL is measured through the base model)")
    check_output(out, [src, base], overwrite)
    a = api.load_adapter(src, base)
    res, rep = convert_for(a, prof, max_rank, base)
    rep["input"] = str(src)
    if base is not None:
        rep["cost"] = measure(base, a, res, prompts, device)
        if max_kl is not None and rep["cost"]["mean_kl"] > max_kl:
            raise CostExceeded(f"converting for {prof.runtime} costs mean KL {rep['cost']['mean_kl']:.3g} > --max-kl "
                               f"{max_kl:g} (top-1 agreement {100 * rep['cost']['top1']:.1f}%); nothing written; "
                               "raise --max-rank to keep more", src)
    if prof.output == "peft":
        api.save_adapter(res, out, "peft", overwrite=overwrite, inputs=[src, base], num_layers=api._num_layers(base))
    elif prof.output == "gguf":
        from ..formats.gguf_adapter import export_gguf_adapter

        rep["gguf"] = export_gguf_adapter(res, base, out, "f32", overwrite)
    else:
        from ..formats.onnx_model import export_onnx_adapter

        rep["onnx_adapter"] = export_onnx_adapter(res, out, "fp32", overwrite, base=base)
    rep["out"] = str(out)
    return rep
