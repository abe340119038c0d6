"""llama.cpp LoRA adapters (GGUF, general.type = adapter).

llama.cpp applies ``W x + (alpha / r) · B (A x)`` with ONE alpha per file and r read from each
tensor. PEFT's per-module scales (rank_pattern, alpha_pattern, rsLoRA) therefore do not survive
a plain copy of the factors; here each module's B is multiplied by ``s · r / alpha`` so that
llama.cpp's ``alpha / r`` times that factor gives back exactly PEFT's scale ``s``. alpha is the
value most modules already use, so for a plain adapter B is written unchanged.

Tensors: ``<gguf tensor>.lora_a`` = A (r × in) and ``.lora_b`` = B (out × r) in numpy order;
for ``token_embd`` llama.cpp wants A transposed (vocab × r). B's rows get the same row transform
as the weight they update (``gguf_arch.lora_b_to_gguf``: on a "norm"-rope architecture the per-head
Q/K permutation, on a fused attn_qkv its Q and K parts). A LoRA on a fused HF module (qkv_proj,
gate_up_proj) maps onto llama.cpp's fused tensor of the same rows (attn_qkv, Phi-3's ffn_up).
"""
from __future__ import annotations

import os
from collections import Counter

import numpy as np
import torch

from ..adapter import Adapter
from ..errors import IncompatibleError, LoratoolsError, UnsupportedError
from ..fsutil import atomic_file, check_output
from ..models.config import load_config
from . import gguf_arch, gguf_moe
from .gguf_model import name_map

DTYPES = {"f32": np.float32, "f16": np.float16}


def export_gguf_adapter(adapter: Adapter, base_dir: str | os.PathLike, out: str | os.PathLike,
                        outtype: str = "f32", overwrite: bool = False) -> dict:
    import gguf

    if outtype not in DTYPES:
        raise LoratoolsError(f"adapter --outtype must be f32 or f16, got {outtype!r}")
    check_output(out, [base_dir, adapter.source or None], overwrite, file=True)
    src = adapter.source or None
    if adapter.use_dora:
        raise UnsupportedError("llama.cpp cannot apply DoRA (its magnitude vector rescales whole rows of W + ΔW); "
                               "merge the adapter and export the merged model instead", src)
    from ..checkpoint import Checkpoint
    from ..models.decoder import internal_adapter
    from ..ops.merge import equals_base

    cfg = load_config(base_dir)
    fam = gguf_arch.family(cfg, base_dir)
    fam.check(cfg, base_dir)
    names = name_map(cfg)
    mv = gguf_moe.moe_values(cfg, base_dir)
    adapter = internal_adapter(cfg, adapter)  # module names as the decoder has them (multimodal prefix dropped)
    with Checkpoint.open(base_dir) as ck:
        experts = {}
        if mv is not None:
            from ..arch.experts import ExpertView
            from ..arch.layout import align_adapter

            adapter = align_adapter(adapter, ck.keys())  # Mixtral's router: mlp.gate in memory, block_sparse_moe.gate on disk
            ev = ExpertView.of(ck)
            experts = {w.name[: -len(".weight")]: w for w in ev.weights.values()}
            adapter = _canonical_experts(adapter, ev, src)
        disk = {cfg.to_internal(k): k for k in ck.keys() if cfg.to_internal(k) is not None}  # decoder name -> stored
        shapes = {own: ck.info(k).shape for own, k in disk.items()}
        shapes.update({n + ".weight": w.shape for n, w in experts.items()})
        if adapter.modules_to_save:  # PEFT saves an unchanged embedding whole: that replaces nothing
            tied = cfg.tie_word_embeddings
            changed = sorted(k for k, t in adapter.modules_to_save.items()
                             if not equals_base(ck, disk.get(k, k), t, tied))
            if changed:
                raise UnsupportedError(f"llama.cpp adapters cannot carry modules_to_save ({', '.join(changed)}): "
                                       "they replace whole tensors; merge the adapter and export the merged model instead", src)
    biased = [n for n, m in adapter.modules.items() if m.bias is not None]
    if biased:
        raise UnsupportedError(f"llama.cpp adapters have no lora_bias (module {biased[0]!r}); merge the adapter instead", src)
    emb = [n for n, m in adapter.modules.items() if m.kind == "embedding"]
    if "lm_head" in adapter.modules and emb and cfg.tie_word_embeddings:
        # what extract writes on a tied model: the same ΔE on embed_tokens and on lm_head
        raise UnsupportedError(f"the adapter changes the tied embedding on both sides ({emb[0]!r} and 'lm_head'), and a llama.cpp "
                               "adapter cannot: its token_embd LoRA is applied to the input lookup only (its layout does not fit "
                               "the tied output matmul); export the merged model instead (export gguf -a), which keeps the tie, "
                               "or drop the embedding LoRA (convert --to peft --exclude 'embed_tokens|lm_head', or extract --embeddings skip)", src)
    if "lm_head" in adapter.modules and cfg.tie_word_embeddings:
        raise UnsupportedError("the adapter targets lm_head, but the base model ties it to the embeddings: llama.cpp has "
                               "no separate output tensor to apply it to; merge the adapter instead", src)
    if cfg.tie_word_embeddings:
        shapes.setdefault("lm_head.weight", shapes.get("model.embed_tokens.weight"))
    adapter.check_against(shapes, f"base model {base_dir}")
    emb = [n for n, m in adapter.modules.items() if m.kind == "embedding"]
    if emb and cfg.tie_word_embeddings:
        # llama.cpp finds adapter tensors by name and the tied output layer is token_embd too, so the
        # embedding's LoRA would also be applied (as a matmul of the wrong shape) at the output
        raise UnsupportedError(f"the adapter has an embedding LoRA ({emb[0]!r}), but the base model ties the embeddings "
                               "to the output layer, which llama.cpp would then also apply it to; merge the adapter instead", src)
    # llama.cpp's scale is alpha / r: choose the alpha most modules already imply
    implied = Counter(round(m.scale * m.rank, 12) for m in adapter.modules.values())
    alpha = float(implied.most_common(1)[0][0]) if implied else 1.0
    if alpha <= 0:
        alpha = 1.0
    w = gguf.GGUFWriter(None, fam.arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    plan = []
    folded = 0
    groups: dict[tuple, dict] = {}  # (layer, part) -> {expert: module}: one stacked lora_a / lora_b each
    for name, m in adapter.modules.items():
        if name in experts:
            ew = experts[name]
            groups.setdefault((ew.layer, ew.part), {})[ew.expert] = m
    for (layer, part), mods in sorted(groups.items()):
        n_exp = mv.experts
        r = max(m.rank for m in mods.values())
        out_f, in_f = gguf_moe.expert_shape(cfg, mv, part)
        a = torch.zeros(n_exp, r, in_f, dtype=torch.float64)
        b = torch.zeros(n_exp, out_f, r, dtype=torch.float64)
        for e, m in mods.items():
            # llama.cpp scales every expert by alpha / r of the stacked tensor (r = its padded rank):
            # B_e carries the rest of the expert's own scale; padded ranks are zero rows / columns
            factor = m.scale * r / alpha
            folded += factor != 1.0
            a[e, : m.rank] = m.A.double()
            b[e, :, : m.rank] = m.B.double() * factor
        gname = gguf_moe.stacked_name(layer, part)
        for suffix, t in ((".lora_a", a), (".lora_b", b)):
            plan.append((gname + suffix, np.ascontiguousarray(t.to(torch.float32).numpy().astype(DTYPES[outtype]))))
    for name, m in sorted(adapter.modules.items()):
        if name in experts:
            continue
        key = f"{name}.weight"
        if key not in names:
            raise IncompatibleError(f"module {name!r} has no GGUF tensor in a {fam.arch} model", src)
        gname = names[key]
        factor = m.scale * m.rank / alpha
        folded += factor != 1.0
        A = m.A.double()
        B = m.B.double() * factor
        if m.kind == "embedding":
            a, b = A.T, B  # llama.cpp: token_embd's lora_a is transposed
        else:
            a, b = A, gguf_arch.lora_b_to_gguf(fam, gname, B, cfg)
        for suffix, t in ((".lora_a", a), (".lora_b", b)):
            arr = np.ascontiguousarray(t.to(torch.float32).numpy().astype(DTYPES[outtype]))
            plan.append((gname + suffix, arr))
    for n, arr in plan:
        w.add_tensor_info(n, arr.shape, arr.dtype, arr.nbytes)
    with atomic_file(out) as tmp:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for _, arr in plan:
            w.write_tensor_data(arr)
        w.close()
    rep = {"out": str(out), "arch": fam.arch, "alpha": alpha, "modules": len(adapter.modules),
           "scales_folded": folded, "outtype": outtype}
    if groups:
        rep["expert_tensors"] = len(groups)
        rep["expert_modules"] = sum(len(g) for g in groups.values())
    return rep


def _canonical_experts(adapter: Adapter, ev, src) -> Adapter:
    """Expert modules under their canonical names (an in-memory "mlp." spelling of a Mixtral expert
    resolved); an expert-shaped name that is no expert of the base is an error naming it."""
    from dataclasses import replace

    mods, changed = {}, False
    for n, m in adapter.modules.items():
        c = ev.resolve(n)
        if c is None and ev.is_expert_name(n):
            raise IncompatibleError(f"adapter module {n!r} is an expert the base model does not have", src)
        mods[c or n] = m
        changed |= c is not None and c != n
    return replace(adapter, modules=mods) if changed else adapter
