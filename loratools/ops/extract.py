"""Extract a LoRA from a full fine-tune: ΔW = W_tuned − W_base, tensor by tensor, factored.

Streaming: one module's delta (fp32) and its factors are in memory at a time; its two weights are
read through file-backed maps and the delta built from them a block of rows at a time. A delta
over BLOCKED_MIN_BYTES (the embedding and head of a large vocabulary) is never whole: its energy
and factorization come from passes over row blocks (factor.DeltaBlocks).
With ``budget``, each module's factors at the cap rank (256 or --max-rank) go to a scratch file
beside the output until the global allocation is known, then each is read back and cut to its
rank: memory stays at one module's factors (a 7B model's cap-rank factors are ~3.5 GB).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from ..adapter import Adapter, LoraModule
from ..arch.experts import ExpertView
from ..checkpoint import Checkpoint
from ..errors import IncompatibleError, LoratoolsError
from ..formats.peft import write_peft
from .. import st
from ..device import pick_device
from ..fsutil import check_output, check_space
from ..modelinfo import EMBED, embed_name, head_name, read_model_info, tied_pair
from . import factor
from .common import check_finite, check_patterns, delta_sq, progress, retained_energy, selected as _selected, sum_sq

# a 2-D delta of more fp32 bytes than this (the embedding and head, at a vocabulary of a few tens of
# thousands) is never whole in memory: its energy and factorization come from row blocks of
# wt − wb (factor.DeltaBlocks). Smaller ones are built whole, as before (the same bytes out).
BLOCKED_MIN_BYTES = 256 << 20
EMBED_NAMES = ("model.embed_tokens", "lm_head")  # the usual layout; the checkpoint's own names are found by modelinfo
REPORT = "extract_report.json"


def _scratch_dir(out) -> str | None:
    """Scratch files go beside the output (the system temp folder may be memory-backed)."""
    if out is None:
        return None
    parent = Path(out).resolve().parent
    return str(parent) if parent.is_dir() else None


def extract(base: str | os.PathLike, tuned: str | os.PathLike, out: str | os.PathLike | None,
            rule: factor.RankRule = factor.RankRule("rank", 16), *, budget: str | int | None = None,
            exact: bool = False, include: str | None = None, exclude: str | None = None,
            embeddings: str = "lora", device: str = "auto", seed: int = 0, oversample: int = 16,
            power_iters: int = 4, dtype: torch.dtype = torch.float32, overwrite: bool = False,
            quiet: bool = True, expert_form: str | None = None, full_spectra: bool = False) -> tuple[Adapter, dict]:
    """Extract a LoRA adapter; write it (PEFT, with ``extract_report.json``) when ``out`` is given.
    ``full_spectra`` (for --plot): each module's whole singular-value spectrum, up to its matrix rank,
    in the report's spectra (a randomized SVD computes only the head it needs)."""
    if embeddings not in ("lora", "full", "skip"):
        raise LoratoolsError(f"--embeddings must be lora, full or skip, got {embeddings!r}")
    check_patterns(include, exclude)
    if out is not None:
        check_output(out, [base, tuned], overwrite)
    dev = pick_device(device)
    cb, ct = read_model_info(base), read_model_info(tuned)
    if cb.model_type != ct.model_type:
        raise IncompatibleError(f"base is {cb.model_type} but tuned is {ct.model_type}", tuned)
    vb, vt = cb.raw.get("vocab_size"), ct.raw.get("vocab_size")
    if vb != vt:
        raise IncompatibleError(f"different vocab sizes: base {vb}, tuned {vt} (a resized vocabulary cannot be carried by a LoRA)", tuned)
    itemsize = torch.empty((), dtype=dtype).element_size()
    budget_params = factor.parse_budget(budget, itemsize) if isinstance(budget, str) else budget
    t0 = time.perf_counter()
    report: dict = {"base": str(base), "tuned": str(tuned), "rule": factor.describe_rule(rule, budget_params), "exact": exact,
                    "budget_params": budget_params, "seed": seed, "oversample": oversample,
                    "power_iters": power_iters, "device": str(dev), "modules": {}, "embeddings": {},
                    "bias": {}, "norms": {}, "unchanged": [], "warnings": []}
    modules: dict[str, LoraModule] = {}
    full: dict[str, torch.Tensor] = {}
    spectra: dict[str, tuple] = {}
    plot_spectra: dict[str, tuple] = {}
    bias_deltas: dict[str, torch.Tensor] = {}
    energy_total = 0.0
    embed_energy: dict[str, float] = {}
    dropped = [0]  # changed modules whose rank rule kept nothing
    pairs: dict[str, tuple] = {}  # "gate+up" key -> ([gate, up], [rows of each]): split after factoring
    scratch = None  # with a budget: module -> file holding its cap-rank factors
    with Checkpoint.open(base) as kb, Checkpoint.open(tuned) as kt, \
            tempfile.TemporaryDirectory(prefix=".loratools-extract-", dir=_scratch_dir(out)) as spill:
        keys_b, keys_t = set(kb.keys()), set(kt.keys())
        if keys_b != keys_t:
            only_b, only_t = sorted(keys_b - keys_t), sorted(keys_t - keys_b)
            what = (f"only in base: {only_b[:3]}" if only_b else "") + ("; " if only_b and only_t else "") + \
                   (f"only in tuned: {only_t[:3]}" if only_t else "")
            raise IncompatibleError(f"base and tuned checkpoints hold different tensors ({what})", tuned)
        for name in sorted(keys_b):
            if kb.info(name).shape != kt.info(name).shape:
                raise IncompatibleError(f"tensor {name!r} is {kb.info(name).shape} in base but {kt.info(name).shape} in tuned", tuned)
        vb, vt = ExpertView.of(kb), ExpertView.of(kt)  # canonical per-expert weights, whatever the stored layout
        if set(vb.weights) != set(vt.weights):
            raise IncompatibleError("base and tuned checkpoints hold different expert weights", tuned)
        names = sorted(n for n in keys_b if not vb.covers(n))
        tied = tied_pair(cb, keys_b)
        emb_mod = (tied[0] if tied else (embed_name(keys_b) or EMBED)).rpartition(".")[0]
        head_mod = (tied[1] if tied else head_name(embed_name(keys_b))).rpartition(".")[0]
        mirrored = tied is not None and tied[1] not in keys_b  # the embedding's LoRA is carried on lm_head too
        if budget_params is not None:
            scratch = {}
            cap_of = lambda shape: min(rule.max_rank or 256, *shape)  # noqa: E731
            check_space(Path(spill) / "x", sum(cap_of(kb.info(n).shape) * sum(kb.info(n).shape) * 4 for n in names
                                               if len(kb.info(n).shape) == 2) +
                        sum(cap_of(w.shape) * sum(w.shape) * 4 for w in vb.weights.values()), "the budget's scratch factors")
        def factor_module(mod, M, e, kind):
            """Factor one module's delta M by the rule (or at the cap rank, for the budget)."""
            ts = time.perf_counter()
            if budget_params is not None:
                cap = min(rule.max_rank or 256, min(M.shape))
                B, A, S, info_f = factor.factorize(M, factor.RankRule("rank", cap), exact, oversample, power_iters, seed)
                # a tied model's embedding LoRA is written twice (embed_tokens and lm_head, below): each
                # of its components costs twice
                spectra[mod] = (S.cpu(), sum(M.shape) * (2 if kind == "embedding" and mirrored else 1))
            else:
                r_mod = rule
                if vb and rule.kind == "rank" and int(rule.value) > min(M.shape):
                    # an MoE router (E, H) or shared-expert gate (1, H) is narrower than the rank: it is carried whole
                    r_mod = factor.RankRule("rank", min(M.shape), rule.max_rank)
                B, A, S, info_f = factor.factorize(M, r_mod, exact, oversample, power_iters, seed)
            spec = info_f.pop("spectrum", S)
            if full_spectra and spec.numel() < min(M.shape):
                spec = factor.svdvals(M).cpu()
            plot_spectra[mod] = (spec, e, info_f["rank"])
            info_f["seconds"] = time.perf_counter() - ts
            info_f["shape"] = list(M.shape)
            info_f["total_energy"] = e
            if info_f["rank"] == 0:
                dropped[0] += 1
                return
            if scratch is not None:  # to disk until the allocation is known
                scratch[mod] = Path(spill) / f"{len(scratch)}.safetensors"
                st.save_file({"A": A.cpu().contiguous(), "B": B.cpu().contiguous()}, scratch[mod])
                A, B = A.new_empty(0, A.shape[1]).cpu(), B.new_empty(B.shape[0], 0).cpu()  # no view: frees the factors
            modules[mod] = LoraModule(A=A.cpu(), B=B.cpu(), scale=1.0, alpha=float(info_f["rank"]), kind=kind)
            (report["embeddings"] if kind == "embedding" or mod == head_mod else report["modules"])[mod] = info_f

        expert_jobs = sorted({(w.name.rsplit(".", 3)[0], w.expert, tuple(vb.moe.leaves)) for w in vb.weights.values()},
                             key=lambda j: (j[0], j[1])) if vb else []
        for name in progress(names, "extract", quiet=quiet):
            wb = wt = delta = M = None  # the previous tensor's buffers go before the next are read
            info = kb.info(name)
            mod, _, leaf = name.rpartition(".")
            if not info.dtype.is_floating_point:
                continue
            # as stored, without a private copy (a file-backed map for safetensors): the fp32 delta is
            # the one whole-tensor buffer of a module
            wb, wt = kb.get_mapped(name), kt.get_mapped(name)
            check_finite(wb, name, kb.path)
            check_finite(wt, name, kt.path)
            if torch.equal(wb, wt):
                report["unchanged"].append(name)
                continue
            # the embedding is factored as ΔWᵀ (PEFT's orientation): its delta is built in that layout,
            # so that the products of the SVD read it in place
            if len(info.shape) == 2 and info.shape[0] >= info.shape[1] and 4 * info.numel > BLOCKED_MIN_BYTES:
                delta = factor.DeltaBlocks(wb, wt, dev, transposed=mod == emb_mod)  # M itself, either orientation
                e = delta.sum_sq()
            else:
                delta, e = delta_sq(wb, wt, dev, transposed=mod == emb_mod and len(info.shape) == 2)
            energy_total += e
            if e == 0.0:
                report["unchanged"].append(name)
                continue
            if len(info.shape) == 1:
                if leaf == "bias":
                    bias_deltas[mod] = delta.cpu()
                    report["bias"][mod] = {"norm": math.sqrt(e)}
                else:
                    base_norm = float(wb.float().norm())
                    report["norms"][name] = {"max_abs": float(delta.abs().max()), "rel": math.sqrt(e) / max(base_norm, 1e-30)}
                continue
            if leaf != "weight" or len(info.shape) != 2 or not _selected(mod, include, exclude):
                report["warnings"].append(f"{name}: delta not carried (not a selected 2-D weight)")
                embed_energy[name] = e
                continue
            if mod in (emb_mod, head_mod):
                embed_energy[name] = e
                if embeddings == "skip":
                    continue
                if embeddings == "full":
                    wt = kt.get(name)  # modules_to_save: the tuned tensor itself, in its own dtype (a copy, not the map)
                    full[name] = wt
                    report["embeddings"][mod] = {"mode": "full", "params": wt.numel(), "energy": 1.0, "total_energy": e}
                    continue
                del embed_energy[name]
            M = delta if isinstance(delta, factor.DeltaBlocks) else delta.T if mod == emb_mod else delta  # PEFT's embedding orientation
            kind = "embedding" if mod == emb_mod else "linear"
            factor_module(mod, M, e, kind)
            del delta, M, wb, wt
        for pre, e_idx, leaves in progress(expert_jobs, "extract experts", quiet=quiet):
            # one expert at a time: gate and up factored together (a fused gate_up LoRA approximates the
            # stacked [ΔW_gate; ΔW_up], so its SVD is the optimum at the fused rank), down alone
            for group in (leaves[:2], leaves[2:]):
                mods = [f"{pre}.{e_idx}.{lf}" for lf in group]
                if not all(_selected(m, include, exclude) for m in mods):
                    for m in mods:  # not carried, but part of the fine-tune's delta (retained energy's denominator)
                        wb, wt = vb.read(kb, m), vt.read(kt, m)
                        energy_total += sum_sq(wt.float() - wb.float())
                        del wb, wt
                    continue
                ds = []
                for m in mods:
                    wb, wt = vb.read(kb, m), vt.read(kt, m)
                    check_finite(wb, m, kb.path)
                    check_finite(wt, m, kt.path)
                    ds.append((wt - wb).to(dev))
                    del wb, wt
                M = torch.cat(ds, 0) if len(ds) > 1 else ds[0]
                del ds
                e = sum_sq(M)
                energy_total += e
                if e == 0.0:
                    report["unchanged"].extend(mods)
                    continue
                key = "+".join(mods)
                if len(mods) > 1:
                    pairs[key] = (mods, [vb.weights[m + ".weight"].shape[0] for m in mods])
                factor_module(key, M, e, "linear")
                del M
        if budget_params is not None:
            ranks = factor.allocate_budget(spectra, budget_params)
            for mod, k in ranks.items():
                m = modules[mod]
                S = spectra[mod][0]
                entry = report["modules"].get(mod) or report["embeddings"][mod]
                if k == 0:
                    del modules[mod]
                    entry.update(rank=0, energy=0.0, rel_error=1.0)
                    continue
                f = st.load_file(scratch[mod])
                modules[mod] = LoraModule(A=f["A"][:k].clone(), B=f["B"][:, :k].clone(), scale=1.0, alpha=float(k),
                                          kind=m.kind)
                del f
                plot_spectra[mod] = (plot_spectra[mod][0], plot_spectra[mod][1], k)
                energy, err = factor.tail_error(S, k, entry["total_energy"])
                entry.update(rank=k, energy=energy, rel_error=err)
    for key, (names_, rows) in pairs.items():  # a fused gate+up factorization -> gate and up sharing its A
        m = modules.pop(key, None)
        if m is not None:
            for n, b in zip(names_, torch.split(m.B, rows, 0)):
                modules[n] = LoraModule(A=m.A, B=b.contiguous(), scale=m.scale, alpha=m.alpha, kind=m.kind)
    # A tied model's embedding is also its output head, so the tuned head moved with it; PEFT's
    # embedding LoRA / modules_to_save on embed_tokens changes the input side only. Carry it on lm_head.
    if tied is not None and tied[1] not in keys_b:
        e = modules.get(emb_mod)
        if e is not None:  # ΔE = s·(B A)ᵀ = s·Aᵀ Bᵀ: as a linear LoRA on lm_head, B' = Aᵀ, A' = Bᵀ
            modules[head_mod] = LoraModule(A=e.B.T.contiguous(), B=e.A.T.contiguous(), scale=e.scale, alpha=e.alpha)
        if tied[0] in full:
            full[tied[1]] = full[tied[0]]
        if e is not None or tied[0] in full:
            report["embeddings"][head_mod] = {"tied_to": emb_mod}
    # bias deltas ride along as lora_bias when PEFT can load that: every LoRA layer needs a base bias
    # (and PEFT refuses lora_bias on embedding layers)
    if bias_deltas:
        all_have_bias = all(lm.kind == "linear" and f"{m}.bias" in keys_b for m, lm in modules.items())
        if all_have_bias and set(bias_deltas) <= set(modules):
            for mod, d in bias_deltas.items():
                modules[mod].bias = d / modules[mod].scale
                report["bias"][mod]["carried"] = True
        else:
            lost = sum(sum_sq(d) for d in bias_deltas.values())
            report["warnings"].append(
                f"bias deltas of {len(bias_deltas)} modules dropped ({100 * lost / max(energy_total, 1e-300):.3g}% of the delta energy): "
                "PEFT's lora_bias needs every LoRA-targeted layer to have a base bias")
    for name, e in embed_energy.items():
        if embeddings == "skip" or name not in full:
            report["warnings"].append(f"{name}: delta skipped, losing {100 * e / max(energy_total, 1e-300):.3g}% of the total delta energy")
    if report["norms"]:
        worst = max(report["norms"].items(), key=lambda kv: kv[1]["rel"])
        report["warnings"].append(f"{len(report['norms'])} norm weights changed (largest relative change {worst[1]['rel']:.3g} in {worst[0]}); "
                                  "a LoRA cannot carry norm weights")
    for m in modules.values():
        m.A, m.B = m.A.to(dtype).contiguous(), m.B.to(dtype).contiguous()
        if m.bias is not None:
            m.bias = m.bias.to(dtype)
    adapter = Adapter(modules=modules, modules_to_save=full, format="peft", source=str(out or ""),
                      config={"base_model_name_or_path": str(base), "task_type": "CAUSAL_LM"},
                      family=cb.model_type if vb else None,
                      num_experts=max(vb.num_experts.values()) if vb else None)
    kept = sum(v["energy"] * v["total_energy"] for v in list(report["modules"].values()) + list(report["embeddings"].values())
               if "energy" in v)
    kept += sum(sum_sq(d) for mod, d in bias_deltas.items() if report["bias"][mod].get("carried"))
    # Σ kept σ² / Σ σ²: a truncated SVD's residual is its dropped σ² (the one definition: common.retained_energy)
    report.update(total_delta_energy=energy_total, retained_energy=retained_energy(energy_total - kept, energy_total),
                  parameters=adapter.num_parameters(), seconds=time.perf_counter() - t0,
                  ranks={k: m.rank for k, m in sorted(modules.items())})
    if not modules and not full:
        if dropped[0]:
            raise LoratoolsError(f"the rank rule ({rule.describe()}) keeps no component of any module; nothing to write")
        raise LoratoolsError("no delta to extract: base and tuned checkpoints are identical in the selected tensors", tuned)
    report["_spectra"] = plot_spectra  # for --plot; not written to the JSON report
    if out is not None:
        write_peft(adapter, out, str(base), num_layers=cb.num_hidden_layers, expert_form=expert_form,
                   extra_files={REPORT: json.dumps({k: v for k, v in report.items() if k != "_spectra"}, indent=2,
                                                   default=str) + "\n"})
    return adapter, report
