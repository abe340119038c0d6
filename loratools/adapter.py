"""The in-memory adapter: one LoRA per module, PEFT-oriented, with its scale resolved.

For a linear module with weight W (out × in)::

    y = W x + scale · B (A x) + scale · b_B        A: (r × in), B: (out × r), b_B: (out,) optional
    ΔW = scale · B @ A

For an embedding module with weight E (num_embeddings × dim), PEFT stores
``lora_embedding_A`` (r × num_embeddings) and ``lora_embedding_B`` (dim × r)::

    y = E[ids] + scale · A.T[ids] @ B.T           ΔE = scale · (B @ A).T

DoRA adds a magnitude vector m (out,):  W' = m / ‖W + ΔW‖_row · (W + ΔW).

Module names are Hugging Face names (``model.layers.3.self_attn.q_proj``); formats translate
at the edges. ``scale`` is resolved once on load (alpha, rank, rank/alpha patterns, rsLoRA).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

from .errors import IncompatibleError


@dataclass
class LoraModule:
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    alpha: float | None = None          # alpha as stored by the source format, if any
    bias: torch.Tensor | None = None    # PEFT lora_B.bias (scaled by `scale` like B)
    kind: str = "linear"                # "linear" | "embedding"
    magnitude: torch.Tensor | None = None  # DoRA magnitude vector (out,)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    @property
    def weight_shape(self) -> tuple[int, int]:
        """Shape of the base weight this LoRA updates."""
        if self.kind == "embedding":
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features)

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW in the base weight's layout, computed in ``dtype`` (fp32 by default)."""
        d = (self.B.to(dtype) @ self.A.to(dtype)) * self.scale
        return d.T if self.kind == "embedding" else d

    def num_parameters(self) -> int:
        n = self.A.numel() + self.B.numel()
        n += 0 if self.bias is None else self.bias.numel()
        n += 0 if self.magnitude is None else self.magnitude.numel()
        return n


@dataclass
class Adapter:
    """A set of LoRA modules plus the config they came with.

    ``config`` keeps the source adapter_config.json fields (PEFT) so they survive a round trip.
    ``modules_to_save`` holds full replacement tensors keyed by HF tensor name
    (``lm_head.weight``), as PEFT's modules_to_save does.
    """

    modules: dict[str, LoraModule] = field(default_factory=dict)
    modules_to_save: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    source: str = ""       # the path it was read from
    format: str = "peft"   # "peft" | "kohya"
    family: str | None = None       # the base's model_type when known (expert layout of MoE adapters)
    num_experts: int | None = None  # routed experts per MoE layer when known (fused expert LoRA)

    @property
    def use_dora(self) -> bool:
        return any(m.magnitude is not None for m in self.modules.values()) or bool(self.config.get("use_dora"))

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora"))

    @property
    def ranks(self) -> dict[str, int]:
        return {k: m.rank for k, m in self.modules.items()}

    def num_parameters(self) -> int:
        """Stored parameters; a tensor shared by modules (the one A of an expert's fused gate_up LoRA) counts once."""
        seen: set[int] = set()
        n = 0
        for m in self.modules.values():
            for t in (m.A, m.B, m.bias, m.magnitude):
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    n += t.numel()
        return n + sum(t.numel() for t in self.modules_to_save.values())

    def dtype(self) -> torch.dtype | None:
        for m in self.modules.values():
            return m.A.dtype
        return None

    def check_against(self, shapes: Mapping[str, tuple[int, ...]], where: str = "base model", merging: bool = False) -> None:
        """Raise IncompatibleError unless every module's weight exists in ``shapes``
        (HF tensor name -> shape) with the shape the LoRA expects. A lora_bias on a layer without
        a bias runs (as in PEFT) but cannot be merged: refused only when ``merging``."""
        for name, m in self.modules.items():
            key = f"{name}.weight"
            if key not in shapes:
                raise IncompatibleError(f"adapter targets module {name!r} which the {where} does not have", self.source or None)
            if tuple(shapes[key]) != m.weight_shape:
                raise IncompatibleError(
                    f"module {name!r}: LoRA expects a weight of shape {m.weight_shape} but the {where} has {tuple(shapes[key])}",
                    self.source or None)
            if merging and m.bias is not None and f"{name}.bias" not in shapes:
                raise IncompatibleError(f"module {name!r}: its lora_B.bias (lora_bias) cannot be merged: the {where} has no bias "
                                        "on that layer (PEFT cannot merge it either)", self.source or None)
        for key, t in self.modules_to_save.items():
            if key not in shapes:
                raise IncompatibleError(f"modules_to_save tensor {key!r} does not exist in the {where}", self.source or None)
            if tuple(shapes[key]) != tuple(t.shape):
                raise IncompatibleError(f"modules_to_save tensor {key!r} is {tuple(t.shape)} but the {where} has {tuple(shapes[key])}",
                                        self.source or None)


# -- scale rules -------------------------------------------------------------------------------
def pattern_key(patterns: Iterable[str], name: str) -> str | None:
    """PEFT's rank_pattern / alpha_pattern rule: the first key that matches the end of the
    module name at a dot boundary (``re.match(rf"(.*\\.)?({key})$", name)``), matched in
    bounded time (patterns.py); a key that cannot be is refused, named."""
    from .errors import InputError
    from .patterns import PatternRefused, compile_key

    for key in patterns:
        try:
            match = compile_key(key)
        except PatternRefused as e:
            raise InputError(f"rank_pattern / alpha_pattern key {key[:80]!r} is refused: {e}") from None
        if match(name):
            return key
    return None


def resolve_rank_alpha(config: Mapping, name: str) -> tuple[int, float]:
    r = config.get("r", 8)
    alpha = config.get("lora_alpha", 8)
    rp = config.get("rank_pattern") or {}
    ap = config.get("alpha_pattern") or {}
    k = pattern_key(rp, name)
    if k is not None:
        r = rp[k]
    k = pattern_key(ap, name)
    if k is not None:
        alpha = ap[k]
    return int(r), float(alpha)


def lora_scale(alpha: float, r: int, rslora: bool = False) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def alpha_for_scale(scale: float, r: int, rslora: bool = False) -> float:
    return scale * math.sqrt(r) if rslora else scale * r
