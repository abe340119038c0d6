"""On-disk <-> in-memory tensor names, as declarations (the spirit of transformers 5's
conversion_mapping): a multimodal Gemma 3 is saved as ``language_model.model.*`` /
``language_model.lm_head`` but held in memory (and named by PEFT) as ``model.language_model.*`` /
``lm_head``. Needs no family: the pairs come from every spec's layouts.

Mixture-of-experts blocks: transformers 5 holds (and PEFT names) every MoE block as ``mlp`` while
Mixtral saves it as ``block_sparse_moe`` (MoeSpec.block): the router ``model.layers.L.mlp.gate``
is ``model.layers.L.block_sparse_moe.gate`` on disk. ``disk_name`` maps either spelling to the one
the checkpoint has; ``memory_name`` maps the router (and any non-expert name under the block) to
``mlp``, and leaves per-expert names (``block_sparse_moe.experts.E.w1``: loratools' canonical
expert modules, as transformers 4.x named them) alone.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterable

from .registry import FAMILIES


def _pairs() -> list[tuple[str, str]]:
    """(in-memory prefix, on-disk prefix) pairs of every family with more than one layout."""
    out = []
    for spec in FAMILIES.values():
        for prefix, head in spec.alt_layouts:
            out.append((spec.prefix, prefix))
            out.append((spec.head + ".", head + "."))
    return list(dict.fromkeys(p for p in out if p[0] != p[1]))


def _block_pairs() -> list[tuple[str, str]]:
    """(in-memory, on-disk) infixes of MoE blocks saved under another name (".mlp.", ".block_sparse_moe.")."""
    return list(dict.fromkeys((".mlp.", f".{s.moe.block}.") for s in FAMILIES.values()
                              if s.moe is not None and s.moe.block != "mlp"))


def disk_name(name: str, keys: Iterable[str]) -> str:
    """``name`` (a module or tensor name in any known layout) as the checkpoint with tensor
    names ``keys`` spells it; unchanged when it already matches or no layout pair fits."""
    keys = keys if isinstance(keys, (set, frozenset, dict)) else set(keys)
    if name in keys or f"{name}.weight" in keys:
        return name
    for mem, disk in _pairs():
        for a, b in ((mem, disk), (disk, mem)):
            if name.startswith(a) or name + "." == a:
                cand = b + (name + ".")[len(a):]
                cand = cand[:-1] if cand.endswith(".") else cand
                if cand in keys or f"{cand}.weight" in keys:
                    return cand
    for mem, disk in _block_pairs():
        for a, b in ((mem, disk), (disk, mem)):
            if a in name:
                cand = name.replace(a, b, 1)
                if cand in keys or f"{cand}.weight" in keys:
                    return cand
    return name


def memory_name(name: str) -> str:
    """``name`` in the in-memory (PEFT) layout: ``language_model.model.x`` -> ``model.language_model.x``."""
    for mem, disk in _pairs():
        if name.startswith(disk) or name + "." == disk:
            out = mem + (name + ".")[len(disk):]
            return out[:-1] if out.endswith(".") else out
    for mem, disk in _block_pairs():
        if disk in name and f"{disk}experts." not in name:
            return name.replace(disk, mem, 1)
    return name


def align_adapter(adapter, keys: Iterable[str]):
    """``adapter`` with module (and modules_to_save) names spelled as the checkpoint with tensor
    names ``keys`` spells them; the same object when nothing changes."""
    keys = set(keys)
    mods = {disk_name(n, keys): m for n, m in adapter.modules.items()}
    mts = {disk_name(n, keys): t for n, t in adapter.modules_to_save.items()}
    if list(mods) == list(adapter.modules) and list(mts) == list(adapter.modules_to_save):
        return adapter
    return replace(adapter, modules=mods, modules_to_save=mts)


def memory_adapter(adapter):
    """``adapter`` with its names in the in-memory layout, as PEFT names modules."""
    mods = {memory_name(n): m for n, m in adapter.modules.items()}
    mts = {memory_name(n): t for n, t in adapter.modules_to_save.items()}
    if list(mods) == list(adapter.modules) and list(mts) == list(adapter.modules_to_save):
        return adapter
    return replace(adapter, modules=mods, modules_to_save=mts)
