"""The CLI is a thin layer: these check its reports, JSON output and exit codes."""
import json
import subprocess
import sys

import torch

from loratools import __version__, api


def test_version(run_cli):
    code, out, _ = run_cli("--version")
    assert code == 0 and __version__ in out


def test_console_script_runs_as_module():
    r = subprocess.run([sys.executable, "-m", "loratools", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and __version__ in r.stdout


def test_inspect_adapter_json(fx, run_cli):
    code, out, err = run_cli("inspect", fx / "adapters" / "llama-patterns", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["type"] == "adapter" and d["format"] == "peft" and d["num_modules"] == 15
    assert d["ranks"] == [2, 4, 8]
    q0 = d["modules"]["model.layers.0.self_attn.q_proj"]
    assert (q0["rank"], q0["scale"], q0["in"], q0["out"]) == (4, 4.0, 64, 64)
    assert d["modules"]["model.embed_tokens"]["kind"] == "embedding"
    assert any("alpha_pattern" in w for w in d["warnings"]["vllm"])
    assert d["parameters"] == sum(m["params"] for m in d["modules"].values())


def test_inspect_warnings_for_runtimes(fx, run_cli):
    code, out, _ = run_cli("inspect", fx / "adapters" / "qwen3-dora", "--json")
    w = json.loads(out)["warnings"]
    assert code == 0 and any("DoRA" in x for x in w["vllm"]) and any("DoRA" in x for x in w["llama.cpp"])
    code, out, _ = run_cli("inspect", fx / "adapters" / "llama-rslora", "--json")
    w = json.loads(out)["warnings"]
    assert any("--max-lora-rank" in x for x in w["vllm"]) is False  # rank 16 is within the default cap
    assert any("rsLoRA" in x for x in w["llama.cpp"])
    code, out, _ = run_cli("inspect", fx / "adapters" / "qwen2-bias", "--json")
    assert any("lora_bias" in x for x in json.loads(out)["warnings"]["vllm"])


def test_inspect_checkpoint(fx, run_cli):
    code, out, err = run_cli("inspect", fx / "models" / "llama-bf16-sharded", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["architecture"] == "llama" and d["layers"] == 2 and d["kv_heads"] == 2
    assert list(d["dtypes"]) == ["BF16"] and len(d["shards"]) == 7
    assert d["rope_scaling"]["rope_type"] == "llama3"
    code, out, _ = run_cli("inspect", fx / "models" / "qwen2")
    assert code == 0 and "qwen2 checkpoint" in out and "tied embeddings True" in out


def test_forward_with_adapter(fx, run_cli):
    code, out, err = run_cli("forward", fx / "models" / "llama", "-a", fx / "adapters" / "llama-rslora",
                             "--prompt", "The quick brown fox", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["max_abs_logit_change"] > 0.1 and len(d["base_top"]) == 5
    ids = d["tokens"]
    logits = api.forward(fx / "models" / "llama", ids, [fx / "adapters" / "llama-rslora"])
    assert abs(d["adapted_top"][0]["logit"] - float(logits[-1].max())) < 1e-5


def test_forward_weights_scale_the_adapter(fx):
    m, a = fx / "models" / "llama", fx / "adapters" / "llama-rslora"
    ids = [5, 6, 7, 8]
    base = api.forward(m, ids)
    full = api.forward(m, ids, [a])
    zero = api.forward(m, ids, [a], weights=[0.0])
    assert torch.allclose(zero, base, atol=1e-6) and (full - base).abs().max() > 0.1


def test_usage_error_exit_code(run_cli, fx):
    code, _, err = run_cli("forward", fx / "models" / "llama")
    assert code == 2 and "exactly one of --prompt or --ids" in err


def test_lora_slots_without_a_value_does_not_swallow_the_next_option(fx, tmp_path, run_cli):
    """`--lora-slots -o DIR` used to take "-o" as the slot list, then ask for -o; alone, it means all-linear."""
    import onnx

    code, out, err = run_cli("export", "onnx", fx / "models" / "llama", "--lora-slots", "-o", tmp_path / "s",
                             "--no-cache", "--json")
    assert code == 0, err
    assert len(json.loads(out)["lora_slots"]) == 2 * 7
    names = {i.name for i in onnx.load(str(tmp_path / "s" / "model.onnx"), load_external_data=False).graph.input}
    slots = {n.rsplit(".", 1)[0] for n in names if n.endswith((".lora_A", ".lora_B"))}
    assert len(slots) == 2 * 7  # all-linear: q, k, v, o, gate, up, down in each of the 2 layers
