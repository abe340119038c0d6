"""PEFT is the peer: adapters loratools writes load in PEFT with the same logits, and adapters
PEFT saves load in loratools with the same logits (fp32, max |Δ| ≤ 1e-5)."""
import pytest
import torch

from loratools import api
from loratools.formats.peft import read_peft, write_peft
from loratools.models import load_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IDS = torch.randint(0, 380, (2, 20), generator=torch.Generator().manual_seed(0))
CASES = [("llama", "llama-patterns"), ("llama", "llama-rslora"), ("qwen2", "qwen2-bias"), ("qwen3", "qwen3-dora")]


def hf_model(d):
    m = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, attn_implementation="eager")
    return m.eval()


def peft_logits(model_dir, adapter_dir):
    pm = peft.PeftModel.from_pretrained(hf_model(model_dir), str(adapter_dir))
    with torch.no_grad():
        return pm(IDS).logits


@pytest.mark.parametrize("arch,adapter", CASES)
def test_our_adapter_loads_in_peft(fx, tmp_path, arch, adapter):
    model_dir = fx / "models" / arch
    a = read_peft(fx / "adapters" / adapter)
    out = write_peft(a, tmp_path / "out", num_layers=2)  # a re-write, through our writer again
    ours, _ = load_model(model_dir, adapters=[a])(IDS)
    base, _ = load_model(model_dir)(IDS)
    ref = peft_logits(model_dir, out)
    assert (ours - base).abs().max() > 0.1  # the adapter matters
    assert (ours - ref).abs().max().item() <= 1e-5


def _peft_saved(model_dir, out, **cfg):
    torch.manual_seed(0)
    pm = peft.get_peft_model(hf_model(model_dir), peft.LoraConfig(init_lora_weights=False, **cfg))
    pm.save_pretrained(str(out))
    return out


PEFT_CONFIGS = {
    "patterns+embedding": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                               rank_pattern={"model.layers.0.self_attn.q_proj": 2, "down_proj": 4},
                               alpha_pattern={"v_proj": 5}),
    "rslora": dict(r=16, lora_alpha=8, use_rslora=True, target_modules="all-linear"),
    "modules_to_save": dict(r=4, lora_alpha=8, target_modules=["o_proj"], modules_to_save=["lm_head"]),
    "dora": dict(r=4, lora_alpha=8, target_modules=["k_proj", "up_proj"], use_dora=True),
}


@pytest.mark.parametrize("name", sorted(PEFT_CONFIGS))
def test_peft_saved_adapter_loads_in_loratools(fx, tmp_path, name):
    model_dir = fx / "models" / "llama"
    out = _peft_saved(model_dir, tmp_path / name, **PEFT_CONFIGS[name])
    ref = peft_logits(model_dir, out)
    a = api.load_adapter(out, base=model_dir)
    ours, _ = load_model(model_dir, adapters=[a])(IDS)
    base, _ = load_model(model_dir)(IDS)
    assert (ref - base).abs().max() > 1e-3
    assert (ours - ref).abs().max().item() <= 1e-5
    # and back out through our writer: PEFT reads what we write with the same result
    again = write_peft(a, tmp_path / f"{name}-rewritten", num_layers=2)
    assert (peft_logits(model_dir, again) - ref).abs().max().item() <= 1e-5


def test_rslora_scale_is_alpha_over_sqrt_r(fx):
    a = read_peft(fx / "adapters" / "llama-rslora")
    assert all(abs(m.scale - 8 / 4.0) < 1e-12 for m in a.modules.values())


def test_pattern_scales_follow_peft_rule(fx):
    a = read_peft(fx / "adapters" / "llama-patterns")
    m = a.modules
    assert m["model.layers.0.self_attn.q_proj"].rank == 4 and m["model.layers.1.self_attn.q_proj"].rank == 8
    assert m["model.layers.0.mlp.down_proj"].scale == 16 / 2
    assert m["model.layers.0.self_attn.v_proj"].scale == 4 / 8
    assert m["model.layers.1.mlp.up_proj"].scale == 3 / 8 and m["model.layers.0.mlp.up_proj"].scale == 2.0
    assert m["model.embed_tokens"].kind == "embedding"


def test_lora_bias_on_a_layer_without_bias_runs_but_does_not_merge(fx, tmp_path):
    """PEFT runs lora_bias on a bias-free layer (with a warning) and cannot merge it; neither can we
    where the family has no switch that adds the bias (Mistral: no attention_bias field)."""
    from loratools.errors import IncompatibleError
    from loratools.ops.merge import merge
    model_dir = fx / "models" / "mistral"
    out = _peft_saved(model_dir, tmp_path / "lb", r=4, lora_alpha=8, target_modules=["o_proj"], lora_bias=True)
    ref = peft_logits(model_dir, out)
    a = api.load_adapter(out, base=model_dir)
    assert all(m.bias is not None for m in a.modules.values())
    ours, _ = load_model(model_dir, adapters=[a])(IDS)
    assert (ours - ref).abs().max().item() <= 1e-5
    with pytest.raises(IncompatibleError, match="cannot be merged.*no config switch"):
        merge(model_dir, [a], tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("targets", [["o_proj"], ["q_proj", "down_proj"]])
def test_lora_bias_merge_turns_the_family_bias_switch_on(fx, tmp_path, targets):
    """Llama's attention_bias / mlp_bias switch: merge writes every bias the switch governs (zeros
    where the adapter has none) and sets it; transformers' reload equals the unmerged adapter."""
    import json

    from loratools import st
    from loratools.ops.merge import merge
    model_dir = fx / "models" / "llama"
    out = _peft_saved(model_dir, tmp_path / "lb", r=4, lora_alpha=8, target_modules=targets, lora_bias=True)
    a = api.load_adapter(out, base=model_dir)
    rep = merge(model_dir, [a], tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    mlp = "down_proj" in targets
    assert cfg["attention_bias"] is (not mlp or "q_proj" in targets) and cfg["mlp_bias"] is mlp
    sd = st.load_file(tmp_path / "m" / "model.safetensors")
    leaves = (["q_proj", "k_proj", "v_proj", "o_proj"] if cfg["attention_bias"] else []) + \
             (["gate_proj", "up_proj", "down_proj"] if mlp else [])
    biases = sorted(k for k in sd if k.endswith(".bias"))
    assert len(biases) == 2 * len(leaves) and rep["biases_added"]["config"]
    for k in biases:
        mod = k[:-len(".bias")]
        if mod in a.modules:
            assert torch.equal(sd[k], (a.modules[mod].bias.float() * a.modules[mod].scale).to(sd[k].dtype))
        else:
            assert not sd[k].any()
    ours, _ = load_model(model_dir, adapters=[a])(IDS)
    with torch.no_grad():
        merged = hf_model(tmp_path / "m")(IDS).logits
    assert (ours - merged).abs().max().item() <= 1e-5
    assert (ours - load_model(model_dir)(IDS)[0]).abs().max() > 1e-3
