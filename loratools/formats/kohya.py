"""kohya-ss LoRA files: one safetensors file with ``<prefix><module_with_underscores>.lora_down.weight``
(r × in), ``.lora_up.weight`` (out × r) and ``.alpha`` (a scalar); scale = alpha / r, alpha = r
when absent. Module names lose their dots, so reading maps them back either through the base
model's module list or through a table of the decoder's multi-word names."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

import torch

from .. import st
from ..adapter import Adapter, LoraModule
from ..errors import InputError, UnsupportedError
from ..fsutil import atomic_file
from ..ops.common import check_finite

DEFAULT_PREFIX = "lora_unet_"
_KNOWN_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_te4_", "lora_te_", "lora_transformer_", "lora_")
# Multi-word names in decoder checkpoints, which must survive the underscore mapping.
_COMPOUNDS = ("self_attn", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
              "embed_tokens", "lm_head", "gate_up_proj", "qkv_proj", "block_sparse_moe", "input_layernorm",
              "post_attention_layernorm")
_SUFFIX = re.compile(r"^(.*)\.(lora_down\.weight|lora_up\.weight|alpha|dora_scale)$")


def is_kohya_file(path: str | os.PathLike) -> bool:
    p = Path(path)
    if not (p.is_file() and p.suffix == ".safetensors"):
        return False
    try:
        infos, _, _ = st.read_header(p)
    except InputError:
        return False
    return any(k.endswith(".lora_down.weight") for k in infos)


def _underscored(name: str) -> str:
    return name.replace(".", "_")


def _guess_dotted(flat: str) -> str:
    """``model_layers_0_self_attn_q_proj`` -> ``model.layers.0.self_attn.q_proj``."""
    keep = {}
    for i, c in enumerate(sorted(_COMPOUNDS, key=len, reverse=True)):
        token = f"\x00{i}\x00"
        flat = re.sub(rf"(^|_){c}(?=_|$)", lambda m, t=token: m.group(1) + t, flat)
        keep[token] = c
    parts = flat.split("_")
    return ".".join(keep.get(p, p) for p in parts)


def read_kohya(path: str | os.PathLike, module_names: Iterable[str] | None = None) -> Adapter:
    """Read a kohya LoRA. ``module_names`` (the base model's module names) resolves names
    exactly; without it the decoder naming table is used."""
    path = Path(path)
    if not path.exists():
        raise InputError("no such file or directory", path)
    with st.SafetensorsFile(path) as f:
        sd = {k: f.get(k) for k in f.keys()}
    lookup = {}
    if module_names is not None:
        lookup = {_underscored(n): n for n in module_names}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        m = _SUFFIX.match(key)
        if not m:
            raise InputError(f"unrecognised kohya tensor {key!r}", path)
        groups.setdefault(m.group(1), {})[m.group(2)] = t
    modules: dict[str, LoraModule] = {}
    for kname, g in sorted(groups.items()):
        if "dora_scale" in g:
            raise UnsupportedError(f"{kname}: kohya DoRA (dora_scale) is not supported", path)
        if "lora_down.weight" not in g or "lora_up.weight" not in g:
            have = "lora_down" if "lora_down.weight" in g else "lora_up"
            raise InputError(f"{kname} has {have} without its pair", path)
        A, B = g["lora_down.weight"], g["lora_up.weight"]
        if A.dim() != 2 or B.dim() != 2:
            raise UnsupportedError(f"{kname}: only linear LoRA is supported (got {A.dim()}-D factors)", path)
        if A.shape[0] != B.shape[1]:
            raise InputError(f"{kname}: lora_down {tuple(A.shape)} and lora_up {tuple(B.shape)} disagree on rank", path)
        if not (A.is_floating_point() and B.is_floating_point()):
            raise InputError(f"{kname}: LoRA factors must be floating point, got {A.dtype} and {B.dtype}", path)
        r = int(A.shape[0])
        if r == 0:
            raise InputError(f"{kname}: rank 0 (lora_down has no rows)", path)
        for part, t in g.items():
            check_finite(t, f"{kname}.{part}", path)
        if "alpha" in g and g["alpha"].numel() != 1:
            raise InputError(f"{kname}.alpha must hold one number, got shape {tuple(g['alpha'].shape)}", path)
        alpha = float(g["alpha"].float().reshape(-1)[0]) if "alpha" in g else float(r)
        flat = kname
        for p in _KNOWN_PREFIXES:
            if flat.startswith(p):
                flat = flat[len(p):]
                break
        if lookup:
            if flat not in lookup:
                raise InputError(f"{kname}: no module of the base model is named {flat!r} (with dots)", path)
            name = lookup[flat]
        else:
            name = _guess_dotted(flat)
        if name in modules:
            raise InputError(f"{kname}: a second set of factors for module {name!r} (another prefix names the same layer)", path)
        modules[name] = LoraModule(A=A, B=B, scale=alpha / r, alpha=alpha)
    if not modules:
        raise InputError("no LoRA tensors (lora_down/lora_up) in this file", path)
    return Adapter(modules=modules, config={"r": max(m.rank for m in modules.values())}, source=str(path), format="kohya")


def kohya_state_dict(adapter: Adapter, prefix: str = DEFAULT_PREFIX) -> dict[str, torch.Tensor]:
    if adapter.modules_to_save:
        raise UnsupportedError(f"the kohya format cannot hold modules_to_save ({', '.join(sorted(adapter.modules_to_save))})", adapter.source or None)
    sd = {}
    for name, m in sorted(adapter.modules.items()):
        why = ("embedding LoRA" if m.kind == "embedding" else "DoRA" if m.magnitude is not None
               else "lora_bias" if m.bias is not None else None)
        if why:
            raise UnsupportedError(f"module {name!r} uses {why}, which the kohya format cannot hold", adapter.source or None)
        k = prefix + _underscored(name)
        sd[f"{k}.lora_down.weight"] = m.A.contiguous()
        sd[f"{k}.lora_up.weight"] = m.B.contiguous()
        # kohya's scale is alpha / r: fold any rsLoRA / pattern scale into alpha, kept in fp32.
        alpha = torch.tensor(m.scale * m.rank, dtype=torch.float32)
        if not torch.isfinite(alpha):
            raise UnsupportedError(f"module {name!r}: its scale × rank ({m.scale * m.rank}) is not a finite float32 alpha", adapter.source or None)
        sd[f"{k}.alpha"] = alpha
    return sd


def write_kohya(adapter: Adapter, out: str | os.PathLike, prefix: str = DEFAULT_PREFIX) -> Path:
    sd = kohya_state_dict(adapter, prefix)
    with atomic_file(out) as tmp:
        st.save_file(sd, tmp, {"ss_network_module": "networks.lora"})
    return Path(out)
