"""The reference decoder on the mixture-of-experts families against transformers and PEFT, on
fixtures transformers builds (fixtures.families.MOE_FIXTURES): full forward on both expert paths
(per-expert gather, and every expert weighted densely as tracing runs it), KV cache, padding,
expert / router / shared-expert LoRA applied unmerged against PeftModel with target_parameters."""
import pytest
import torch

from fixtures.families import MOE_FIXTURES
from loratools.adapter import Adapter, LoraModule
from loratools.arch import load_config
from loratools.models import load_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

NAMES = list(MOE_FIXTURES)
TOL = 1e-5
IDS = torch.randint(0, 380, (2, 24), generator=torch.Generator().manual_seed(0))  # longer than every window


def hf_model(d):
    return transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, attn_implementation="eager").eval()


def hf_logits(d, ids=IDS, **kw):
    with torch.no_grad():
        return hf_model(d)(ids, **kw).logits


@pytest.mark.parametrize("name", NAMES)
def test_dense_expert_path_matches_transformers(moe_families, name):
    """The traced form (plain-op attention, every expert on every token weighted by the scattered
    routing weights) against transformers; the per-expert gather path, the KV cache and padding are
    in tests/test_families.py's reference-logit matrix."""
    d = moe_families / name
    model = load_model(d)
    model.set_explicit_attention(True)
    dense, _ = model(IDS)
    assert (dense - hf_logits(d)).abs().max().item() <= TOL


def test_moe_features_act(moe_families):
    """The fixtures exercise what they claim: every expert of every MoE layer is routed to,
    Qwen2-MoE's layer 1 is dense and has a shared expert elsewhere, gpt-oss's SwiGLU clamp cuts,
    its sinks and windows change the result, YaRN blends and scales."""
    from loratools.models import decoder

    hits, clamped = {}, []
    orig_route, orig_clamp = decoder.route, decoder.clamped_swiglu

    def spy_route(logits, k, scoring, renorm):
        w, idx = orig_route(logits, k, scoring, renorm)
        hits.setdefault(name, []).append((set(idx.flatten().tolist()), logits.shape[-1]))
        return w, idx

    def spy_clamp(gate, up, limit, alpha):
        clamped.append(float(((gate > limit) | (up.abs() > limit)).float().mean()))
        return orig_clamp(gate, up, limit, alpha)

    decoder.route, decoder.clamped_swiglu = spy_route, spy_clamp
    try:
        for name in NAMES:
            load_model(moe_families / name)(IDS)
    finally:
        decoder.route, decoder.clamped_swiglu = orig_route, orig_clamp
    for name in NAMES:
        assert all(len(seen) == e for seen, e in hits[name]), name  # every expert used
    assert len(hits["qwen2_moe"]) == 2  # layers 0 and 2 route; layer 1 is dense (mlp_only_layers)
    q2 = load_model(moe_families / "qwen2_moe")
    assert hasattr(q2.model.layers[0].mlp, "shared_expert") and not hasattr(q2.model.layers[1].mlp, "experts")
    # the clamp (limit 1.0) cuts a real share of gate / up values in every gpt-oss expert call
    assert clamped and min(clamped) > 0.05, clamped
    cfg = load_config(moe_families / "gpt_oss")
    assert cfg.layer_windows == (6, None, 6, None)
    rope = cfg.layer_ropes[0]
    assert rope.rope_type == "yarn" and rope.attention_factor > 1.2
    # sinks take probability mass: zeroing them changes the logits
    m = load_model(moe_families / "gpt_oss")
    ref, _ = m(IDS)
    for layer in m.model.layers:
        layer.self_attn.sinks.data.fill_(-1e4)
    assert (m(IDS)[0] - ref).abs().max() > 1e-2


# -- LoRA on experts, router, shared expert: unmerged against PeftModel ---------------------------
def _experts_in_out(name) -> bool:
    return MOE_FIXTURES[name].experts_in_out  # gpt-oss: fused (E, in, out), gate / up interleaved


def peft_moe(d, name, seed=0):
    """PeftModel with LoRA on the fused expert parameters (target_parameters), the router, the
    attention and (Qwen2-MoE) the shared expert and its gate; random non-zero B."""
    torch.manual_seed(seed)
    router = "router" if name == "gpt_oss" else "gate"
    mods = ["q_proj", "v_proj"]
    if name == "qwen2_moe":
        mods += ["shared_expert.gate_proj", "shared_expert.down_proj", "shared_expert_gate"]
    # the routers are no nn.Linear (transformers' TopKRouter): PEFT reaches them as parameters
    conf = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=mods,
                           target_parameters=[f"mlp.{router}.weight", "mlp.experts.gate_up_proj",
                                              "mlp.experts.down_proj"])
    return peft.get_peft_model(hf_model(d), conf).eval()


def canonical_adapter(pm, cfg, name) -> Adapter:
    """loratools' canonical Adapter from a PeftModel: ordinary modules by their names, and the
    fused expert LoRA as per-expert gate / up / down modules, each the exact ΔW PEFT computes
    (get_delta_weight) written as A = I, B = ΔW."""
    from peft.tuners.lora.layer import Linear as PLinear, ParamWrapper

    mods = {}
    inv = _experts_in_out(name)
    block = cfg.moe.block
    gate_leaf, up_leaf, down_leaf = cfg.moe.leaves
    for qual, m in pm.base_model.model.named_modules():
        if isinstance(m, ParamWrapper):
            delta = m.get_delta_weight("default").detach().float()  # the parameter's own layout
            pname = m.parameter_name
            if delta.dim() == 2:  # a router: PEFT wraps its weight parameter (the router is no nn.Linear)
                own = qual.replace(".mlp.", f".{block}.")
                mods[own] = LoraModule(torch.eye(delta.shape[1]), delta.clone(), 1.0)
                continue
            prefix = qual.replace(".base_layer", "").replace(".mlp.experts", f".{block}.experts")
            for e in range(delta.shape[0]):
                de = delta[e].T if inv else delta[e]  # (out, in)
                if pname == "down_proj":
                    parts = {down_leaf: de}
                elif inv:
                    parts = {gate_leaf: de[0::2], up_leaf: de[1::2]}
                else:
                    half = de.shape[0] // 2
                    parts = {gate_leaf: de[:half], up_leaf: de[half:]}
                for leaf, dw in parts.items():
                    mods[f"{prefix}.{e}.{leaf}"] = LoraModule(torch.eye(dw.shape[1]), dw.clone(), 1.0)
        elif isinstance(m, PLinear):
            A, B = m.lora_A["default"].weight.detach().float(), m.lora_B["default"].weight.detach().float()
            own = qual.replace(".mlp.", f".{block}.") if ".mlp.gate" in qual or ".mlp.router" in qual else qual
            mods[own] = LoraModule(A.clone(), B.clone(), float(m.scaling["default"]))
    return Adapter(modules=mods, config={"r": 4, "lora_alpha": 8})


@pytest.mark.parametrize("name", NAMES)
def test_expert_lora_matches_peft(moe_families, name):
    d = moe_families / name
    cfg = load_config(d)
    pm = peft_moe(d, name)
    with torch.no_grad():
        ref = pm(IDS).logits
    a = canonical_adapter(pm, cfg, name)
    experts = [n for n in a.modules if ".experts." in n]
    assert len(experts) == 3 * cfg.moe.experts * sum(cfg.moe.layers)
    base, _ = load_model(d)(IDS)
    assert (ref - base).abs().max() > 1e-2
    model = load_model(d, adapters=[a])
    ours, _ = model(IDS)
    assert (ours - ref).abs().max().item() <= TOL
    model.set_explicit_attention(True)
    dense, _ = model(IDS)
    assert (dense - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("name", NAMES)
def test_saved_peft_adapter_runs_as_peft(moe_families, tmp_path, name):
    """The same adapter saved by PEFT (target_parameters form), read by api.load_adapter, applied
    unmerged: equal to PeftModel.from_pretrained, on the gather and the dense expert paths."""
    from loratools import api

    d = moe_families / name
    pm = peft_moe(d, name, seed=1)
    pm.save_pretrained(str(tmp_path / "peft"))
    del pm
    with torch.no_grad():
        ref = peft.PeftModel.from_pretrained(hf_model(d), str(tmp_path / "peft")).eval()(IDS).logits
    a = api.load_adapter(tmp_path / "peft", base=d)
    cfg = load_config(d)
    assert sum(".experts." in n for n in a.modules) == 3 * cfg.moe.experts * sum(cfg.moe.layers)
    model = load_model(d, adapters=[a])
    ours, _ = model(IDS)
    assert (ours - ref).abs().max().item() <= TOL
    model.set_explicit_attention(True)
    assert (model(IDS)[0] - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])  # per-expert block_sparse_moe on disk; fused, interleaved
def test_validate_merged_checkpoint(moe_families, tmp_path, name):
    """validate: base + a PEFT expert adapter (the reference, unmerged) against the merged
    checkpoint (loratools' torch model and transformers both load it) and PeftModel."""
    from loratools import api
    from loratools.validate import validate

    d = moe_families / name
    pm = peft_moe(d, name, seed=2)
    pm.save_pretrained(str(tmp_path / "peft"))
    with torch.no_grad():
        want = pm(IDS).logits
    del pm
    api.merge(d, [tmp_path / "peft"], tmp_path / "merged")
    assert (hf_logits(tmp_path / "merged") - want).abs().max().item() <= TOL
    rep = validate(d, [tmp_path / "peft"], [str(tmp_path / "merged")], tokens=6, device="cpu")
    assert rep["passed"], [(x["failed_checks"], x["metrics"]) for x in rep["candidates"]]
    assert rep["candidates"][0]["metrics"]["max_abs"] <= TOL
    assert rep["independent_reference"]["agrees"] and rep["independent_reference"]["max_abs_vs_reference"] <= TOL


def test_mxfp4_experts_match_transformers(moe_families, tmp_path):
    """gpt-oss with MXFP4 experts (blocks / scales as published): the reference decoder
    dequantizes as transformers does and equals it (transformers dequantizing on the CPU)."""
    from fixtures.mxfp4 import make_mxfp4

    q = make_mxfp4(moe_families / "gpt_oss", tmp_path / "mxfp4")
    with torch.no_grad():
        ref = transformers.AutoModelForCausalLM.from_pretrained(
            str(q), dtype=torch.float32, attn_implementation="eager",
            quantization_config=transformers.Mxfp4Config(dequantize=True)).eval()(IDS).logits
    ours, _ = load_model(q)(IDS)
    assert (ours - ref).abs().max().item() <= TOL
    assert (ours - load_model(moe_families / "gpt_oss")(IDS)[0]).abs().max() > 1e-2  # other (quantized) weights


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_train_a_few_steps_with_expert_lora(moe_families, tmp_path, name):
    """train: LoRA on attention, every routed expert (Mixtral's w1 / w3 / w2 by role), Qwen2-MoE's
    shared expert and dense layer; the loss falls; the output is PEFT's target_parameters form and
    PeftModel computes what the reference decoder does with it."""
    import json
    import math

    from loratools import api
    from loratools.train.loop import TrainConfig, train

    words = ["apple", "river", "stone", "cloud"]
    tr = tmp_path / "train.jsonl"
    tr.write_text("".join(json.dumps({"prompt": f"Code for {w}:", "completion": f" {100 + 37 * i}"}) + "\n"
                          for _ in range(4) for i, w in enumerate(words)))
    d = moe_families / name
    cfg = TrainConfig(rank=4, alpha=8, seq_len=32, batch_size=4, epochs=2, lr=1e-2, warmup=1, eval_every=1000,
                      checkpoint_every=1000, device="cpu")
    rep = train(d, tr, tmp_path / "out", cfg, log=lambda m: None)
    losses = [l for _, l in rep["losses"]] if isinstance(rep["losses"][0], (list, tuple)) else rep["losses"]
    assert all(math.isfinite(l) for l in losses) and losses[-1] < losses[0], losses
    conf = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    mc = load_config(d)
    assert {t.rsplit(".", 1)[-1] for t in conf["target_parameters"]} == {"gate_up_proj", "down_proj"}  # fused form
    a = api.load_adapter(tmp_path / "out", base=d)
    assert sum(".experts." in n for n in a.modules) == 3 * mc.moe.experts * sum(mc.moe.layers)
    if mc.moe.shared:
        assert any(".shared_expert." in n for n in a.modules) and "model.layers.1.mlp.gate_proj" in a.modules
    ours, _ = load_model(d, adapters=[a])(IDS)
    with torch.no_grad():
        ref = peft.PeftModel.from_pretrained(hf_model(d), str(tmp_path / "out")).eval()(IDS).logits
    assert (ours - ref).abs().max().item() <= TOL


# -- config switches and generations ------------------------------------------------------------
@pytest.mark.parametrize("name,overrides", [
    ("olmoe", {"clip_qkv": 0.3}),                                    # q, k, v clamped
    ("qwen3_moe", {"use_sliding_window": True, "sliding_window": 6}),  # every layer slides
    ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 2}),
    ("gpt_oss", {"rope_parameters": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 12,
                                     "rope_theta": 150000.0}}),      # truncate (default True), betas defaulted
])
def test_switch_variants_match_transformers(tmp_path, name, overrides):
    from fixtures.families import make_family

    d = make_family(tmp_path / name, name, seed=7, **overrides)
    ours, _ = load_model(d)(IDS)
    plain, _ = load_model(make_family(tmp_path / "plain", name, seed=7))(IDS)
    assert (ours - plain).abs().max() > 1e-3  # the switch matters
    assert (ours - hf_logits(d)).abs().max().item() <= TOL
    # without the layer_types transformers 5 writes, the family's own rule gives the same layers
    import json

    cfg = json.loads((d / "config.json").read_text())
    if cfg.pop("layer_types", None) is not None:
        (d / "config.json").write_text(json.dumps(cfg))
        assert torch.equal(load_model(d)(IDS)[0], ours)


def test_transformers4_configs(moe_families, tmp_path):
    """Configs as published (transformers 4.x): Qwen3-MoE's num_experts, gpt-oss's rope_theta +
    rope_scaling and no layer_types, Qwen2-MoE without layer_types: the same models."""
    import json
    import shutil

    edits = {
        "qwen3_moe": lambda c: c.update(num_experts=c.pop("num_local_experts")),
        "gpt_oss": lambda c: (c.update(rope_theta=c["rope_parameters"].pop("rope_theta"),
                                       rope_scaling=c.pop("rope_parameters")), c.pop("layer_types")),
        "qwen2_moe": lambda c: c.pop("layer_types"),
    }
    for name, edit in edits.items():
        d = tmp_path / name
        shutil.copytree(moe_families / name, d)
        cfg = json.loads((d / "config.json").read_text())
        edit(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
        assert load_config(d).moe == load_config(moe_families / name).moe
        assert torch.equal(load_model(d)(IDS)[0], load_model(moe_families / name)(IDS)[0]), name


@pytest.mark.parametrize("name,edit,match", [
    ("mixtral", {"num_experts_per_tok": 5}, "exceeds the number of experts"),
    ("qwen3_moe", {"num_local_experts": 0}, "must be positive"),
    ("qwen2_moe", {"decoder_sparse_step": 0}, "decoder_sparse_step"),
    ("qwen2_moe", {"mlp_only_layers": "1"}, "mlp_only_layers"),
    ("gpt_oss", {"swiglu_limit": -1.0}, "swiglu_limit"),
    ("gpt_oss", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "truncate": "no", "rope_theta": 1e4}},
     "truncate"),
    ("olmoe", {"clip_qkv": 0}, "clip_qkv"),
])
def test_bad_moe_configs_are_one_line(moe_families, name, edit, match):
    import json

    from loratools.arch import parse_config
    from loratools.errors import InputError

    cfg = {**json.loads((moe_families / name / "config.json").read_text()), **edit}
    with pytest.raises(InputError, match=match) as e:
        parse_config(cfg)
    assert "\n" not in str(e.value)
