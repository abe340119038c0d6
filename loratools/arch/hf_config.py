"""config.json -> ModelConfig: the family's spec (registry) resolved against the file's values.

config.json comes in two generations and both are read:
  transformers 5: ``rope_parameters`` = {rope_theta, rope_type, scaling fields}, or one such dict
                  per layer type ({"full_attention": {...}, "sliding_attention": {...}});
  transformers 4: ``rope_theta`` and ``rope_scaling`` at the top level, and for Gemma 3 the
                  sliding layers' base as ``rope_local_base_freq`` (rope_scaling applies to the
                  full-attention layers only).
Fields a config may omit take the value transformers' config class gives them (spec.defaults).
Features that contradict each other are refused in one line naming config.json.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import read_json
from ..errors import InputError, UnsupportedError
from .registry import get_spec
from .spec import ACT_ALIASES, ArchSpec

LAYER_TYPES = ("full_attention", "sliding_attention")
ROPE_ALIASES = {"su": "longrope", "yarn": "longrope"}  # Phi-3 4.x configs (transformers maps both)


@dataclass(frozen=True, eq=True)
class RopeSpec:
    """One rotary embedding: base ``theta``, ``rope_type`` and its scaling fields, applied to the
    first ``rotary_dim`` dims of each head (partial rotary when < head_dim)."""

    theta: float
    rope_type: str = "default"
    rotary_dim: int = 0
    scaling: tuple = ()          # sorted (key, value) pairs of the scaling fields (factor, ...)
    attention_factor: float = 1.0  # cos and sin are multiplied by it (LongRoPE)

    def get(self, key, default=None):
        return dict(self.scaling).get(key, default)


@dataclass(frozen=True)
class LayerSpec:
    """What one layer is: its attention type, sliding window (None: full), rope (None: NoPE),
    head_dim and key/value heads (they differ per layer only in Gemma 4), and the earlier layer
    whose K/V it reuses (None: its own), its MLP width (0: intermediate_size) and whether its
    values are its key projection (Gemma 4 attention_k_eq_v: no v_proj)."""

    layer_type: str = "full_attention"
    window: int | None = None
    rope: RopeSpec | None = None
    head_dim: int = 0
    kv_heads: int = 0
    kv_source: int | None = None
    intermediate_size: int = 0
    v_from_k: bool = False


@dataclass(frozen=True)
class MoeConfig:
    """A family's MoeSpec resolved against config.json: ``experts`` routed experts of width
    ``intermediate``, ``top_k`` per token, a shared expert of width ``shared`` (0: none),
    ``clamp`` / ``alpha`` of gpt-oss's clamped SwiGLU (clamp None: act(gate) · up) and, per layer,
    whether its MLP is the MoE block (``layers``; False: a dense MLP of intermediate_size)."""

    experts: int
    top_k: int
    intermediate: int
    scoring: str
    renorm: bool
    router: str
    router_bias: bool
    block: str
    leaves: tuple
    disk_layout: str
    expert_bias: bool
    shared: int = 0
    clamp: float | None = None
    alpha: float = 1.0
    layers: tuple = ()


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float            # the full-attention layers' rope base
    rope_scaling: dict = field(default_factory=dict)   # {"rope_type": ..., "factor": ..., ...} (full attention)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False        # the attention has q_norm / k_norm (kind: qk_norm_kind)
    hidden_act: str = "silu"
    layer_windows: tuple = ()    # per layer: None (full attention) or the sliding window size
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    raw: dict = field(default_factory=dict, repr=False)
    # -- resolved feature switches (arch/spec.py says what each means) -------------------------
    family: str = ""                      # registry key
    spec: ArchSpec | None = field(default=None, repr=False)
    norm_offset: float = 0.0              # RMSNorm: (norm_offset + w) · x̂
    norm_fp32_weight: bool = False        # weight applied to the fp32 x̂ (Gemma, OLMo 2)
    norm_layout: str = "pre"              # "pre" | "sandwich" | "post"
    qk_norm_kind: str | None = None       # None | "head" | "proj"
    v_norm: bool = False
    embedding_scale: float = 1.0          # embeddings multiplied by it
    embedding_scale_rounded: bool = False  # the factor is first rounded to the compute dtype (Gemma's √hidden)
    attention_scale: float = 0.0          # softmax(scale · q kᵀ): 1/√head_dim unless the family says
    attn_softcap: float | None = None
    final_softcap: float | None = None
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0           # logits divided by it
    fused_qkv: bool = False
    fused_gate_up: bool = False
    layers: tuple = ()                    # LayerSpec per layer
    per_layer_input_size: int = 0         # Gemma 4 per-layer input embeddings (0: off)
    per_layer_input_vocab: int = 0        # rows of its table (embed_tokens_per_layer)
    layer_scalar: bool = False            # Gemma 4: each layer's output times model.layers.N.layer_scalar
    kv_shared_layers: int = 0             # Gemma 4: trailing layers reusing earlier K/V (0: off)
    text_config: bool = False             # the values came from config.json's text_config
    moe: MoeConfig | None = None          # the mixture-of-experts MLP (None: dense)
    qkv_clip: float | None = None         # q, k, v clamped to [-c, c] (OLMoE clip_qkv)
    attn_sinks: bool = False              # a learned sink logit per head (gpt-oss)

    @property
    def rope_type(self) -> str:
        return self.rope_scaling.get("rope_type", "default")

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def layer_ropes(self) -> tuple:
        return tuple(l.rope for l in self.layers)

    @property
    def layer_types(self) -> tuple:
        return tuple(l.layer_type for l in self.layers)

    @property
    def rotary_dim(self) -> int:
        """Rotary dims of the full-attention rope (head_dim unless partial)."""
        ropes = [r for r in self.layer_ropes if r is not None]
        return ropes[0].rotary_dim if ropes else self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Leaf module name -> weight shape (out, in) of each linear layer in a block."""
        h, i = self.hidden_size, self.intermediate_size
        out = {}
        if self.fused_qkv:
            out["qkv_proj"] = (self.q_size + 2 * self.kv_size, h)
        else:
            out.update(q_proj=(self.q_size, h), k_proj=(self.kv_size, h), v_proj=(self.kv_size, h))
        out["o_proj"] = (h, self.q_size)
        if self.fused_gate_up:
            out["gate_up_proj"] = (2 * i, h)
        else:
            out.update(gate_proj=(i, h), up_proj=(i, h))
        out["down_proj"] = (h, i)
        return out

    # -- names: on disk <-> the decoder's own (model.layers..., lm_head) ------------------------
    def to_internal(self, name: str) -> str | None:
        """An on-disk tensor or module name -> the decoder's name; None for tensors that are
        not part of the text decoder (a vision tower); unchanged when no layout matches."""
        spec = self.spec
        if spec is None:
            return name
        for pre in spec.foreign_prefixes:
            if name.startswith(pre):
                return None
        for prefix, head in spec.layouts():
            if prefix != "model." and name.startswith(prefix):
                return "model." + name[len(prefix):]
            if head != "lm_head" and (name == head or name.startswith(head + ".")):
                return "lm_head" + name[len(head):]
        return name

    def to_external(self, name: str) -> str:
        """The decoder's name -> the name in the current (transformers 5) on-disk layout."""
        spec = self.spec
        if spec is None:
            return name
        if spec.prefix != "model." and name.startswith("model."):
            return spec.prefix + name[len("model."):]
        if spec.head != "lm_head" and (name == "lm_head" or name.startswith("lm_head.")):
            return spec.head + name[len("lm_head"):]
        return name


# -- reading -----------------------------------------------------------------------------------
def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _get(cfg: dict, key: str, typ, path, default=...):
    if key not in cfg or cfg[key] is None:
        if default is ...:
            raise InputError(f"missing field {key!r}", path)
        return default
    v = cfg[key]
    ok = isinstance(v, typ) and not isinstance(v, bool) if typ is not bool else isinstance(v, bool)
    if typ is float:
        ok = _num(v)
    if not ok:
        raise InputError(f"field {key!r} must be {typ.__name__}, got {v!r}", path)
    return float(v) if typ is float else v


def _flag(cfg: dict, spec, path) -> bool:
    if isinstance(spec, bool):
        return spec
    return _get(cfg, spec, bool, path, False)


def _opt_pos_float(cfg: dict, key: str | None, path) -> float | None:
    """A soft-capping value: None/absent = off, else a finite number > 0."""
    if key is None or cfg.get(key) is None:
        return None
    v = cfg[key]
    if not _num(v) or not math.isfinite(v) or v <= 0:
        raise InputError(f"field {key!r} must be a positive number or null, got {v!r}", path)
    return float(v)


def _pos_float(cfg: dict, key: str, path, default: float = 1.0) -> float:
    v = cfg.get(key, default)
    if v is None:
        v = default
    if not _num(v) or not math.isfinite(v) or v <= 0:
        raise InputError(f"field {key!r} must be a finite number > 0, got {v!r}", path)
    return float(v)


def parse_config(cfg: dict, path: str | os.PathLike = "config.json") -> ModelConfig:
    if not isinstance(cfg, dict):
        raise InputError("config.json must hold a JSON object", path)
    mt = cfg.get("model_type")
    if mt is None:
        raise InputError("missing field 'model_type'", path)
    if not isinstance(mt, str):
        raise InputError(f"field 'model_type' must be a string, got {mt!r}", path)
    spec = get_spec(mt, path)
    raw = dict(cfg)
    if spec.text_config:
        tc = cfg.get("text_config")
        if not isinstance(tc, dict):
            raise InputError(f"a {mt} config needs a 'text_config' object, got {tc!r}", path)
        # tie_word_embeddings may sit at the top level of a multimodal config
        cfg = {**({"tie_word_embeddings": cfg["tie_word_embeddings"]} if "tie_word_embeddings" in cfg else {}), **tc}
    cfg = {**spec.defaults, **{k: v for k, v in cfg.items() if not (v is None and k in ("head_dim", "rope_parameters"))}}
    _refuse(cfg, spec, path)
    pos = lambda k, d=...: _get(cfg, k, int, path, d)  # noqa: E731
    hidden, heads = pos("hidden_size"), pos("num_attention_heads")
    for k, v in (("hidden_size", hidden), ("num_attention_heads", heads)):
        if v <= 0:
            raise InputError(f"field {k!r} must be positive, got {v}", path)
    kv = pos("num_key_value_heads", heads)
    head_dim = pos("head_dim", hidden // heads)
    if kv <= 0 or heads % kv:
        raise InputError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}", path)
    layers = pos("num_hidden_layers")
    for k in ("num_hidden_layers", "intermediate_size", "vocab_size", "head_dim"):
        v = {"num_hidden_layers": layers, "head_dim": head_dim}.get(k, None)
        v = pos(k) if v is None else v
        if v <= 0:
            raise InputError(f"field {k!r} must be positive, got {v}", path)
    eps = _get(cfg, "rms_norm_eps", float, path, 1e-6)
    if not math.isfinite(eps) or eps < 0:
        raise InputError(f"rms_norm_eps must be a finite number >= 0, got {eps!r}", path)
    act = _activation(cfg, spec, path)
    types = _layer_types(cfg, spec, layers, path)
    windows = _windows(cfg, spec, types, layers, path)
    dims = _layer_dims(cfg, spec, types, head_dim, kv, heads, path)
    ropes = _ropes(cfg, spec, types, _type_head_dims(types, dims, path), hidden, heads, path)
    full_rope = next((ropes[t] for t in ("full_attention", "sliding_attention") if ropes.get(t) is not None), None)
    nope = _nope(cfg, spec, layers, path)
    sources = _kv_sources(cfg, spec, types, path)
    inter = _get(cfg, "intermediate_size", int, path)
    wide = spec.double_wide_mlp is not None and _flag(cfg, spec.double_wide_mlp, path)
    k_eq_v = spec.kv_eq_v is not None and _flag(cfg, spec.kv_eq_v, path)
    layer_specs = tuple(LayerSpec(types[i], windows[i], None if nope[i] else ropes[types[i]], dims[i][0], dims[i][1],
                                  sources[i], 2 * inter if wide and sources[i] is not None else 0,
                                  k_eq_v and types[i] == "full_attention")
                        for i in range(layers))
    ple, ple_vocab = _per_layer_input(cfg, spec, path)
    fq, fg = _fused(cfg, spec, path)
    scaling = dict(full_rope.scaling) if full_rope is not None else {}
    scaling["rope_type"] = full_rope.rope_type if full_rope is not None else "default"
    return ModelConfig(
        model_type=mt, vocab_size=pos("vocab_size"), hidden_size=hidden, intermediate_size=pos("intermediate_size"),
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
        rms_norm_eps=eps, rope_theta=full_rope.theta if full_rope is not None else 10000.0, rope_scaling=scaling,
        tie_word_embeddings=_get(cfg, "tie_word_embeddings", bool, path, False),
        qkv_bias=_flag(cfg, spec.qkv_bias, path), o_bias=_flag(cfg, spec.o_bias, path),
        mlp_bias=_flag(cfg, spec.mlp_bias, path), qk_norm=spec.qk_norm is not None, hidden_act=act,
        layer_windows=tuple(windows), max_position_embeddings=pos("max_position_embeddings", 4096),
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"), raw=raw,
        family=spec.family, spec=spec, norm_offset=spec.norm_offset, norm_layout=spec.norm_layout,
        norm_fp32_weight=spec.norm_fp32_weight or spec.norm_offset != 0.0,
        qk_norm_kind=spec.qk_norm, v_norm=spec.v_norm,
        embedding_scale=_embedding_scale(cfg, spec, hidden, path),
        embedding_scale_rounded=spec.embedding_scale == "sqrt_hidden",
        attention_scale=_attention_scale(cfg, spec, head_dim, path),
        attn_softcap=_opt_pos_float(cfg, spec.attn_softcap, path),
        final_softcap=_opt_pos_float(cfg, spec.final_softcap, path),
        residual_multiplier=_pos_float(cfg, spec.residual_multiplier, path) if spec.residual_multiplier else 1.0,
        logits_scaling=_pos_float(cfg, spec.logits_scaling, path) if spec.logits_scaling else 1.0,
        fused_qkv=fq, fused_gate_up=fg, layers=layer_specs, text_config=spec.text_config,
        per_layer_input_size=ple, per_layer_input_vocab=ple_vocab,
        kv_shared_layers=sum(1 for x in sources if x is not None), layer_scalar=spec.layer_scalar,
        moe=_moe(cfg, spec, layers, path), qkv_clip=_opt_pos_float(cfg, spec.qkv_clip, path),
        attn_sinks=spec.attn_sinks,
    )


def _moe(cfg, spec: ArchSpec, layers: int, path) -> MoeConfig | None:
    m = spec.moe
    if m is None:
        return None
    names = (m.experts,) if isinstance(m.experts, str) else tuple(m.experts)
    key = next((k for k in names if cfg.get(k) is not None), names[0])
    experts, top_k, inter = (_get(cfg, k, int, path) for k in (key, m.top_k, m.intermediate))
    for k, v in ((key, experts), (m.top_k, top_k), (m.intermediate, inter)):
        if v <= 0:
            raise InputError(f"field {k!r} must be positive, got {v}", path)
    if top_k > experts:
        raise InputError(f"{m.top_k}={top_k} exceeds the number of experts {key}={experts}", path)
    shared = 0
    if m.shared is not None:
        shared = _get(cfg, m.shared, int, path, 0)
        if shared < 0:
            raise InputError(f"field {m.shared!r} must be >= 0, got {shared}", path)
    moe_layers = [True] * layers
    if m.dense_rule == "sparse_step":
        step = _get(cfg, "decoder_sparse_step", int, path, 1)
        only = cfg.get("mlp_only_layers") or []
        if step <= 0:
            raise InputError(f"field 'decoder_sparse_step' must be positive, got {step}", path)
        if not isinstance(only, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in only):
            raise InputError(f"field 'mlp_only_layers' must list layer indices, got {only!r}", path)
        moe_layers = [i not in only and (i + 1) % step == 0 for i in range(layers)]
    clamp = alpha = None
    if m.act_clamp is not None:
        clamp = _opt_pos_float(cfg, m.act_clamp, path)
        alpha = _get(cfg, m.act_alpha, float, path)
    return MoeConfig(experts=experts, top_k=top_k, intermediate=inter, scoring=m.scoring,
                     renorm=_flag(cfg, m.renorm, path), router=m.router, router_bias=m.router_bias, block=m.block,
                     leaves=tuple(m.leaves), disk_layout=m.disk_layout, expert_bias=m.expert_bias, shared=shared,
                     clamp=clamp, alpha=1.0 if alpha is None else alpha, layers=tuple(moe_layers))


# -- per-layer structure (Gemma 4) -------------------------------------------------------------
def _refuse(cfg, spec: ArchSpec, path) -> None:
    for key, value, what in spec.refuse:
        v = cfg.get(key)
        if v is not None and v == value and type(v) is type(value):
            raise UnsupportedError(f"{what} is not supported for {spec.family}", path)


LAYER_OVERRIDES = ("head_dim", "num_key_value_heads")


def _layer_dims(cfg, spec: ArchSpec, types: list[str], head_dim: int, kv: int, heads: int, path) -> list[tuple]:
    """(head_dim, kv_heads) per layer. transformers 5 writes per-layer overrides as
    ``per_layer_config`` {"<layer index>": {"head_dim": ..., "num_key_value_heads": ...}}; a config
    without it (Gemma 4 as published) gives full-attention layers ``global_head_dim`` (and, with
    attention_k_eq_v, ``num_global_key_value_heads``), as transformers' config class does."""
    layers = len(types)
    over: dict[int, dict] = {}
    plc = cfg.get("per_layer_config")
    if plc is not None:
        if not isinstance(plc, dict):
            raise InputError(f"field 'per_layer_config' must be an object, got {plc!r}", path)
        for k, v in plc.items():
            idx = int(k) if isinstance(k, str) and k.isdigit() else None
            if idx is None or idx >= layers or not isinstance(v, dict):
                raise InputError(f"per_layer_config entry {k!r} must map a layer index below {layers} to an object", path)
            bad = sorted(set(v) - set(LAYER_OVERRIDES))
            if bad:
                raise UnsupportedError(f"per_layer_config overrides {bad} are not supported "
                                       f"(supported: {', '.join(LAYER_OVERRIDES)})", path)
            over[idx] = v
    elif spec.layer_head_dim is not None:
        full = {}
        g = cfg.get(spec.layer_head_dim)
        if g is not None:
            full["head_dim"] = g
        if spec.layer_kv_heads is not None and cfg.get(spec.layer_kv_heads) is not None and \
                (spec.kv_eq_v is None or _flag(cfg, spec.kv_eq_v, path)):
            full["num_key_value_heads"] = cfg[spec.layer_kv_heads]
        over = {i: full for i, t in enumerate(types) if t == "full_attention" and full}
    out = []
    for i in range(layers):
        d, h = over.get(i, {}).get("head_dim", head_dim), over.get(i, {}).get("num_key_value_heads", kv)
        for name, v in (("head_dim", d), ("num_key_value_heads", h)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise InputError(f"layer {i}: {name} must be a positive integer, got {v!r}", path)
        if heads % h:
            raise InputError(f"layer {i}: num_attention_heads={heads} is not a multiple of num_key_value_heads={h}", path)
        out.append((d, h))
    return out


def _type_head_dims(types: list[str], dims: list[tuple], path) -> dict:
    """Layer type -> head_dim of its layers (its rope is built for it); one per type."""
    out: dict[str, int] = {}
    for t, (d, _) in zip(types, dims):
        if out.setdefault(t, d) != d:
            raise UnsupportedError(f"{t} layers with different head_dim ({out[t]} and {d}) are not supported", path)
    return out


def _kv_sources(cfg, spec: ArchSpec, types: list[str], path) -> list:
    """Per layer: None (it computes its own K/V) or the index of the layer whose K/V it reuses. The
    last ``num_kv_shared_layers`` layers reuse the K/V of the last earlier layer of their own
    attention type (transformers' kv_sharing_modes)."""
    layers = len(types)
    n = _get(cfg, spec.kv_shared, int, path, 0) if spec.kv_shared is not None else 0
    if n == 0:
        return [None] * layers
    if n < 0 or n >= layers:
        raise InputError(f"field {spec.kv_shared!r}={n} must lie in [0, {layers}): the shared layers reuse K/V of "
                         "earlier layers", path)
    first = layers - n
    last = {t: i for i, t in enumerate(types[:first])}
    missing = sorted(set(types[first:]) - set(last))
    if missing:
        raise InputError(f"{spec.kv_shared}={n}: no earlier {missing[0]} layer computes the K/V its shared layers "
                         "reuse", path)
    return [None if i < first else last[types[i]] for i in range(layers)]


def _per_layer_input(cfg, spec: ArchSpec, path) -> tuple[int, int]:
    if spec.per_layer_input is None:
        return 0, 0
    size = _get(cfg, spec.per_layer_input, int, path, 0)
    if size < 0:
        raise InputError(f"field {spec.per_layer_input!r} must be >= 0, got {size}", path)
    if not size:
        return 0, 0
    vocab = _get(cfg, spec.per_layer_vocab, int, path) if spec.per_layer_vocab else _get(cfg, "vocab_size", int, path)
    if vocab <= 0:
        raise InputError(f"field {spec.per_layer_vocab!r} must be positive, got {vocab}", path)
    return size, vocab


def _activation(cfg, spec: ArchSpec, path) -> str:
    act = cfg.get(spec.act_field)
    if act is None and spec.act_field != "hidden_act":
        act = cfg.get("hidden_act")  # e.g. Gemma configs carry both; hidden_activation wins
    if act is None:
        act = spec.act
    if not isinstance(act, str) or act not in ACT_ALIASES:
        raise UnsupportedError(f"{spec.act_field} {act!r} is not supported (supported: {', '.join(sorted(set(ACT_ALIASES.values())))})", path)
    return ACT_ALIASES[act]


def _embedding_scale(cfg, spec: ArchSpec, hidden: int, path) -> float:
    if spec.embedding_scale is None:
        return 1.0
    if spec.embedding_scale == "sqrt_hidden":
        return hidden ** 0.5
    return _pos_float(cfg, spec.embedding_scale, path)


def _attention_scale(cfg, spec: ArchSpec, head_dim: int, path) -> float:
    rule = spec.attention_scale
    if rule == "head_dim":
        return head_dim ** -0.5
    if rule == "one":
        return 1.0
    if rule == "query_pre_attn_scalar":
        return _pos_float(cfg, rule, path, float(head_dim)) ** -0.5
    return _pos_float(cfg, rule, path, head_dim ** -0.5)  # the field is the scale itself (Granite)


def _fused(cfg, spec: ArchSpec, path) -> tuple[bool, bool]:
    """Fused projections are a family fact (transformers builds Phi-3 with qkv_proj and
    gate_up_proj, whatever the checkpoint holds); check_fits refuses a checkpoint that disagrees."""
    return spec.fused_qkv, spec.fused_gate_up


def _layer_types(cfg, spec: ArchSpec, layers: int, path) -> list[str]:
    types = cfg.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != layers:
            raise InputError(f"layer_types must list {layers} entries", path)
        bad = sorted({repr(t) for t in types} - {repr(t) for t in LAYER_TYPES})
        if bad:
            raise UnsupportedError(f"layer types {bad} are not supported (supported: {', '.join(LAYER_TYPES)})", path)
        return list(types[:-1]) + ["full_attention"] if spec.last_layer_full else list(types)
    window = cfg.get("sliding_window")
    if spec.sliding == "pattern":
        n = cfg.get("sliding_window_pattern", spec.default_pattern)
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise InputError(f"field 'sliding_window_pattern' must be a positive integer, got {n!r}", path)
        types = ["sliding_attention" if (i + 1) % n else "full_attention" for i in range(layers)]
        return types[:-1] + ["full_attention"] if spec.last_layer_full else types
    if spec.sliding == "qwen":
        if not cfg.get(spec.sliding_flag or "use_sliding_window") or window is None:
            return ["full_attention"] * layers
        mwl = cfg.get("max_window_layers", layers)
        if isinstance(mwl, bool) or not isinstance(mwl, int):
            raise InputError(f"field 'max_window_layers' must be an integer, got {mwl!r}", path)
        return ["sliding_attention" if i >= mwl else "full_attention" for i in range(layers)]
    if spec.sliding == "alternate_below":
        if not cfg.get(spec.sliding_flag or "use_sliding_window") or not window:
            return ["full_attention"] * layers
        mwl = cfg.get("max_window_layers", layers)
        if isinstance(mwl, bool) or not isinstance(mwl, int):
            raise InputError(f"field 'max_window_layers' must be an integer, got {mwl!r}", path)
        return ["sliding_attention" if (i + 1) % 2 and i < mwl else "full_attention" for i in range(layers)]
    if spec.sliding == "nope_layers":
        nope = _nope(cfg, spec, layers, path)
        on = bool(cfg.get(spec.sliding_flag)) and window is not None
        return ["sliding_attention" if on and nope[i] else "full_attention" for i in range(layers)]
    if spec.sliding == "all" and window is not None:
        return ["sliding_attention"] * layers
    return ["full_attention"] * layers


def _windows(cfg, spec: ArchSpec, types: list[str], layers: int, path) -> list:
    window = cfg.get("sliding_window")
    if window == 0 and spec.sliding_flag is not None and not cfg.get(spec.sliding_flag):
        window = None  # Qwen2-MoE's config class writes 0 when use_sliding_window is off
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise InputError(f"field 'sliding_window' must be a positive integer or null, got {window!r}", path)
    if spec.sliding == "none":
        return [None] * layers
    slides = spec.sliding_flag is None or bool(cfg.get(spec.sliding_flag, False))
    if spec.sliding in ("qwen", "alternate_below") and cfg.get("layer_types") is not None:
        slides = True  # transformers 5 Qwen: layer_types alone decide
    out = []
    for t in types:
        if t == "sliding_attention" and slides:
            if window is None:
                raise InputError("layer_types has a 'sliding_attention' layer but sliding_window is null", path)
            out.append(window)
        else:
            out.append(None)
    return out


def _nope(cfg, spec: ArchSpec, layers: int, path) -> list[bool]:
    """Per layer: True where the layer has no rope (SmolLM3's no_rope_layers lists 1 = rope)."""
    if spec.nope_field is None:
        return [False] * layers
    v = cfg.get(spec.nope_field)
    if v is None:
        n = cfg.get("no_rope_layer_interval", 4)
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise InputError(f"field 'no_rope_layer_interval' must be a positive integer, got {n!r}", path)
        return [(i + 1) % n == 0 for i in range(layers)]
    if not isinstance(v, list) or len(v) != layers or any(x not in (0, 1) or isinstance(x, float) for x in v):
        raise InputError(f"field {spec.nope_field!r} must list {layers} entries of 0 or 1, got {v!r}", path)
    return [not bool(x) for x in v]


# -- rope --------------------------------------------------------------------------------------
def _ropes(cfg, spec: ArchSpec, types: list[str], head_dim: int, hidden: int, heads: int, path) -> dict:
    """Layer type -> RopeSpec, from rope_parameters (flat or per layer type) or 4.x fields."""
    for key in ("rope_parameters", "rope_scaling"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise InputError(f"field {key!r} must be an object, got {cfg[key]!r}", path)
    rp = cfg.get("rope_parameters")
    nested = isinstance(rp, dict) and any(k in LAYER_TYPES for k in rp)
    if isinstance(rp, dict) and not nested and any(isinstance(v, dict) for v in rp.values()):
        raise UnsupportedError(f"rope_parameters keyed by {sorted(k for k, v in rp.items() if isinstance(v, dict))} "
                               f"are not supported (layer types: {', '.join(LAYER_TYPES)})", path)
    top_theta = cfg.get("rope_theta")
    per_type: dict[str, dict] = {}
    for t in sorted(set(types)):
        if nested:
            if t not in rp or not isinstance(rp[t], dict):
                raise InputError(f"rope_parameters has no entry for layer type {t!r}", path)
            d = dict(rp[t])
        elif isinstance(rp, dict):
            d = dict(rp)
        else:
            d = dict(cfg.get("rope_scaling") or {})
            if spec.rope_by_layer_type and t == "sliding_attention":
                d = {}  # 4.x Gemma 3: rope_scaling applies to the global layers only
        if "rope_theta" not in d or d["rope_theta"] is None:
            if spec.rope_by_layer_type and t == "sliding_attention":
                d["rope_theta"] = cfg.get("rope_local_base_freq", spec.local_rope_theta)
            else:
                d["rope_theta"] = top_theta if top_theta is not None else 10000.0
        per_type[t] = d
    dim = head_dim.get if isinstance(head_dim, dict) else (lambda t: head_dim)
    return {t: _rope(cfg, spec, d, dim(t), hidden, heads, path) for t, d in per_type.items()}


def _rope(cfg, spec: ArchSpec, d: dict, head_dim: int, hidden: int, heads: int, path) -> RopeSpec:
    d = dict(d)
    theta = d.pop("rope_theta")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 1:
        raise InputError(f"rope_theta must be a finite number > 1, got {theta!r}", path)
    if "type" in d and "rope_type" not in d:
        d["rope_type"] = d.pop("type")
    d.pop("type", None)
    rt = d.pop("rope_type", "default")
    rt = ROPE_ALIASES.get(rt, rt) if "longrope" in spec.rope_types else rt
    if not isinstance(rt, str) or rt not in spec.rope_types:
        raise UnsupportedError(f"rope_type {rt!r} is not supported for {spec.family} (supported: {', '.join(spec.rope_types)})", path)
    prf = d.pop("partial_rotary_factor", None)
    if prf is None:
        prf = cfg.get("partial_rotary_factor", 1.0)
    if prf is None:
        prf = 1.0
    if not _num(prf) or not 0 < prf <= 1:
        raise InputError(f"partial_rotary_factor must be a number in (0, 1], got {prf!r}", path)
    if rt == "proportional":
        # Gemma 4: frequencies θ^(-2j/head_dim) on the first partial_rotary_factor·head_dim/2 pairs,
        # zero (no rotation) on the rest, all head_dim dims through rotate_half
        f = d.get("factor", 1.0)
        if not _num(f) or not math.isfinite(f) or f <= 0:
            raise InputError(f"rope scaling 'proportional' needs a positive number 'factor', got {f!r}", path)
        d["partial_rotary_factor"], prf = prf, 1.0
    if prf != 1.0 and not spec.partial_rotary:
        raise UnsupportedError(f"partial_rotary_factor != 1 is not supported for {spec.family} "
                               "(transformers applies rope to the whole head there)", path)
    rotary = int(head_dim * prf)
    if rotary <= 0 or rotary % 2:
        raise InputError(f"partial_rotary_factor={prf} gives an odd rotary dimension {rotary} "
                         f"(head_dim {head_dim}); rope needs an even one", path)
    need = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    for f in need.get(rt, ()):
        v = d.get(f)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise InputError(f"rope scaling {rt!r} needs a positive number {f!r}, got {v!r}", path)
    if rt == "llama3" and d["low_freq_factor"] == d["high_freq_factor"]:
        raise InputError("rope scaling 'llama3' needs low_freq_factor != high_freq_factor", path)
    attention_factor = 1.0
    if rt == "longrope":
        # transformers: a top-level original_max_position_embeddings wins over rope_parameters'
        orig = cfg.get("original_max_position_embeddings", d.get("original_max_position_embeddings"))
        mpe = _get(cfg, "max_position_embeddings", int, path, 4096)
        if orig is None:
            orig = mpe
        if isinstance(orig, bool) or not isinstance(orig, int) or orig <= 0:
            raise InputError(f"longrope needs a positive integer original_max_position_embeddings, got {orig!r}", path)
        d["original_max_position_embeddings"] = orig
        # transformers checks the factor lists against hidden // heads · partial_rotary_factor
        n = int(hidden // heads * prf) // 2
        for f in ("short_factor", "long_factor"):
            v = d.get(f)
            if not isinstance(v, list) or not all(_num(x) and math.isfinite(x) and x > 0 for x in v):
                raise InputError(f"longrope needs {f!r}: a list of positive numbers, got {v!r}", path)
            if len(v) != rotary // 2 or len(v) != n:
                raise InputError(f"longrope {f!r} has {len(v)} entries but the rotary dimension {rotary} needs {rotary // 2}", path)
            d[f] = tuple(float(x) for x in v)
        factor = d.get("factor")
        if factor is None:
            factor = mpe / orig
        af = d.get("attention_factor")
        if af is None:
            af = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        if not _num(af) or not math.isfinite(af) or af <= 0:
            raise InputError(f"longrope attention_factor must be a positive number, got {af!r}", path)
        attention_factor = float(af)
    if rt == "yarn":
        d, attention_factor = _yarn(cfg, d, path)
    scaling = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))
    return RopeSpec(float(theta), rt, rotary, scaling, attention_factor)


def _yarn(cfg, d: dict, path) -> tuple[dict, float]:
    """YaRN's fields resolved as transformers' _compute_yarn_parameters does: a top-level
    original_max_position_embeddings wins, else rope_parameters', else max_position_embeddings;
    factor None = max_position_embeddings / original; attention_factor from mscale (and
    mscale_all_dim) when not given; beta_fast / beta_slow default 32 / 1; truncate default True."""
    mpe = _get(cfg, "max_position_embeddings", int, path, 4096)
    orig = cfg.get("original_max_position_embeddings", d.get("original_max_position_embeddings"))
    if orig is None:
        orig = mpe
    if isinstance(orig, bool) or not isinstance(orig, int) or orig <= 0:
        raise InputError(f"yarn needs a positive integer original_max_position_embeddings, got {orig!r}", path)
    factor = d.get("factor")
    if factor is None:
        factor = mpe / orig
    for k, v in (("factor", factor), ("beta_fast", d.get("beta_fast") or 32), ("beta_slow", d.get("beta_slow") or 1)):
        if not _num(v) or not math.isfinite(v) or v <= 0:
            raise InputError(f"rope scaling 'yarn' needs a positive number {k!r}, got {v!r}", path)
    truncate = d.get("truncate", True)
    if not isinstance(truncate, bool):
        raise InputError(f"rope scaling 'yarn' field 'truncate' must be true or false, got {truncate!r}", path)

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    af = d.get("attention_factor")
    if af is None:
        ms, msa = d.get("mscale"), d.get("mscale_all_dim")
        af = float(mscale(factor, ms) / mscale(factor, msa)) if ms and msa else mscale(factor)
    if not _num(af) or not math.isfinite(af) or af <= 0:
        raise InputError(f"yarn attention_factor must be a positive number, got {af!r}", path)
    out = {**d, "original_max_position_embeddings": orig, "factor": float(factor), "truncate": truncate,
           "beta_fast": float(d.get("beta_fast") or 32), "beta_slow": float(d.get("beta_slow") or 1)}
    return out, float(af)


def load_config(path: str | os.PathLike) -> ModelConfig:
    p = Path(path)
    if not p.exists():
        raise InputError("no such file or directory", p)
    if p.is_dir():
        p = p / "config.json"
    return parse_config(read_json(p, "config.json"), p)


def rope_inv_freq(cfg: ModelConfig, rope: RopeSpec | None = None, long: bool = False):
    """Inverse frequencies (rotary_dim/2,) in fp32 of ``rope`` (default: the full-attention
    rope), with linear, Llama-3 or LongRoPE scaling (``long``: LongRoPE's long factors)."""
    import torch

    if rope is None:
        rope = next((r for r in cfg.layer_ropes if r is not None), None) if cfg.layers else None
    if rope is None:  # a config without layers (built by hand) or every layer NoPE
        rope = RopeSpec(cfg.rope_theta, cfg.rope_type, cfg.head_dim,
                        tuple(sorted((k, v) for k, v in cfg.rope_scaling.items() if k != "rope_type")))
    d = rope.rotary_dim or cfg.head_dim
    inv = 1.0 / (rope.theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = dict(rope.scaling)
    if rope.rope_type == "linear":
        inv = inv / float(s["factor"])
    elif rope.rope_type == "llama3":
        factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old = float(s["original_max_position_embeddings"])
        lo_wl, hi_wl = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > lo_wl, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < hi_wl) & ~(wavelen > lo_wl)
        inv = torch.where(medium, smoothed, scaled)
    elif rope.rope_type == "proportional":
        n = int(float(s.get("partial_rotary_factor", 1.0)) * d // 2)
        inv = 1.0 / (rope.theta ** (torch.arange(0, 2 * n, 2, dtype=torch.int64).float() / d))
        inv = torch.cat((inv, torch.zeros(d // 2 - n))) / float(s.get("factor", 1.0))
    elif rope.rope_type == "yarn":
        inv = yarn_inv_freq(rope.theta, d, float(s["factor"]), s["beta_fast"], s["beta_slow"],
                            int(s["original_max_position_embeddings"]), bool(s["truncate"]))
    elif rope.rope_type == "longrope":
        ext = torch.tensor(s["long_factor" if long else "short_factor"], dtype=torch.float32)
        shape = torch.arange(0, d, 2, dtype=torch.int64).float() / d
        inv = 1.0 / (ext * rope.theta ** shape)
    return inv


def yarn_inv_freq(base: float, d: int, factor: float, beta_fast: float, beta_slow: float, orig: int,
                  truncate: bool):
    """YaRN's inverse frequencies (d/2,): a blend, per frequency, of the original θ^(-2j/d)
    (extrapolation) and it divided by ``factor`` (interpolation); the blend ramps linearly over
    the dimensions between the ones that turn ``beta_fast`` and ``beta_slow`` times over ``orig``
    positions (bounds floored / ceiled when ``truncate``), as transformers computes it."""
    import torch

    def corr_dim(rot):
        return (d * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos = base ** (torch.arange(0, d, 2).to(dtype=torch.float) / d)
    extra = 1 - ramp
    return (1.0 / (factor * pos)) * (1 - extra) + (1.0 / pos) * extra
