"""One readable decoder LM for every family in the registry (loratools/arch), with GQA, rope
scaling (linear, Llama 3, LongRoPE, YaRN), partial rotary, NoPE layers, sliding windows per layer
type, attention sinks, tied embeddings, a KV cache, mixture-of-experts MLPs (MoE: router, top-k
routing, per-expert gate / up / down, a shared expert, clamped SwiGLU) and LoRA applied unmerged
(on experts too: one module per expert and matrix). It reads the feature switches of its
ModelConfig (arch/spec.py says what each means), never a family name.

Module and parameter names are the Hugging Face ones, so a checkpoint's tensors load by name
(a multimodal checkpoint's text prefix is mapped by ModelConfig.to_internal).

    x ─ embed_tokens · embedding_scale ─┬─ layers[i] (norm_layout "pre"):
                                        │    h = x + m·o_proj(attn(rope(q), rope(k), v))   q, k, v = q/k/v_proj(n1 x) or qkv_proj
                                        │    x = h + m·down_proj(act(gate) · up)           gate, up = gate/up_proj(n2 h) or gate_up_proj
                                        └─ norm ─ lm_head ─ / logits_scaling ─ soft-cap ─ logits

    moe:  y = Σ_{e in top-k(router(x))} w_e · expert_e(x)  (+ sigmoid(shared_expert_gate(x)) · shared_expert(x))

    attn = softmax(scale · q kᵀ, soft-capped, + mask [, sink]) v; q/k norms per head or per projection;
    "sandwich" (Gemma) adds post-attention / pre- and post-feed-forward norms; "post" (OLMo 2)
    norms only the branch outputs.

Shapes: hidden (b, s, hidden); q (b, heads, s, head_dim); k, v (b, kv_heads, past + s, head_dim).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter import Adapter
from ..errors import IncompatibleError, InputError
from ..ops import gemm
from ..ops.common import check_finite
from .config import ModelConfig, load_config, rope_inv_freq


@dataclass
class LoraSlot:
    """One LoRA attached to a layer: y += scale · B (A x) (+ scale · bias); DoRA rescales rows."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    bias: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None


def _autocast(x: torch.Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(x.device.type)
    except TypeError:  # PyTorch < 2.4: no device argument
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


def _plain(l: LoraSlot, x: torch.Tensor, w: torch.Tensor) -> bool:
    """A LoRA without DoRA or bias, everything in one dtype, not traced."""
    return l.magnitude is None and l.bias is None and x.dtype == l.A.dtype == w.dtype and not torch.jit.is_tracing()


class _FrozenLinear(torch.autograd.Function):
    """y = x Wᵀ + b with W and b frozen (only dx flows back); the products go through
    ``gemm.linear`` (oneDNN where it is faster)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return gemm.linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        (weight,) = ctx.saved_tensors
        return gemm.linear(dy, weight.T), None, None


class _LoraLinear(torch.autograd.Function):
    """y = x Wᵀ + b + s·(x Aᵀ) Bᵀ with W and b frozen: the training path.

    Backward by hand, so each product is the one needed and results accumulate in place:
    dh = s·dy B,  dB = s·dyᵀ h,  dA = dhᵀ x,  dx = dy W + dh A (one buffer)."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale):
        x2 = x.reshape(-1, x.shape[-1])
        h = gemm.linear(x2, A)
        y = gemm.linear(x2, weight, bias)
        y.addmm_(h, B.T, alpha=scale)
        ctx.save_for_backward(x2, weight, A, B, h)
        ctx.scale, ctx.in_shape = scale, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x2, weight, A, B, h = ctx.saved_tensors
        s = ctx.scale
        dy = dy.reshape(-1, dy.shape[-1])
        dh = gemm.linear(dy, B.T).mul_(s)
        dA = gemm.linear(dh.T, x2.T) if ctx.needs_input_grad[3] else None
        dB = gemm.linear(h.T, dy.T).mul_(s).T if ctx.needs_input_grad[4] else None  # (hᵀ dy)ᵀ: the faster order
        dx = None
        if ctx.needs_input_grad[0]:
            dx = gemm.linear(dy, weight.T).addmm_(dh, A).view(ctx.in_shape)
        return dx, None, None, dA, dB, None


class Linear(nn.Module):
    """nn.Linear with unmerged LoRA slots. With a frozen base weight (always, here) the base
    product runs through ``gemm.linear`` and the backward is hand-written: only dx of the
    base and the LoRA factors' gradients are computed."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.loras: list[LoraSlot] = []

    def _frozen(self, x: torch.Tensor) -> bool:
        """The fast paths apply: a frozen base, not traced, no autocast (autocast's casts apply
        to PyTorch's own ops, not to the hand-written backward or oneDNN's product)."""
        return not (self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)
                    or torch.jit.is_tracing() or _autocast(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frozen = self._frozen(x)
        graph = torch.is_grad_enabled()
        if frozen and graph and len(self.loras) == 1 and _plain(self.loras[0], x, self.weight):
            l = self.loras[0]
            return _LoraLinear.apply(x, self.weight, self.bias, l.A, l.B, l.scale)
        if not frozen:
            y = F.linear(x, self.weight, self.bias)
        elif graph and x.requires_grad:
            y = _FrozenLinear.apply(x, self.weight, self.bias)
        else:
            y = gemm.linear(x, self.weight, self.bias)
        for l in self.loras:
            if l.A.shape[0] == 0 and l.magnitude is None and l.bias is None:
                continue  # rank 0: no contribution
            if l.magnitude is None and l.bias is None and x.dtype == l.A.dtype == y.dtype and not torch.jit.is_tracing():
                # y + (x Aᵀ)(s·B)ᵀ as one GEMM with accumulate; scaling the r-column B is cheaper
                # than scaling the (tokens × out) product
                h = F.linear(x, l.A)
                y = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), (l.B * l.scale).T).view(y.shape)
                continue
            xl = x if x.dtype == l.A.dtype else x.to(l.A.dtype)  # fp32 LoRA on a bf16 base (training)
            lora = (F.linear(F.linear(xl, l.A), l.B) * l.scale).to(y.dtype)
            if l.magnitude is not None:
                # DoRA: m / ‖W + s·B·A‖_row · (W x + s·B A x), the norm treated as a constant.
                w = self.weight + l.scale * (l.B @ l.A)
                k = (l.magnitude / torch.linalg.norm(w, dim=1)).to(y.dtype)
                base = y if self.bias is None else y - self.bias
                y = y + (k - 1) * base + k * lora
            else:
                y = y + lora
            if l.bias is not None:
                y = y + l.bias * l.scale
        return y


class Embedding(nn.Module):
    def __init__(self, num: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, dim))
        self.loras: list[LoraSlot] = []

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = F.embedding(ids, self.weight)
        for l in self.loras:
            y = y + (F.embedding(ids, l.A.T) @ l.B.T) * l.scale
        return y


class RMSNorm(nn.Module):
    """x̂ = x / rms(x);  y = w · x̂  (Llama),  (offset + w) · x̂  (Gemma: offset 1), optionally
    with the weight applied in fp32 before rounding (Gemma, OLMo 2); ``weight=False``: y = x̂
    (Gemma 4's v_norm)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0, fp32_weight: bool = False, weight: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim)) if weight else None
        self.eps, self.offset, self.fp32_weight = eps, offset, fp32_weight or offset != 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is None:
            return x.to(dt)
        if self.fp32_weight:
            w = self.weight.float()
            return (x * (w + self.offset if self.offset else w)).to(dt)
        return self.weight * x.to(dt)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rope on the first cos.shape[-1] dims of each head (partial rotary: the rest
    pass through)."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    xr, xp = x[..., :rot], x[..., rot:]
    return torch.cat((xr * cos + rotate_half(xr) * sin, xp), dim=-1)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap · tanh(x / cap): bounds x to (-cap, cap) (Gemma's soft-capping)."""
    return torch.tanh(x / cap) * cap


ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class Attention(nn.Module):
    """softmax(scale · q kᵀ [soft-capped] + mask) v, with q/k/v from one fused ``qkv_proj`` or
    three projections, optional q/k norms (per head, or over the whole projection), rope on
    the first rotary dims (none on a NoPE layer) and GQA."""

    def __init__(self, cfg: ModelConfig, i: int):
        super().__init__()
        lay = cfg.layers[i] if cfg.layers else None
        h = cfg.hidden_size
        d = lay.head_dim if lay is not None and lay.head_dim else cfg.head_dim
        kvh = lay.kv_heads if lay is not None and lay.kv_heads else cfg.num_key_value_heads
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, kvh, d
        self.window = cfg.layer_windows[i] if cfg.layer_windows else None
        self.rope = lay.rope if lay is not None else True   # RopeSpec, None (NoPE) or True (the one rope)
        q, kv = self.heads * d, kvh * d
        self.sizes = (q, kv, kv)
        self.fused = cfg.fused_qkv
        # Gemma 4: a KV-shared layer has no k/v projections (it attends to layer kv_source's K/V);
        # v_from_k: no v_proj, the values are the key projection (before k_norm)
        self.kv_source = lay.kv_source if lay is not None else None
        self.v_from_k = lay is not None and lay.v_from_k
        if self.fused:
            self.qkv_proj = Linear(h, q + 2 * kv, cfg.qkv_bias)
        else:
            self.q_proj = Linear(h, q, cfg.qkv_bias)
            if self.kv_source is None:
                self.k_proj = Linear(h, kv, cfg.qkv_bias)
                if not self.v_from_k:
                    self.v_proj = Linear(h, kv, cfg.qkv_bias)
        self.o_proj = Linear(q, h, cfg.o_bias)
        self.qk_norm = cfg.qk_norm_kind if cfg.qk_norm else None
        if self.qk_norm is None and cfg.qk_norm:
            self.qk_norm = "head"
        if self.qk_norm:
            per_head = self.qk_norm == "head"
            norm = lambda n: RMSNorm(n, cfg.rms_norm_eps, cfg.norm_offset, cfg.norm_fp32_weight)  # noqa: E731
            self.q_norm = norm(d if per_head else q)
            if self.kv_source is None:
                self.k_norm = norm(d if per_head else kv)
        self.v_norm = RMSNorm(d, cfg.rms_norm_eps, weight=False) if cfg.v_norm else None
        # None: PyTorch's default 1/√head_dim (bit-for-bit what the four original families use)
        default = not cfg.attention_scale or cfg.spec is None or cfg.spec.attention_scale == "head_dim"
        self.scale = None if default else cfg.attention_scale
        self.softcap = cfg.attn_softcap
        self.clip = cfg.qkv_clip
        # gpt-oss: a learned logit per head joins each row's softmax (takes mass, adds no value)
        self.sinks = nn.Parameter(torch.empty(self.heads)) if cfg.attn_sinks else None
        self.explicit = False  # plain-op attention (set for ONNX export)

    def forward(self, x, cos, sin, mask, past: tuple | None, rows: torch.Tensor | None = None,
                shared: tuple | None = None):
        """``shared``: for a KV-shared layer, the (k, v) of layer ``kv_source`` (its cache included),
        returned again as this layer's present."""
        b, s, _ = x.shape
        if self.fused:
            q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        elif self.kv_source is not None:
            q, k, v = self.q_proj(x), None, None
        else:
            q, k = self.q_proj(x), self.k_proj(x)
            v = k if self.v_from_k else self.v_proj(x)
        if self.qk_norm == "proj":
            q = self.q_norm(q)
        if self.clip is not None:
            q = q.clamp(-self.clip, self.clip)
        q = q.view(b, s, self.heads, self.head_dim)
        if self.qk_norm == "head":
            q = self.q_norm(q)
        q = q.transpose(1, 2)
        if cos is not None:
            q = apply_rope(q, cos, sin)
        if k is None:
            k, v = shared
        else:
            if self.qk_norm == "proj":
                k = self.k_norm(k)
            if self.clip is not None:
                k, v = k.clamp(-self.clip, self.clip), v.clamp(-self.clip, self.clip)
            k = k.view(b, s, self.kv_heads, self.head_dim)
            v = v.view(b, s, self.kv_heads, self.head_dim)
            if self.qk_norm == "head":
                k = self.k_norm(k)
            if self.v_norm is not None:
                v = self.v_norm(v)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            if cos is not None:
                k = apply_rope(k, cos, sin)
            if past is not None:
                k = torch.cat([past[0], k], dim=2)
                v = torch.cat([past[1], v], dim=2)
        present = (k, v)
        if self.explicit or self.softcap is not None or self.sinks is not None:
            # the same computation spelled out in plain ops (what ONNX export traces; soft-capping
            # has no fused kernel): as transformers' eager attention
            rep = self.heads // self.kv_heads
            kr = k.repeat_interleave(rep, dim=1) if rep > 1 else k
            vr = v.repeat_interleave(rep, dim=1) if rep > 1 else v
            scores = (q @ kr.transpose(-1, -2)) * (self.head_dim**-0.5 if self.scale is None else self.scale)
            if self.softcap is not None:
                scores = softcap(scores, self.softcap)
            scores = scores + mask
            if self.sinks is not None:
                # the sink is one more column of each row's softmax, dropped after it
                sink = self.sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(b, -1, s, 1)
                probs = torch.softmax(torch.cat([scores, sink], dim=-1).float(), dim=-1)[..., :-1]
                out = probs.to(q.dtype) @ vr
            else:
                out = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ vr
        else:
            # softmax(q kᵀ / √d + mask) v; mask None = plain causal (PyTorch's fused kernels); GQA
            # shares each key/value head among heads / kv_heads query heads
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                 enable_gqa=self.heads != self.kv_heads, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, s, -1)
        if rows is not None:
            out = out.reshape(b * s, -1)[rows]  # only these positions go on (see DecoderLM.hidden)
        return self.o_proj(out), present


class MLP(nn.Module):
    """down_proj(act(gate) · up), gate and up from one fused ``gate_up_proj`` (rows: gate, then
    up) or two projections."""

    def __init__(self, cfg: ModelConfig, width: int = 0):
        super().__init__()
        h, i = cfg.hidden_size, width or cfg.intermediate_size
        self.fused = cfg.fused_gate_up
        if self.fused:
            self.gate_up_proj = Linear(h, 2 * i, cfg.mlp_bias)
        else:
            self.gate_proj = Linear(h, i, cfg.mlp_bias)
            self.up_proj = Linear(h, i, cfg.mlp_bias)
        self.down_proj = Linear(i, h, cfg.mlp_bias)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def route(logits: torch.Tensor, top_k: int, scoring: str, renorm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits (tokens, E) -> (weights (tokens, k) fp32, expert indices (tokens, k)).
    "softmax_topk": softmax over all E in fp32, the k largest, divided by their sum when
    ``renorm`` (Mixtral, Qwen, OLMoE); "topk_softmax": the k largest logits, softmax over them
    (gpt-oss)."""
    if scoring == "topk_softmax":
        top, idx = torch.topk(logits, top_k, dim=-1)
        return torch.softmax(top.float(), dim=-1), idx
    w, idx = torch.topk(torch.softmax(logits.float(), dim=-1), top_k, dim=-1)
    if renorm:
        w = w / w.sum(dim=-1, keepdim=True)
    return w, idx


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    """gpt-oss: (clamp(up, ±limit) + 1) · g · sigmoid(alpha · g), g = min(gate, limit)."""
    g = gate.clamp(max=limit)
    return (up.clamp(-limit, limit) + 1) * (g * torch.sigmoid(g * alpha))


class Expert(nn.Module):
    """One routed expert: down(act(gate x) · up x), its leaves named as on disk (gate_proj /
    up_proj / down_proj; Mixtral w1 / w3 / w2), with biases and the clamped SwiGLU of gpt-oss."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.moe
        h, i = cfg.hidden_size, m.intermediate
        self.leaves = m.leaves
        for name, (fin, fout) in zip(m.leaves, ((h, i), (h, i), (i, h))):
            setattr(self, name, Linear(fin, fout, m.expert_bias))
        self.clamp, self.alpha = m.clamp, m.alpha
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        g, u, d = (getattr(self, n) for n in self.leaves)
        if self.clamp is not None:
            return d(clamped_swiglu(g(x), u(x), self.clamp, self.alpha))
        return d(self.act(g(x)) * u(x))


class MoE(nn.Module):
    """A mixture-of-experts MLP: the router (``gate``; gpt-oss ``router``, with bias) scores E
    experts per token, the top k run and their outputs are summed with the routing weights; a
    shared expert (Qwen2-MoE) adds sigmoid(shared_expert_gate(x)) · shared_expert(x).

    Two exact ways to run the experts: per expert on the tokens routed to it (gathered, added
    back with index_add: the eager path, cost ∝ k), or every expert on every token, weighted by
    the routing weights scattered into a (tokens, E) matrix, zero for the unselected ones (what
    tracing / ONNX export uses: no data-dependent shapes). Both add the experts in index order,
    as transformers does."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.moe
        self.router_name, self.top_k, self.scoring, self.renorm = m.router, m.top_k, m.scoring, m.renorm
        setattr(self, m.router, Linear(cfg.hidden_size, m.experts, m.router_bias))
        self.experts = nn.ModuleList(Expert(cfg) for _ in range(m.experts))
        if m.shared:
            self.shared_expert = MLP(cfg, m.shared)
            self.shared_expert_gate = Linear(cfg.hidden_size, 1, False)
        self.shared = bool(m.shared)
        self.dense = False  # every expert on every token (set for ONNX export)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        w, idx = route(getattr(self, self.router_name)(x), self.top_k, self.scoring, self.renorm)
        if self.dense or torch.jit.is_tracing():
            full = torch.zeros(x.shape[0], len(self.experts), dtype=w.dtype, device=x.device).scatter(1, idx, w)
            out = torch.zeros_like(x)
            for e, expert in enumerate(self.experts):
                out = out + expert(x) * full[:, e:e + 1].to(x.dtype)
        else:
            out = torch.zeros_like(x)
            for e, expert in enumerate(self.experts):
                tok, pos = torch.where(idx == e)
                if tok.numel():
                    out = out.index_add(0, tok, expert(x[tok]) * w[tok, pos, None].to(x.dtype))
        if self.shared:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(shape)


class Block(nn.Module):
    """One layer; the norms sit as ``norm_layout`` says:
        pre:       x = x + m·attn(input_ln(x));             x = x + m·mlp(post_attention_ln(x))
        sandwich:  x = x + post_attention_ln(attn(input_ln(x)));  x = x + post_feedforward_ln(mlp(pre_feedforward_ln(x)))
        post:      x = x + post_attention_ln(attn(x));      x = x + post_feedforward_ln(mlp(x))
    (m: Granite's residual_multiplier, 1 elsewhere)."""

    def __init__(self, cfg: ModelConfig, i: int):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset, cfg.norm_fp32_weight)  # noqa: E731
        self.layout = cfg.norm_layout
        if self.layout in ("pre", "sandwich"):
            self.input_layernorm = norm()
        self.self_attn = Attention(cfg, i)
        self.post_attention_layernorm = norm()
        if self.layout == "sandwich":
            self.pre_feedforward_layernorm = norm()
        if self.layout in ("sandwich", "post"):
            self.post_feedforward_layernorm = norm()
        # the MLP: dense, or the MoE block under its on-disk name (Mixtral: block_sparse_moe)
        moe = cfg.moe is not None and cfg.moe.layers[i]
        self.mlp_name = cfg.moe.block if moe else "mlp"
        setattr(self, self.mlp_name, MoE(cfg) if moe else MLP(cfg, cfg.layers[i].intermediate_size if cfg.layers else 0))
        self.m = cfg.residual_multiplier
        # Gemma 4: the per-layer input branch and a stored output scalar
        self.per_layer_input = cfg.per_layer_input_size
        if self.per_layer_input:
            h, p = cfg.hidden_size, cfg.per_layer_input_size
            self.per_layer_input_gate = Linear(h, p, False)
            self.per_layer_projection = Linear(p, h, False)
            self.post_per_layer_input_norm = norm()
            self.act = ACTIVATIONS[cfg.hidden_act]
        self.layer_scalar = nn.Parameter(torch.empty(1)) if cfg.layer_scalar else None

    def forward(self, x, ropes, masks, past, rows=None, per_layer=None, shared=None):
        """``per_layer``: this layer's per-layer input (b, s, P) (Gemma 4); ``shared``: the K/V
        this layer reuses (Attention.forward)."""
        cos, sin = ropes[self.self_attn.rope] if self.self_attn.rope is not None else (None, None)
        attn_in = self.input_layernorm(x) if self.layout != "post" else x
        a, present = self.self_attn(attn_in, cos, sin, masks[self.self_attn.window], past, rows, shared)
        if rows is not None:
            x = x.reshape(-1, x.shape[-1])[rows]
        if self.layout == "pre":
            x = x + (a if self.m == 1.0 else a * self.m)
            f = self._modules[self.mlp_name](self.post_attention_layernorm(x))
            x = x + (f if self.m == 1.0 else f * self.m)
        else:
            x = x + self.post_attention_layernorm(a)
            f = self._modules[self.mlp_name](self.pre_feedforward_layernorm(x) if self.layout == "sandwich" else x)
            x = x + self.post_feedforward_layernorm(f)
        if self.per_layer_input:
            # x + norm(per_layer_projection(act(per_layer_input_gate(x)) · per_layer_input))
            if rows is not None:
                per_layer = per_layer.reshape(-1, per_layer.shape[-1])[rows]
            g = self.act(self.per_layer_input_gate(x)) * per_layer
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(g))
        if self.layer_scalar is not None:
            x = x * self.layer_scalar
        return x, present


class Body(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset, cfg.norm_fp32_weight)
        if cfg.per_layer_input_size:  # Gemma 4 per-layer input embeddings: one table for every layer
            lp = cfg.num_hidden_layers * cfg.per_layer_input_size
            self.embed_tokens_per_layer = Embedding(cfg.per_layer_input_vocab, lp)
            self.per_layer_model_projection = Linear(cfg.hidden_size, lp, False)
            self.per_layer_projection_norm = RMSNorm(cfg.per_layer_input_size, cfg.rms_norm_eps, cfg.norm_offset,
                                                     cfg.norm_fp32_weight)


class DecoderLM(nn.Module):
    """``forward(input_ids, attention_mask=None, position_ids=None, past=None)`` →
    ``(logits (b, s, vocab) fp32, present: list of (k, v), None for a KV-shared layer)``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Body(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False)
        ropes = [r for r in dict.fromkeys(cfg.layer_ropes) if r is not None] if cfg.layers else []
        self.ropes = ropes or [True]   # distinct rotary embeddings; inv_freq is the first one's
        rot = ropes[0].rotary_dim if ropes else cfg.head_dim
        self.register_buffer("inv_freq", torch.empty(rot // 2), persistent=False)
        self._inv: dict = {}           # the other ropes' inverse frequencies, made on first use
        self.gradient_checkpointing = False
        self.explicit_attention = False
        self.softcapped = cfg.attn_softcap is not None or cfg.attn_sinks  # attention in plain ops: masks as tensors

    def set_explicit_attention(self, on: bool = True) -> None:
        """Plain-op attention with an explicit mask in every layer (for tracing / ONNX export)."""
        self.explicit_attention = on
        for layer in self.model.layers:
            layer.self_attn.explicit = on
            mlp = layer._modules[layer.mlp_name]
            if isinstance(mlp, MoE):
                mlp.dense = on  # no data-dependent shapes in the traced graph

    # -- forward -----------------------------------------------------------------------------
    def _inv_freq(self, rope, long: bool = False) -> torch.Tensor:
        if rope is self.ropes[0] and not long:
            return self.inv_freq.float()
        key = (rope, long)
        t = self._inv.get(key)
        if t is None or t.device != self.inv_freq.device:
            t = self._inv[key] = rope_inv_freq(self.cfg, rope, long=long).to(self.inv_freq.device)
        return t

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """(cos, sin) (b, 1, s, rotary_dim) of the first rope (what ``forward`` of the four
        single-rope families uses)."""
        return self.ropes_for(position_ids, dtype)[self.ropes[0]]

    def ropes_for(self, position_ids: torch.Tensor, dtype: torch.dtype) -> dict:
        """Every distinct rope -> (cos, sin) (b, 1, s, rotary_dim). LongRoPE takes its long
        factors when the furthest position reaches past original_max_position_embeddings (as
        transformers decides, per call)."""
        out = {}
        for r in self.ropes:
            inv = self._inv_freq(r)
            if r is not True and r.rope_type == "longrope":
                far = position_ids.max() + 1 > r.get("original_max_position_embeddings")
                inv = torch.where(far, self._inv_freq(r, long=True), inv)
            freqs = position_ids[:, :, None].float() * inv[None, None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos(), emb.sin()
            if r is not True and r.attention_factor != 1.0:
                cos, sin = cos * r.attention_factor, sin * r.attention_factor
            out[r] = cos.to(dtype)[:, None], sin.to(dtype)[:, None]
        return out

    def masks(self, b: int, s: int, past_len: int, attention_mask, dtype, device) -> dict:
        """Additive masks (b, 1, s, past+s), one per distinct window (key None = no window);
        a value of None means plain causal attention, which needs no mask tensor."""
        total = past_len + s
        qpos = torch.arange(past_len, total, device=device)[:, None]
        kpos = torch.arange(total, device=device)[None, :]
        keep_pad = None
        if attention_mask is not None:
            if attention_mask.shape != (b, total):
                raise InputError(f"attention_mask must be {(b, total)}, got {tuple(attention_mask.shape)}")
            keep_pad = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        out = {}
        for w in set(self.cfg.layer_windows) | {None}:
            if (attention_mask is None and past_len == 0 and (w is None or w >= s) and not self.explicit_attention
                    and not self.softcapped):
                out[w] = None  # plain causal: no mask tensor needed
                continue
            keep = kpos <= qpos
            if w is not None:
                keep = keep & (qpos - kpos < w)
            keep = keep[None, None].expand(b, 1, s, total)
            if keep_pad is not None:
                keep = keep & keep_pad
            m = torch.zeros(b, 1, s, total, dtype=dtype, device=device)
            out[w] = m.masked_fill(~keep, torch.finfo(dtype).min)
        return out

    def forward(self, input_ids, attention_mask=None, position_ids=None, past=None):
        h, presents = self.hidden(input_ids, attention_mask, position_ids, past)
        return self.head(h), presents

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """lm_head, then the family's logit transforms (Granite's logits_scaling, Gemma's final
        soft-capping), in fp32."""
        logits = self.lm_head(h).float()
        if self.cfg.logits_scaling != 1.0:
            logits = logits / self.cfg.logits_scaling
        if self.cfg.final_softcap is not None:
            logits = softcap(logits, self.cfg.final_softcap)
        return logits

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        c = self.cfg
        if c.embedding_scale != 1.0:
            # Gemma rounds √hidden to the weight dtype first (sqrt(3072) is 55.5 in bf16); Granite's
            # multiplier is a Python float applied in the op's own precision
            x = x * (torch.tensor(c.embedding_scale, dtype=x.dtype, device=x.device) if c.embedding_scale_rounded
                     else c.embedding_scale)
        return x

    def per_layer_inputs(self, input_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Gemma 4's per-layer inputs (b, s, layers, P) from the token ids and the scaled embeddings x:
        (norm(per_layer_model_projection(x) / √hidden) + embed_tokens_per_layer(ids) · √P) / √2."""
        b, s = input_ids.shape
        n, p = self.cfg.num_hidden_layers, self.cfg.per_layer_input_size
        tok = self.model.embed_tokens_per_layer(input_ids)
        tok = (tok * torch.tensor(p ** 0.5, dtype=tok.dtype, device=tok.device)).reshape(b, s, n, p)
        proj = self.model.per_layer_model_projection(x) * self.cfg.hidden_size ** -0.5
        proj = self.model.per_layer_projection_norm(proj.reshape(b, s, n, p))
        return (proj + tok) * 2.0 ** -0.5

    def hidden(self, input_ids, attention_mask=None, position_ids=None, past=None, rows=None):
        """The final normed hidden states (b, s, hidden) and the KV cache; ``forward`` is this plus
        lm_head (training applies the head only at positions that carry loss).

        ``rows``: flat indices into the b·s positions whose final state is wanted; the result is
        then (len(rows), hidden). Every position's keys and values still feed the last block's
        attention, but its output projection, MLP and the final norm run only at those rows."""
        b, s = input_ids.shape
        past_len = 0 if not past else past[0][0].shape[2]
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + s, device=input_ids.device)[None].expand(b, s)
        x = self.embed(input_ids)
        per_layer = self.per_layer_inputs(input_ids, x) if self.cfg.per_layer_input_size else None
        ropes = self.ropes_for(position_ids, x.dtype)
        masks = self.masks(b, s, past_len, attention_mask, x.dtype, x.device)
        presents = []
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            src = layer.self_attn.kv_source  # a KV-shared layer: no cache of its own
            args = (x, ropes, masks, past[i] if past and src is None else None, rows if i == last else None,
                    None if per_layer is None else per_layer[:, :, i], None if src is None else presents[src])
            if self.gradient_checkpointing and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                x, pr = checkpoint(layer, *args, use_reentrant=False)
            else:
                x, pr = layer(*args)
            presents.append(pr if src is None else None)  # a KV-shared layer keeps no cache of its own
        return self.model.norm(x), presents

    # -- weights -----------------------------------------------------------------------------
    def linear_modules(self) -> dict[str, nn.Module]:
        return {n: m for n, m in self.named_modules() if isinstance(m, (Linear, Embedding))}

    def attach(self, adapter: Adapter, weight: float = 1.0) -> None:
        """Apply ``adapter`` unmerged, its scale multiplied by ``weight``. Module names may be in
        the checkpoint's on-disk layout (e.g. ``model.language_model.layers.0...``)."""
        adapter = internal_adapter(self.cfg, adapter)
        shapes = {f"{n}.{p}": tuple(t.shape) for n, m in self.linear_modules().items() for p, t in m.named_parameters(recurse=False)}
        adapter.check_against(shapes, "base model")
        mods = self.linear_modules()
        dev, dt = self.inv_freq.device, self.model.norm.weight.dtype
        to = lambda t: None if t is None else t.to(device=dev, dtype=dt)  # noqa: E731
        for name, m in adapter.modules.items():
            mods[name].loras.append(LoraSlot(to(m.A), to(m.B), m.scale * weight, to(m.bias), to(m.magnitude)))
        if adapter.modules_to_save:
            if weight != 1.0:
                raise IncompatibleError("an adapter with modules_to_save cannot be weighted", adapter.source or None)
            for key, t in adapter.modules_to_save.items():
                self._set(key, to(t))

    def detach_adapters(self) -> None:
        for m in self.linear_modules().values():
            m.loras.clear()

    def _set(self, key: str, t: torch.Tensor) -> None:
        mod_name, _, pname = key.rpartition(".")
        mod = self.get_submodule(mod_name)
        if pname == "weight" and mod is self.lm_head and self.lm_head.weight is self.model.embed_tokens.weight:
            self.lm_head.weight = nn.Parameter(t, requires_grad=False)  # untie: lm_head replaced alone
            return
        setattr(mod, pname, nn.Parameter(t, requires_grad=False))

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.named_parameters(remove_duplicate=False)}


def check_fits(cfg: ModelConfig, shapes: dict[str, tuple], path) -> None:
    """Refuse tensors that are not exactly the model ``cfg`` describes: a name the model does not
    have, another shape, or a missing tensor (``lm_head.weight`` may be absent: the head is then
    the embedding)."""
    with torch.device("meta"):
        expected = DecoderLM(cfg).expected_shapes()
    own = {}
    for name, shape in shapes.items():
        n = cfg.to_internal(name)
        if n is not None:  # None: not part of the text decoder (a vision tower)
            own[n] = shape
    for name, shape in own.items():
        if name not in expected:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            leaf = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else name
            fused = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
                     "up_proj": "gate_up_proj"}
            split = {"qkv_proj": "q_proj/k_proj/v_proj", "gate_up_proj": "gate_proj/up_proj"}
            if leaf in fused and any(n.endswith(f".{fused[leaf]}.weight") for n in expected):
                raise IncompatibleError(f"tensor {name!r} is a split projection, but a {cfg.model_type} model (config.json) "
                                        f"has a fused {fused[leaf]}", path)
            if leaf in split and not any(n.endswith(f".{leaf}.weight") for n in expected):
                raise IncompatibleError(f"tensor {name!r} is a fused projection, but a {cfg.model_type} model (config.json) "
                                        f"has separate {split[leaf]}", path)
            raise IncompatibleError(f"tensor {name!r} is not part of a {cfg.model_type} model with this config", path)
        if tuple(shape) != expected[name]:
            raise IncompatibleError(f"tensor {name!r} has shape {tuple(shape)} but config.json implies {expected[name]}", path)
    missing = [n for n in expected if n not in own and n != "lm_head.weight"]
    if missing:
        raise IncompatibleError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[0]!r}", path)


def expert_bias_slices(cfg: ModelConfig, name: str, shape: tuple) -> list[tuple[str, int, object]] | None:
    """A fused expert bias tensor (gpt-oss ``...experts.gate_up_proj_bias`` (E, 2I), gate and up
    interleaved like the weight's columns; ``...experts.down_proj_bias`` (E, H)) -> its canonical
    per-expert biases [(``...experts.E.<leaf>.bias``, E, column selection)]; None for any other tensor."""
    m = cfg.moe
    if m is None or not m.expert_bias or not name.endswith(("experts.gate_up_proj_bias", "experts.down_proj_bias")):
        return None
    base, _, t = name.rpartition(".")
    if len(shape) != 2:
        raise IncompatibleError(f"tensor {name!r} has shape {tuple(shape)}, expected (experts, width)")
    gate, up, down = m.leaves
    if t == "down_proj_bias":
        parts = ((down, slice(None)),)
    elif m.disk_layout == "gpt_oss":
        parts = ((gate, slice(0, None, 2)), (up, slice(1, None, 2)))
    else:
        parts = ((gate, slice(0, shape[1] // 2)), (up, slice(shape[1] // 2, None)))
    return [(f"{base}.{e}.{leaf}.bias", e, sel) for e in range(shape[0]) for leaf, sel in parts]


def model_tensors(cfg: ModelConfig, ck, merged=None) -> dict:
    """The decoder's own tensor name -> (shape, read(dtype or None) -> tensor) for an open
    checkpoint: its tensors by name (a multimodal layout mapped, a vision tower left out), and a
    mixture-of-experts model's experts as canonical per-expert weights (arch/experts.py reads
    every stored layout, MXFP4 dequantized, one expert at a time) and biases.

    ``merged``: an ``ops.merge.MergedView`` of ``ck``: its tensors (adapters applied) are read
    instead, each expert weight merged on its own (MergedView.expert_weight)."""
    from ..arch.experts import ExpertView

    if merged is not None:
        view = merged.experts if cfg.moe is not None else None
        names = [n for n in merged.names() if n not in merged.expert_out]
        shape_of, full = (lambda n: tuple(merged.info(n).shape)), merged.tensor
    else:
        view = ExpertView.of(ck) if cfg.moe is not None else None
        names = [n for n in ck.keys() if view is None or not view.covers(n)]
        shape_of, full = (lambda n: tuple(ck.info(n).shape)), ck.get
    last: dict = {}

    def stored(name):  # the last whole tensor read (a fused bias: its experts are read in order)
        if name not in last:
            last.clear()
            last[name] = full(name)
        return last[name]

    out: dict = {}
    for name in names:
        shape = shape_of(name)
        bias = expert_bias_slices(cfg, name, shape)
        if bias is not None:
            for cname, e, sel in bias:
                n = len(range(shape[1])[sel])
                out[cfg.to_internal(cname)] = ((n,), lambda dt, name=name, e=e, sel=sel: _cast(stored(name)[e, sel], dt))
            continue
        own = cfg.to_internal(name)
        if own is None or name.endswith("rotary_emb.inv_freq"):
            continue
        out[own] = (shape, lambda dt, name=name: _cast(full(name), dt))

    def expert(cname, dt):
        if merged is not None and cname in merged.updates:
            return _cast(merged.expert_weight(cname), dt)
        return _cast(view.read(ck, cname, dtype=None), dt)

    for cname, w in (view.weights.items() if view else ()):
        out[cfg.to_internal(cname)] = (tuple(w.shape), lambda dt, cname=cname: expert(cname, dt))
    return out


def _cast(t: torch.Tensor, dtype) -> torch.Tensor:
    return (t if dtype is None else t.to(dtype)).contiguous()


def internal_adapter(cfg: ModelConfig, adapter: Adapter) -> Adapter:
    """``adapter`` with its module names in the decoder's own layout (``model.layers...``,
    ``lm_head``); the same object when they already are."""
    rename = {n: cfg.to_internal(n) for n in list(adapter.modules) + list(adapter.modules_to_save)}
    if all(k == v for k, v in rename.items()):
        return adapter
    foreign = [k for k, v in rename.items() if v is None]
    if foreign:
        raise IncompatibleError(f"the adapter targets {foreign[0]!r}, outside the text decoder, which loratools "
                                "does not run", adapter.source or None)
    from dataclasses import replace

    return replace(adapter, modules={rename[k]: m for k, m in adapter.modules.items()},
                   modules_to_save={rename[k]: t for k, t in adapter.modules_to_save.items()})


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | None = "cpu",
               adapters: Iterable[Adapter] = (), weights: Iterable[float] | None = None,
               allow_pickle: bool = False, mmap: bool = False) -> DecoderLM:
    """Build the reference model from a checkpoint folder, tensor by tensor, and attach adapters.
    ``mmap``: on the CPU, weights stored in the compute dtype stay in a copy-on-write map of the
    file instead of being copied (file-backed pages; for frozen weights)."""
    from ..checkpoint import Checkpoint

    cfg = load_config(path)
    from ..device import pick_device

    dev = pick_device(device)
    with torch.device("meta"):
        model = DecoderLM(cfg)
    with Checkpoint.open(path, allow_pickle=allow_pickle) as ck:
        if cfg.moe is None:
            check_fits(cfg, {n: tuple(ck.info(n).shape) for n in ck.keys()}, ck.path)  # from the headers, before any read
            for name in ck.keys():
                own = cfg.to_internal(name)
                if own is None or name.endswith("rotary_emb.inv_freq"):
                    continue
                t = ck.get_mapped(name) if mmap and dev.type == "cpu" and ck.info(name).dtype == dtype else ck.get(name)
                check_finite(t, name, ck.index[name])  # NaN/Inf in the weights: refused, named (one aminmax pass)
                model._set(own, t if t.dtype == dtype and t.device == dev else t.to(device=dev, dtype=dtype))
        else:  # experts in any stored layout, as canonical per-expert weights
            tensors = model_tensors(cfg, ck)
            check_fits(cfg, {n: shape for n, (shape, _) in tensors.items()}, ck.path)
            for own, (_, read) in tensors.items():
                t = read(None)
                check_finite(t, own, ck.path)
                model._set(own, t.to(device=dev, dtype=dtype))
        from ..modelinfo import tied_pair

        tied = tied_pair(cfg, ck.keys()) is not None  # config says so, or the checkpoint simply has no head
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg).to(dev)  # the first rope; the others are made on first use
    model.requires_grad_(False)
    model.eval()
    ws = list(weights) if weights is not None else None
    for i, a in enumerate(adapters):
        model.attach(a, 1.0 if ws is None else ws[i])
    return model
