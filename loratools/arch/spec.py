"""ArchSpec: what one decoder family is, as named feature switches (in the spirit of litgpt's Config).

A spec says *which* features a family has and *which config.json fields* drive them; the values
come from config.json (``hf_config.parse_config`` resolves both into a ``ModelConfig``). The
decoder reads the resolved switches, never a family name.

    field                 meaning (default = Llama)
    family                registry key (the config.json model_type, or the text family of a
                          multimodal checkpoint: gemma3 -> gemma3_text)
    hf_class              the transformers class that builds the model (architectures[0])
    text_config           hyper-parameters sit under config.json's "text_config" (multimodal)
    prefix                weight-name prefix of the decoder body on disk ("model."); the decoder's
                          own names always use "model."
    head                  name of the LM head module on disk ("lm_head")
    alt_layouts           other layouts of the same weights: ((prefix, head), ...). Multimodal
                          Gemma 3: transformers 5 holds (and PEFT names) the text model as
                          "model.language_model.*" but saves it, as 4.x did, as
                          "language_model.model.*" / "language_model.lm_head"
    foreign_prefixes      tensors that are not part of the text decoder and are skipped
                          (vision tower, projector)
    qkv_bias / o_bias /   True, False, or the config field that switches the bias on
    mlp_bias                (attention_bias, mlp_bias)
    norm_offset           RMSNorm scales by (norm_offset + w): 1.0 for Gemma ((1 + w), weights
                          stored around 0), 0.0 otherwise
    norm_fp32_weight      the norm weight multiplies the fp32 x̂ before rounding (OLMo 2; Gemma's
                          (1 + w) always does) instead of w · round(x̂) (Llama)
    norm_layout           "pre": x + f(norm(x)) (Llama);  "sandwich": x + post_norm(f(pre_norm(x)))
                          (Gemma 2/3: input/post_attention/pre_feedforward/post_feedforward
                          norms);  "post": x + norm(f(x)) (OLMo 2: post_attention and
                          post_feedforward norms only)
    qk_norm               None, "head" (RMSNorm over each head's head_dim, before rope: Qwen3,
                          Gemma 3) or "proj" (over the whole q / k projection: OLMo 2)
    v_norm                RMSNorm without weight on each value head (Gemma 4)
    act_field / act       config field naming the MLP activation, and its default
                          ("silu"; Gemma: hidden_activation, "gelu_pytorch_tanh")
    embedding_scale       None, "sqrt_hidden" (Gemma: embeddings · √hidden, rounded to the
                          weight dtype) or a config field that multiplies (Granite:
                          embedding_multiplier)
    attention_scale       "head_dim" (1/√head_dim), "query_pre_attn_scalar" (1/√that field:
                          Gemma), "one" (1.0: Gemma 4) or a config field used as the scale itself
                          (Granite: attention_multiplier)
    residual_multiplier   config field scaling each block's branch before the residual add
                          (Granite)
    logits_scaling        config field that divides the logits (Granite)
    attn_softcap          config field: scores = c·tanh(scores / c) before the mask (Gemma 2)
    final_softcap         config field: logits = c·tanh(logits / c) (Gemma 2/3)
    fused_qkv             one qkv_proj (rows q, k, v) instead of q_proj/k_proj/v_proj (Phi-3)
    fused_gate_up         one gate_up_proj (rows gate, up) instead of gate_proj/up_proj (Phi-3)
    sliding               how per-layer sliding windows are found when config.json has no
                          layer_types: "all" (sliding_window on every layer: Mistral, Phi-3),
                          "qwen" (use_sliding_window + max_window_layers: layers from it on
                          slide), "alternate_below" (Qwen2-MoE: even layers below
                          max_window_layers slide, when sliding_flag), "pattern"
                          (sliding_window_pattern / default_pattern: every Nth layer is full),
                          "nope_layers" (the NoPE layers slide, when sliding_flag: SmolLM3),
                          "none" (the family has no sliding window)
    sliding_flag          config field that must be true for sliding layer types to slide
                          (SmolLM3, Qwen: use_sliding_window)
    default_pattern       Gemma's default sliding pattern (2: alternate; 6: five local, one global)
    rope_by_layer_type    rope_parameters may be keyed by layer type; 4.x configs give the
                          sliding layers' base as rope_local_base_freq (Gemma 3)
    local_rope_theta      default rope base of sliding layers when rope_by_layer_type
    nope_field            config field listing per layer 1 = rope, 0 = no rope (SmolLM3
                          no_rope_layers) — NoPE layers
    rope_types            rope_type values this family may use
    partial_rotary        the family honours partial_rotary_factor (rope on the first
                          head_dim · factor dims of each head: Phi-4-mini)
    per_layer_input       config field: size of Gemma 4's per-layer input embeddings (0 = off)
    kv_shared             config field: number of trailing layers that reuse an earlier layer's
                          K/V (Gemma 4's num_kv_shared_layers; 0 = off)
    layer_head_dim        config field: head_dim of full-attention layers when it differs
                          (Gemma 4 global_head_dim; transformers 5 writes per_layer_config instead)
    layer_kv_heads        config field: key/value heads of full-attention layers when they differ
                          (Gemma 4 num_global_key_value_heads, honoured with kv_eq_v)
    kv_eq_v               config field: full-attention layers have no v_proj, V is the k_proj
                          output before k_norm (Gemma 4 attention_k_eq_v)
    double_wide_mlp       config field: the KV-shared layers' MLP is twice intermediate_size wide
                          (Gemma 4 use_double_wide_mlp)
    per_layer_vocab       config field: rows of the per-layer input embedding table
                          (Gemma 4 vocab_size_per_layer_input)
    layer_scalar          each layer's output is multiplied by a stored (1,) tensor
                          ``model.layers.N.layer_scalar`` (Gemma 4)
    last_layer_full       the last layer is full attention whatever layer_types says (Gemma 4:
                          transformers forces it)
    refuse                ((config field, value, what), ...): values the decoder does not run,
                          refused in one line (Gemma 4 MoE blocks, bidirectional attention)
    moe                   the MLP of (some) layers is a mixture of experts: a MoeSpec (below), None
                          for dense families
    attn_sinks            each head has a learned sink logit ``self_attn.sinks`` (heads,) that joins
                          the softmax and takes probability mass but adds no value (gpt-oss)
    qkv_clip              config field: q, k and v are clamped to [-c, c] after the projections
                          (and q/k norms) when set (OLMoE clip_qkv)
    defaults              values transformers' config class uses for fields config.json may
                          omit (e.g. Gemma 2 query_pre_attn_scalar 256)
    implemented           the reference decoder runs this family (False: known to the registry,
                          decoder math not written yet)
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ArchSpec:
    family: str
    hf_class: str
    text_config: bool = False
    prefix: str = "model."
    head: str = "lm_head"
    alt_layouts: tuple = ()
    foreign_prefixes: tuple = ()
    qkv_bias: str | bool = "attention_bias"
    o_bias: str | bool = "attention_bias"
    mlp_bias: str | bool = False
    norm_offset: float = 0.0
    norm_fp32_weight: bool = False
    norm_layout: str = "pre"
    qk_norm: str | None = None
    v_norm: bool = False
    act_field: str = "hidden_act"
    act: str = "silu"
    embedding_scale: str | None = None
    attention_scale: str = "head_dim"
    residual_multiplier: str | None = None
    logits_scaling: str | None = None
    attn_softcap: str | None = None
    final_softcap: str | None = None
    fused_qkv: bool = False
    fused_gate_up: bool = False
    sliding: str = "all"
    sliding_flag: str | None = None
    default_pattern: int | None = None
    rope_by_layer_type: bool = False
    local_rope_theta: float | None = None
    nope_field: str | None = None
    rope_types: tuple = ("default", "linear", "llama3")
    partial_rotary: bool = False
    per_layer_input: str | None = None
    kv_shared: str | None = None
    layer_head_dim: str | None = None
    layer_kv_heads: str | None = None
    kv_eq_v: str | None = None
    double_wide_mlp: str | None = None
    per_layer_vocab: str | None = None
    layer_scalar: bool = False
    last_layer_full: bool = False
    refuse: tuple = ()
    moe: "MoeSpec | None" = None
    attn_sinks: bool = False
    qkv_clip: str | None = None
    defaults: dict = field(default_factory=dict)
    implemented: bool = True

    # -- names ---------------------------------------------------------------------------------
    def layouts(self) -> tuple:
        """Every on-disk layout (body prefix, head name), the current one first."""
        return ((self.prefix, self.head),) + tuple(self.alt_layouts)


NORM_LAYOUTS = ("pre", "sandwich", "post")
QK_NORMS = (None, "head", "proj")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
ACT_ALIASES = {"swish": "silu", "gelu_pytorch_tanh": "gelu_pytorch_tanh", "silu": "silu"}
SLIDING_RULES = ("all", "qwen", "alternate_below", "pattern", "nope_layers", "none")


@dataclass(frozen=True)
class MoeSpec:
    """A mixture-of-experts MLP: a router picks top-k of E experts per token; each expert is a
    gated MLP (gate, up, down); the outputs are summed with the routing weights.

    Names. In memory (transformers 5) and in PEFT the block is ``mlp``: router ``mlp.<router>``,
    experts fused as 3-D parameters ``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj``. On
    disk the layout is ``disk_layout``:

      "per_expert"   one 2-D tensor per expert and matrix, as transformers saves them:
                     ``<block>.experts.<e>.<leaf>.weight`` with leaves ``leaves`` (gate, up, down)
                     and the router ``<block>.<router>.weight`` (Mixtral: block
                     "block_sparse_moe", leaves w1 / w3 / w2). The same tensors in the
                     in-memory fused layout (``mlp.experts.gate_up_proj`` (E, 2I, H), gate rows
                     then up rows; ``mlp.experts.down_proj`` (E, H, I)) are read too.
      "gpt_oss"      fused 3-D tensors on disk as in memory, transposed to (E, in, out):
                     ``mlp.experts.gate_up_proj`` (E, H, 2I) with gate and up *interleaved*
                     (columns 0::2 gate, 1::2 up), ``gate_up_proj_bias`` (E, 2I),
                     ``down_proj`` (E, I, H), ``down_proj_bias`` (E, H); or MXFP4
                     ``*_blocks`` / ``*_scales`` (dequantized on read).

    loratools' canonical expert LoRA is per expert and matrix, 2-D, named as the per-expert
    tensors are (``model.layers.L.mlp.experts.<e>.gate_proj``; Mixtral
    ``model.layers.L.block_sparse_moe.experts.<e>.w1``; gpt-oss uses the gate_proj / up_proj /
    down_proj names for its virtual per-expert matrices).

    field           meaning
    experts         config field(s): number of routed experts; a tuple names the field and the
                    alias transformers' attribute_map reads the same (num_experts /
                    num_local_experts), the first present wins
    top_k           config field: experts per token
    intermediate    config field: width I of one routed expert
    scoring         "softmax_topk": softmax over all E logits (fp32), then top-k (Mixtral, Qwen,
                    OLMoE); "topk_softmax": top-k logits, softmax over those k (gpt-oss)
    renorm          True, False, or the config field (norm_topk_prob) that says whether the k
                    weights are divided by their sum ("topk_softmax" sums to 1 anyway)
    router          leaf name of the router linear under the block ("gate"; gpt-oss "router")
    router_bias     the router has a bias (gpt-oss)
    block           module name of the MoE block on disk ("mlp"; Mixtral "block_sparse_moe")
    leaves          per-expert leaf names on disk for (gate, up, down)
    disk_layout     "per_expert" or "gpt_oss" (above)
    expert_bias     experts have biases (gpt-oss gate_up_proj_bias / down_proj_bias)
    shared          config field: width of the always-on shared expert (Qwen2-MoE
                    shared_expert_intermediate_size; its output is scaled by
                    sigmoid(shared_expert_gate(x))); None: no shared expert
    dense_rule      which layers are dense MLPs: None (every layer is MoE) or "sparse_step"
                    (layer i is MoE unless i in mlp_only_layers or (i + 1) % decoder_sparse_step)
    act_clamp       config field of gpt-oss's clamped SwiGLU limit (swiglu_limit; with
                    swiglu_alpha): gate = min(gate, limit), up = clamp(up, -limit, limit),
                    out = (up + 1) · gate · sigmoid(alpha · gate); None: act(gate) · up
    act_alpha       config field of alpha in the clamped SwiGLU (swiglu_alpha)
    """

    experts: str | tuple = ("num_experts", "num_local_experts")
    top_k: str = "num_experts_per_tok"
    intermediate: str = "moe_intermediate_size"
    scoring: str = "softmax_topk"
    renorm: str | bool = "norm_topk_prob"
    router: str = "gate"
    router_bias: bool = False
    block: str = "mlp"
    leaves: tuple = ("gate_proj", "up_proj", "down_proj")
    disk_layout: str = "per_expert"
    expert_bias: bool = False
    shared: str | None = None
    dense_rule: str | None = None
    act_clamp: str | None = None
    act_alpha: str = "swiglu_alpha"


MOE_SCORING = ("softmax_topk", "topk_softmax")
MOE_DISK_LAYOUTS = ("per_expert", "gpt_oss")
