"""merge / unmerge of expert LoRA on every MoE fixture, against PEFT and transformers.

Adapters are made by PEFT: per-expert modules (PEFT on a stand-in module tree carrying the
per-expert nn.Linear names as transformers 4.x had them, saved with save_pretrained) and, where
loratools reads them, ``target_parameters`` on the transformers 5 model. The merged checkpoint,
reloaded by transformers, must equal ``PeftModel(...).merge_and_unload()`` and W + s·B·A computed
in float64 and rounded once; unmerge must give the base back within rounding.
"""
from __future__ import annotations

import json

import pytest
import torch

from fixtures.families import MOE_FIXTURES
from loratools import api
from loratools.arch.experts import ExpertView
from loratools.checkpoint import Checkpoint
from loratools.errors import IncompatibleError

MOE = list(MOE_FIXTURES)
# PEFT 0.21 converts transformers-4.x per-expert adapters to the fused form for these families
# (its _MODEL_TO_CONVERSION_PATTERN maps qwen3_moe and olmoe to "qwen2_moe" but has no entry for
# qwen2_moe itself, nor for gpt-oss, which never had per-expert modules)
PEFT_CONVERTS = ("mixtral", "qwen3_moe", "olmoe")
ROUTER = {"mixtral": "gate", "gpt_oss": "router"}


def _leaves(name: str) -> list[str]:
    spec_leaves = {"mixtral": ["w1", "w3", "w2"]}.get(name, ["gate_proj", "up_proj", "down_proj"])
    return spec_leaves + ["q_proj", ROUTER.get(name, "gate")]


def _standin(path) -> torch.nn.Module:
    """A module tree with an nn.Linear for every 2-D weight of the checkpoint and for every canonical
    per-expert weight (the names transformers 4.x modules had)."""
    ck = Checkpoint.open(path)
    shapes = {k[: -len(".weight")]: tuple(ck.info(k).shape) for k in ck.keys()
              if k.endswith(".weight") and len(ck.info(k).shape) == 2 and "embed" not in k and "lm_head" not in k}
    shapes.update({k[: -len(".weight")]: s for k, s in ExpertView.of(ck).shapes().items()})
    root = torch.nn.Module()
    for name, (o, i) in sorted(shapes.items()):
        mod = root
        *parents, leaf = name.split(".")
        for p in parents:
            if not hasattr(mod, p):
                mod.add_module(p, torch.nn.Module())
            mod = getattr(mod, p)
        mod.add_module(leaf, torch.nn.Linear(i, o, bias=False))
    return root


def per_expert_adapter(path, out, name: str, seed: int = 0, r: int = 4, num_experts: int | None = None):
    """A per-expert LoRA (experts, router, q_proj, Qwen2-MoE's shared expert) made by PEFT on the
    stand-in tree and saved with save_pretrained. ``num_experts``: pretend the model has that many."""
    from peft import LoraConfig, get_peft_model

    tree = _standin(path)
    if num_experts is not None:  # more experts than the base has: copy expert 0's modules
        import copy

        for layer in tree.model.layers.children():
            block = getattr(layer, "block_sparse_moe", None) or layer.mlp
            if hasattr(block, "experts"):
                for e in range(len(list(block.experts.children())), num_experts):
                    block.experts.add_module(str(e), copy.deepcopy(getattr(block.experts, "0")))
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=_leaves(name), init_lora_weights=False)
    pm = get_peft_model(tree, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(0.1)  # a fine-tune-sized delta
    pm.save_pretrained(str(out))
    return out


def target_parameters_adapter(path, out, name: str, seed: int = 0, r: int = 4):
    """PEFT's transformers-5 form, made by PEFT on the transformers model: target_parameters on the
    fused experts and the router weight, target_modules q_proj (and Qwen2-MoE's shared expert)."""
    from peft import LoraConfig, get_peft_model

    model = _model(path)
    router = f"mlp.{ROUTER.get(name, 'gate')}.weight"
    mods = ["q_proj"] + (["shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj",
                          "shared_expert_gate"] if name == "qwen2_moe" else [])
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=mods, init_lora_weights=False,
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj", router])
    pm = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(0.1)
    pm.save_pretrained(str(out))
    return out


def _model(path, dtype=torch.float32):
    import transformers

    cfg = json.loads((path / "config.json").read_text())
    return getattr(transformers, cfg["architectures"][0]).from_pretrained(str(path), dtype=dtype).eval()


def _sd(model) -> dict:
    return {k: v.detach() for k, v in model.state_dict().items()}


def _f64_reference(base, adapter_dir) -> dict:
    """{canonical / tensor name: (W + s·B·A) in float64, rounded once to the base dtype}."""
    a = api.load_adapter(adapter_dir, base)
    ck = Checkpoint.open(base)
    view = ExpertView.of(ck)
    out = {}
    for n, m in a.modules.items():
        key = view.resolve(n)
        if key is not None:
            W = view.read(ck, key)
            key = key + ".weight"
        else:
            from loratools.arch.layout import disk_name

            key = disk_name(n, ck.keys()) + ".weight"
            W = ck.get(key)
        d = m.B.double() @ m.A.double() * m.scale
        out[key] = (W.double() + d).to(W.dtype)
    return out


def _merged_weights(path) -> dict:
    """Every canonical expert weight and plain 2-D tensor of a checkpoint."""
    ck = Checkpoint.open(path)
    view = ExpertView.of(ck)
    out = {n: view.read(ck, n, dtype=None) for n in view.weights}
    out.update({k: ck.get(k) for k in ck.keys() if not view.covers(k)})
    return out


@pytest.mark.parametrize("name", MOE)
def test_merge_per_expert_adapter(moe_families, tmp_path, name):
    import peft

    base = moe_families / name
    ad = per_expert_adapter(base, tmp_path / "ad", name)
    out = tmp_path / "merged"
    rep = api.merge(base, [ad], out)
    view = ExpertView.of(Checkpoint.open(base))
    E = sum(view.num_experts.values())
    assert rep["experts_changed"] == E  # every expert of every MoE layer
    # written as transformers writes it: the same tensor names as the base (per-expert / fused)
    assert sorted(Checkpoint.open(out).keys()) == sorted(Checkpoint.open(base).keys())
    n_expert_tensors = E * 3 if name != "gpt_oss" else 2 * len(view.num_experts)
    mods = rep["modified"]
    assert rep["tensors_changed"] == len(mods) == len(set(mods))
    assert sum("experts" in m for m in mods) == n_expert_tensors
    assert sum("self_attn.q_proj" in m for m in mods) == len(_model_layers(base))
    assert sum(m.endswith(f".{ROUTER.get(name, 'gate')}.weight") for m in mods) == len(view.num_experts)
    if name == "qwen2_moe":
        assert sum("shared_expert." in m for m in mods) == 3 * len(view.num_experts)
    # == W + s·B·A in float64, rounded once
    ref = _f64_reference(base, ad)
    got = _merged_weights(out)
    worst = max((got[k].double() - v.double()).abs().max().item() / v.abs().max().item() for k, v in ref.items())
    assert worst <= 2 ** -22, worst
    # reloaded by transformers == PEFT's merge_and_unload (PEFT converts the per-expert adapter on load)
    mine = _sd(_model(out))
    if name in PEFT_CONVERTS:
        theirs = _sd(peft.PeftModel.from_pretrained(_model(base), str(ad)).merge_and_unload())
        assert mine.keys() == theirs.keys()
        base_sd = _sd(_model(base))
        diff = max((mine[k] - theirs[k]).abs().max().item() for k in mine)
        changed = [k for k in mine if not torch.equal(theirs[k], base_sd[k])]
        assert diff <= 1e-6 and any("experts" in k for k in changed), (diff, changed)
    # unmerge restores the base within rounding
    back = tmp_path / "back"
    api.unmerge(out, [ad], back)
    b, o = _merged_weights(base), _merged_weights(back)
    assert b.keys() == o.keys()
    assert max((b[k] - o[k]).abs().max().item() for k in b) <= 1e-6


@pytest.mark.parametrize("name", MOE)
def test_merge_target_parameters_adapter(moe_families, tmp_path, name):
    """PEFT's target_parameters adapter (experts, router, q_proj, shared expert): merged checkpoint
    reloaded by transformers == PeftModel(...).merge_and_unload() == float64 W + s·B·A."""
    import peft

    base = moe_families / name
    ad = target_parameters_adapter(base, tmp_path / "ad", name)
    out = tmp_path / "merged"
    rep = api.merge(base, [ad], out)
    view = ExpertView.of(Checkpoint.open(base))
    assert rep["experts_changed"] == sum(view.num_experts.values())
    assert sorted(Checkpoint.open(out).keys()) == sorted(Checkpoint.open(base).keys())
    mods = rep["modified"]
    assert sum(m.endswith(f".{ROUTER.get(name, 'gate')}.weight") for m in mods) == len(view.num_experts)
    if name == "qwen2_moe":
        assert sum("shared_expert" in m for m in mods) == 4 * len(view.num_experts)
    ref = _f64_reference(base, ad)
    got = _merged_weights(out)
    worst = max((got[k].double() - v.double()).abs().max().item() / v.abs().max().item() for k, v in ref.items())
    assert worst <= 2 ** -22, worst
    mine = _sd(_model(out))
    theirs = _sd(peft.PeftModel.from_pretrained(_model(base), str(ad)).merge_and_unload())
    base_sd = _sd(_model(base))
    assert mine.keys() == theirs.keys()
    diff = max((mine[k] - theirs[k]).abs().max().item() for k in mine)
    changed = sorted(k for k in mine if not torch.equal(theirs[k], base_sd[k]))
    assert diff <= 1e-6, diff
    assert changed == sorted(k for k in mine if not torch.equal(mine[k], base_sd[k]))
    assert sum(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in changed) == 2 * len(view.num_experts)
    back = tmp_path / "back"
    api.unmerge(out, [ad], back)
    b, o = _merged_weights(base), _merged_weights(back)
    assert max((b[k] - o[k]).abs().max().item() for k in b) <= 1e-6


def _model_layers(base) -> list:
    return list(range(json.loads((base / "config.json").read_text())["num_hidden_layers"]))


def test_merge_fused_in_memory_layout(moe_families, tmp_path):
    """A checkpoint saved in transformers 5's in-memory layout (fused experts) merges to per-expert
    tensors, as transformers writes them."""
    from safetensors.torch import save_file

    base = moe_families / "mixtral"
    mem = tmp_path / "mem"
    mem.mkdir()
    save_file({k: v.contiguous() for k, v in _sd(_model(base)).items()}, str(mem / "model.safetensors"))
    (mem / "config.json").write_text((base / "config.json").read_text())
    ad = per_expert_adapter(base, tmp_path / "ad", "mixtral")
    api.merge(base, [ad], tmp_path / "a")
    rep = api.merge(mem, [ad], tmp_path / "b")
    assert rep["experts_changed"] == 8
    a, b = Checkpoint.open(tmp_path / "a"), Checkpoint.open(tmp_path / "b")
    experts = sorted(k for k in a.keys() if ".experts." in k)
    assert experts == sorted(k for k in b.keys() if ".experts." in k)
    assert all(torch.equal(a.get(k), b.get(k)) for k in experts)


def test_merge_mxfp4(moe_families, tmp_path):
    """MXFP4 experts are dequantized, merged and written as bf16 fused tensors; quantization_config
    is dropped; transformers loads the result; unmerge gives the dequantized base back within bf16."""
    from fixtures.mxfp4 import make_mxfp4

    q = make_mxfp4(moe_families / "gpt_oss", tmp_path / "q")
    ad = per_expert_adapter(q, tmp_path / "ad", "gpt_oss")
    out = tmp_path / "merged"
    rep = api.merge(q, [ad], out)
    assert rep["dequantized"]["from"] == "mxfp4" and rep["dequantized"]["to"] == "bfloat16"
    assert rep["experts_changed"] == 16
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    ck = Checkpoint.open(out)
    assert not any(k.endswith(("_blocks", "_scales")) for k in ck.keys())
    assert ck.info("model.layers.0.mlp.experts.gate_up_proj").dtype == torch.bfloat16
    assert tuple(ck.info("model.layers.0.mlp.experts.gate_up_proj").shape) == (4, 64, 64)
    ref = _f64_reference(q, ad)
    got = _merged_weights(out)
    for k, v in ref.items():
        want = v.to(got[k].dtype)
        assert torch.equal(got[k], want) or (got[k].float() - want.float()).abs().max() <= 2 ** -8 * v.abs().max(), k
    m = _model(out)  # transformers reads the merged (dequantized) checkpoint
    exp = m.model.layers[1].mlp.experts.gate_up_proj.detach()
    assert torch.equal(exp, ck.get("model.layers.1.mlp.experts.gate_up_proj").float())
    back = tmp_path / "back"
    api.unmerge(out, [ad], back)
    qb, bb = _merged_weights(q), _merged_weights(back)
    err = max((qb[k].float() - bb[k].float()).abs().max().item() / qb[k].float().abs().max().item()
              for k in qb if ".experts." in k)
    assert err <= 2 ** -7, err


def test_nowhere_is_an_error(moe_families, tmp_path):
    """Expert deltas that would land nowhere fail in one line naming them."""
    from fixtures.families import make_family

    base = moe_families / "mixtral"
    ad = per_expert_adapter(base, tmp_path / "ad8", "mixtral", num_experts=8)  # 8 experts on a 4-expert model
    with pytest.raises(IncompatibleError) as e:
        api.merge(base, [ad], tmp_path / "o1")
    msg = str(e.value)
    assert "\n" not in msg and "block_sparse_moe.experts.4.w1" in msg and "4 experts in each of layers 0, 1" in msg
    assert "(24 in all)" in msg  # experts 4..7 × 3 matrices × 2 layers
    assert not (tmp_path / "o1").exists()
    # an expert LoRA on a dense model
    dense = make_family(tmp_path / "dense", "qwen3")
    ad2 = per_expert_adapter(moe_families / "qwen3_moe", tmp_path / "ad2", "qwen3_moe")
    with pytest.raises(IncompatibleError) as e:
        api.merge(dense, [ad2], tmp_path / "o2")
    assert "no mixture-of-experts layers" in str(e.value) and "mlp.experts.0.gate_proj" in str(e.value)
    assert "\n" not in str(e.value)


def test_cli_merge_mxfp4(moe_families, tmp_path, run_cli):
    from fixtures.mxfp4 import make_mxfp4

    q = make_mxfp4(moe_families / "gpt_oss", tmp_path / "q")
    ad = per_expert_adapter(q, tmp_path / "ad", "gpt_oss")
    code, out, err = run_cli("merge", "--base", q, "-a", ad, "-o", tmp_path / "m", "--quiet")
    assert code == 0, err
    assert "(16 experts changed)" in out and "quantization_config dropped" in out
    code, out, err = run_cli("merge", "--base", moe_families / "olmoe", "-a", ad, "-o", tmp_path / "bad")
    assert code == 3 and "does not have" in err and "8 experts in each of layers 0, 1" in err


def test_gpt_oss_streams_expert_slabs(moe_families, tmp_path, monkeypatch):
    """A fused gpt-oss stack is read, merged and written one expert slab at a time: every expert
    read is 2-D and every changed stack arrives through write_part, expert by expert."""
    from loratools.arch import experts as ex
    from loratools.checkpoint import CheckpointWriter

    reads, parts = [], []
    real_read, real_part = ex.ExpertView.read_slab, CheckpointWriter.write_part
    monkeypatch.setattr(ex.ExpertView, "read_slab",
                        lambda self, ck, t, e, dtype=torch.float32: reads.append((t, e)) or real_read(self, ck, t, e, dtype))
    monkeypatch.setattr(CheckpointWriter, "write_part",
                        lambda self, n, i, p: parts.append((n, i, tuple(p.shape))) or real_part(self, n, i, p))
    base = moe_families / "gpt_oss"
    ad = per_expert_adapter(base, tmp_path / "ad", "gpt_oss")
    api.merge(base, [ad], tmp_path / "m")
    stacks = {f"model.layers.{L}.mlp.experts.{t}" for L in range(4) for t in ("gate_up_proj", "down_proj")}
    assert {n for n, _, _ in parts} == stacks
    assert sorted((n, i) for n, i, _ in parts) == sorted((n, i) for n in stacks for i in range(4))
    assert all(len(s) == 2 for _, _, s in parts)
    assert all(e is not None for _, e in reads) and len(reads) == len(parts)
