"""arch/experts.py: the canonical per-expert view of every MoE layout, against transformers."""
from __future__ import annotations

import json

import pytest
import torch

from fixtures.families import MOE_FIXTURES
from loratools.arch.experts import ExpertView, mxfp4_dequantize
from loratools.arch.layout import disk_name, memory_name
from loratools.checkpoint import Checkpoint
from loratools.errors import InputError

MOE = list(MOE_FIXTURES)


def _model(path):
    import transformers

    cfg = json.loads((path / "config.json").read_text())
    return getattr(transformers, cfg["architectures"][0]).from_pretrained(str(path), dtype=torch.float32).eval()


def _expert_params(model):
    """{layer: (gate_up (E, .., ..), down, is_transposed)} of the transformers model in memory."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        ex = getattr(layer.mlp, "experts", None)
        if ex is not None and hasattr(ex, "gate_up_proj"):
            out[i] = (ex.gate_up_proj.detach(), ex.down_proj.detach(), bool(getattr(ex, "is_transposed", False)))
    return out


def _reference(params, L, e, part):
    """The (out, in) weight transformers' experts forward uses for (layer, expert, part)."""
    gu, down, t = params[L]
    if part == "down":
        return down[e].t() if t else down[e]
    if t:  # gpt-oss: x @ gate_up[e], gate = [..., 0::2], up = [..., 1::2]
        return gu[e][:, 0::2].t() if part == "gate" else gu[e][:, 1::2].t()
    n = gu.shape[1] // 2
    return gu[e][:n] if part == "gate" else gu[e][n:]


@pytest.mark.parametrize("name", MOE)
def test_view_matches_transformers(moe_families, name, tmp_path):
    """Every canonical weight read from the saved checkpoint and from transformers 5's in-memory
    fused layout saved to disk equals what transformers' experts compute with."""
    from safetensors.torch import save_file

    path = moe_families / name
    ck = Checkpoint.open(path)
    view = ExpertView.of(ck)
    model = _model(path)
    params = _expert_params(model)
    assert set(view.num_experts) == set(params) and view
    E = {L: params[L][0].shape[0] for L in params}
    assert view.num_experts == E
    assert len(view.weights) == 3 * sum(E.values())
    for cname, w in view.weights.items():
        ref = _reference(params, w.layer, w.expert, w.part)
        assert w.shape == tuple(ref.shape)
        assert torch.equal(view.read(ck, cname), ref), cname
        assert view.read(ck, cname, dtype=None).dtype == torch.float32
    # the in-memory (fused) layout written to disk as is: the same canonical weights
    mem = tmp_path / "mem"
    mem.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(mem / "model.safetensors"))
    (mem / "config.json").write_text((path / "config.json").read_text())
    ck2 = Checkpoint.open(mem)
    view2 = ExpertView.of(ck2)
    assert sorted(view2.weights) == sorted(view.weights)
    assert set(view2.layout.values()) == {"gpt_oss" if name == "gpt_oss" else "fused"}
    for cname in view.weights:
        assert torch.equal(view2.read(ck2, cname), view.read(ck, cname)), cname
        assert view2.weights[cname].slot.expert == view.weights[cname].expert


def test_mixtral_names(moe_families):
    ck = Checkpoint.open(moe_families / "mixtral")
    view = ExpertView.of(ck)
    assert "model.layers.1.block_sparse_moe.experts.3.w3.weight" in view.weights
    assert view.weights["model.layers.1.block_sparse_moe.experts.3.w3.weight"].part == "up"
    # PEFT / in-memory spelling "mlp." -> the disk's "block_sparse_moe." and back
    assert view.resolve("model.layers.1.mlp.experts.3.w1") == "model.layers.1.block_sparse_moe.experts.3.w1"
    assert view.resolve("model.layers.1.mlp.experts.4.w1") is None
    assert view.is_expert_name("model.layers.1.mlp.experts.4.w1")
    keys = ck.keys()
    assert disk_name("model.layers.0.mlp.gate", keys) == "model.layers.0.block_sparse_moe.gate"
    assert disk_name("model.layers.0.mlp.experts.2.w2", keys) == "model.layers.0.block_sparse_moe.experts.2.w2"
    assert disk_name("model.layers.0.self_attn.q_proj", keys) == "model.layers.0.self_attn.q_proj"
    assert memory_name("model.layers.0.block_sparse_moe.gate") == "model.layers.0.mlp.gate"
    assert memory_name("model.layers.0.block_sparse_moe.experts.2.w2") == "model.layers.0.block_sparse_moe.experts.2.w2"


def test_dense_has_no_view(moe_families, families):
    ck = Checkpoint.open(families / "qwen3")
    assert not ExpertView.of(ck)
    # Qwen2-MoE's dense layer 1 and shared expert are not experts
    view = ExpertView.of(Checkpoint.open(moe_families / "qwen2_moe"))
    assert 1 not in view.num_experts
    assert not any("shared_expert" in n for n in view.weights)


@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss"])
def test_slot_inverse(moe_families, name):
    """A delta added at a weight's Slot changes that weight and nothing else in its slab."""
    ck = Checkpoint.open(moe_families / name)
    view = ExpertView.of(ck)
    g = torch.Generator().manual_seed(0)
    for tensor, e in view.slabs():
        names = view.in_slab(tensor, e)
        slab = view.read_slab(ck, tensor, e)
        before = {n: view.weights[n].slot.take(slab).clone() for n in names}
        target = names[-1]
        delta = torch.randn(view.weights[target].shape, generator=g)
        view.weights[target].slot.add_(slab, delta)
        for n in names:
            now = view.weights[n].slot.take(slab)
            assert torch.equal(now, before[n] + delta if n == target else before[n]), (tensor, e, n)
        assert slab.numel() == sum(before[n].numel() for n in names)  # the slots tile the slab


def test_mxfp4(moe_families, tmp_path):
    """MXFP4 blocks/scales (quantized by fixtures/mxfp4.py) dequantize exactly as transformers does,
    both its packed-tensor function and from_pretrained."""
    from safetensors.torch import load_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from fixtures.mxfp4 import make_mxfp4

    path = make_mxfp4(moe_families / "gpt_oss", tmp_path / "mxfp4")
    ck = Checkpoint.open(path)
    view = ExpertView.of(ck)
    assert set(view.layout.values()) == {"mxfp4"} and len(view.weights) == 4 * 4 * 3
    assert view.covers("model.layers.0.mlp.experts.gate_up_proj_blocks")
    assert view.covers("model.layers.0.mlp.experts.down_proj_scales")
    assert not view.covers("model.layers.0.mlp.experts.gate_up_proj_bias")
    sd = load_file(str(path / "model.safetensors"))
    model = _model(path)  # transformers dequantizes on CPU
    params = _expert_params(model)
    orig = ExpertView.of(Checkpoint.open(moe_families / "gpt_oss"))
    base = Checkpoint.open(moe_families / "gpt_oss")
    for L in range(4):
        for t in ("gate_up_proj", "down_proj"):
            k = f"model.layers.{L}.mlp.experts.{t}"
            ref = convert_moe_packed_tensors(sd[k + "_blocks"], sd[k + "_scales"], dtype=torch.float32)
            assert torch.equal(mxfp4_dequantize(sd[k + "_blocks"], sd[k + "_scales"]), ref)
    errs = []
    for cname, w in view.weights.items():
        got = view.read(ck, cname)
        assert torch.equal(got, _reference(params, w.layer, w.expert, w.part)), cname
        errs.append(((got - orig.read(base, cname)).abs().max() / orig.read(base, cname).abs().max()).item())
    assert max(errs) < 0.3  # e2m1 with a shared power-of-two scale: coarse, but the same weights


def test_bad_layouts(moe_families):
    cfg = json.loads((moe_families / "qwen3_moe" / "config.json").read_text())
    shapes = {f"model.layers.0.mlp.experts.{e}.{p}.weight": (32, 64) for e in range(8) for p in ("gate_proj", "up_proj")}
    with pytest.raises(InputError, match="down"):
        ExpertView.from_shapes(shapes, cfg)
    shapes.update({f"model.layers.0.mlp.experts.{e}.down_proj.weight": (64, 32) for e in range(8)})
    assert len(ExpertView.from_shapes(shapes, cfg).weights) == 24
    with pytest.raises(InputError, match="4 experts but config.json says num_local_experts=8"):
        ExpertView.from_shapes({k: v for k, v in shapes.items() if int(k.split(".")[5]) < 4}, cfg)
    with pytest.raises(InputError, match="stored twice"):
        ExpertView.from_shapes({**shapes, "model.layers.0.mlp.experts.gate_up_proj": (8, 64, 64),
                                "model.layers.0.mlp.experts.down_proj": (8, 64, 32)}, cfg)
