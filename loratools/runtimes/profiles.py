"""What each serving runtime accepts in a LoRA adapter: one profile per runtime, each read in the
runtime's own source at the version named (vLLM and SGLang cannot run here: their rows are
readings, not measurements; llama.cpp's and ONNX Runtime's are the builds the test suite runs).

Used by ``convert --for RUNTIME`` (loratools.ops.serve.convert_for) to write an adapter the runtime
loads and computes as the original did, and by ``inspect --for RUNTIME`` (serve.lint) to say what
the runtime would refuse or read differently.

Fields:

- ``output``: what convert writes: a PEFT folder ("peft"), a llama.cpp adapter GGUF ("gguf") or
  ONNX Runtime's adapter file ("onnx_adapter").
- ``default_rank`` / ``ranks``: the rank cap convert uses when ``--max-rank`` is not given, and the
  caps the runtime accepts (None: any positive rank, no cap by default).
- ``dora``, ``modules_to_save``, ``lora_bias``: whether the runtime applies them (False: convert
  turns DoRA into plain LoRA and modules_to_save into LoRA of their delta, and refuses lora_bias).
- ``lora_on``: the embedding / head modules it takes LoRA on (``embed_tokens``, ``lm_head``).
- ``scale``: how it computes each module's scale: "config" (one ``lora_alpha / r`` from the
  config's global r and alpha for every module, rank read from the tensors), "per_file_alpha"
  (one alpha per file over each tensor's own rank), "folded" (the file holds s·B, no scale).
- ``reads_rslora`` / ``reads_patterns``: whether use_rslora and rank_pattern / alpha_pattern
  change the scale it applies.
- ``needs_base``: the output format needs the base model (GGUF: the architecture's tensor names).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import LoratoolsError


@dataclass(frozen=True)
class Profile:
    runtime: str
    version: str
    output: str
    default_rank: int | None
    ranks: tuple[int, ...] | None
    dora: bool
    modules_to_save: bool
    lora_bias: bool
    lora_on: frozenset
    scale: str
    reads_rslora: bool
    reads_patterns: bool
    needs_base: bool
    sources: tuple
    notes: str = ""

    def check_cap(self, cap: int) -> None:
        """Raise unless ``cap`` is a rank cap this runtime accepts."""
        if cap < 1:
            raise LoratoolsError(f"--max-rank must be >= 1, got {cap}")
        if self.ranks is not None and cap not in self.ranks:
            raise LoratoolsError(f"--max-rank {cap} is not a rank {self.runtime} accepts: its max LoRA rank must be one of "
                                 f"{', '.join(map(str, self.ranks))} ({self.version})")


PROFILES: dict[str, Profile] = {
    "vllm": Profile(
        runtime="vLLM",
        version="vLLM 0.11 (vllm/config/lora.py at commit 01230b4; vllm/lora/peft_helper.py validate_legal as at commit e745baf)",
        output="peft",
        default_rank=16,  # LoRAConfig.max_lora_rank default
        ranks=(1, 8, 16, 32, 64, 128, 256, 320, 512),  # MaxLoRARanks
        dora=False,            # "vLLM does not yet support DoRA."
        modules_to_save=False,  # "vLLM only supports modules_to_save being None."
        lora_bias=False,       # no bias_enabled left in this LoRAConfig (earlier versions needed it for adapter biases)
        lora_on=frozenset(),   # embedding / lm_head LoRA went with the extra-vocabulary support (deprecated for removal in 0.12)
        scale="config",        # vllm_lora_scaling_factor = lora_alpha / r (or / sqrt(r)), one for all modules
        reads_rslora=True,
        reads_patterns=False,  # PEFTHelper has no rank_pattern / alpha_pattern fields
        needs_base=False,
        sources=("vllm/config/lora.py (MaxLoRARanks, max_lora_rank = 16)",
                 "vllm/lora/peft_helper.py (_validate_features: modules_to_save, DoRA; validate_legal: config r > "
                 "max_lora_rank; vllm_lora_scaling_factor)"),
        notes="start the server with --max-lora-rank at least the adapter's r",
    ),
    "sglang": Profile(
        runtime="SGLang",
        version="SGLang main (python/sglang/srt/lora/lora_config.py at commit 0ceb81f, lora.py, lora_manager.py)",
        output="peft",
        default_rank=None,     # --max-lora-rank is inferred from the adapters when not given
        ranks=None,
        dora=False,            # its LoRA layers compute B·A only; no magnitude vector is applied
        modules_to_save=False,  # LoRAAdapter loads lora_A / lora_B (and embedding) tensors only
        lora_bias=False,
        lora_on=frozenset({"embed_tokens", "lm_head"}),  # embedding_layers, lm_head LoRA (backend/lmhead_mixing.py)
        scale="config",        # LoRAAdapter.scaling = lora_alpha / r, use_rslora not read
        reads_rslora=False,
        reads_patterns=False,  # rank_pattern / alpha_pattern are read for memory admission only, not for the scale
        needs_base=False,
        sources=("python/sglang/srt/lora/lora_config.py (rank_overrides / alpha_overrides for admission)",
                 "python/sglang/srt/lora/lora.py (self.scaling = lora_alpha / r; embedding_layers)",
                 "python/sglang/srt/lora/lora_manager.py (max LoRA rank from the adapters' r)"),
        notes="embed_tokens / lm_head LoRA are read by recent versions only (older releases stack q/k/v and "
              "gate/up LoRA of the blocks and nothing else)",
    ),
    "llama.cpp": Profile(
        runtime="llama.cpp",
        version="llama.cpp commit 0c1e570 (2026-10-01) as vendored in llama-cpp-python 0.3.36",
        output="gguf",
        default_rank=None,
        ranks=None,
        dora=False,            # no magnitude vector in the adapter GGUF
        modules_to_save=False,  # an adapter GGUF holds lora_a / lora_b pairs only
        lora_bias=False,
        lora_on=frozenset({"embed_tokens", "lm_head"}),  # token_embd (inp_embd) and output (build_lora_mm), untied bases
        scale="per_file_alpha",  # general.adapter.lora.alpha / rank of each tensor
        reads_rslora=False,
        reads_patterns=False,
        needs_base=True,
        sources=("src/llama-adapter.cpp (one alpha per file)", "src/llama-graph.cpp (build_lora_mm, build_inp_embd)"),
    ),
    "onnxruntime": Profile(
        runtime="ONNX Runtime",
        version="onnxruntime's AdapterFormat (version 1), as installed (onnxruntime 1.2x) with a loratools --lora-slots export",
        output="onnx_adapter",
        default_rank=None,
        ranks=None,
        dora=False,
        modules_to_save=False,
        lora_bias=False,
        lora_on=frozenset(),   # slots are on the decoder blocks' linear layers only
        scale="folded",        # the file holds A and s·B; the slot model adds x·A·(s·B)
        reads_rslora=False,
        reads_patterns=False,
        needs_base=False,
        sources=("loratools/formats/onnx_model.py (slot names, export_onnx_adapter)",),
        notes="apply it to a `loratools export onnx --lora-slots` model",
    ),
}


def profile(name: str) -> Profile:
    key = name.lower().replace("_", "").replace("-", "")
    key = {"llamacpp": "llama.cpp", "ort": "onnxruntime"}.get(key, key)
    if key not in PROFILES:
        raise LoratoolsError(f"unknown runtime {name!r} (one of {', '.join(PROFILES)})")
    return PROFILES[key]
