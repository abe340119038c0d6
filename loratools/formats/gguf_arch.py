"""GGUF facts per family, as tables: what llama.cpp's converter (``convert_hf_to_gguf.py``, its
``conversion/`` classes) does in code, held here as data.

A ``GgufFamily`` says, for one registry family:

    arch        general.architecture (llama.cpp's graph for it)
    rope        "norm": llama.cpp rotates adjacent pairs (its LLAMA_ROPE_TYPE_NORM), while HF rotates
                the two halves of each head: Q and K rows are permuted per head (``permute_qk``);
                "neox": the HF layout as it is
    kvs         hyper-parameter keys, in file order: (gguf-py key template, value type, value from the
                ModelConfig; None = not written)
    output      "optional": output.weight absent means tied to token_embd; "required": llama.cpp
                needs it even when tied (OLMo 2: the embedding is written twice); "never": the graph
                only ever multiplies by token_embd (Gemma 2: an untied head cannot be expressed)
    biases      GGUF roles whose ``.bias`` the llama.cpp loader reads (any other bias is refused
                before writing: llama.cpp would stop at "wrong number of tensors")
    swa         llama.cpp applies the sliding windows (the pattern is written); False: it ignores
                them (a warning says from which length results differ)
    limits      what the family's llama.cpp graph cannot compute: (reason or None) from the config,
                checked before anything is written

Value transforms are by GGUF role (the name without ``blk.N.`` and suffix), in one place each:
``to_gguf`` / ``from_gguf`` (norm offset, Q/K permutation, on fused attn_qkv the Q and K parts)
and ``lora_b_to_gguf`` (LoRA B rows get the same row permutation as the weight they update).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import UnsupportedError

# GGUF roles of RMSNorm weights: llama.cpp multiplies by the stored weight, so a family whose norms
# scale by (offset + w) (Gemma: 1 + w) is written w + offset
NORM_ROLES = frozenset({"attn_norm", "ffn_norm", "output_norm", "post_attention_norm", "post_ffw_norm",
                        "attn_q_norm", "attn_k_norm"})
QKV_BIASES = ("attn_q", "attn_k", "attn_v")  # create_tensor_qkv: optional on every architecture
ALL_BIASES = QKV_BIASES + ("attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _gguf():
    import gguf

    return gguf


# -- the one Q/K permutation ---------------------------------------------------------------
def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half layout → llama.cpp interleaved layout: within each head, rows
    [0..d/2) and [d/2..d) are interleaved (row i of the first half, then row i of the second).
    Works on weights (out, in), biases (out,) and LoRA B (out, r) alike."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# -- hyper-parameters as data ----------------------------------------------------------------
@dataclass(frozen=True)
class KV:
    key: str                               # gguf-py key template ("{arch}.attention.sliding_window")
    vtype: str                             # GGUFValueType member name: UINT32, FLOAT32, BOOL, STRING, ARRAY
    value: Callable[[Any], Any]            # ModelConfig -> value, or None (not written)


def _K(path: str) -> str:
    """gguf.Keys by dotted path, e.g. "Attention.SLIDING_WINDOW"."""
    obj = _gguf().Keys
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _explicit_head_dim(c) -> int | None:
    # written when config.json names head_dim or it is not hidden / heads (as before: byte-identical files)
    return c.head_dim if c.raw.get("head_dim") is not None or c.head_dim != c.hidden_size // c.num_attention_heads else None


def _linear_factor(c):
    return float(c.rope_scaling["factor"]) if c.rope_type == "linear" else None


BASE = (
    KV("LLM.CONTEXT_LENGTH", "UINT32", lambda c: c.max_position_embeddings),
    KV("LLM.EMBEDDING_LENGTH", "UINT32", lambda c: c.hidden_size),
    KV("LLM.BLOCK_COUNT", "UINT32", lambda c: c.num_hidden_layers),
    KV("LLM.FEED_FORWARD_LENGTH", "UINT32", lambda c: c.intermediate_size),
    KV("Attention.HEAD_COUNT", "UINT32", lambda c: c.num_attention_heads),
    KV("Attention.HEAD_COUNT_KV", "UINT32", lambda c: c.num_key_value_heads),
    KV("Rope.FREQ_BASE", "FLOAT32", lambda c: c.rope_theta),
    KV("Attention.LAYERNORM_RMS_EPS", "FLOAT32", lambda c: c.rms_norm_eps),
    KV("LLM.VOCAB_SIZE", "UINT32", lambda c: c.vocab_size),
    KV("Attention.KEY_LENGTH", "UINT32", _explicit_head_dim),
    KV("Attention.VALUE_LENGTH", "UINT32", _explicit_head_dim),
)
ROPE_DIM = (KV("Rope.DIMENSION_COUNT", "UINT32", lambda c: c.head_dim),)
LINEAR_ROPE = (
    KV("Rope.SCALING_TYPE", "STRING", lambda c: "linear" if c.rope_type == "linear" else None),
    KV("Rope.SCALING_FACTOR", "FLOAT32", _linear_factor),
)


# -- families ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GgufFamily:
    arch: str
    rope: str = "neox"
    kvs: tuple = BASE + LINEAR_ROPE
    output: str = "optional"
    biases: tuple = QKV_BIASES
    swa: bool = False
    rope_types: tuple = ("default", "linear")
    limits: tuple = ()
    extra: tuple = ()                       # generated tensors: (gguf name, ModelConfig -> tensor or None)

    @property
    def permute(self) -> bool:
        return self.rope == "norm"

    def check(self, cfg, path=None) -> None:
        """Refuse, in one line, a config this family's llama.cpp graph would compute differently."""
        if cfg.rope_type not in self.rope_types:
            raise UnsupportedError(f"llama.cpp's {self.arch} architecture has no rope_type {cfg.rope_type!r} "
                                   f"(it runs {', '.join(self.rope_types)})", path)
        for limit in self.limits:
            reason = limit(cfg)
            if reason:
                raise UnsupportedError(f"llama.cpp's {self.arch} architecture cannot run this model: {reason}", path)


def _llama3_rope_freqs(cfg) -> torch.Tensor | None:
    """Llama-3 rope scaling as llama.cpp takes it: a per-frequency divisor tensor."""
    if cfg.rope_type != "llama3":
        return None
    from ..models.config import rope_inv_freq

    d = cfg.head_dim
    base = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    return (base / rope_inv_freq(cfg)).float()


LLAMA = GgufFamily("llama", rope="norm", kvs=BASE + ROPE_DIM + LINEAR_ROPE, biases=ALL_BIASES,
                   rope_types=("default", "linear", "llama3"), extra=(("rope_freqs.weight", _llama3_rope_freqs),))

FAMILIES: dict[str, GgufFamily] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": GgufFamily("qwen2"),
    "qwen3": GgufFamily("qwen3"),
}


def family(cfg, path=None) -> GgufFamily:
    fam = FAMILIES.get(cfg.model_type)
    if fam is None:
        raise UnsupportedError(f"no GGUF export for model_type {cfg.model_type!r} (GGUF families: "
                               f"{', '.join(sorted(FAMILIES))})", path)
    return fam


def write_kvs(w, fam: GgufFamily, cfg) -> None:
    gguf = _gguf()
    for kv in fam.kvs:
        v = kv.value(cfg)
        if v is None:
            continue
        w.add_key_value(_K(kv.key).format(arch=w.arch), v, gguf.GGUFValueType[kv.vtype])


# -- per-tensor value transforms, by role ---------------------------------------------------------
def role(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` → ``attn_q``; ``output_norm.weight`` → ``output_norm``."""
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        parts = parts[2:]
    return parts[0]


def _qkv_rows(cfg) -> tuple[int, int, int]:
    return cfg.q_size, cfg.kv_size, cfg.kv_size


def _rows(fam: GgufFamily, r: str, cfg, inverse: bool) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The row permutation llama.cpp's rope layout needs for role ``r`` (None: rows as they are)."""
    if not fam.permute:
        return None
    p = unpermute_qk if inverse else permute_qk
    if r == "attn_q":
        return lambda t: p(t, cfg.num_attention_heads)
    if r == "attn_k":
        return lambda t: p(t, cfg.num_key_value_heads)
    if r == "attn_qkv":
        def fused(t):
            q, k, v = torch.split(t, _qkv_rows(cfg), dim=0)
            return torch.cat([p(q, cfg.num_attention_heads), p(k, cfg.num_key_value_heads), v], dim=0)
        return fused
    return None


def norm_offset(cfg) -> float:
    return float(getattr(cfg, "norm_offset", 0.0) or 0.0)


def to_gguf(fam: GgufFamily, gguf_name: str, t: torch.Tensor, cfg) -> torch.Tensor:
    """An HF tensor (fp32) as llama.cpp wants it under ``gguf_name``."""
    r = role(gguf_name)
    off = norm_offset(cfg)
    if off and r in NORM_ROLES:
        return t + off
    rows = _rows(fam, r, cfg, inverse=False)
    return rows(t) if rows else t


def from_gguf(fam: GgufFamily, gguf_name: str, t: torch.Tensor, cfg) -> torch.Tensor:
    """Inverse of ``to_gguf``. (1 + w) - 1 gives back w' with fp32 1 + w' == 1 + w: the norm computes
    the same; bit-exact w needs |w| within the range where the subtraction is exact.)"""
    r = role(gguf_name)
    off = norm_offset(cfg)
    if off and r in NORM_ROLES:
        return t - off
    rows = _rows(fam, r, cfg, inverse=True)
    return rows(t) if rows else t


def lora_b_to_gguf(fam: GgufFamily, gguf_name: str, b: torch.Tensor, cfg) -> torch.Tensor:
    """LoRA B (out, r) of the weight ``gguf_name``: ΔW = B A, so W's row permutation applies to B's rows."""
    rows = _rows(fam, role(gguf_name), cfg, inverse=False)
    return rows(b) if rows else b
