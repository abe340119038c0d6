"""Mixture-of-experts models in GGUF: llama.cpp stacks the experts of a layer into 3-D tensors.

    GGUF tensor                 numpy shape   from (per expert e, canonical (out, in) weights)
    blk.L.ffn_gate_inp.weight   (E, H)        the router (``mlp.gate`` / ``block_sparse_moe.gate`` / ``mlp.router``)
    blk.L.ffn_gate_exps.weight  (E, I, H)     gate_proj of every expert, expert 0 first
    blk.L.ffn_up_exps.weight    (E, I, H)     up_proj
    blk.L.ffn_down_exps.weight  (E, H, I)     down_proj
    blk.L.ffn_{gate,up,down}_exps.bias (E, I) / (E, H)    gpt-oss's expert biases (gate/up de-interleaved)
    blk.L.ffn_{gate,up,down}_shexp.weight                 Qwen2-MoE's shared expert (2-D, as a dense MLP)
    blk.L.ffn_gate_inp_shexp.weight (H,)                  its sigmoid gate (1, H) on disk, a vector in llama.cpp

A stacked tensor is written expert by expert: a row-major (E, a, b) tensor's bytes are its experts'
(a, b) slabs one after another (for the block quants too: their blocks run along rows), so one
expert's fp32 weight (merged with any adapter) is the most that is held at a time.

Canonical per-expert weights (``loratools.arch.experts`` on the ckpt branch gives the same view of every
checkpoint layout): ``model.layers.L.mlp.experts.e.{gate,up,down}_proj.weight`` (Mixtral:
``block_sparse_moe.experts.e.w1 / w3 / w2``), stored so by transformers for every family but
gpt-oss, whose experts are fused on disk: ``mlp.experts.gate_up_proj`` (E, H, 2I) with gate and up
interleaved (columns 0::2 / 1::2), ``down_proj`` (E, I, H), ``*_bias`` (E, 2I) / (E, H).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..errors import IncompatibleError, UnsupportedError

ROLES = ("gate", "up", "down")
EXPS = {"gate": "ffn_gate_exps", "up": "ffn_up_exps", "down": "ffn_down_exps"}
SHEXP = {"gate_proj": "ffn_gate_shexp", "up_proj": "ffn_up_shexp", "down_proj": "ffn_down_shexp"}
GPT_OSS_FUSED = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")


@dataclass(frozen=True)
class MoeValues:
    """A config's mixture of experts, resolved (MoeSpec fields read from config.json)."""

    experts: int
    top_k: int
    inter: int                 # width of one routed expert
    shared: int                # width of the shared expert (0: none)
    renorm: bool               # top-k weights divided by their sum
    scoring: str               # MoeSpec.scoring
    moe_layers: tuple          # per layer: True = mixture of experts, False = a dense MLP
    act_limit: float | None    # clamped SwiGLU (gpt-oss swiglu_limit), None: plain SwiGLU
    act_alpha: float | None
    router_bias: bool
    expert_bias: bool
    disk_layout: str
    block: str
    router: str
    leaves: tuple

    @property
    def dense_layers(self) -> list[int]:
        return [i for i, m in enumerate(self.moe_layers) if not m]


def moe_values(cfg, path=None) -> MoeValues | None:
    """The resolved MoE of ``cfg`` (a ModelConfig: its ``moe``), None for a dense family."""
    m = getattr(cfg, "moe", None)
    if m is None:
        return None
    return MoeValues(m.experts, m.top_k, m.intermediate, m.shared, m.renorm, m.scoring, tuple(m.layers), m.clamp,
                     m.alpha if m.clamp is not None else None, m.router_bias, m.expert_bias, m.disk_layout, m.block,
                     m.router, tuple(m.leaves))


# -- names ---------------------------------------------------------------------------------
def block(mv: MoeValues, layer: int) -> str:
    return f"model.layers.{layer}.{mv.block}"


def expert_module(mv: MoeValues, layer: int, e: int, role: str) -> str:
    """The canonical per-expert module name (its LoRA module, its weight + ".weight")."""
    leaf = dict(zip(ROLES, mv.leaves if mv.disk_layout == "per_expert" else ("gate_proj", "up_proj", "down_proj")))[role]
    return f"{block(mv, layer)}.experts.{e}.{leaf}"


def expert_shape(cfg, mv: MoeValues, role: str) -> tuple[int, int]:
    return (cfg.hidden_size, mv.inter) if role == "down" else (mv.inter, cfg.hidden_size)


def stacked_name(layer: int, role: str, bias: bool = False) -> str:
    return f"blk.{layer}.{EXPS[role]}.{'bias' if bias else 'weight'}"


def block_tensors(cfg, mv: MoeValues) -> dict[str, tuple[str, tuple]]:
    """The 1:1 tensors of the MoE blocks: decoder name -> (GGUF name, GGUF numpy shape)."""
    h = cfg.hidden_size
    out = {}
    for layer, is_moe in enumerate(mv.moe_layers):
        if not is_moe:
            continue
        b = block(mv, layer)
        out[f"{b}.{mv.router}.weight"] = (f"blk.{layer}.ffn_gate_inp.weight", (mv.experts, h))
        if mv.router_bias:
            out[f"{b}.{mv.router}.bias"] = (f"blk.{layer}.ffn_gate_inp.bias", (mv.experts,))
        if mv.shared:
            for leaf, g in SHEXP.items():
                shape = (h, mv.shared) if leaf == "down_proj" else (mv.shared, h)
                out[f"{b}.shared_expert.{leaf}.weight"] = (f"blk.{layer}.{g}.weight", shape)
            out[f"{b}.shared_expert_gate.weight"] = (f"blk.{layer}.ffn_gate_inp_shexp.weight", (h,))
    return out


def disk_expert_shapes(cfg, mv: MoeValues) -> dict[str, tuple]:
    """The expert tensors a checkpoint of this config stores (transformers' on-disk layout)."""
    out = {}
    h, i, n = cfg.hidden_size, mv.inter, mv.experts
    for layer, is_moe in enumerate(mv.moe_layers):
        if not is_moe:
            continue
        if mv.disk_layout == "gpt_oss":
            b = f"{block(mv, layer)}.experts."
            out.update({b + "gate_up_proj": (n, h, 2 * i), b + "gate_up_proj_bias": (n, 2 * i),
                        b + "down_proj": (n, i, h), b + "down_proj_bias": (n, h)})
        else:
            for e in range(n):
                for role in ROLES:
                    out[expert_module(mv, layer, e, role) + ".weight"] = expert_shape(cfg, mv, role)
    return out


# -- reading canonical expert weights ----------------------------------------------------------
def _half(role: str) -> slice:
    """gpt-oss's interleaved gate_up columns: gate 0::2, up 1::2."""
    return slice(0, None, 2) if role == "gate" else slice(1, None, 2)


class ExpertReader:
    """Canonical per-expert weights of an open checkpoint through a MergedView (adapters merged), one
    expert at a time, fp32, whatever layout stores them (``arch.experts.ExpertView``: per-expert,
    transformers-5 fused, gpt-oss fused, MXFP4 dequantized)."""

    def __init__(self, view, cfg, mv: MoeValues, path=None):
        from ..arch.experts import ExpertView

        self.view, self.cfg, self.mv, self.path = view, cfg, mv, path
        self.ev = getattr(view, "experts", None) or ExpertView.of(view.ck)
        self.index = {(w.layer, w.expert, w.part): w.name for w in self.ev.weights.values()}
        for layer, is_moe in enumerate(mv.moe_layers):
            for e in range(mv.experts if is_moe else 0):
                for role in ROLES:
                    name = self.index.get((layer, e, role))
                    if name is None:
                        raise IncompatibleError(f"checkpoint lacks the {role} weight of expert {e} in layer {layer}", path)
                    want = expert_shape(cfg, mv, role)
                    if tuple(self.ev.weights[name].shape) != want:
                        raise IncompatibleError(f"expert weight {name!r} is {tuple(self.ev.weights[name].shape)} but "
                                                f"config.json implies {want}", path)
        extra = sorted({w.layer for w in self.ev.weights.values()} - {i for i, m in enumerate(mv.moe_layers) if m})
        if extra:
            raise IncompatibleError(f"layer {extra[0]} stores experts but config.json makes it a dense MLP", path)

    def weight(self, layer: int, e: int, role: str) -> torch.Tensor:
        name = self.index[(layer, e, role)]
        merged = getattr(self.view, "expert_weight", None)
        if merged is not None:  # the MergedView merges one canonical expert weight (any stored layout)
            return merged(name)
        slot = self.ev.weights[name].slot
        if slot.expert is None and slot.stored == "plain":  # a per-expert tensor: the view merges it
            return self.view.tensor(slot.tensor).float()
        w = self.ev.read(self.view.ck, name)
        for m, k in getattr(self.view, "updates", {}).get(name, ()):  # expert LoRA on a fused layout
            w += k * m.delta()
        return w

    def bias(self, layer: int, role: str) -> torch.Tensor:
        """(E, out) expert biases (gpt-oss, de-interleaved)."""
        b = f"{block(self.mv, layer)}.experts."
        if role == "down":
            return self.view.ck.get(b + "down_proj_bias").float()
        return self.view.ck.get(b + "gate_up_proj_bias").float()[:, _half(role)].contiguous()

    def consumed(self) -> set[str]:
        """The checkpoint tensors the stacked GGUF tensors are made of."""
        # MXFP4: *_blocks / *_scales and the logical name; and the MergedView's expert output names
        out = set(self.ev.stored) | set(self.ev.stored.values()) | set(getattr(self.view, "expert_out", ()))
        if self.mv.expert_bias:
            out |= {f"{block(self.mv, i)}.experts.{t}_bias" for i, m in enumerate(self.mv.moe_layers) if m
                    for t in ("gate_up_proj", "down_proj")}
        return out


def stacked_plan(cfg, mv: MoeValues, reader: ExpertReader) -> list[tuple[str, tuple, bool, Callable]]:
    """(GGUF name, numpy shape, is_weight, getter) of every stacked expert tensor; a weight's getter
    yields the experts' 2-D slabs in order, a bias's returns the (E, out) tensor."""
    plan = []
    for layer, is_moe in enumerate(mv.moe_layers):
        if not is_moe:
            continue
        for role in ROLES:
            shape = (mv.experts, *expert_shape(cfg, mv, role))

            def slabs(layer=layer, role=role) -> Iterator[torch.Tensor]:
                for e in range(mv.experts):
                    yield reader.weight(layer, e, role)
            plan.append((stacked_name(layer, role), shape, True, slabs))
        if mv.expert_bias:
            for role in ROLES:
                shape = (mv.experts, expert_shape(cfg, mv, role)[0])
                plan.append((stacked_name(layer, role, bias=True), shape, False,
                             lambda layer=layer, role=role: reader.bias(layer, role)))
    return plan


def check_experts(cfg, mv: MoeValues, shapes: dict, path) -> None:
    """The checkpoint holds every expert tensor with the shape config.json implies."""
    want = disk_expert_shapes(cfg, mv)
    for n, s in want.items():
        if n not in shapes:
            if mv.disk_layout == "per_expert" and any(k.endswith(".experts.gate_up_proj") for k in shapes):
                raise UnsupportedError("this checkpoint stores its experts fused (transformers' in-memory layout "
                                       "mlp.experts.gate_up_proj); save it with transformers (per-expert tensors) first", path)
            raise IncompatibleError(f"checkpoint lacks expert tensor {n!r}", path)
        if tuple(shapes[n]) != tuple(s):
            raise IncompatibleError(f"tensor {n!r} has shape {tuple(shapes[n])} but config.json implies {tuple(s)}", path)


# -- import: stacked GGUF tensors -> the checkpoint layout transformers writes ------------------
def unstack_plan(cfg, mv: MoeValues, tensors: dict, deq, path) -> list[tuple[str, tuple, Callable, tuple]]:
    """(checkpoint name, shape, fp32 producer, GGUF tensors used) of every expert tensor. Per-expert
    layouts: one producer per expert and matrix (its slab of the stacked tensor, dequantized alone);
    gpt-oss: the fused (E, H, 2I) gate_up_proj (gate and up interleaved), down_proj (E, I, H) and
    their biases, as transformers saves them."""
    out = []
    for layer, is_moe in enumerate(mv.moe_layers):
        if not is_moe:
            continue
        names = {r: stacked_name(layer, r) for r in ROLES}
        missing = [n for n in names.values() if n not in tensors]
        if missing:
            raise IncompatibleError(f"GGUF lacks expert tensor {missing[0]!r}", path)
        for r, g in names.items():
            want = (mv.experts, *expert_shape(cfg, mv, r))
            have = tuple(int(x) for x in reversed(tensors[g].shape.tolist()))
            if have != want:
                raise IncompatibleError(f"tensor {g!r} has shape {have} but the config implies {want}", path)
        if mv.disk_layout == "gpt_oss":
            b = f"{block(mv, layer)}.experts."
            h, i, n = cfg.hidden_size, mv.inter, mv.experts
            bias = {r: f"blk.{layer}.{EXPS[r]}.bias" for r in ROLES}
            if any(x not in tensors for x in bias.values()):
                raise IncompatibleError(f"GGUF lacks the expert biases of layer {layer} ({bias['gate']!r})", path)

            def gate_up(gt=tensors[names["gate"]], ut=tensors[names["up"]], n=n, i=i, h=h):
                fused = torch.empty(n, h, 2 * i)
                fused[..., 0::2] = deq(gt, shape=(n, i, h)).transpose(1, 2)
                fused[..., 1::2] = deq(ut, shape=(n, i, h)).transpose(1, 2)
                return fused

            def gate_up_bias(gt=tensors[bias["gate"]], ut=tensors[bias["up"]], n=n, i=i):
                fused = torch.empty(n, 2 * i)
                fused[:, 0::2], fused[:, 1::2] = deq(gt, shape=(n, i)), deq(ut, shape=(n, i))
                return fused
            out += [
                (b + "gate_up_proj", (n, h, 2 * i), gate_up, (names["gate"], names["up"])),
                (b + "gate_up_proj_bias", (n, 2 * i), gate_up_bias, (bias["gate"], bias["up"])),
                (b + "down_proj", (n, i, h),
                 lambda t=tensors[names["down"]], n=n, i=i, h=h: deq(t, shape=(n, h, i)).transpose(1, 2).contiguous(),
                 (names["down"],)),
                (b + "down_proj_bias", (n, h), lambda t=tensors[bias["down"]], n=n, h=h: deq(t, shape=(n, h)),
                 (bias["down"],)),
            ]
            continue
        for r, g in names.items():
            t = tensors[g]
            shape = expert_shape(cfg, mv, r)
            for e in range(mv.experts):
                out.append((expert_module(mv, layer, e, r) + ".weight", shape,
                            lambda t=t, e=e, shape=shape: deq(t, t.data[e], shape), (g,)))
    return out
