"""config.json -> ModelConfig, for the decoder architectures loratools runs itself.

Per-architecture facts live in the ARCHS table, not in if-chains. config.json comes in two
generations: transformers 5 writes ``rope_parameters`` ({rope_theta, rope_type, scaling
fields}); 4.x writes ``rope_theta`` and ``rope_scaling`` at the top level. Both are read.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import read_json
from ..errors import InputError, UnsupportedError


@dataclass(frozen=True)
class Arch:
    qkv_bias: str | bool        # True, False, or the name of the config field that decides
    o_bias: str | bool
    mlp_bias: str | bool
    qk_norm: bool
    sliding: str                # "mistral": sliding_window on every layer; "qwen": use_sliding_window + max_window_layers
    architectures: str          # the transformers class name


ARCHS: dict[str, Arch] = {
    "llama": Arch("attention_bias", "attention_bias", "mlp_bias", False, "mistral", "LlamaForCausalLM"),
    "mistral": Arch(False, False, False, False, "mistral", "MistralForCausalLM"),
    "qwen2": Arch(True, False, False, False, "qwen", "Qwen2ForCausalLM"),
    "qwen3": Arch("attention_bias", "attention_bias", False, True, "qwen", "Qwen3ForCausalLM"),
}
ROPE_TYPES = ("default", "linear", "llama3")


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
    rope_theta: float
    rope_scaling: dict = field(default_factory=dict)   # {"rope_type": ..., "factor": ..., ...}
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"
    layer_windows: tuple = ()    # per layer: None (full attention) or the sliding window size
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def rope_type(self) -> str:
        return self.rope_scaling.get("rope_type", "default")

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Leaf module name -> weight shape (out, in) of each linear layer in a block."""
        h, i = self.hidden_size, self.intermediate_size
        return {"q_proj": (self.q_size, h), "k_proj": (self.kv_size, h), "v_proj": (self.kv_size, h),
                "o_proj": (h, self.q_size), "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def _get(cfg: dict, key: str, typ, path, default=...):
    if key not in cfg or cfg[key] is None:
        if default is ...:
            raise InputError(f"missing field {key!r}", path)
        return default
    v = cfg[key]
    ok = isinstance(v, typ) and not isinstance(v, bool) if typ is not bool else isinstance(v, bool)
    if typ is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    if not ok:
        raise InputError(f"field {key!r} must be {typ.__name__}, got {v!r}", path)
    return float(v) if typ is float else v


def _flag(cfg: dict, spec, path) -> bool:
    if isinstance(spec, bool):
        return spec
    return _get(cfg, spec, bool, path, False)


def parse_config(cfg: dict, path: str | os.PathLike = "config.json") -> ModelConfig:
    mt = cfg.get("model_type")
    if mt is None:
        raise InputError("missing field 'model_type'", path)
    if not isinstance(mt, str):
        raise InputError(f"field 'model_type' must be a string, got {mt!r}", path)
    if mt not in ARCHS:
        raise UnsupportedError(f"unsupported architecture model_type={mt!r} (supported: {', '.join(ARCHS)})", path)
    arch = ARCHS[mt]
    pos = lambda k, d=...: _get(cfg, k, int, path, d)  # noqa: E731
    hidden, heads = pos("hidden_size"), pos("num_attention_heads")
    for k, v in (("hidden_size", hidden), ("num_attention_heads", heads)):
        if v <= 0:
            raise InputError(f"field {k!r} must be positive, got {v}", path)
    kv = pos("num_key_value_heads", heads)
    head_dim = pos("head_dim", hidden // heads)
    if kv <= 0 or heads % kv:
        raise InputError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}", path)
    # rope: transformers 5 `rope_parameters` or 4.x `rope_theta` + `rope_scaling`
    rp = cfg.get("rope_parameters")
    for key in ("rope_parameters", "rope_scaling"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise InputError(f"field {key!r} must be an object, got {cfg[key]!r}", path)
    if isinstance(rp, dict) and any(isinstance(v, dict) for v in rp.values()):
        raise UnsupportedError("per-layer-type rope_parameters are not supported", path)
    scaling = dict(rp) if isinstance(rp, dict) else dict(cfg.get("rope_scaling") or {})
    theta = scaling.pop("rope_theta", None)
    if theta is None:
        theta = _get(cfg, "rope_theta", float, path, 10000.0)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 1:
        raise InputError(f"rope_theta must be a finite number > 1, got {theta!r}", path)
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    scaling.setdefault("rope_type", "default")
    if not isinstance(scaling["rope_type"], str) or scaling["rope_type"] not in ROPE_TYPES:
        raise UnsupportedError(f"rope_type {scaling['rope_type']!r} is not supported (supported: {', '.join(ROPE_TYPES)})", path)
    need = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    for f in need.get(scaling["rope_type"], ()):
        v = scaling.get(f)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise InputError(f"rope scaling {scaling['rope_type']!r} needs a positive number {f!r}, got {v!r}", path)
    if scaling["rope_type"] == "llama3" and scaling["low_freq_factor"] == scaling["high_freq_factor"]:
        raise InputError("rope scaling 'llama3' needs low_freq_factor != high_freq_factor", path)
    prf = (scaling.get("partial_rotary_factor", 1.0), cfg.get("partial_rotary_factor", 1.0))
    if any(x is not None and x != 1.0 for x in prf):
        raise UnsupportedError("partial_rotary_factor != 1 is not supported", path)
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedError(f"hidden_act {act!r} is not supported (silu only)", path)
    layers = pos("num_hidden_layers")
    for k in ("num_hidden_layers", "intermediate_size", "vocab_size", "head_dim"):
        v = {"num_hidden_layers": layers, "head_dim": head_dim}.get(k, None)
        v = pos(k) if v is None else v
        if v <= 0:
            raise InputError(f"field {k!r} must be positive, got {v}", path)
    eps = _get(cfg, "rms_norm_eps", float, path, 1e-6)
    if not math.isfinite(eps) or eps < 0:
        raise InputError(f"rms_norm_eps must be a finite number >= 0, got {eps!r}", path)
    windows = _layer_windows(cfg, arch, layers, path)
    return ModelConfig(
        model_type=mt, vocab_size=pos("vocab_size"), hidden_size=hidden, intermediate_size=pos("intermediate_size"),
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
        rms_norm_eps=_get(cfg, "rms_norm_eps", float, path, 1e-6), rope_theta=float(theta), rope_scaling=scaling,
        tie_word_embeddings=_get(cfg, "tie_word_embeddings", bool, path, False),
        qkv_bias=_flag(cfg, arch.qkv_bias, path), o_bias=_flag(cfg, arch.o_bias, path),
        mlp_bias=_flag(cfg, arch.mlp_bias, path), qk_norm=arch.qk_norm, hidden_act="silu",
        layer_windows=windows, max_position_embeddings=pos("max_position_embeddings", 4096),
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"), raw=dict(cfg),
    )


def _layer_windows(cfg: dict, arch: Arch, layers: int, path) -> tuple:
    window = cfg.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise InputError(f"field 'sliding_window' must be a positive integer or null, got {window!r}", path)
    types = cfg.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != layers:
            raise InputError(f"layer_types must list {layers} entries", path)
        bad = set(types) - {"full_attention", "sliding_attention"}
        if bad:
            raise UnsupportedError(f"layer types {sorted(bad)} are not supported", path)
        return tuple(window if t == "sliding_attention" else None for t in types)
    if arch.sliding == "mistral":
        return tuple([window] * layers)
    if not cfg.get("use_sliding_window") or window is None:
        return tuple([None] * layers)
    mwl = cfg.get("max_window_layers", layers)
    if isinstance(mwl, bool) or not isinstance(mwl, int):
        raise InputError(f"field 'max_window_layers' must be an integer, got {mwl!r}", path)
    return tuple(window if i >= mwl else None for i in range(layers))


def load_config(path: str | os.PathLike) -> ModelConfig:
    p = Path(path)
    if not p.exists():
        raise InputError("no such file or directory", p)
    if p.is_dir():
        p = p / "config.json"
    return parse_config(read_json(p, "config.json"), p)


def rope_inv_freq(cfg: ModelConfig):
    """Inverse frequencies (head_dim/2,) in fp32, with linear or Llama-3 scaling."""
    import torch

    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if cfg.rope_type == "linear":
        inv = inv / float(s["factor"])
    elif cfg.rope_type == "llama3":
        factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old = float(s["original_max_position_embeddings"])
        lo_wl, hi_wl = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > lo_wl, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < hi_wl) & ~(wavelen > lo_wl)
        inv = torch.where(medium, smoothed, scaled)
    return inv
