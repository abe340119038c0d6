"""FAMILIES: config.json model_type -> ArchSpec. A variant is ``replace(parent, ...)``.

Adding a family is an entry here (plus a named switch in spec.py and the decoder if the family
brings a feature no other family has). Tests parametrized over this table pick it up.
"""
from __future__ import annotations

from dataclasses import replace

from ..errors import UnsupportedError
from .spec import ArchSpec, MoeSpec

LLAMA = ArchSpec("llama", "LlamaForCausalLM", mlp_bias="mlp_bias")
MISTRAL = replace(LLAMA, family="mistral", hf_class="MistralForCausalLM", qkv_bias=False, o_bias=False, mlp_bias=False)
QWEN2 = replace(LLAMA, family="qwen2", hf_class="Qwen2ForCausalLM", qkv_bias=True, o_bias=False, mlp_bias=False,
                sliding="qwen", sliding_flag="use_sliding_window")
QWEN3 = replace(QWEN2, family="qwen3", hf_class="Qwen3ForCausalLM", qkv_bias="attention_bias", o_bias="attention_bias",
                qk_norm="head")

GEMMA2 = ArchSpec(
    "gemma2", "Gemma2ForCausalLM", norm_offset=1.0, norm_layout="sandwich", act_field="hidden_activation",
    act="gelu_pytorch_tanh", embedding_scale="sqrt_hidden", attention_scale="query_pre_attn_scalar",
    attn_softcap="attn_logit_softcapping", final_softcap="final_logit_softcapping", sliding="pattern",
    default_pattern=2,
    defaults={"head_dim": 256, "query_pre_attn_scalar": 256, "final_logit_softcapping": 30.0,
              "attn_logit_softcapping": 50.0, "sliding_window": 4096, "tie_word_embeddings": True,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0})
# Gemma 3: q/k norms per head, a rope base per layer type, no attention soft-capping (transformers'
# Gemma3Attention does not pass attn_logit_softcapping on), five local layers to one global
GEMMA3_TEXT = replace(
    GEMMA2, family="gemma3_text", hf_class="Gemma3ForCausalLM", qk_norm="head", attn_softcap=None,
    default_pattern=6, rope_by_layer_type=True, local_rope_theta=10000.0,
    defaults={**GEMMA2.defaults, "final_logit_softcapping": None, "attn_logit_softcapping": None,
              "rope_theta": 1000000.0})
# the text part of a multimodal Gemma 3 checkpoint: hyper-parameters in text_config, weights under
# model.language_model.* (transformers 5 in memory, PEFT names) or language_model.model.* (on disk, as both
# 4.x and 5.x save it), vision tower skipped; Gemma3ForConditionalGeneration applies no final soft-capping
GEMMA3 = replace(
    GEMMA3_TEXT, family="gemma3", hf_class="Gemma3ForConditionalGeneration", text_config=True, final_softcap=None,
    prefix="model.language_model.", head="lm_head", alt_layouts=(("language_model.model.", "language_model.lm_head"),),
    foreign_prefixes=("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.", "multi_modal_projector."))

# Gemma 4: plain w · x̂ norms (no 1 + w), q/k norms and a weightless v norm per head, attention scale 1,
# head_dim and key/value heads per layer type (per_layer_config or global_head_dim), proportional rope
# on the global layers, per-layer input embeddings, trailing layers that reuse earlier K/V, a stored
# scalar per layer; mixture-of-experts blocks are refused (expert LoRA is a later issue)
GEMMA4_TEXT = replace(
    GEMMA3_TEXT, family="gemma4_text", hf_class="Gemma4ForCausalLM", norm_offset=0.0, norm_fp32_weight=True,
    v_norm=True, attention_scale="one", rope_types=("default", "proportional"),
    per_layer_input="hidden_size_per_layer_input", per_layer_vocab="vocab_size_per_layer_input",
    kv_shared="num_kv_shared_layers", layer_head_dim="global_head_dim", layer_kv_heads="num_global_key_value_heads",
    kv_eq_v="attention_k_eq_v", double_wide_mlp="use_double_wide_mlp", layer_scalar=True, last_layer_full=True,
    refuse=(("enable_moe_block", True, "mixture-of-experts blocks (enable_moe_block; expert LoRA is a later issue)"),
            ("use_bidirectional_attention", "all", "bidirectional attention (use_bidirectional_attention='all')")),
    defaults={"head_dim": 256, "global_head_dim": 512, "sliding_window": 512, "final_logit_softcapping": None,
              "attn_logit_softcapping": None, "tie_word_embeddings": True, "rms_norm_eps": 1e-6,
              "hidden_size_per_layer_input": 256, "vocab_size_per_layer_input": 262144, "num_kv_shared_layers": 0,
              "max_position_embeddings": 131072,
              "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                  "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                                     "rope_theta": 1000000.0}}})
# the text part of a multimodal Gemma 4 checkpoint (Gemma4ForConditionalGeneration: how google/gemma-4-*
# are published): hyper-parameters in text_config, weights under model.language_model.* (in memory and on
# disk alike), the vision / audio towers and their embedders skipped; final soft-capping as in the text model
GEMMA4 = replace(
    GEMMA4_TEXT, family="gemma4", hf_class="Gemma4ForConditionalGeneration", text_config=True,
    prefix="model.language_model.", head="lm_head",
    foreign_prefixes=("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio."))

PHI3 = ArchSpec(
    "phi3", "Phi3ForCausalLM", qkv_bias=False, o_bias=False, fused_qkv=True, fused_gate_up=True,
    rope_types=("default", "longrope"), partial_rotary=True,
    defaults={"original_max_position_embeddings": 4096, "rms_norm_eps": 1e-5})
OLMO2 = ArchSpec("olmo2", "Olmo2ForCausalLM", norm_layout="post", qk_norm="proj", norm_fp32_weight=True, sliding="none",
                 defaults={"rms_norm_eps": 1e-5})
GRANITE = ArchSpec(
    "granite", "GraniteForCausalLM", mlp_bias="mlp_bias", embedding_scale="embedding_multiplier",
    attention_scale="attention_multiplier", residual_multiplier="residual_multiplier",
    logits_scaling="logits_scaling", sliding="none",
    defaults={"embedding_multiplier": 1.0, "attention_multiplier": 1.0, "residual_multiplier": 1.0,
              "logits_scaling": 1.0})
SMOLLM3 = ArchSpec(
    "smollm3", "SmolLM3ForCausalLM", mlp_bias="mlp_bias", nope_field="no_rope_layers", sliding="nope_layers",
    sliding_flag="use_sliding_window", defaults={"tie_word_embeddings": True, "no_rope_layer_interval": 4})

# -- mixture of experts (expert LoRA: arch/spec.py MoeSpec) -------------------------------------
MIXTRAL = replace(MISTRAL, family="mixtral", hf_class="MixtralForCausalLM",
                  moe=MoeSpec(experts=("num_local_experts", "num_experts"), intermediate="intermediate_size",
                              renorm=True, block="block_sparse_moe", leaves=("w1", "w3", "w2")))
# Qwen2-MoE: qkv biases by qkv_bias (default on), 4.x configs slide the even layers below max_window_layers
QWEN2_MOE = replace(QWEN2, family="qwen2_moe", hf_class="Qwen2MoeForCausalLM",
                    qkv_bias="qkv_bias", sliding="alternate_below", defaults={"qkv_bias": True},
                    moe=MoeSpec(shared="shared_expert_intermediate_size", dense_rule="sparse_step"))
# Qwen3-MoE: with use_sliding_window every layer slides (transformers' attention takes sliding_window as is)
QWEN3_MOE = replace(QWEN3, family="qwen3_moe", hf_class="Qwen3MoeForCausalLM", sliding="all",
                    moe=MoeSpec(experts=("num_local_experts", "num_experts"), dense_rule="sparse_step"))
OLMOE = replace(LLAMA, family="olmoe", hf_class="OlmoeForCausalLM", qk_norm="proj", mlp_bias=False, sliding="none",
                qkv_clip="clip_qkv", moe=MoeSpec(intermediate="intermediate_size"))
# gpt-oss: the norm weight multiplies the fp32 x̂ (GptOssRMSNorm), every layer sliding or full by layer_types
GPT_OSS = replace(LLAMA, family="gpt_oss", hf_class="GptOssForCausalLM", mlp_bias=False, attn_sinks=True,
                  norm_fp32_weight=True, rope_types=("default", "yarn"), sliding="pattern", default_pattern=2,
                  moe=MoeSpec(experts=("num_local_experts", "num_experts"), intermediate="intermediate_size",
                              scoring="topk_softmax", renorm=False, router="router", router_bias=True,
                              disk_layout="gpt_oss", expert_bias=True, act_clamp="swiglu_limit"),
                  defaults={"swiglu_alpha": 1.702, "swiglu_limit": 7.0, "attention_bias": True, "sliding_window": 128,
                            "rope_theta": 150000.0})

FAMILIES: dict[str, ArchSpec] = {s.family: s for s in (
    LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA2, GEMMA3_TEXT, GEMMA3, GEMMA4_TEXT, GEMMA4, PHI3, OLMO2, GRANITE, SMOLLM3,
    MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE, GPT_OSS)}
MOE_FAMILIES = tuple(k for k, s in FAMILIES.items() if s.moe is not None)


def get_spec(model_type: str, path=None) -> ArchSpec:
    """The spec of ``model_type``; an unknown one is refused in one line naming the family."""
    spec = FAMILIES.get(model_type)
    if spec is None or not spec.implemented:
        known = ", ".join(k for k, s in FAMILIES.items() if s.implemented)
        raise UnsupportedError(f"unsupported architecture model_type={model_type!r}: no architecture spec for this "
                               f"family (supported: {known})", path)
    return spec
