"""GGUF for the mixture-of-experts families (fixtures/families.MOE_FIXTURES), checked in llama.cpp
(llama-cpp-python) against transformers: the model, expert LoRA as a GGUF adapter, import back.

Measured on these fixtures (24-token prompt; max |Δlogit| vs transformers; q8_0 can move a token's
top-k expert choice, hence its larger error):

    fixture     arch      |logit|max  f32      f16 (top-1)    q8_0 (top-1)   expert LoRA GGUF vs merged GGUF / transformers
    mixtral     llama     4.6         5.1e-6   5.3e-3 (0.96)  0.14 (0.92)    2.1e-6 / 5.1e-6
    qwen2_moe   qwen2moe  3.7         4.1e-6   5.6e-3 (1.00)  0.34 (0.92)    2.4e-6 / 5.7e-6
    qwen3_moe   qwen3moe  4.4         4.4e-6   6.4e-3 (1.00)  2.3  (0.83)    2.3e-6 / 5.4e-6
    olmoe       olmoe     4.4         2.6e-6   3.7e-3 (1.00)  0.71 (0.96)    1.3e-6 / 2.7e-6
    gpt_oss     gpt-oss   4.2         6.4e-6   6.9e-3 (1.00)  0.89 (0.92)    4.5e-6 / 8.4e-6

PEFT target_parameters LoRA as a GGUF adapter vs PeftModel: 2.1e-5, 1.8e-5, 1.4e-5, 1.1e-5, 2.8e-5
(B scaled up 5x there: larger logits). validate (our decoder vs llama.cpp, f32): 4e-6 .. 8e-6.
q8_0 also quantizes the activations in llama.cpp and can move a token to other experts
(llama.cpp q8_0 vs transformers on the same dequantized q8_0 weights: 0.09 .. 0.64).

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
PROMPT = "The experts of every layer, stacked as llama.cpp expects them, one slab at a time."
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
    # one expert of another rank and alpha: its stacked tensors are padded to rank 4, its scale folded into B
    odd = next(k for k, _ in root.named_modules() if re.search(r"layers\.0\.\w+\.experts\.1\.(gate_proj|w1)$", k))
    torch.manual_seed(seed)
    pm = peft.get_peft_model(root, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                                                   rank_pattern={odd: 2}, alpha_pattern={odd: 5}))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(0.5)
    pm.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("name", NAMES)
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
    assert rep["scales_folded"] == 1 and a.modules[_odd(a)].rank == 2
    got = llamacpp.logits(tmp_path / "base.gguf", IDS, lora=tmp_path / "lora.gguf")
    merged = llamacpp.logits(tmp_path / "merged.gguf", IDS)
    base = llamacpp.logits(tmp_path / "base.gguf", IDS)
    assert np.abs(merged - base).max() > 0.5  # the adapter matters
    assert np.abs(got - merged).max() <= 2e-5
    api.merge(m, [ad], tmp_path / "mck")
    assert np.abs(got - hf_logits(name, tmp_path / "mck")).max() <= 3e-5


@pytest.mark.parametrize("name", NAMES)
def test_target_parameters_lora_gguf_in_llama_cpp_matches_peft(moe, tmp_path, name):
    """PEFT's target_parameters LoRA on the fused experts (gate_up_proj nested under down_proj's
    wrapper, rank 2 / alpha 3 on down_proj: another scale, folded into B), on the router and, as
    modules, on q_proj and the shared expert: base GGUF + our adapter GGUF in llama.cpp == PeftModel."""
    m = moe(name)
    router = "router" if name == "gpt_oss" else "gate"
    down = "model.layers.0.mlp.experts.down_proj"
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                          target_modules=["q_proj", "gate_proj", "up_proj", "down_proj", "shared_expert_gate"],
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj", f"mlp.{router}.weight"],
                          rank_pattern={down: 2}, alpha_pattern={down: 3})
    model = getattr(transformers, MOE_FIXTURES[name].model_class).from_pretrained(str(m), dtype=torch.float32).eval()
    torch.manual_seed(1)
    pm = peft.get_peft_model(model, cfg).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(5)
        want = pm(torch.tensor([IDS])).logits[0].numpy()
    pm.save_pretrained(str(tmp_path / "peft"))
    a = api.load_adapter(tmp_path / "peft", base=m)
    export_gguf(m, tmp_path / "base.gguf", outtype="f32")
    rep = export_gguf_adapter(a, m, tmp_path / "lora.gguf")
    assert rep["expert_tensors"] == 3 * MOE_FIXTURES[name].config["num_hidden_layers"] and rep["scales_folded"] > 0
    base = llamacpp.logits(tmp_path / "base.gguf", IDS)
    got = llamacpp.logits(tmp_path / "base.gguf", IDS, lora=tmp_path / "lora.gguf")
    assert np.abs(want - base).max() > 0.5  # the adapter matters
    assert np.abs(got - want).max() <= 1e-4, float(np.abs(got - want).max())


def _odd(a):
    return next(n for n in a.modules if re.search(r"layers\.0\.\w+\.experts\.1\.(gate_proj|w1)$", n))


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


@pytest.mark.parametrize("name", NAMES)
def test_validate_moe_gguf_candidates_against_the_reference_decoder(moe, tmp_path, name):
    """``validate``: our reference decoder (fp32, the adapter applied) against llama.cpp running the
    merged GGUF and the base GGUF + the expert LoRA GGUF."""
    from loratools.validate import validate

    m = moe(name)
    ad = per_expert_peft(m, tmp_path / "peft")
    a = api.load_adapter(ad)
    export_gguf(m, tmp_path / "merged.gguf", [a], outtype="f32")
    export_gguf(m, tmp_path / "base.gguf", outtype="f32")
    export_gguf_adapter(a, m, tmp_path / "lora.gguf")
    rep = validate(m, [ad], [str(tmp_path / "merged.gguf"), f"{tmp_path / 'base.gguf'}+{tmp_path / 'lora.gguf'}"],
                   prompts=[PROMPT], tokens=4, peft_check=False)
    assert rep["passed"], rep["candidates"]
    for c in rep["candidates"]:
        assert c["metrics"]["max_abs"] <= 5e-5 and c["metrics"]["top1"] == 1.0, (c["candidate"], c["metrics"])


@pytest.mark.parametrize("name", NAMES)
def test_moe_import_without_the_source_config_rebuilds_it_from_the_keys(moe, tmp_path, monkeypatch, name):
    """A MoE GGUF from another tool (no loratools.source_config): config.json from the expert keys
    (gguf_arch.IMPORTS; llama with expert_count -> Mixtral); tensors and logits as the source's."""
    from loratools.formats import gguf_model

    m = moe(name)
    with monkeypatch.context() as mp:
        mp.setattr(gguf_model, "SOURCE_CONFIG_KEY", "other.tool.note")
        export_gguf(m, tmp_path / "m.gguf", outtype="f32")
    assert field(open_gguf(tmp_path / "m.gguf"), "loratools.source_config") is None
    import_gguf(tmp_path / "m.gguf", tmp_path / "back")
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["model_type"] == MOE_FIXTURES[name].family
    with Checkpoint.open(m) as a, Checkpoint.open(tmp_path / "back") as b:
        assert set(a.keys()) == set(b.keys()) and all(torch.equal(a.get(k), b.get(k)) for k in a.keys())
    assert np.array_equal(hf_logits(name, tmp_path / "back"), hf_logits(name, m))


# llama.cpp's own converter (convert_hf_to_gguf.py of the llama-cpp-python sdist; Mixtral's llama
# converter also needs sentencepiece): LORATOOLS_LLAMA_CPP_SRC=<sdist>/vendor/llama.cpp runs these
@pytest.mark.parametrize("name", ["qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"])
def test_llama_cpp_converter_moe_gguf_imports_back(moe, tmp_path, name):
    import os
    import subprocess
    import sys

    src = os.environ.get("LORATOOLS_LLAMA_CPP_SRC")
    if not src:
        why = "set LORATOOLS_LLAMA_CPP_SRC to llama.cpp's source folder (its convert_hf_to_gguf.py; `make test` does)"
        if os.environ.get("CI"):
            pytest.fail(why)  # under CI every peer is there
        pytest.skip(why)
    m = moe(name)
    out = tmp_path / "conv.gguf"
    subprocess.run([sys.executable, "-m", "fixtures.llama_cpp_convert", src, str(m), "--outtype", "f32",
                    "--outfile", str(out)], check=True, capture_output=True)
    ref = hf_logits(name, m)
    assert np.abs(llamacpp.logits(out, IDS) - ref).max() <= TOL["f32"]
    import_gguf(out, tmp_path / "back")
    with Checkpoint.open(m) as a, Checkpoint.open(tmp_path / "back") as b:
        assert set(a.keys()) == set(b.keys()) and all(torch.equal(a.get(k), b.get(k)) for k in a.keys())
    assert np.array_equal(hf_logits(name, tmp_path / "back"), ref)


def test_mxfp4_gpt_oss_exports_its_dequantized_experts(moe, tmp_path):
    """A gpt-oss checkpoint with MXFP4 experts (as published): the stacked tensors are the experts as
    transformers dequantizes them; llama.cpp runs the f32 GGUF as our decoder runs the checkpoint."""
    from fixtures.mxfp4 import make_mxfp4
    from loratools.arch.experts import mxfp4_dequantize
    from loratools.validate import validate

    m = make_mxfp4(moe("gpt_oss"), tmp_path / "mxfp4")
    export_gguf(m, tmp_path / "g.gguf", outtype="f32")
    t = {x.name: x for x in open_gguf(tmp_path / "g.gguf").tensors}
    with Checkpoint.open(m) as ck:
        gu = mxfp4_dequantize(ck.get("model.layers.0.mlp.experts.gate_up_proj_blocks"),
                              ck.get("model.layers.0.mlp.experts.gate_up_proj_scales"))
    assert torch.equal(torch.from_numpy(np.array(t["blk.0.ffn_up_exps.weight"].data)), gu[..., 1::2].transpose(1, 2))
    rep = validate(m, [], [str(tmp_path / "g.gguf")], prompts=[PROMPT], tokens=4, peft_check=False)
    assert rep["passed"] and rep["candidates"][0]["metrics"]["max_abs"] <= 5e-5, rep["candidates"][0]["metrics"]


def test_fused_in_memory_layout_checkpoint_exports(moe, tmp_path):
    """A checkpoint saved from transformers 5's in-memory state (experts fused: gate_up_proj
    (E, 2I, H) = cat(gate, up), down_proj (E, H, I)) exports like the per-expert one."""
    import shutil

    from safetensors.torch import save_file

    m = moe("qwen3_moe")
    model = getattr(transformers, MOE_FIXTURES["qwen3_moe"].model_class).from_pretrained(str(m), dtype=torch.float32)
    fused = tmp_path / "fused"
    fused.mkdir()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in sd
    save_file(sd, str(fused / "model.safetensors"), metadata={"format": "pt"})
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(m / f, fused / f)
    export_gguf(m, tmp_path / "a.gguf", outtype="f32")
    export_gguf(fused, tmp_path / "b.gguf", outtype="f32")
    ta = {t.name: np.array(t.data) for t in open_gguf(tmp_path / "a.gguf").tensors}
    tb = {t.name: np.array(t.data) for t in open_gguf(tmp_path / "b.gguf").tensors}
    assert set(ta) == set(tb) and all(np.array_equal(ta[k], tb[k]) for k in ta)


def test_moe_gguf_through_the_cli(moe, tmp_path, run_cli):
    """export gguf (-a: merged), export gguf-adapter, import gguf on a MoE model; a config llama.cpp
    cannot compute: exit 4, one line, nothing written."""
    m = moe("qwen2_moe")
    ad = per_expert_peft(m, tmp_path / "peft")
    code, _, err = run_cli("export", "gguf", m, "-a", ad, "-o", tmp_path / "merged.gguf", "--outtype", "f32")
    assert code == 0, err
    code, _, err = run_cli("export", "gguf-adapter", ad, "--base", m, "-o", tmp_path / "lora.gguf")
    assert code == 0, err
    code, _, err = run_cli("export", "gguf", m, "-o", tmp_path / "base.gguf", "--outtype", "f32")
    assert code == 0, err
    got = llamacpp.logits(tmp_path / "base.gguf", IDS, lora=tmp_path / "lora.gguf")
    assert np.abs(got - llamacpp.logits(tmp_path / "merged.gguf", IDS)).max() <= 2e-5
    code, _, err = run_cli("import", "gguf", tmp_path / "merged.gguf", "-o", tmp_path / "back")
    assert code == 0, err
    code, _, err = run_cli("export", "gguf", moe("qwen2_moe", variant=False), "-o", tmp_path / "x.gguf")
    assert code == 4 and "dense MLPs" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.gguf").exists()
