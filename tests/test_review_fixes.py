"""Regression tests for bugs found in review (each failed before its fix)."""
import json
import shutil

import pytest
import torch

from loratools import api, st
from loratools.errors import LoratoolsError, UnsupportedError
from loratools.formats.peft import read_peft, write_peft
from loratools.models import load_model
from loratools.ops.combine import combine
from loratools.ops.extract import extract
from loratools.ops.factor import RankRule
from loratools.ops.resize import resize

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
IDS = torch.randint(0, 380, (2, 16), generator=torch.Generator().manual_seed(5))


def logits(model_dir, adapters=()):
    return load_model(model_dir, adapters=adapters)(IDS)[0]


def peft_logits(model_dir, adapter_dir):
    m = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(m.eval(), str(adapter_dir))(IDS).logits


def _tied_tuned(fx, tmp_path):
    """qwen2 (tied embeddings) whose fine-tune moved the embedding (rank 2) and one q_proj (rank 1)."""
    base, tuned = fx / "models" / "qwen2", tmp_path / "qwen2-embed-tuned"
    shutil.copytree(base, tuned)
    sd = st.load_file(tuned / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    E = sd["model.embed_tokens.weight"]
    sd["model.embed_tokens.weight"] = (E + 0.2 * torch.randn(E.shape[0], 2, generator=g) @ torch.randn(2, E.shape[1], generator=g)).contiguous()
    # and one linear layer, so that the adapter has a LoRA module besides modules_to_save (PEFT
    # refuses an adapter whose target_modules match nothing)
    Q = sd["model.layers.0.self_attn.q_proj.weight"]
    sd["model.layers.0.self_attn.q_proj.weight"] = (Q + 0.1 * torch.randn(Q.shape[0], 1, generator=g) @ torch.randn(1, Q.shape[1], generator=g)).contiguous()
    st.save_file(sd, tuned / "model.safetensors")
    return base, tuned


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_extract_on_tied_model_carries_the_head(fx, tmp_path, mode):
    # The tuned model's lm_head *is* its embedding; an adapter that changes embed_tokens only
    # (PEFT unties them) used to leave the head at the base weight: logits off by ~20.
    base, tuned = _tied_tuned(fx, tmp_path)
    out = tmp_path / f"ex-{mode}"
    a, _ = extract(base, tuned, out, RankRule("rank", 2), exact=True, embeddings=mode)
    want = logits(tuned)
    assert (logits(base) - want).abs().max() > 1.0
    assert (logits(base, [read_peft(out)]) - want).abs().max() <= 1e-3
    assert (peft_logits(base, out) - want).abs().max() <= 1e-3


def test_extract_bias_deltas_with_embedding_lora_load_in_peft(fx, tmp_path):
    # qwen2 q/k/v have biases: selecting them plus embed_tokens used to write lora_bias=true with
    # an embedding LoRA, which PEFT refuses ("lora_bias=True is not supported for Embedding").
    base, out = fx / "models" / "qwen2", tmp_path / "ex"
    extract(base, fx / "models" / "qwen2-tuned", out, RankRule("rank", 4), include=r"(q|k|v)_proj|embed_tokens")
    assert (peft_logits(base, out) - logits(base, [read_peft(out)])).abs().max() <= 1e-5


def test_writer_refuses_lora_bias_with_embedding_lora(fx, tmp_path):
    # combine used to write such an adapter silently
    a = combine([read_peft(fx / "adapters" / "llama-patterns"), read_peft(fx / "adapters" / "qwen2-bias")])
    with pytest.raises(UnsupportedError, match="lora_bias together with embedding LoRA"):
        write_peft(a, tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_resize_to_nothing_is_an_error_not_an_unreadable_adapter(fx, tmp_path, run_cli):
    a, _ = resize(read_peft(fx / "adapters" / "llama-patterns"), RankRule("threshold", 1e9))
    with pytest.raises(LoratoolsError, match="nothing to write"):
        write_peft(a, tmp_path / "r")
    code, _, err = run_cli("resize", fx / "adapters" / "llama-patterns", "-o", tmp_path / "r2", "--threshold", "1e9")
    assert code != 0 and "nothing to write" in err and not (tmp_path / "r2").exists()


def test_extract_rule_that_keeps_nothing_says_so(fx):
    with pytest.raises(LoratoolsError, match="keeps no component") as e:
        extract(fx / "models" / "llama", fx / "models" / "llama-tuned", None, RankRule("threshold", 1e9))
    assert "identical" not in str(e.value)


def _adapter_copy(fx, tmp_path, name="llama-rslora"):
    d = tmp_path / name
    shutil.copytree(fx / "adapters" / name, d)
    return d


@pytest.mark.parametrize("field,value,needle", [
    ("init_lora_weights", "pissa", "residual base"),
    ("init_lora_weights", "pissa_niter_4", "residual base"),
    ("init_lora_weights", "olora", "residual base"),
    ("init_lora_weights", "corda", "residual base"),
    ("alora_invocation_tokens", [5, 6], "activated LoRA"),
    ("layer_replication", [[0, 2], [1, 2]], "layer stack"),
])
def test_peft_configs_whose_semantics_we_do_not_model_are_refused(fx, tmp_path, run_cli, field, value, needle):
    d = _adapter_copy(fx, tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg[field] = value
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match=needle):
        read_peft(d)
    code, _, err = run_cli("inspect", d)
    assert code == 4 and "internal error" not in err


def test_peft_pissa_adapter_mismatch_is_real(fx, tmp_path):
    # Why the refusal: PEFT rebuilds W - s·B₀A₀ at load, so W + s·BA is the wrong model.
    model_dir = fx / "models" / "llama"
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    pm = peft.get_peft_model(m, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="pissa"))
    pm.save_pretrained(str(tmp_path / "p"))
    with pytest.raises(UnsupportedError, match="residual base"):
        api.load_adapter(tmp_path / "p", base=model_dir)
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = True
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(cfg))
    a = api.load_adapter(tmp_path / "p", base=model_dir)
    m2 = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": "pissa"}))
    with torch.no_grad():
        ref = peft.PeftModel.from_pretrained(m2, str(tmp_path / "p"))(IDS).logits
    assert (logits(model_dir, [a]) - ref).abs().max() > 1e-2


def test_nan_in_adapter_is_refused(fx, tmp_path, run_cli):
    d = _adapter_copy(fx, tmp_path)
    sd = st.load_file(d / "adapter_model.safetensors")
    k = sorted(x for x in sd if x.endswith("lora_B.weight"))[0]
    sd[k][0, 0] = float("nan")
    st.save_file(sd, d / "adapter_model.safetensors")
    code, _, err = run_cli("merge", "--base", fx / "models" / "llama", "-a", d, "-o", tmp_path / "m")
    assert code == 2 and "NaN" in err and k in err and not (tmp_path / "m").exists()
    # kohya too
    sd = st.load_file(fx / "adapters" / "mistral-kohya.safetensors")
    k = sorted(x for x in sd if x.endswith("lora_up.weight"))[0]
    sd[k][0, 0] = float("inf")
    st.save_file(sd, tmp_path / "k.safetensors")
    code, _, err = run_cli("inspect", tmp_path / "k.safetensors")
    assert code == 2 and "NaN/Inf" in err


def test_kohya_alpha_without_a_value_is_a_clear_error(fx, tmp_path, run_cli):
    sd = st.load_file(fx / "adapters" / "mistral-kohya.safetensors")
    k = sorted(x for x in sd if x.endswith(".alpha"))[0]
    sd[k] = torch.zeros(0)
    st.save_file(sd, tmp_path / "k.safetensors")
    code, _, err = run_cli("inspect", tmp_path / "k.safetensors")
    assert code == 2 and "alpha must hold one number" in err and "internal error" not in err


def _mutated(fx, tmp_path, mutate, sub="a"):
    (tmp_path / sub).mkdir()
    d = _adapter_copy(fx, tmp_path / sub, "llama-patterns")
    sd = st.load_file(d / "adapter_model.safetensors")
    mutate(sd)
    st.save_file(sd, d / "adapter_model.safetensors")
    return d


Q = "base_model.model.model.layers.0.self_attn.q_proj."


def test_float8_adapter_tensor_is_not_an_internal_error(fx, tmp_path, run_cli):
    # the NaN/Inf check must not crash on float8 (torch has no isfinite kernel for it)
    d = _mutated(fx, tmp_path, lambda sd: sd.__setitem__(Q + "lora_A.weight", sd[Q + "lora_A.weight"].to(torch.float8_e4m3fn)))
    code, _, err = run_cli("inspect", d)
    assert code == 0 and "internal error" not in err
    bad = torch.full((4, 64), float("nan")).to(torch.float8_e4m3fn)
    d2 = _mutated(fx, tmp_path, lambda sd: sd.__setitem__(Q + "lora_A.weight", bad), sub="b")
    code, _, err = run_cli("inspect", d2)
    assert code == 2 and "NaN/Inf" in err


def test_integer_lora_tensor_is_refused(fx, tmp_path, run_cli):
    d = _mutated(fx, tmp_path, lambda sd: sd.__setitem__(Q + "lora_A.weight", torch.zeros(4, 64, dtype=torch.int32)))
    code, _, err = run_cli("inspect", d)
    assert code == 2 and "floating point" in err


def test_magnitude_without_use_dora_is_refused(fx, tmp_path, run_cli):
    # PEFT ignores the magnitude when use_dora is false; we used to apply DoRA anyway
    d = _mutated(fx, tmp_path, lambda sd: sd.__setitem__(Q + "lora_magnitude_vector", torch.ones(64)))
    code, _, err = run_cli("forward", fx / "models" / "llama", "-a", d, "--ids", "1,2")
    assert code == 2 and "use_dora false" in err


def test_modules_to_save_only_adapter_is_refused_not_written_unloadable(fx, tmp_path, run_cli):
    # target_modules [] makes PEFT raise NoMatchingPeftModuleError on load
    code, _, err = run_cli("extract", "--base", fx / "models" / "llama", "--tuned", fx / "models" / "llama-tuned",
                           "-o", tmp_path / "e", "--include", "embed_tokens|lm_head", "--embeddings", "full")
    assert code == 4 and "only modules_to_save" in err and not (tmp_path / "e").exists()
