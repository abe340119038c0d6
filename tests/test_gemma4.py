"""Gemma 4 (gemma4_text) beyond the family matrix of test_families.py: what the fixtures resolve to
(KV sharing, per-layer head dims, proportional rope, k_eq_v, double-wide MLPs), the published config
form (global_head_dim) against transformers, LoRA on the per-layer input modules both ways, and the
configs refused in one line (MoE blocks, bidirectional attention)."""

import pytest
import torch

from loratools import api
from loratools.arch import load_config
from loratools.errors import IncompatibleError, InputError, UnsupportedError
from loratools.models import load_model
from loratools.ops.merge import merge
from tests.test_families import IDS, TOL, edited_copy, hf_logits, hf_model, peft_logits

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _variant(families, tmp_path, name, edit, tag="v"):
    return edited_copy(families, tmp_path, name, edit, tag)


def test_fixture_features_resolve(families):
    cfg = load_config(families / "gemma4_text")
    lay = cfg.layers
    # layers 3 (sliding) and 4 (full) reuse the K/V of the last earlier layer of their type
    assert [l.kv_source for l in lay] == [None, None, None, 1, 2]
    assert [l.head_dim for l in lay] == [16, 16, 32, 16, 32] and cfg.per_layer_input_size == 32
    assert [l.intermediate_size for l in lay] == [0, 0, 0, 256, 256]  # double-wide on the shared layers
    assert [l.window for l in lay] == [6, 6, None, 6, None]
    full = lay[2].rope
    assert full.rope_type == "proportional" and full.rotary_dim == 32
    from loratools.arch import rope_inv_freq

    inv = rope_inv_freq(cfg, full)  # a quarter of the 16 pairs rotate, θ^(-2j/32)
    assert inv.shape == (16,) and (inv[4:] == 0).all() and torch.allclose(inv[:4], 1e6 ** (-torch.arange(0, 8, 2) / 32))
    kv = load_config(families / "gemma4_kv")
    assert [(l.head_dim, l.kv_heads, l.v_from_k) for l in kv.layers] == [
        (16, 2, False), (32, 1, True), (16, 2, False), (32, 1, True)]
    m = load_model(families / "gemma4_kv")
    assert not hasattr(m.model.layers[1].self_attn, "v_proj") and hasattr(m.model.layers[0].self_attn, "v_proj")


def test_shared_layers_keep_no_cache_and_features_act(families):
    m = load_model(families / "gemma4_text")
    logits, presents = m(IDS)
    assert presents[3] is None and presents[4] is None and all(p is not None for p in presents[:3])
    att = m.model.layers[3].self_attn
    assert not hasattr(att, "k_proj") and not hasattr(att, "k_norm")
    raw = m.lm_head(m.hidden(IDS)[0])
    assert (raw.abs() > m.cfg.final_softcap).any()  # soft-capping acts
    # the per-layer inputs and the layer scalars change the result
    with torch.no_grad():
        for name in ("model.per_layer_model_projection.weight", "model.layers.0.layer_scalar"):
            p = m.get_parameter(name)
            keep = p.clone()
            p.mul_(0.5)
            assert (m(IDS)[0] - logits).abs().max() > 1e-3, name
            p.copy_(keep)


def test_published_config_form(families, tmp_path):
    """google/gemma-4 configs carry global_head_dim / num_global_key_value_heads instead of the
    per_layer_config transformers 5.24 writes: the same model, in transformers and here; without
    either, full layers get transformers' default global_head_dim 512 (and this checkpoint no longer fits)."""
    src = families / "gemma4_kv"

    def published(c):
        c.pop("per_layer_config")
        c.update(global_head_dim=32, num_global_key_value_heads=1)

    d = _variant(families, tmp_path, "gemma4_kv", published)
    ref, _ = load_model(src)(IDS)
    assert torch.equal(load_model(d)(IDS)[0], ref)
    assert (hf_logits(d) - ref).abs().max().item() <= TOL
    bare = _variant(families, tmp_path, "gemma4_kv", lambda c: c.pop("per_layer_config"), "bare")
    assert load_config(bare).layers[1].head_dim == 512
    with pytest.raises(IncompatibleError) as e:
        load_model(bare)
    assert "config.json" in str(e.value) and "\n" not in str(e.value)


def test_lora_on_per_layer_input_modules(families, tmp_path):
    """PEFT on the per-layer input path (its embedding table included): ours == PEFT, loratools'
    copy loads in PEFT, and the merge reloaded by transformers equals PeftModel."""
    d = families / "gemma4_text"
    torch.manual_seed(3)
    conf = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=[
        "per_layer_input_gate", "per_layer_projection", "per_layer_model_projection", "embed_tokens_per_layer",
        "q_proj"])
    pm = peft.get_peft_model(hf_model(d), conf)
    with torch.no_grad():  # PEFT starts embedding LoRA with a zero A: make it act
        for n, p in pm.named_parameters():
            if "lora_embedding_A" in n:
                p.normal_(0, 0.5)
    pm.save_pretrained(str(tmp_path / "peft"))
    ref = peft_logits(d, tmp_path / "peft")
    a = api.load_adapter(tmp_path / "peft", base=d)
    assert any("embed_tokens_per_layer" in n for n in a.modules)
    ours, _ = load_model(d, adapters=[a])(IDS)
    assert (ref - load_model(d)(IDS)[0]).abs().max() > 1e-3
    assert (ours - ref).abs().max().item() <= TOL
    again = api.save_adapter(a, tmp_path / "ours", num_layers=5)
    assert (peft_logits(d, again) - ref).abs().max().item() <= TOL
    merge(d, [a], tmp_path / "merged")
    assert (hf_logits(tmp_path / "merged") - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("edit,word,error", [
    # unsupported features
    (lambda c: c.update(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32),
     "mixture-of-experts", UnsupportedError),
    (lambda c: c.update(use_bidirectional_attention="all"), "bidirectional", UnsupportedError),
    # contradicting values
    (lambda c: c.update(num_kv_shared_layers=5), "num_kv_shared_layers", InputError),
    (lambda c: c.update(num_kv_shared_layers=3), "full_attention", InputError),  # no own full layer before the shared ones
    (lambda c: c.update(per_layer_config={"9": {"head_dim": 32}}), "per_layer_config", InputError),
])
def test_bad_configs_refused_in_one_line(families, tmp_path, edit, word, error):
    d = _variant(families, tmp_path, "gemma4_text", edit)
    with pytest.raises(error) as e:
        load_model(d)
    msg = str(e.value)
    assert word in msg and "config.json" in msg and "\n" not in msg


def test_gguf_refuses_a_kv_sharing_layout_llama_cpp_maps_differently(families, tmp_path, run_cli):
    """llama.cpp hands KV-shared layers the cache of the last two own layers ([sliding, full]);
    own layers ending [full, sliding] reuse other layers in transformers: refused, nothing written."""
    def edit(c):
        c["layer_types"] = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
                            "full_attention"]
        c["per_layer_config"] = {"1": c["per_layer_config"].pop("2"), **c["per_layer_config"]}
    d = _variant(families, tmp_path, "gemma4_text", edit)
    assert [l.kv_source for l in load_config(d).layers] == [None, None, None, 2, 1]
    out = tmp_path / "g.gguf"
    code, _, err = run_cli("export", "gguf", d, "-o", out, "--outtype", "f32")
    assert code == 4 and "KV-shared" in err and "gemma4" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
