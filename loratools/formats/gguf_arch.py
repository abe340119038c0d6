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
    swa_rope    sliding layers have their own, unscaled rope (rope.freq_base_swa: Gemma 3/4)
    rope_types  the rope types its GGUF can carry (linear: keys; llama3: rope_freqs; longrope:
                rope_factors_long/short; proportional: rope_freqs of 1 / 1e30)
    nope_step   llama.cpp's fixed NoPE layer step (SmolLM3: every 4th layer; 0: rope everywhere)
    graph       what its graph computes with where no key says (GRAPH_DEFAULTS: SiLU, no embedding
                scale, 1/sqrt(head_dim), no soft-caps, no multipliers), overridden per family or
                WRITTEN (a key carries the config's value); a config that differs is refused
    limits      what else the family's llama.cpp graph cannot compute: ModelConfig -> reason or None,
                checked before anything is written
    extra       generated tensors: (GGUF name, ModelConfig -> tensor or None)
    import_as   (model_type, architecture) of the checkpoint ``import gguf`` writes (a multimodal
                family's text model); None: the source's own

Value transforms are by GGUF role (the name without ``blk.N.`` and suffix), in one place each:
``to_gguf`` / ``from_gguf`` (norm offset, Q/K permutation, on fused attn_qkv the Q and K parts)
and ``lora_b_to_gguf`` (LoRA B rows get the same row permutation as the weight they update).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from ..errors import UnsupportedError

# GGUF roles of RMSNorm weights: llama.cpp multiplies by the stored weight, so a family whose norms
# scale by (offset + w) (Gemma: 1 + w) is written w + offset
NORM_ROLES = frozenset({"attn_norm", "ffn_norm", "output_norm", "post_attention_norm", "post_ffw_norm",
                        "attn_q_norm", "attn_k_norm", "post_norm", "per_layer_proj_norm"})
# roles llama.cpp keeps in F32 whatever the file type (its converter and llama-quantize: the routers,
# whose small errors would move tokens to other experts)
F32_ROLES = frozenset({"ffn_gate_inp", "ffn_gate_inp_shexp"})
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


# -- what llama.cpp's graphs compute with ------------------------------------------------------
# ModelConfig switch -> the value a family's llama.cpp graph uses when no key carries it. A family
# overrides an entry with its graph's own rule, or with WRITTEN when one of its keys carries the
# value. ``GgufFamily.check`` refuses a config whose switch differs: the GGUF would compute another model.
WRITTEN = None
GRAPH_DEFAULTS: dict[str, Callable] = {
    "hidden_act": lambda c: "silu",
    "embedding_scale": lambda c: 1.0,
    "attention_scale": lambda c: c.head_dim ** -0.5,
    "attn_softcap": lambda c: None,
    "final_softcap": lambda c: None,
    "residual_multiplier": lambda c: 1.0,
    "logits_scaling": lambda c: 1.0,
    "qkv_clip": lambda c: None,           # OLMoE's clip_qkv: no llama.cpp graph here clamps q, k, v
}


def _gemma_attention_scale(big_layers: int):
    # llama.cpp hard-codes Gemma's query scaling (gemma_pytorch's config): 1/sqrt(head_dim), and
    # 1/sqrt(hidden / heads) for the 27B shape (recognised by its layer count) -- not query_pre_attn_scalar
    def rule(c):
        d = c.hidden_size // c.num_attention_heads if c.num_hidden_layers == big_layers else c.head_dim
        return d ** -0.5
    return rule


def _close(a, b) -> bool:
    if a is None or b is None or isinstance(a, str) or isinstance(b, str):
        return a == b
    return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=0.0)


@dataclass(frozen=True)
class GgufFamily:
    arch: str
    rope: str = "neox"
    kvs: tuple = BASE + LINEAR_ROPE
    output: str = "optional"
    biases: tuple = QKV_BIASES
    swa: bool = False
    swa_rope: bool = False                  # sliding layers have their own rope base (rope.freq_base_swa), unscaled
    nope_step: int = 0                      # llama.cpp drops rope on layers i with (i + 1) % step == 0 (0: none)
    rope_types: tuple = ("default", "linear")
    graph: dict = field(default_factory=dict)   # overrides of GRAPH_DEFAULTS
    limits: tuple = ()                      # ModelConfig -> reason it cannot run, or None
    extra: tuple = ()                       # generated tensors: (gguf name, ModelConfig -> tensor or None)
    import_as: tuple | None = None          # (model_type, architectures[0]) of the checkpoint import writes
                                            # (a multimodal family's text model); None: the source's own
    moe: "MoeGguf | None" = None            # its graph's mixture of experts (None: dense MLPs)
    warns: tuple = ()                       # ModelConfig -> a difference llama.cpp computes with (warned), or None

    @property
    def permute(self) -> bool:
        return self.rope == "norm"

    def check(self, cfg, path=None) -> None:
        """Refuse, in one line, a config this family's llama.cpp graph would compute differently."""
        for reason in self.problems(cfg):
            raise UnsupportedError(f"llama.cpp's {self.arch} architecture cannot run this model: {reason}", path)

    def problems(self, cfg) -> list[str]:
        out = []
        rules = {**GRAPH_DEFAULTS, **self.graph}
        for attr, rule in rules.items():
            if rule is WRITTEN:
                continue
            want, have = rule(cfg), getattr(cfg, attr)
            if not _close(want, have):
                out.append(f"its {attr} is {have!r}, llama.cpp computes with {want!r}")
        out += _rope_problems(self, cfg)
        if self.moe is not None:
            out += _moe_problems(self, cfg)
        for limit in self.limits:
            reason = limit(cfg)
            if reason:
                out.append(reason)
        return out

    def warnings(self, cfg) -> list[str]:
        return [w for w in (f(cfg) for f in self.warns) if w]


def _rope_problems(fam: GgufFamily, cfg) -> list[str]:
    out = []
    full = {l.rope for l in cfg.layers if l.layer_type == "full_attention"}
    slide = {l.rope for l in cfg.layers if l.layer_type == "sliding_attention"}
    windows = {l.window for l in cfg.layers if l.window is not None}
    if cfg.rope_type not in fam.rope_types:
        out.append(f"rope_type {cfg.rope_type!r} (it runs {', '.join(fam.rope_types)})")
    if len(windows) > 1:
        out.append(f"layers with different sliding windows {sorted(windows)} (one window for all)")
    nope = [l.rope is None for l in cfg.layers]
    if any(nope) and nope != [bool(fam.nope_step) and (i + 1) % fam.nope_step == 0 for i in range(len(nope))]:
        where = f"every {fam.nope_step}th layer only" if fam.nope_step else "no layer"
        out.append(f"its NoPE layers {[i for i, x in enumerate(nope) if x]} (llama.cpp drops rope on {where})")
    ropes = {r for r in full | slide if r is not None}
    if fam.swa_rope:
        if len({r for r in full if r is not None}) > 1 or len({r for r in slide if r is not None}) > 1:
            out.append("several ropes within one layer type")
        for r in slide:
            if r is not None and (r.rope_type != "default" or r.rotary_dim != cfg.head_dim):
                out.append(f"sliding layers with rope_type {r.rope_type!r} / rotary_dim {r.rotary_dim} "
                           "(llama.cpp scales only the full-attention rope)")
    elif len(ropes) > 1:
        out.append("a rope per layer type (one rope for all layers)")
    return out


def _head_dim_is_hidden_over_heads(c):
    if c.head_dim * c.num_attention_heads != c.hidden_size:
        return (f"head_dim {c.head_dim} x {c.num_attention_heads} heads != hidden_size {c.hidden_size} "
                "(its graph takes the head size from hidden_size / heads)")
    return None


def _llama3_rope_freqs(cfg) -> torch.Tensor | None:
    """Llama-3 rope scaling as llama.cpp takes it: a per-frequency divisor tensor."""
    if cfg.rope_type != "llama3":
        return None
    from ..arch.hf_config import rope_inv_freq

    d = cfg.head_dim
    base = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    return (base / rope_inv_freq(cfg)).float()


def _longrope_factors(which: str):
    """Phi-3 LongRoPE: the long / short per-frequency divisors (llama.cpp picks long when its context
    exceeds rope.scaling.original_context_length; transformers when the sequence does)."""
    def make(cfg):
        r = _full_rope(cfg)
        if r is None or r.rope_type != "longrope":
            return None
        return torch.tensor(r.get(which), dtype=torch.float32)
    return make


def _full_rope(cfg):
    return next((l.rope for l in cfg.layers if l.rope is not None and l.layer_type == "full_attention"),
                next((l.rope for l in cfg.layers if l.rope is not None), None))


def _slide_rope(cfg):
    return next((l.rope for l in cfg.layers if l.rope is not None and l.layer_type == "sliding_attention"), None)


def _window(cfg):
    return next((w for w in cfg.layer_windows if w is not None), None)


def _longrope(cfg, key):
    r = _full_rope(cfg)
    if r is None or r.rope_type != "longrope":
        return None
    return r.get(key) if key != "attention_factor" else r.attention_factor


SWA = (
    KV("Attention.SLIDING_WINDOW", "UINT32", _window),
    KV("Attention.SLIDING_WINDOW_PATTERN", "ARRAY", lambda c: [w is not None for w in c.layer_windows]),
)
SWA_ROPE = (KV("Rope.FREQ_BASE_SWA", "FLOAT32", lambda c: _slide_rope(c).theta if _slide_rope(c) else None),)
SOFTCAPS = (
    KV("LLM.ATTN_LOGIT_SOFTCAPPING", "FLOAT32", lambda c: c.attn_softcap),
    KV("LLM.FINAL_LOGIT_SOFTCAPPING", "FLOAT32", lambda c: c.final_softcap),
)
PARTIAL_ROPE_DIM = (KV("Rope.DIMENSION_COUNT", "UINT32", lambda c: c.rotary_dim),)
LONGROPE = (
    KV("Rope.SCALING_ORIG_CTX_LEN", "UINT32", lambda c: _longrope(c, "original_max_position_embeddings")),
    KV("Rope.SCALING_ATTN_FACTOR", "FLOAT32", lambda c: _longrope(c, "attention_factor")),
)
GRANITE_SCALES = (
    KV("Attention.SCALE", "FLOAT32", lambda c: c.attention_scale),
    KV("LLM.EMBEDDING_SCALE", "FLOAT32", lambda c: c.embedding_scale),
    KV("LLM.RESIDUAL_SCALE", "FLOAT32", lambda c: c.residual_multiplier),
    KV("LLM.LOGIT_SCALE", "FLOAT32", lambda c: c.logits_scaling),
)
ROPE_FREQS = (("rope_freqs.weight", _llama3_rope_freqs),)

LLAMA = GgufFamily("llama", rope="norm", kvs=BASE + ROPE_DIM + LINEAR_ROPE, biases=ALL_BIASES,
                   rope_types=("default", "linear", "llama3"), extra=ROPE_FREQS)
GEMMA2 = GgufFamily(
    "gemma2", kvs=BASE + SWA + SOFTCAPS + LINEAR_ROPE, output="never", swa=True,
    graph={"hidden_act": lambda c: "gelu_pytorch_tanh", "embedding_scale": lambda c: c.hidden_size ** 0.5,
           "attention_scale": _gemma_attention_scale(46), "attn_softcap": WRITTEN, "final_softcap": WRITTEN},
    # its graph soft-caps always: a missing cap would be llama.cpp's default (50 / 30), not none
    limits=(lambda c: "attn_logit_softcapping or final_logit_softcapping is null (llama.cpp's gemma2 always "
                      "soft-caps)" if c.attn_softcap is None or c.final_softcap is None else None,))
GEMMA3 = GgufFamily(
    "gemma3", kvs=BASE + SWA + SWA_ROPE + SOFTCAPS[1:] + LINEAR_ROPE, swa=True, swa_rope=True,
    graph={"hidden_act": lambda c: "gelu_pytorch_tanh", "embedding_scale": lambda c: c.hidden_size ** 0.5,
           "attention_scale": _gemma_attention_scale(62), "final_softcap": WRITTEN})
PHI3 = GgufFamily(
    "phi3", kvs=BASE + PARTIAL_ROPE_DIM + LONGROPE, rope_types=("default", "longrope"),
    limits=(_head_dim_is_hidden_over_heads,),
    extra=(("rope_factors_long.weight", _longrope_factors("long_factor")),
           ("rope_factors_short.weight", _longrope_factors("short_factor"))))
OLMO2 = GgufFamily("olmo2", output="required", limits=(_head_dim_is_hidden_over_heads,))
GRANITE = GgufFamily(
    "granite", rope="norm", kvs=BASE + ROPE_DIM + LINEAR_ROPE + GRANITE_SCALES, biases=ALL_BIASES,
    rope_types=("default", "linear", "llama3"), extra=ROPE_FREQS, limits=(_head_dim_is_hidden_over_heads,),
    graph={"attention_scale": WRITTEN, "embedding_scale": WRITTEN, "residual_multiplier": WRITTEN,
           "logits_scaling": WRITTEN})
SMOLLM3 = GgufFamily("smollm3", rope="norm", kvs=BASE + ROPE_DIM + LINEAR_ROPE, nope_step=4)  # its n_no_rope_layer_step


# -- Gemma 4 (llama.cpp's gemma4 graph: src/models/gemma4.cpp) ---------------------------------
def _layers_of(c, kind: str):
    return [l for l in c.layers if l.layer_type == kind]


def _g4_dim(kind: str):
    """head_dim of the full / sliding layers (one per type; the other type's when there are none)."""
    def dim(c):
        own = _layers_of(c, kind) or list(c.layers)
        return own[0].head_dim or c.head_dim
    return dim


def _per_layer(get, scalar: bool):
    """A per-layer value as llama.cpp's get_key_or_arr reads it: one number when every layer has the
    same (``scalar``), else an array (``not scalar``); the other form is not written."""
    def value(c):
        vals = [int(get(c, l)) for l in c.layers]
        same = len(set(vals)) == 1
        return (vals[0] if same else None) if scalar else (None if same else vals)
    return value


_ff = lambda c, l: l.intermediate_size or c.intermediate_size  # noqa: E731
_kvh = lambda c, l: l.kv_heads or c.num_key_value_heads  # noqa: E731


def _proportional_freqs(c) -> torch.Tensor:
    """Gemma 4's full-attention rope as llama.cpp takes it: a frequency divisor per pair (1 on the
    rotated pairs, 1e30 on the rest, whose angle is then 0), like its converter writes."""
    r = _full_rope(c)
    d = _g4_dim("full_attention")(c)
    n = d // 2
    if r is not None and r.rope_type == "proportional":
        n = int(float(r.get("partial_rotary_factor", 1.0)) * d // 2)
    return torch.tensor([1.0] * n + [1e30] * (d // 2 - n), dtype=torch.float32)


def _g4_kv_reuse(c):
    """llama.cpp gives KV-shared layer i the cache of layer n_own - 2 (sliding) or n_own - 1 (full);
    transformers the last own layer of the same type: they agree only when the own layers end
    [sliding, full]."""
    own = sum(1 for l in c.layers if l.kv_source is None)
    bad = [i for i, l in enumerate(c.layers) if l.kv_source is not None
           and l.kv_source != own - (2 if l.layer_type == "sliding_attention" else 1)]
    if bad:
        return (f"KV-shared layers {bad} reuse layers {[c.layers[i].kv_source for i in bad]}, but llama.cpp takes "
                f"layer {own - 2} for sliding and {own - 1} for full-attention ones")
    return None


def _g4_limits():
    def ple_vocab(c):
        if c.per_layer_input_size and c.per_layer_input_vocab != c.vocab_size:
            return (f"vocab_size_per_layer_input {c.per_layer_input_vocab} != vocab_size {c.vocab_size} "
                    "(its per-layer embedding table has one row per token)")
        return None

    def rope_factor(c):
        r = _full_rope(c)
        if r is not None and float(r.get("factor", 1.0)) != 1.0:
            return f"proportional rope with factor {r.get('factor')} (llama.cpp's gemma4 reads no rope factor)"
        return None
    def sliding(c):
        if not any(l.layer_type == "sliding_attention" for l in c.layers):
            return "no sliding layer (llama.cpp's gemma4 graph always builds the sliding-window KV cache)"
        return None
    return (ple_vocab, rope_factor, _g4_kv_reuse, sliding)


GEMMA4 = GgufFamily(
    "gemma4", swa=True, swa_rope=True, rope_types=("default", "proportional"),
    kvs=(
        KV("LLM.CONTEXT_LENGTH", "UINT32", lambda c: c.max_position_embeddings),
        KV("LLM.EMBEDDING_LENGTH", "UINT32", lambda c: c.hidden_size),
        KV("LLM.BLOCK_COUNT", "UINT32", lambda c: c.num_hidden_layers),
        KV("LLM.FEED_FORWARD_LENGTH", "UINT32", _per_layer(_ff, True)),
        KV("LLM.FEED_FORWARD_LENGTH", "ARRAY", _per_layer(_ff, False)),      # double-wide MLPs
        KV("Attention.HEAD_COUNT", "UINT32", lambda c: c.num_attention_heads),
        KV("Attention.HEAD_COUNT_KV", "UINT32", _per_layer(_kvh, True)),
        KV("Attention.HEAD_COUNT_KV", "ARRAY", _per_layer(_kvh, False)),     # full layers' own kv heads
        KV("Rope.FREQ_BASE", "FLOAT32", lambda c: c.rope_theta),
        KV("Attention.LAYERNORM_RMS_EPS", "FLOAT32", lambda c: c.rms_norm_eps),
        KV("LLM.VOCAB_SIZE", "UINT32", lambda c: c.vocab_size),
        KV("Attention.KEY_LENGTH", "UINT32", _g4_dim("full_attention")),
        KV("Attention.VALUE_LENGTH", "UINT32", _g4_dim("full_attention")),
        KV("Attention.KEY_LENGTH_SWA", "UINT32", _g4_dim("sliding_attention")),
        KV("Attention.VALUE_LENGTH_SWA", "UINT32", _g4_dim("sliding_attention")),
        KV("Rope.DIMENSION_COUNT", "UINT32", _g4_dim("full_attention")),      # partial via rope_freqs
        KV("Rope.DIMENSION_COUNT_SWA", "UINT32", _g4_dim("sliding_attention")),
        KV("Attention.SLIDING_WINDOW", "UINT32", lambda c: _window(c) or c.max_position_embeddings),
        SWA[1],
        SWA_ROPE[0],
        SOFTCAPS[1],
        KV("Attention.SHARED_KV_LAYERS", "UINT32", lambda c: c.kv_shared_layers),
        KV("LLM.EMBD_LENGTH_PER_LAYER_INP", "UINT32", lambda c: c.per_layer_input_size),
    ),
    graph={"hidden_act": lambda c: "gelu_pytorch_tanh", "embedding_scale": lambda c: c.hidden_size ** 0.5,
           "attention_scale": lambda c: 1.0, "final_softcap": WRITTEN},
    limits=_g4_limits(),
    extra=(("rope_freqs.weight", _proportional_freqs),))

# -- mixtures of experts (gguf_moe: the stacked expert tensors) --------------------------------
@dataclass(frozen=True)
class MoeGguf:
    """What a llama.cpp graph's mixture of experts computes (build_moe_ffn's arguments in its
    src/models/<arch>.cpp, hard-coded there: a config that differs is refused)."""

    renorm: bool                   # norm_w: the top-k weights are divided by their sum
    scoring: str = "softmax_topk"  # SOFTMAX (softmax over all, then top-k) | SOFTMAX_WEIGHT ("topk_softmax")
    shared: bool = False           # every MoE layer has the sigmoid-gated shared expert (required tensors)
    expert_bias: bool = False      # expert and router biases (required tensors)
    act_clamp: tuple | None = None  # (alpha, limit) of LLM_FFN_SWIGLU_OAI_MOE; None: SiLU(gate) · up


def _moe(c):
    from .gguf_moe import moe_values

    return moe_values(c)


def _moe_problems(fam: GgufFamily, cfg) -> list[str]:
    mv, g = _moe(cfg), fam.moe
    if mv is None:
        return ["the model has no mixture of experts"]
    out = []
    if mv.dense_layers:
        out.append(f"layers {mv.dense_layers} are dense MLPs (mlp_only_layers / decoder_sparse_step), but llama.cpp's "
                   f"{fam.arch} graph makes every layer a mixture of experts")
    if mv.scoring != g.scoring:
        out.append(f"its router scores {mv.scoring}, llama.cpp's {fam.arch} graph {g.scoring}")
    elif mv.scoring == "softmax_topk" and mv.renorm != g.renorm:
        out.append(f"norm_topk_prob is {mv.renorm}, but llama.cpp's {fam.arch} graph "
                   f"{'always' if g.renorm else 'never'} renormalises the top-k routing weights")
    if bool(mv.shared) != g.shared:
        out.append("a shared expert" + (" is missing" if g.shared else "") + f" (llama.cpp's {fam.arch} graph "
                   f"{'needs' if g.shared else 'has no'} one)")
    if (mv.router_bias or mv.expert_bias) != g.expert_bias:
        out.append(f"expert / router biases {'are missing' if g.expert_bias else ''} (llama.cpp's {fam.arch} graph "
                   f"{'needs' if g.expert_bias else 'has none'})")
    if g.act_clamp is not None:
        alpha, limit = g.act_clamp
        if mv.act_limit is None or not _close(mv.act_limit, limit) or not _close(mv.act_alpha, alpha):
            out.append(f"swiglu_limit {mv.act_limit} / swiglu_alpha {mv.act_alpha} (llama.cpp's {fam.arch} graph "
                       f"clamps at {limit} with alpha {alpha}, hard-coded)")
    elif mv.act_limit is not None:
        out.append(f"a clamped SwiGLU (limit {mv.act_limit}) that llama.cpp's {fam.arch} graph does not compute")
    if mv.experts < mv.top_k:
        out.append(f"{mv.top_k} experts per token of {mv.experts}")
    return out


def _kv_heads_are_heads(c):
    if c.num_key_value_heads != c.num_attention_heads:
        return (f"{c.num_key_value_heads} key/value heads of {c.num_attention_heads} (its k_norm over the whole key "
                "projection is hidden_size wide there: no grouped-query attention)")
    return None


def _yarn(c, key):
    r = _full_rope(c)
    if r is None or r.rope_type != "yarn":
        return None
    return r.get(key)


def _yarn_limits(c):
    """llama.cpp's YaRN: the attention factor 0.1 ln(factor) + 1 (no mscale fields), the factor
    from rope.scaling.factor (transformers takes max_position / original when both are given)."""
    r = _full_rope(c)
    if r is None or r.rope_type != "yarn":
        return None
    for k in ("mscale", "mscale_all_dim", "attention_factor"):
        if r.get(k) is not None:
            return f"YaRN with {k}={r.get(k)} (llama.cpp's attention factor is 0.1 ln(factor) + 1)"
    orig, factor = r.get("original_max_position_embeddings"), float(r.get("factor", 1.0))
    if orig and not _close(c.max_position_embeddings / orig, factor):
        return (f"YaRN factor {factor} but max_position_embeddings / original_max_position_embeddings = "
                f"{c.max_position_embeddings / orig:g} (transformers scales attention by the latter)")
    return None


def _yarn_truncate(c):
    r = _full_rope(c)
    if r is not None and r.rope_type == "yarn" and r.get("truncate", True) is False:
        return ("llama.cpp rounds YaRN's correction range to whole dimensions (truncate=true), this config has "
                "truncate=false: its logits differ slightly from the source's")
    return None


EXPERTS = (
    KV("LLM.EXPERT_COUNT", "UINT32", lambda c: _moe(c).experts),
    KV("LLM.EXPERT_USED_COUNT", "UINT32", lambda c: _moe(c).top_k),
)
EXPERT_FF = (KV("LLM.EXPERT_FEED_FORWARD_LENGTH", "UINT32", lambda c: _moe(c).inter),)
SHARED_FF = (KV("LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH", "UINT32", lambda c: _moe(c).shared or None),)
YARN = (
    KV("Rope.SCALING_TYPE", "STRING", lambda c: "yarn" if c.rope_type == "yarn" else None),
    KV("Rope.SCALING_FACTOR", "FLOAT32", lambda c: _yarn(c, "factor")),
    KV("Rope.SCALING_ORIG_CTX_LEN", "UINT32", lambda c: _yarn(c, "original_max_position_embeddings")),
    KV("Rope.SCALING_YARN_BETA_FAST", "FLOAT32", lambda c: _yarn(c, "beta_fast")),
    KV("Rope.SCALING_YARN_BETA_SLOW", "FLOAT32", lambda c: _yarn(c, "beta_slow")),
)
MOE_BIASES = ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")

# Mixtral: llama.cpp's llama graph with experts (its converter writes Mixtral as llama)
MIXTRAL = replace(LLAMA, kvs=LLAMA.kvs + EXPERTS, moe=MoeGguf(renorm=True))
QWEN2MOE = GgufFamily("qwen2moe", kvs=BASE + LINEAR_ROPE + EXPERTS + EXPERT_FF + SHARED_FF, output="required",
                      moe=MoeGguf(renorm=False, shared=True), limits=(_head_dim_is_hidden_over_heads,))
QWEN3MOE = GgufFamily("qwen3moe", kvs=BASE + LINEAR_ROPE + EXPERTS + EXPERT_FF, moe=MoeGguf(renorm=True))
OLMOE = GgufFamily("olmoe", kvs=BASE + LINEAR_ROPE + EXPERTS, output="required", moe=MoeGguf(renorm=False),
                   limits=(_head_dim_is_hidden_over_heads, _kv_heads_are_heads))
GPT_OSS = GgufFamily(
    "gpt-oss", kvs=BASE + EXPERTS + EXPERT_FF + (
        KV("Attention.SLIDING_WINDOW", "UINT32", lambda c: _window(c) or c.max_position_embeddings), SWA[1]) + YARN,
    output="required", swa=True, biases=ALL_BIASES + MOE_BIASES, rope_types=("default", "yarn"),
    moe=MoeGguf(renorm=False, scoring="topk_softmax", expert_bias=True, act_clamp=(1.702, 7.0)),
    limits=(_yarn_limits,), warns=(_yarn_truncate,))

# registry family -> GGUF facts
FAMILIES: dict[str, GgufFamily] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": GgufFamily("qwen2"),
    "qwen3": GgufFamily("qwen3"),
    "gemma2": GEMMA2,
    "gemma3_text": GEMMA3,
    "gemma3": replace(GEMMA3, import_as=("gemma3_text", "Gemma3ForCausalLM")),
    "gemma4_text": GEMMA4,
    "gemma4": replace(GEMMA4, import_as=("gemma4_text", "Gemma4ForCausalLM")),
    "phi3": PHI3,
    "olmo2": OLMO2,
    "granite": GRANITE,
    "smollm3": SMOLLM3,
    "mixtral": MIXTRAL,
    "qwen2_moe": QWEN2MOE,
    "qwen3_moe": QWEN3MOE,
    "olmoe": OLMOE,
    "gpt_oss": GPT_OSS,
}
# registry families with no GGUF path, and why (tests read this: an exclusion is explicit, never a skip)
EXCLUDED: dict[str, str] = {}


# -- import of a GGUF without loratools' source config (llama.cpp's converter, other tools) --------
# general.architecture -> (model_type, transformers class, extra config.json fields from the keys);
# ``key(name, default)`` reads "{arch}.<name>", ``names`` is the file's tensor names. Families not
# listed need fields no key carries (Gemma: query_pre_attn_scalar, layer types of the source;
# Phi-3: LongRoPE's factors as the source wrote them) and are refused in one line.
def _pad(meta):
    # transformers' config classes default pad_token_id to the released vocabulary's id (SmolLM3: 128004),
    # which an embedding of another size cannot take
    return {"pad_token_id": meta("tokenizer.ggml.padding_token_id")}


def _granite_import(key, names, meta):
    return {"attention_multiplier": float(key("attention.scale", 1.0)),
            "embedding_multiplier": float(key("embedding_scale", 1.0)),
            "residual_multiplier": float(key("residual_scale", 1.0)),
            "logits_scaling": float(key("logit_scale", 1.0)),
            "attention_bias": "blk.0.attn_q.bias" in names, "mlp_bias": "blk.0.ffn_down.bias" in names, **_pad(meta)}


IMPORTS: dict[str, tuple] = {
    "llama": ("llama", "LlamaForCausalLM", None),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", lambda key, names, meta: {"use_sliding_window": False, "sliding_window": None}),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", None),
    "olmo2": ("olmo2", "Olmo2ForCausalLM", lambda key, names, meta: {"attention_bias": "blk.0.attn_q.bias" in names,
                                                                     **_pad(meta)}),
    "granite": ("granite", "GraniteForCausalLM", _granite_import),
    # llama.cpp drops rope on every 4th layer whatever the source said: that is transformers' default interval
    "smollm3": ("smollm3", "SmolLM3ForCausalLM",
                lambda key, names, meta: {"no_rope_layer_interval": 4, "use_sliding_window": False,
                                          "attention_bias": "blk.0.attn_q.bias" in names, **_pad(meta)}),
}


def _experts(key, field="num_experts"):
    return {field: int(key("expert_count")), "num_experts_per_tok": int(key("expert_used_count"))}


def _qwen_moe_import(renorm: bool, bias_field: str):
    def extra(key, names, meta):
        return {**_experts(key), "moe_intermediate_size": int(key("expert_feed_forward_length")),
                "norm_topk_prob": renorm, "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": False,
                "sliding_window": None, bias_field: "blk.0.attn_q.bias" in names, **_pad(meta)}
    return extra


def _qwen2moe_import(key, names, meta):
    shared = key("expert_shared_feed_forward_length")
    return {**_qwen_moe_import(False, "qkv_bias")(key, names, meta),
            "shared_expert_intermediate_size": int(shared if shared is not None else key("feed_forward_length"))}


def _gpt_oss_import(key, names, meta):
    n = int(key("block_count"))
    pattern = key("attention.sliding_window_pattern")
    if not isinstance(pattern, list) or len(pattern) != n:
        pattern = [i % 2 == 0 for i in range(n)]  # llama.cpp's default for gpt-oss: every other layer slides
    rope = {"rope_type": "default", "rope_theta": float(key("rope.freq_base", 150000.0))}
    if key("rope.scaling.type") == "yarn":
        # llama.cpp rounds YaRN's correction range to whole dimensions: transformers' truncate=true
        rope.update(rope_type="yarn", factor=float(key("rope.scaling.factor")), truncate=True,
                    original_max_position_embeddings=int(key("rope.scaling.original_context_length")),
                    beta_fast=float(key("rope.scaling.yarn_beta_fast", 32.0)),
                    beta_slow=float(key("rope.scaling.yarn_beta_slow", 1.0)))
    return {**_experts(key, "num_local_experts"), "intermediate_size": int(key("expert_feed_forward_length")),
            "sliding_window": int(key("attention.sliding_window")),
            "layer_types": ["sliding_attention" if p else "full_attention" for p in pattern],
            "rope_parameters": rope, "rope_theta": None, "swiglu_limit": 7.0, "swiglu_alpha": 1.702,
            "attention_bias": True, **_pad(meta)}


IMPORTS.update({
    "qwen2moe": ("qwen2_moe", "Qwen2MoeForCausalLM", _qwen2moe_import),
    "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM", _qwen_moe_import(True, "attention_bias")),
    "olmoe": ("olmoe", "OlmoeForCausalLM", lambda key, names, meta: {**_experts(key), "norm_topk_prob": False,
                                                                     "clip_qkv": None, **_pad(meta)}),
    "gpt-oss": ("gpt_oss", "GptOssForCausalLM", _gpt_oss_import),
})
# an architecture whose GGUF with experts (an expert_count key) is another family: llama.cpp's
# converter writes Mixtral as llama
MOE_IMPORTS: dict[str, tuple] = {
    "llama": ("mixtral", "MixtralForCausalLM",
              lambda key, names, meta: {**_experts(key, "num_local_experts"), "sliding_window": None, **_pad(meta)}),
}


def family(cfg, path=None) -> GgufFamily:
    key = getattr(cfg, "family", "") or cfg.model_type
    fam = FAMILIES.get(key)
    if fam is None:
        why = EXCLUDED.get(key)
        raise UnsupportedError(f"no GGUF export for the {key!r} family" + (f": {why}" if why else
                               f" (GGUF families: {', '.join(sorted(FAMILIES))})"), path)
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


def changes(fam: GgufFamily, gguf_name: str, cfg) -> bool:
    """Whether ``to_gguf`` changes the tensor ``gguf_name`` (else llama.cpp takes it as stored)."""
    r = role(gguf_name)
    return bool(norm_offset(cfg) and r in NORM_ROLES) or _rows(fam, r, cfg, inverse=False) is not None


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
