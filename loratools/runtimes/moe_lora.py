"""What the serving runtimes do with mixture-of-experts LoRA: one table of facts, each read in the
runtime's own source at the version named (loratools cannot run vLLM or SGLang here: these are
readings, not measurements; llama.cpp's is the build the test suite runs).

Used by ``inspect`` to say, for a given adapter, what each runtime will do with its expert LoRA.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RuntimeFacts:
    runtime: str
    version: str          # the source read
    routed: str           # routed-expert LoRA: which key forms it reads and how it applies them
    fused_form: str       # PEFT target_parameters keys (mlp.experts.base_layer / mlp.experts)
    per_expert_form: str  # transformers 4.x per-expert keys (mlp.experts.N.gate_proj, block_sparse_moe.experts.N.w1)
    router: str
    shared_expert: str
    sources: tuple


FACTS: tuple[RuntimeFacts, ...] = (
    RuntimeFacts(
        "llama.cpp",
        "llama.cpp commit 0c1e570 (2026-10-01) as vendored in llama-cpp-python 0.3.36",
        "applies LoRA to the stacked expert tensors ffn_{gate,up,down}_exps (and a fused ffn_gate_up_exps) in "
        "build_lora_mm_id: a second ggml_mul_mat_id through the adapter's 3-D A and B for the selected experts, "
        "scale = alpha / rank with one general.adapter.lora.alpha per file and the rank read per tensor, so one "
        "rank per tensor across all experts; the loader checks only the first two dims of each pair",
        "convert_lora_to_gguf.py has no target_parameters handling: the keys become the base name "
        "'mlp.experts.weight' / 'mlp.experts.base_layer.weight', which no model converter maps (the Qwen/Mixtral "
        "converters look for experts.N.* or experts.gate_up_proj), so conversion fails; a GGUF adapter must be "
        "written per expert and stacked (loratools' GGUF adapter export)",
        "convert_lora_to_gguf.py stacks per-expert LoRA (LoraTorchTensor supports torch.stack) when the model "
        "converter stacks experts.N.* into *_exps, so a 4.x-named adapter converts",
        "the router ffn_gate_inp goes through build_lora_mm: LoRA on it applies",
        "shared-expert ffn_*_shexp go through build_ffn / build_lora_mm, and Qwen2-MoE's ffn_gate_inp_shexp "
        "through build_lora_mm: LoRA on them applies",
        ("src/llama-graph.cpp (build_lora_mm_id, build_moe_ffn)", "src/llama-adapter.cpp (shape check, alpha)",
         "src/models/qwen2moe.cpp (shared-expert gate)", "convert_lora_to_gguf.py (get_base_tensor_name, torch.stack)",
         "conversion/qwen.py (expert stacking)"),
    ),
    RuntimeFacts(
        "vLLM",
        "main: vllm/lora/lora_model.py at commit 0306474, vllm/lora/model_manager.py at commit 01533aa "
        "(the release that carries them was not pinned; third-party notes place the 3-D default of Qwen3.5-MoE "
        "in vLLM 0.24.0)",
        "routed-expert LoRA runs in FusedMoE's LoRA wrappers; a model class declares which on-disk form it "
        "expects with is_3d_moe_weight: True -> FusedMoE3DWithLoRA reading the fused form, False -> "
        "FusedMoEWithLoRA reading per-expert keys; --enable-mixed-moe-lora-format forces the 2-D wrapper so both "
        "forms load; expert LoRA with expert parallelism was refused in earlier versions",
        "read for models with is_3d_moe_weight: 'experts.base_layer' = gate_up (w13), 'experts' = down (w2), "
        "experts folded into the rank dimension (PEFT's layout); for (E, out, in) models vLLM PR #52194 reports a "
        "transposed reading of PEFT's factors in stock vLLM (a shape error at set_lora)",
        "read for models without is_3d_moe_weight: experts.N.gate_proj / up_proj / down_proj (w1 / w3 / w2)",
        "the gated-MoE router (mlp.gate) is a LoRA target; non-gated MoE routers (mixer.gate) are skipped",
        "shared experts are ordinary linear layers: their LoRA loads",
        ("vllm/lora/lora_model.py (check_unexpected_modules: base_layer / .experts keys)",
         "vllm/lora/model_manager.py (is_3d_moe_weight, enable_mixed_moe_lora_format, router alias)",
         "vllm-project/vllm#41384, #52194, #47088 (PEFT target_parameters loading)"),
    ),
    RuntimeFacts(
        "SGLang",
        "main: test/registered/unit/lora/test_peft_paramwrapper_moe_unit.py at commits 5aba980 / 3599d9b (the "
        "loader they test; the release that carries it was not pinned)",
        "routed-expert LoRA is loaded into per-expert MoE LoRA buffers (A (E, r, in), B (E, out, r)) and applied "
        "in its LoRA MoE runners (python/sglang/srt/lora/lora_moe_runners.py)",
        "rewritten into its per-expert layout by LoRAAdapter._normalize_peft_paramwrapper_moe, gated on "
        "target_parameters in adapter_config.json (sgl-project/sglang#27381): the base_layer / outer slots are "
        "told apart by shape (lora_A's input width = hidden -> gate_up_proj, = moe_intermediate_size -> "
        "down_proj), and more than two target_parameters entries (e.g. a router 'mlp.gate.weight') raise "
        "ValueError; releases before it drop those keys silently, or fail under --lora-strict-loading (as that "
        "PR describes)",
        "read directly (its native MoE layout: ...experts.<e>.<leaf>.lora_A/B)",
        "a router ('gate') LoRA target is wired per model (sgl-project/sglang#25528 adds it for LFM2-MoE); in "
        "PEFT's target_parameters form a router entry makes the expert normalizer refuse the adapter (above)",
        "shared experts are ordinary linear layers (DeepSeek-style shared experts get their own buffer)",
        ("test/registered/unit/lora/test_peft_paramwrapper_moe_unit.py (slot resolution, >2 entries refused, "
         "per-expert names untouched)", "sgl-project/sglang#27381, #25528"),
    ),
)


def moe_runtime_notes(summary: dict, fused_on_disk: bool | None = None) -> dict[str, list[str]]:
    """Per runtime, what it will do with the expert LoRA described by ``summary``
    (peft_experts.expert_summary); ``fused_on_disk``: the adapter is in the target_parameters form
    (None: unknown / not a PEFT folder)."""
    if not summary:
        return {}
    out: dict[str, list[str]] = {}
    routed = summary.get("routed")
    for f in FACTS:
        notes = []
        if routed:
            form = (f.fused_form if fused_on_disk else f.per_expert_form) if fused_on_disk is not None else f.routed
            notes.append(f"routed experts: {form}")
            if f.runtime == "llama.cpp":
                ranks = sorted({r for blk in routed.values() for g in blk.values() for r in g["ranks"]})
                if len(ranks) > 1:
                    notes.append(f"expert ranks differ ({ranks}): a GGUF *_exps adapter tensor has one rank, so "
                                 "experts are padded to the largest with zeros")
        if summary.get("routers"):
            notes.append(f"router: {f.router}")
        if summary.get("shared_expert"):
            notes.append(f"shared expert: {f.shared_expert}")
        notes.append(f"(read in {f.version})")
        out[f.runtime] = notes
    return out
