"""Expert LoRA in PEFT adapters (issue 14): both PEFT forms read, written and loaded by PeftModel.

Every adapter here is made by PEFT itself: ``get_peft_model`` with ``target_parameters`` on the
transformers 5 model (the fused form), or with ``target_modules`` on a module tree carrying the
transformers 4.x per-expert names (the old form). The layout facts (nesting, the expert dimension
inside A and B, gate/up rows, gpt-oss's interleaving and orientation) are checked against PEFT's
own ``get_delta_weight``; loading is checked by PeftModel's logits on the transformers 5 model.
"""
from __future__ import annotations

import json

import pytest
import torch

from fixtures.families import MOE_FIXTURES

FAMILIES = list(MOE_FIXTURES)
IDS = torch.tensor([[1, 5, 9, 13, 2, 7, 3, 11, 4, 8]])
LEAVES = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2"))}
ROUTER = {"gpt_oss": "router"}


def _load(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _canon(fam, layer, e, part):
    block, leaves = LEAVES.get(fam, ("mlp", ("gate_proj", "up_proj", "down_proj")))
    return f"model.layers.{layer}.{block}.experts.{e}.{leaves[('gate', 'up', 'down').index(part)]}"


def _router_canon(fam, layer):
    block = LEAVES.get(fam, ("mlp",))[0]
    return f"model.layers.{layer}.{block}.{ROUTER.get(fam, 'gate')}"


def _make_fused(base, out, fam, targets=("gate_up_proj", "down_proj"), router=True, rslora=False, seed=0, gain=20.0):
    """A PEFT target_parameters adapter with random (non-zero) B, saved to ``out``; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    tp = [f"mlp.experts.{t}" for t in targets] + ([f"mlp.{ROUTER.get(fam, 'gate')}.weight"] if router else [])
    pat = "model.layers.0.mlp.experts." + targets[-1]
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=tp, init_lora_weights=False,
                     use_rslora=rslora, rank_pattern={} if rslora else {pat: 2}, alpha_pattern={} if rslora else {pat: 3})
    torch.manual_seed(seed)
    pm = get_peft_model(_load(base), cfg).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(gain)  # a visible effect on the logits
    pm.save_pretrained(str(out))
    return pm


def _moe_layers(model):
    return [(i, layer.mlp) for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


def _peft_expert_deltas(pm, fam):
    """{canonical name: ΔW (out, in)} from PEFT's own get_delta_weight of each ParamWrapper,
    sliced by the experts class's own orientation flag (is_transposed) and gpt-oss's interleave."""
    out = {}
    for L, layer in enumerate(pm.base_model.model.model.layers):
        mlp = layer.mlp
        if not hasattr(mlp, "experts"):
            continue
        w = mlp.experts
        while type(w).__name__ == "ParamWrapper":
            d = w.get_delta_weight("default").detach()           # the parameter's own layout (E, a, b)
            base = w.get_base_layer()
            if getattr(base, "is_transposed", False):             # gpt-oss: (E, in, out)
                d = d.transpose(1, 2)
            for e in range(d.shape[0]):
                if w.parameter_name == "down_proj":
                    out[_canon(fam, L, e, "down")] = d[e]
                else:
                    gate, up = (d[e][0::2], d[e][1::2]) if fam == "gpt_oss" else d[e].chunk(2, 0)
                    out[_canon(fam, L, e, "gate")], out[_canon(fam, L, e, "up")] = gate, up
            w = w.base_layer
    return out


@pytest.mark.parametrize("fam", FAMILIES)
def test_fused_form_read_matches_peft_and_loads_both_ways(fam, moe_families, tmp_path):
    from peft import PeftModel

    from loratools.formats.peft import read_peft, write_peft

    base = moe_families / fam
    pm = _make_fused(base, tmp_path / "peft", fam)
    ref = _logits(pm)
    assert (ref - _logits(_load(base))).abs().max() > 0.1  # the adapter does something
    a = read_peft(tmp_path / "peft", family=fam)
    # the layout facts, against PEFT's own delta
    want = _peft_expert_deltas(pm, fam)
    assert set(want) <= set(a.modules)
    worst = max(float((a.modules[n].delta() - d).abs().max()) for n, d in want.items())
    assert worst <= 1e-6, worst
    for L, mlp in _moe_layers(pm.base_model.model):
        r = mlp.__getattr__(ROUTER.get(fam, "gate"))
        rd = r.get_delta_weight("default").detach()
        assert torch.allclose(a.modules[_router_canon(fam, L)].delta(), rd, atol=1e-6)
        E = r.get_base_layer().weight.shape[0]
        g0, u0 = a.modules[_canon(fam, L, 0, "gate")], a.modules[_canon(fam, L, 0, "up")]
        assert g0.A is u0.A and a.num_experts == E  # gate and up share the fused A
    # layer 0's down_proj has rank 2, alpha 3 (rank_pattern / alpha_pattern keyed by the parameter name)
    d0 = a.modules[_canon(fam, 0, 0, "down")]
    assert (d0.rank, d0.scale) == (2, 1.5)

    # fused form: exact round trip, PeftModel loads it
    write_peft(a, tmp_path / "fused")
    cfg = json.loads((tmp_path / "fused" / "adapter_config.json").read_text())
    assert "mlp.experts.gate_up_proj" in cfg["target_parameters"]
    b = read_peft(tmp_path / "fused", family=fam)
    assert sorted(a.modules) == sorted(b.modules)
    assert all(torch.equal(a.modules[n].A, b.modules[n].A) and torch.equal(a.modules[n].B, b.modules[n].B)
               and a.modules[n].scale == b.modules[n].scale for n in a.modules)
    d_fused = float((_logits(PeftModel.from_pretrained(_load(base), str(tmp_path / "fused"))) - ref).abs().max())
    assert d_fused <= 1e-5, d_fused

    # per-expert (transformers 4.x) form: PEFT converts it on load where it can; refused in one line elsewhere
    from loratools.errors import UnsupportedError

    if fam in ("gpt_oss", "qwen2_moe"):
        with pytest.raises(UnsupportedError, match="expert-form fused"):
            write_peft(a, tmp_path / "per", expert_form="per_expert")
        assert not (tmp_path / "per").exists()
        return
    write_peft(a, tmp_path / "per", expert_form="per_expert", num_layers=len(pm.base_model.model.model.layers))
    keys = json.loads((tmp_path / "per" / "adapter_config.json").read_text())["target_modules"]
    assert "target_parameters" not in json.loads((tmp_path / "per" / "adapter_config.json").read_text())
    assert set(LEAVES.get(fam, (0, ("gate_proj", "up_proj", "down_proj")))[1]) <= set(keys)
    d_per = float((_logits(PeftModel.from_pretrained(_load(base), str(tmp_path / "per"))) - ref).abs().max())
    assert d_per <= 1e-5, d_per
    c = read_peft(tmp_path / "per", family=fam)
    worst = max(float((c.modules[n].delta() - m.delta()).abs().max()) for n, m in a.modules.items())
    assert worst <= 1e-6  # the scale differences folded into B: equal up to rounding
    write_peft(c, tmp_path / "per_again", expert_form="per_expert")
    e = read_peft(tmp_path / "per_again", family=fam)
    assert all(torch.equal(c.modules[n].A, e.modules[n].A) and torch.equal(c.modules[n].B, e.modules[n].B) for n in c.modules)


@pytest.mark.parametrize("fam,targets", [("qwen3_moe", ("down_proj",)), ("gpt_oss", ("gate_up_proj",))])
def test_one_fused_parameter_and_rslora(fam, targets, moe_families, tmp_path):
    """One targeted parameter: no base_layer nesting; rsLoRA scales by alpha/sqrt(r)."""
    from peft import PeftModel

    from loratools.formats.peft import read_peft, write_peft

    base = moe_families / fam
    pm = _make_fused(base, tmp_path / "peft", fam, targets=targets, router=False, rslora=True)
    keys = [k for k in __import__("safetensors.torch", fromlist=["x"]).load_file(
        str(tmp_path / "peft" / "adapter_model.safetensors")) if ".experts." in k]
    assert keys and not any("base_layer" in k for k in keys)
    a = read_peft(tmp_path / "peft", family=fam)
    want = _peft_expert_deltas(pm, fam)
    assert max(float((a.modules[n].delta() - d).abs().max()) for n, d in want.items()) <= 1e-6
    assert a.modules[next(iter(want))].scale == pytest.approx(8 / 2)  # rsLoRA: 8 / sqrt(4)
    write_peft(a, tmp_path / "out")
    got = _logits(PeftModel.from_pretrained(_load(base), str(tmp_path / "out")))
    assert float((got - _logits(pm)).abs().max()) <= 1e-5


def _v4_tree(model, fam):
    """An nn.Module tree with the transformers 4.x per-expert names of ``model``'s MoE blocks
    (weights copied from the fused parameters), for PEFT to make an old-style adapter on."""
    from torch import nn

    block, leaves = LEAVES.get(fam, ("mlp", ("gate_proj", "up_proj", "down_proj")))
    root, root.model = nn.Module(), nn.Module()
    root.model.layers = nn.ModuleList()
    for layer in model.model.layers:
        lay = nn.Module()
        if hasattr(layer.mlp, "experts"):
            gu, dn = layer.mlp.experts.gate_up_proj.detach(), layer.mlp.experts.down_proj.detach()
            blk, blk.experts = nn.Module(), nn.ModuleList()
            inter = gu.shape[1] // 2
            for e in range(gu.shape[0]):
                ex = nn.Module()
                for leaf, w in zip(leaves, (gu[e, :inter], gu[e, inter:], dn[e])):
                    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
                    lin.weight.data.copy_(w)
                    setattr(ex, leaf, lin)
                blk.experts.append(ex)
            rw = layer.mlp.gate.weight.detach()
            blk.gate = nn.Linear(rw.shape[1], rw.shape[0], bias=False)
            blk.gate.weight.data.copy_(rw)
            setattr(lay, block, blk)
        root.model.layers.append(lay)
    return root


@pytest.mark.parametrize("fam", ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe"])
def test_old_per_expert_adapter(fam, moe_families, tmp_path):
    """A transformers 4.x style adapter (PEFT on per-expert nn.Linear modules, gate and up with their
    own A): read as canonical modules, written fused (A = [A_gate; A_up], block-diagonal B), loaded by
    PeftModel on the transformers 5 model; reference: the fused parameters plus PEFT's own deltas."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from loratools.formats.peft import read_peft, write_peft

    base = moe_families / fam
    model = _load(base)
    block, leaves = LEAVES.get(fam, ("mlp", ("gate_proj", "up_proj", "down_proj")))
    torch.manual_seed(1)
    tree = get_peft_model(_v4_tree(model, fam), LoraConfig(r=4, lora_alpha=8, target_modules=[*leaves, "gate"],
                                                           init_lora_weights=False))
    with torch.no_grad():
        for n, p in tree.named_parameters():
            if "lora_B" in n:
                p.mul_(20)
    tree.save_pretrained(str(tmp_path / "v4"))
    ref_model = _load(base)
    with torch.no_grad():
        for L, layer in enumerate(tree.base_model.model.model.layers):
            if not hasattr(layer, block):
                continue
            blk, mlp = getattr(layer, block), ref_model.model.layers[L].mlp
            inter = mlp.experts.gate_up_proj.shape[1] // 2
            for e, ex in enumerate(blk.experts):
                mlp.experts.gate_up_proj[e, :inter] += getattr(ex, leaves[0]).get_delta_weight("default")
                mlp.experts.gate_up_proj[e, inter:] += getattr(ex, leaves[1]).get_delta_weight("default")
                mlp.experts.down_proj[e] += getattr(ex, leaves[2]).get_delta_weight("default")
            mlp.gate.weight += blk.gate.get_delta_weight("default")
    ref = _logits(ref_model)
    a = read_peft(tmp_path / "v4", family=fam)
    assert _canon(fam, 0, 1, "up") in a.modules and _router_canon(fam, 0) in a.modules
    write_peft(a, tmp_path / "fused", num_experts=model.model.layers[0].mlp.experts.num_experts)
    sd = __import__("safetensors.torch", fromlist=["x"]).load_file(str(tmp_path / "fused" / "adapter_model.safetensors"))
    E = model.model.layers[0].mlp.experts.num_experts
    assert sd["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape[0] == E * 8  # r_g + r_u
    d = float((_logits(PeftModel.from_pretrained(_load(base), str(tmp_path / "fused"))) - ref).abs().max())
    assert d <= 1e-5, d
    if fam != "qwen2_moe":  # PEFT 0.21's own v4 -> v5 conversion agrees (it has none for qwen2_moe)
        d_peft = float((_logits(PeftModel.from_pretrained(_load(base), str(tmp_path / "v4"))) - ref).abs().max())
        assert d_peft <= 1e-5, d_peft


def test_stray_expert_tensor_is_an_error(moe_families, tmp_path):
    """Fused expert tensors that match no targeted parameter: an error naming them, never a no-op."""
    from loratools.errors import InputError
    from loratools.formats.peft import read_peft

    _make_fused(moe_families / "qwen3_moe", tmp_path / "a", "qwen3_moe", router=False)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["target_parameters"] = ["mlp.experts.down_proj"]  # the base_layer (gate_up_proj) tensors land nowhere
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"experts\.base_layer.*match no parameter"):
        read_peft(tmp_path / "a", family="qwen3_moe")


def test_fused_needs_the_family(moe_families, tmp_path):
    from loratools.errors import UnsupportedError
    from loratools.formats.peft import read_peft

    _make_fused(moe_families / "qwen3_moe", tmp_path / "a", "qwen3_moe", router=False)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someone/some-model"
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="--base"):
        read_peft(tmp_path / "a")
    assert len(read_peft(tmp_path / "a", family="qwen3_moe").modules) > 0


def test_cli_convert_expert_form(moe_families, tmp_path, run_cli):
    from peft import PeftModel

    base = moe_families / "mixtral"
    pm = _make_fused(base, tmp_path / "peft", "mixtral")
    ref = _logits(pm)
    code, out, err = run_cli("convert", tmp_path / "peft", "-o", tmp_path / "per", "--to", "peft", "--base", base,
                             "--expert-form", "per-expert")
    assert code == 0, err
    assert "target_parameters" not in json.loads((tmp_path / "per" / "adapter_config.json").read_text())
    code, out, err = run_cli("convert", tmp_path / "per", "-o", tmp_path / "fused", "--to", "peft", "--base", base)
    assert code == 0, err
    assert json.loads((tmp_path / "fused" / "adapter_config.json").read_text())["target_parameters"]
    for d in ("per", "fused"):
        got = _logits(PeftModel.from_pretrained(_load(base), str(tmp_path / d)))
        assert float((got - ref).abs().max()) <= 1e-5


def _expert_mats(model, fam):
    """{(layer, expert): (ΔW-able stacked gate/up (2I, H), down (H, I))} in canonical (out, in)
    orientation, read from the transformers model's own fused parameters."""
    out = {}
    for L, mlp in _moe_layers(model):
        gu, dn = mlp.experts.gate_up_proj.detach().double(), mlp.experts.down_proj.detach().double()
        for e in range(gu.shape[0]):
            if fam == "gpt_oss":  # (E, H, 2I) interleaved, (E, I, H)
                g, u, d = gu[e][:, 0::2].T, gu[e][:, 1::2].T, dn[e].T
            else:                 # (E, 2I, H) = cat(gate, up), (E, H, I)
                g, u = gu[e].chunk(2, 0)
                d = dn[e]
            out[(L, e)] = (torch.cat([g, u], 0), d)
    return out


def _make_tuned(base, out, fam, kind, seed=3):
    """A 'fully fine-tuned' checkpoint saved by transformers: every expert matrix, the routers and
    q_proj moved, by exactly rank-3 deltas (kind "lowrank") or full-rank ones ("full")."""
    model = _load(base)
    g = torch.Generator().manual_seed(seed)

    def delta(shape):
        if kind == "lowrank":
            return 0.3 * torch.randn(shape[0], 3, generator=g) @ torch.randn(3, shape[1], generator=g) / shape[1] ** 0.5
        # a decaying but full spectrum, as fine-tunes have
        u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=g))
        v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=g))
        k = min(shape)
        s = 0.5 * torch.exp(-torch.arange(k, dtype=torch.float32) / 3)
        return (u[:, :k] * s) @ v[:, :k].T

    with torch.no_grad():
        for _, mlp in _moe_layers(model):
            for p in (mlp.experts.gate_up_proj, mlp.experts.down_proj):
                for e in range(p.shape[0]):
                    p[e] += delta(tuple(p[e].shape))
            r = getattr(mlp, ROUTER.get(fam, "gate")).weight
            r += delta(tuple(r.shape))
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight += delta(tuple(layer.self_attn.q_proj.weight.shape))
    model.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("fam", FAMILIES)
def test_extract_expert_lora(fam, moe_families, tmp_path):
    """extract on a transformers-made MoE fine-tune: written in target_parameters form; per expert
    within 1% of the optimal (Eckart-Young, float64 SVD of the stacked [ΔW_gate; ΔW_up]) error at
    the fused rank; an exactly low-rank fine-tune comes back exactly (PeftModel logits = tuned)."""
    from peft import PeftModel

    from loratools import api
    from loratools.formats.peft import read_peft

    base = moe_families / fam
    k = 4
    bm = _expert_mats(_load(base), fam)
    # full-rank deltas: the optimal error
    tuned = _make_tuned(base, tmp_path / "tuned_full", fam, "full")
    tm = _expert_mats(_load(tuned), fam)
    # default settings (at this size the exact SVD path), and a sketch small enough to force the randomized one
    for name, kw in (("full", {}), ("sketch", {"oversample": 2})):
        a, rep = api.extract(base, tuned, tmp_path / name, api.RankRule("rank", k), **kw)
        cfg = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert any(t.endswith("mlp.experts.gate_up_proj") for t in cfg["target_parameters"])
        worst = 0.0
        for (L, e), (gu_b, d_b) in bm.items():
            gu_t, d_t = tm[(L, e)]
            g, u, d = (a.modules[_canon(fam, L, e, p)] for p in ("gate", "up", "down"))
            assert torch.equal(g.A, u.A) and g.rank == k
            for want, got in ((gu_t - gu_b, torch.cat([g.delta(torch.float64), u.delta(torch.float64)], 0)),
                              (d_t - d_b, d.delta(torch.float64))):
                s = torch.linalg.svdvals(want)
                optimal = float(s[k:].pow(2).sum().sqrt())
                err = float((want - got).norm())
                worst = max(worst, err / optimal - 1)
        assert worst <= 0.01, (name, worst)
        print(f"{fam} {name}: worst per-expert error over the optimum {100 * worst:.3g}%")
    # the written adapter reads back (family from base_model_name_or_path) with the same modules
    b = read_peft(tmp_path / "full")
    assert set(b.modules) == set(a.modules)
    # exactly low-rank deltas: the extracted adapter reproduces the fine-tune in PeftModel
    tuned = _make_tuned(base, tmp_path / "tuned_low", fam, "lowrank")
    api.extract(base, tuned, tmp_path / "low", api.RankRule("rank", k))
    got = _logits(PeftModel.from_pretrained(_load(base), str(tmp_path / "low")))
    d = float((got - _logits(_load(tuned))).abs().max())
    assert d <= 1e-4, d
    print(f"{fam}: PeftModel(base + extracted) vs tuned max |Δlogit| {d:.2e}")


@pytest.mark.parametrize("fam", ["qwen3_moe", "gpt_oss"])
def test_resize_and_combine_expert_lora(fam, moe_families, tmp_path):
    """resize: gate and up of a fused LoRA are cut together (the optimum of the stacked matrix, one
    shared A), exact at the full rank; combine linear is exact (PeftModel with both adapters active),
    svd keeps one fused LoRA per expert."""
    from peft import PeftModel

    from loratools import api

    base = moe_families / fam
    pa = _make_fused(base, tmp_path / "a", fam, seed=0, gain=4.0)
    ref_a = _logits(pa)
    _make_fused(base, tmp_path / "b", fam, seed=1, gain=4.0)
    a = api.load_adapter(tmp_path / "a", base=base)
    # resize at the full rank: exact up to the fp32 re-factorization (QR + SVD) of every module
    same, _ = api.resize(tmp_path / "a", tmp_path / "same", api.RankRule("rank", 4), base=base)
    worst = max(float((same.modules[n].delta(torch.float64) - a.modules[n].delta(torch.float64)).norm()
                      / a.modules[n].delta(torch.float64).norm()) for n in a.modules)
    assert worst <= 1e-6, worst
    d = float((_logits(PeftModel.from_pretrained(_load(base), str(tmp_path / "same"))) - ref_a).abs().max())
    assert d <= 1e-4, d
    # resize to rank 2: per expert, the error of the stacked gate/up is the Eckart-Young optimum
    res, rep = api.resize(tmp_path / "a", tmp_path / "r2", api.RankRule("rank", 2), base=base)
    worst = 0.0
    for n, g in res.modules.items():
        if not n.endswith(".gate_proj"):
            continue
        u = res.modules[n[: -len("gate_proj")] + "up_proj"]
        assert torch.equal(g.A, u.A) and g.rank == 2
        want = torch.cat([a.modules[n].delta(torch.float64), a.modules[n[: -9] + "up_proj"].delta(torch.float64)], 0)
        got = torch.cat([g.delta(torch.float64), u.delta(torch.float64)], 0)
        optimal = float(torch.linalg.svdvals(want)[2:].pow(2).sum().sqrt())
        worst = max(worst, float((want - got).norm()) / optimal - 1)
    assert worst <= 1e-4, worst
    cfg = json.loads((tmp_path / "r2" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and "mlp.experts.gate_up_proj" in cfg["target_parameters"]
    # combine linear = both adapters active in PeftModel
    ab, _, _ = api.combine([tmp_path / "a", tmp_path / "b"], tmp_path / "ab", base=base)
    b = api.load_adapter(tmp_path / "b", base=base)
    worst = max(float((ab.modules[n].delta(torch.float64) - a.modules[n].delta(torch.float64)
                       - b.modules[n].delta(torch.float64)).abs().max()) for n in a.modules)
    assert worst <= 1e-6, worst  # exact: stacked factors
    both = PeftModel.from_pretrained(_load(base), str(tmp_path / "a"))
    both.load_adapter(str(tmp_path / "b"), adapter_name="b")
    both.base_model.set_adapter(["default", "b"])
    ref_ab = _logits(both)
    d = float((_logits(PeftModel.from_pretrained(_load(base), str(tmp_path / "ab"))) - ref_ab).abs().max())
    assert d <= 1e-4, d  # PEFT sums two adapters' dense deltas, we apply one stacked factor pair: fp32 order
    # combine svd at rank 4: gate and up keep one A
    res, _, _ = api.combine([tmp_path / "a", tmp_path / "b"], tmp_path / "svd", method="svd", rank=4, base=base)
    g = res.modules["model.layers.0.mlp.experts.0.gate_proj"]
    assert torch.equal(g.A, res.modules["model.layers.0.mlp.experts.0.up_proj"].A) and g.rank == 4
    assert json.loads((tmp_path / "svd" / "adapter_config.json").read_text())["r"] == 4
    PeftModel.from_pretrained(_load(base), str(tmp_path / "svd"))  # loads


@pytest.mark.parametrize("fam", ["mixtral", "gpt_oss"])
def test_pre_0_19_1_peft_orientation(fam, moe_families, tmp_path):
    """PEFT before 0.19.1 read (E, out, in) expert parameters positionally as (E, in, out): lora_A
    (E·r, out), lora_B (in, r·E). No such PEFT is installed, so this adapter is PEFT 0.21's own,
    re-laid-out by that rule (transpose each expert's factors and swap them) and stamped
    peft_version 0.18.1; it must read as the same per-expert deltas. gpt-oss's (E, in, out)
    parameters were read the same way by both versions: nothing changes."""
    from safetensors.torch import load_file, save_file

    from loratools.formats.peft import read_peft

    _make_fused(moe_families / fam, tmp_path / "new", fam, router=False)
    new = read_peft(tmp_path / "new", family=fam)
    sd = load_file(str(tmp_path / "new" / "adapter_model.safetensors"))
    cfg = json.loads((tmp_path / "new" / "adapter_config.json").read_text())
    old = {}
    for k, t in sd.items():
        if ".experts." not in k + "." or "lora_A" not in k or fam == "gpt_oss":
            old.setdefault(k, t)
            continue
        kb = k.replace("lora_A", "lora_B")
        A, B = t, sd[kb]
        n_in, n_out = A.shape[1], B.shape[0]
        r_e = B.shape[1]
        E = next(m.num_experts for m in [new])
        r = r_e // E
        A3, B3 = A.reshape(E, r, n_in), B.reshape(n_out, r, E).permute(2, 0, 1)  # (E, r, in), (E, out, r)
        old[k] = B3.transpose(1, 2).reshape(E * r, n_out).contiguous()          # lora_A (E·r, out)
        old[kb] = A3.transpose(1, 2).permute(1, 2, 0).reshape(n_in, r * E).contiguous()  # lora_B (in, r·E)
    (tmp_path / "old").mkdir()
    save_file(old, str(tmp_path / "old" / "adapter_model.safetensors"))
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps({**cfg, "peft_version": "0.18.1"}))
    got = read_peft(tmp_path / "old", family=fam)
    assert set(got.modules) == set(new.modules)
    worst = max(float((got.modules[n].delta() - m.delta()).abs().max()) for n, m in new.modules.items())
    assert worst <= 1e-6, worst


def test_inspect_expert_groups(moe_families, tmp_path, run_cli):
    """inspect: ranks per expert group (routed experts per layer and matrix, router, shared expert)
    and what vLLM, llama.cpp and SGLang do with them."""
    from loratools import api
    from loratools.runtimes.moe_lora import FACTS

    base = moe_families / "qwen2_moe"
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["shared_expert.gate_proj", "shared_expert_gate"],
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"],
                     rank_pattern={"model.layers.2.mlp.experts.down_proj": 2})
    get_peft_model(_load(base), cfg).save_pretrained(str(tmp_path / "a"))
    d = api.inspect(tmp_path / "a", base=base)
    ex = d["experts"]
    assert ex["routed"]["model.layers.0.mlp.experts"] == {"gate_up": {"experts": 4, "ranks": [4]},
                                                          "down_proj": {"experts": 4, "ranks": [4]}}
    assert ex["routed"]["model.layers.2.mlp.experts"]["down_proj"]["ranks"] == [2]
    assert "model.layers.1.mlp.experts" not in ex["routed"]  # the dense layer
    assert set(ex["routers"]) == {"model.layers.0.mlp.gate", "model.layers.2.mlp.gate"}
    assert set(ex["shared_expert"]) >= {"model.layers.0.mlp.shared_expert.gate_proj", "model.layers.0.mlp.shared_expert_gate"}
    w = d["warnings"]
    assert any("is_3d_moe_weight" in x for x in w["vllm"]) and any("build_lora_mm" in x for x in w["llama.cpp"])
    assert any("_normalize_peft_paramwrapper_moe" in x for x in w["sglang"])
    assert {f.runtime for f in FACTS} == {"llama.cpp", "vLLM", "SGLang"}
    code, out, err = run_cli("inspect", tmp_path / "a", "--base", base)
    assert code == 0, err
    assert "model.layers.0.mlp.experts: gate_up 4 experts, ranks [4]" in out and "warning [sglang]" in out


def test_shared_expert_and_router_patterns(moe_families, tmp_path):
    """Qwen2-MoE: shared-expert LoRA (its MLP and sigmoid gate), a router whose rank_pattern / alpha_pattern
    key is the parameter name (``mlp.gate.weight``), and the dense layer 1's MLP: read as PEFT applies them,
    written fused, loaded by PeftModel."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from loratools.formats.peft import read_peft, write_peft

    base = moe_families / "qwen2_moe"
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                     target_modules=["shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj",
                                     "shared_expert_gate", "model.layers.1.mlp.gate_proj"],
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.gate.weight"],
                     rank_pattern={"model.layers.0.mlp.gate.weight": 2}, alpha_pattern={"model.layers.0.mlp.gate.weight": 6})
    torch.manual_seed(2)
    pm = get_peft_model(_load(base), cfg).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(10)
    ref = _logits(pm)
    pm.save_pretrained(str(tmp_path / "a"))
    a = read_peft(tmp_path / "a", family="qwen2_moe")
    r0 = a.modules["model.layers.0.mlp.gate"]
    assert (r0.rank, r0.scale) == (2, 3.0)
    want = pm.base_model.model.model.layers[0].mlp.gate.get_delta_weight("default").detach()
    assert torch.allclose(r0.delta(), want, atol=1e-6)
    assert "model.layers.0.mlp.shared_expert_gate" in a.modules and "model.layers.1.mlp.gate_proj" in a.modules
    write_peft(a, tmp_path / "fused", num_layers=3)
    d = float((_logits(PeftModel.from_pretrained(_load(base), str(tmp_path / "fused"))) - ref).abs().max())
    assert d <= 1e-5, d


def test_fused_layers_with_different_parameters(moe_families, tmp_path):
    """Layer 0 with gate_up LoRA only, layer 1 with down LoRA only: target_parameters names both for every
    layer, so the keys nest as PEFT nests them (gate_up under base_layer everywhere) and PeftModel applies
    exactly these deltas (reference: the fused parameters plus the deltas, in transformers)."""
    from peft import PeftModel

    from loratools.formats.peft import read_peft, write_peft

    fam, base = "qwen3_moe", moe_families / "qwen3_moe"
    _make_fused(base, tmp_path / "a", fam, router=False)
    a = read_peft(tmp_path / "a", family=fam)
    a.modules = {n: m for n, m in a.modules.items()
                 if not ((".layers.0." in n and n.endswith("down_proj")) or (".layers.1." in n and n.endswith(("gate_proj", "up_proj"))))
                 and "self_attn" not in n}
    write_peft(a, tmp_path / "out")
    b = read_peft(tmp_path / "out", family=fam)
    assert sorted(b.modules) == sorted(a.modules)
    ref = _load(base)
    with torch.no_grad():
        for n, m in a.modules.items():
            L, e, leaf = int(n.split(".")[2]), int(n.split(".")[5]), n.split(".")[6]
            ex = ref.model.layers[L].mlp.experts
            inter = ex.gate_up_proj.shape[1] // 2
            if leaf == "down_proj":
                ex.down_proj[e] += m.delta()
            else:
                ex.gate_up_proj[e, slice(0, inter) if leaf == "gate_proj" else slice(inter, None)] += m.delta()
    d = float((_logits(PeftModel.from_pretrained(_load(base), str(tmp_path / "out"))) - _logits(ref)).abs().max())
    assert d <= 1e-5, d


def test_extract_expert_budget(moe_families, tmp_path):
    """--budget across modules: a fused gate/up pair is one knapsack item (cost 2I + H per component, one
    shared A), the written adapter stays within the budget and reproduces a low-rank fine-tune."""
    from peft import PeftModel

    from loratools import api

    base = moe_families / "qwen3_moe"
    tuned = _make_tuned(base, tmp_path / "tuned", "qwen3_moe", "lowrank")
    a, rep = api.extract(base, tuned, tmp_path / "b", budget="30000")
    assert rep["parameters"] == a.num_parameters() <= 30000
    g, u = a.modules["model.layers.0.mlp.experts.0.gate_proj"], a.modules["model.layers.0.mlp.experts.0.up_proj"]
    assert g.A is u.A
    d = float((_logits(PeftModel.from_pretrained(_load(base), str(tmp_path / "b"))) - _logits(_load(tuned))).abs().max())
    assert d <= 1e-4, d
