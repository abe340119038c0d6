"""GGUF for the mixture-of-experts families (fixtures/families.MOE_FIXTURES), checked in llama.cpp
(llama-cpp-python) against transformers: the model, expert LoRA as a GGUF adapter, import back.

Measured on these fixtures (24-token prompt; max |Δlogit| vs transformers; q8_0 can move a token's
top-k expert choice, hence its larger error):

    fixture     arch      |logit|max  f32      f16      q8_0 (top-1)   adapter (vs merged GGUF / transformers)
    mixtral     llama     4.6         5.1e-6   6.8e-3   0.16 (0.92)    2.2e-6 / 5.1e-6
    qwen2_moe   qwen2moe  3.7         4.1e-6   5.1e-3   0.35 (0.92)    2.4e-6 / 5.7e-6
    qwen3_moe   qwen3moe  4.4         4.4e-6   6.3e-3   2.3  (0.83)    2.3e-6 / 5.4e-6
    olmoe       olmoe     4.4         2.6e-6   3.6e-3   0.13 (0.96)    1.3e-6 / 2.7e-6
    gpt_oss     gpt-oss   4.2         6.4e-6   6.9e-3   0.90 (0.92)

LLAMA_CPP_VARIANT: what llama.cpp's graph for the family cannot compute in the fixture as it is
(each refused, or warned about, in one line by the unchanged fixture's test).
"""
import contextlib
import io
import json
import re

import numpy as np
import pytest
import torch

from fixtures.families import MOE_FIXTURES, make_family
from loratools import api
from loratools.arch.experts import ExpertView
from loratools.checkpoint import Checkpoint
from loratools.errors import IncompatibleError, UnsupportedError
from loratools.formats import gguf_arch
from loratools.formats.gguf_adapter import export_gguf_adapter
from loratools.formats.gguf_model import export_gguf, field, import_gguf, open_gguf

llamacpp = pytest.importorskip("loratools.runtimes.llamacpp")
pytest.importorskip("llama_cpp")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IDS = [int(x) for x in torch.randint(3, 380, (24,), generator=torch.Generator().manual_seed(5))]
NAMES = list(MOE_FIXTURES)
LLAMA_CPP_VARIANT = {
    "mixtral": ({"sliding_window": None}, "ignores sliding_window", UserWarning),
    # llama.cpp's qwen2moe makes every layer MoE; the shared expert's 48 columns are off the q8_0 block
    "qwen2_moe": ({"mlp_only_layers": [], "shared_expert_intermediate_size": 64}, "dense MLPs", UnsupportedError),
    "olmoe": ({"num_key_value_heads": 4}, "no grouped-query attention", UnsupportedError),
    "gpt_oss": ({"swiglu_limit": 7.0}, "clamps at 7.0", UnsupportedError),
}
TOL = {"f32": 3e-5, "f16": 3e-2, "q8_0": 4.0}
TOP1_MIN = {"f32": 1.0, "f16": 0.95, "q8_0": 0.8}


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_gguf")
    made = {}

    def get(name, variant=True):
        key = (name, variant)
        if key not in made:
            ov = LLAMA_CPP_VARIANT.get(name, ({},))[0] if variant else {}
            with contextlib.redirect_stderr(io.StringIO()):
                made[key] = make_family(root / f"{name}{'-v' if variant and ov else ''}", name,
                                        seed=300 + NAMES.index(name), **ov)
        return made[key]

    return get


def hf_logits(name, path):
    cls = getattr(transformers, MOE_FIXTURES[name].model_class)
    model = cls.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].float().numpy()


def test_moe_families_have_a_gguf_path():
    for name in NAMES:
        fam = gguf_arch.FAMILIES[MOE_FIXTURES[name].family]
        assert fam.moe is not None and MOE_FIXTURES[name].family not in gguf_arch.EXCLUDED


@pytest.mark.parametrize("name", [n for n in NAMES if n in LLAMA_CPP_VARIANT])
def test_what_llama_cpp_cannot_compute_is_refused_or_warned(moe, tmp_path, name):
    _, why, kind = LLAMA_CPP_VARIANT[name]
    out = tmp_path / "x.gguf"
    if kind is UserWarning:
        with pytest.warns(UserWarning, match=why):
            export_gguf(moe(name, variant=False), out, outtype="f32")
        return
    with pytest.raises(kind, match=why) as e:
        export_gguf(moe(name, variant=False), out, outtype="f32")
    assert "\n" not in str(e.value) and not out.exists()


@pytest.mark.parametrize("name", NAMES)
def test_moe_models_in_llama_cpp_match_transformers(moe, tmp_path, name):
    m = moe(name)
    ref = hf_logits(name, m)
    assert np.abs(ref).max() > 0.5
    fam = gguf_arch.FAMILIES[MOE_FIXTURES[name].family]
    for outtype in ("f32", "f16", "q8_0"):
        out = tmp_path / f"{outtype}.gguf"
        rep = export_gguf(m, out, outtype=outtype)
        assert rep["arch"] == fam.arch and rep["experts"]["layers"] == MOE_FIXTURES[name].config["num_hidden_layers"]
        got = llamacpp.logits(out, IDS)
        dmax, top1 = float(np.abs(ref - got).max()), float((ref.argmax(-1) == got.argmax(-1)).mean())
        assert top1 >= TOP1_MIN[outtype] and dmax <= TOL[outtype], (outtype, dmax, top1)
    r = open_gguf(tmp_path / "f32.gguf")
    tensors = {t.name: t for t in r.tensors}
    n_exp = field(r, f"{fam.arch}.expert_count")
    g = tensors["blk.0.ffn_gate_exps.weight"]
    assert [int(x) for x in g.shape] == [64, field(r, f"{fam.arch}.expert_feed_forward_length") or 32, n_exp]
    assert field(r, f"{fam.arch}.expert_used_count") == 2


def test_stacked_experts_are_the_canonical_weights_expert_by_expert(moe, tmp_path):
    """gpt-oss: gate / up de-interleaved from the fused (E, H, 2I) tensor, transposed to (I, H);
    biases split the same way."""
    m = moe("gpt_oss")
    export_gguf(m, tmp_path / "g.gguf", outtype="f32")
    t = {x.name: x for x in open_gguf(tmp_path / "g.gguf").tensors}
    with Checkpoint.open(m) as ck:
        gu = ck.get("model.layers.1.mlp.experts.gate_up_proj")
        dn = ck.get("model.layers.1.mlp.experts.down_proj")
        bias = ck.get("model.layers.1.mlp.experts.gate_up_proj_bias")
    got = lambda n: torch.from_numpy(np.array(t[n].data))  # noqa: E731
    assert torch.equal(got("blk.1.ffn_gate_exps.weight"), gu[..., 0::2].transpose(1, 2))
    assert torch.equal(got("blk.1.ffn_up_exps.weight"), gu[..., 1::2].transpose(1, 2))
    assert torch.equal(got("blk.1.ffn_down_exps.weight"), dn.transpose(1, 2))
    assert torch.equal(got("blk.1.ffn_up_exps.bias"), bias[:, 1::2])
    assert "blk.1.attn_sinks.weight" in t


def test_experts_are_written_one_slab_at_a_time(moe, tmp_path, monkeypatch):
    """Each expert's slab is read alone (never the whole stack); row blocks of 1 KiB give the same file."""
    from loratools.formats import gguf_model, gguf_moe

    m = moe("qwen3_moe")
    export_gguf(m, tmp_path / "a.gguf", outtype="q8_0")
    seen = []
    orig = gguf_moe.ExpertReader.weight

    def spy(self, layer, e, role):
        w = orig(self, layer, e, role)
        seen.append(tuple(w.shape))
        return w
    monkeypatch.setattr(gguf_moe.ExpertReader, "weight", spy)
    monkeypatch.setattr(gguf_model, "BLOCK_BYTES", 1024)
    export_gguf(m, tmp_path / "b.gguf", outtype="q8_0")
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    assert len(seen) == 2 * 8 * 3 and set(seen) == {(32, 64), (64, 32)}


# -- expert LoRA as a GGUF adapter ---------------------------------------------------------------
def per_expert_peft(model_dir, out, seed=0):
    """A real PEFT LoRA on a module tree with the per-expert nn.Linear names transformers 4.x had
    (experts, router, shared expert, q_proj), random A and B, rank 4, alpha 8."""
    root = torch.nn.Module()
    with Checkpoint.open(model_dir) as ck:
        shapes = {k: tuple(ck.info(k).shape) for k in ck.keys()}
        shapes.update({k: w.shape for k, w in ExpertView.of(ck).weights.items()})
    for k, shape in sorted(shapes.items()):
        if len(shape) != 2 or not re.search(r"experts\.\d+\.|\.(gate|router|shared_expert_gate)\.weight|shared_expert\.|q_proj", k):
            continue
        *parents, leaf = k[: -len(".weight")].split(".")
        mod = root
        for p in parents:
            if not hasattr(mod, p):
                mod.add_module(p, torch.nn.Module())
            mod = getattr(mod, p)
        mod.add_module(leaf, torch.nn.Linear(shape[1], shape[0], bias=False))
    leaves = {k.rsplit(".", 1)[-1] for k, _ in root.named_modules() if k}
    targets = sorted(leaves & {"gate_proj", "up_proj", "down_proj", "w1", "w2", "w3", "gate", "router",
                               "shared_expert_gate", "q_proj"})
    torch.manual_seed(seed)
    pm = peft.get_peft_model(root, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(0.5)
    pm.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("name", [n for n in NAMES if n != "gpt_oss"])
def test_expert_lora_gguf_in_llama_cpp_matches_the_merged_model(moe, tmp_path, name):
    """base GGUF + our adapter GGUF (experts as 3-D lora_a / lora_b) in llama.cpp == the merged
    GGUF in llama.cpp == transformers on the merged checkpoint."""
    m = moe(name)
    ad = per_expert_peft(m, tmp_path / "peft")
    a = api.load_adapter(ad)
    export_gguf(m, tmp_path / "base.gguf", outtype="f32")
    export_gguf(m, tmp_path / "merged.gguf", [a], outtype="f32")
    rep = export_gguf_adapter(a, m, tmp_path / "lora.gguf")
    n_exp = ExpertView.of(Checkpoint.open(m)).num_experts[0]
    layers = MOE_FIXTURES[name].config["num_hidden_layers"]
    assert rep["expert_modules"] == layers * 3 * n_exp and rep["expert_tensors"] == layers * 3
    r = {t.name: t for t in open_gguf(tmp_path / "lora.gguf").tensors}
    assert [int(x) for x in r["blk.0.ffn_down_exps.weight.lora_a"].shape] == [32, 4, n_exp]   # ne: (in, r, E)
    assert [int(x) for x in r["blk.0.ffn_down_exps.weight.lora_b"].shape] == [4, 64, n_exp]   # ne: (r, out, E)
    got = llamacpp.logits(tmp_path / "base.gguf", IDS, lora=tmp_path / "lora.gguf")
    merged = llamacpp.logits(tmp_path / "merged.gguf", IDS)
    base = llamacpp.logits(tmp_path / "base.gguf", IDS)
    assert np.abs(merged - base).max() > 0.5  # the adapter matters
    assert np.abs(got - merged).max() <= 2e-5
    api.merge(m, [ad], tmp_path / "mck")
    assert np.abs(got - hf_logits(name, tmp_path / "mck")).max() <= 3e-5


def test_expert_lora_of_a_missing_expert_is_refused(moe, tmp_path):
    m = moe("qwen3_moe")
    a = api.load_adapter(per_expert_peft(m, tmp_path / "peft"))
    from dataclasses import replace

    mods = dict(a.modules)
    mods["model.layers.0.mlp.experts.9.gate_proj"] = mods["model.layers.0.mlp.experts.0.gate_proj"]
    with pytest.raises(IncompatibleError, match=r"experts\.9\.gate_proj"):
        export_gguf_adapter(replace(a, modules=mods), m, tmp_path / "lora.gguf")
    assert not (tmp_path / "lora.gguf").exists()


# -- import back ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_moe_import_gives_back_the_source_checkpoint(moe, tmp_path, name):
    """f32 GGUF -> HF in the layout transformers writes (per-expert tensors; gpt-oss fused,
    interleaved): every tensor bit-exact, transformers' logits equal."""
    m = moe(name)
    export_gguf(m, tmp_path / "m.gguf", outtype="f32")
    rep = import_gguf(tmp_path / "m.gguf", tmp_path / "back")
    with Checkpoint.open(m) as a, Checkpoint.open(tmp_path / "back") as b:
        assert set(a.keys()) == set(b.keys()) and rep["tensors"] == len(a.keys())
        for k in a.keys():
            assert torch.equal(a.get(k), b.get(k)), k
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["architectures"] == [MOE_FIXTURES[name].model_class]
    assert np.array_equal(hf_logits(name, tmp_path / "back"), hf_logits(name, m))
