"""convert --for RUNTIME / inspect --for RUNTIME on adapters PEFT itself made (rsLoRA with rank and
alpha patterns, DoRA, modules_to_save lm_head, embedding LoRA) on the tiny llama fixture (hidden 64,
untied head). Peers: PEFT loads what is written and recomputes the logits the reported KL is checked
against; llama.cpp applies the adapter GGUF; ONNX Runtime applies the .onnx_adapter."""
import json

import numpy as np
import pytest
import torch

from loratools import api
from loratools.formats.peft import read_peft
from loratools.models import load_model
from loratools.runtimes.profiles import PROFILES
from loratools.validate import DEFAULT_PROMPTS, kl_rows, prompt_ids

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

RS = dict(r=64, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
          rank_pattern={"v_proj": 32, "model.layers.1.self_attn.o_proj": 48}, alpha_pattern={"down_proj": 8})
DORA = dict(r=8, lora_alpha=16, use_dora=True, target_modules=["q_proj", "k_proj", "up_proj"])
MTS = dict(r=8, lora_alpha=16, target_modules=["q_proj", "o_proj"], modules_to_save=["lm_head"])
EMB = dict(r=8, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "v_proj"])


def hf_model(d):
    return transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, attn_implementation="eager").eval()


def _made_by_peft(model_dir, out, seed, **cfg):
    torch.manual_seed(seed)
    pm = peft.get_peft_model(hf_model(model_dir), peft.LoraConfig(init_lora_weights=False, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "lora_embedding_B" in n:
                p.mul_(0.3)
            elif "lora_magnitude_vector" in n:  # a trained magnitude: no longer the norm it started from
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif "modules_to_save" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def made(fx, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    m = fx / "models" / "llama"
    return {name: _made_by_peft(m, root / name, i, **cfg)
            for i, (name, cfg) in enumerate((("rs64", RS), ("dora", DORA), ("mts", MTS), ("emb", EMB)))}


def ids_of(base):
    return [prompt_ids(base, p) for p in DEFAULT_PROMPTS]


def peft_logits(base, adapter_dir, ids):
    pm = peft.PeftModel.from_pretrained(hf_model(base), str(adapter_dir)).eval()
    with torch.no_grad():
        return [pm(torch.tensor([i])).logits[0].double().numpy() for i in ids]


def peft_kl(base, a, b):
    ids = ids_of(base)
    la, lb = peft_logits(base, a, ids), peft_logits(base, b, ids)
    return float(np.concatenate([kl_rows(x, y) for x, y in zip(la, lb)]).mean()), la, lb


def check_rules(out, runtime, cap):
    """The profile's rules on a written PEFT folder: one rank r <= cap (a rank the runtime accepts as
    its max), no patterns, no rsLoRA / DoRA / lora_bias / modules_to_save, LoRA only where it takes it."""
    prof = PROFILES[runtime]
    cfg = json.loads((out / "adapter_config.json").read_text())
    a = read_peft(out)
    ranks = {m.rank for m in a.modules.values()}
    assert ranks == {cfg["r"]}
    if cap is not None:
        assert cfg["r"] <= cap
    if prof.ranks is not None:
        assert any(cfg["r"] <= x for x in prof.ranks)
    assert not cfg["rank_pattern"] and not cfg["alpha_pattern"] and cfg["use_rslora"] is False
    assert cfg["use_dora"] is False and cfg["lora_bias"] is False and not cfg["modules_to_save"] and not a.modules_to_save
    assert all(m.magnitude is None and m.bias is None for m in a.modules.values())
    for n in a.modules:
        leaf = n.rsplit(".", 1)[-1]
        assert leaf not in ("embed_tokens", "lm_head") or leaf in prof.lora_on
    # the runtime's reading of the scale (one lora_alpha / r) is PEFT's for every module
    assert all(abs(m.scale - cfg["lora_alpha"] / cfg["r"]) < 1e-12 for m in a.modules.values())


@pytest.mark.parametrize("runtime,cap", [("vllm", 64), ("sglang", None)])
def test_exact_fold_gives_peft_the_same_logits(fx, made, tmp_path, runtime, cap):
    m = fx / "models" / "llama"
    out = tmp_path / runtime
    rep = api.convert_for_runtime(made["rs64"], out, runtime, max_rank=cap, base=m)
    assert not rep["lossy"] and rep["scales_folded"] > 0 and rep["padded_modules"] > 0
    check_rules(out, runtime, cap)
    kl, orig, conv = peft_kl(m, made["rs64"], out)
    base = peft_logits(m, made["rs64"], ids_of(m)[:1])  # (the adapter matters: against the base model below)
    plain = load_model(m)(torch.tensor([ids_of(m)[0]]))[0][0].double().numpy()
    assert np.abs(base[0] - plain).max() > 0.1
    assert max(float(np.abs(x - y).max()) for x, y in zip(orig, conv)) <= 1e-5
    assert rep["cost"]["mean_kl"] < 1e-9 and rep["cost"]["top1"] == 1.0


def test_rank_cap_is_lossy_and_its_kl_is_peft_s(fx, made, tmp_path, run_cli):
    m = fx / "models" / "llama"
    out = tmp_path / "vllm16"
    code, stdout, err = run_cli("convert", made["rs64"], "--for", "vllm", "--base", m, "-o", out, "--json")
    assert code == 0, err
    rep = json.loads(stdout)
    check_rules(out, "vllm", 16)
    cut = rep["steps"]["rank_cap"]
    assert set(cut["modules"]) == {n for n in read_peft(made["rs64"]).modules}  # every module was above 16
    assert all(v["rank"] == 16 and 0 < v["retained"] < 1 for v in cut["modules"].values())
    assert 0 < cut["retained"] < 1
    kl, _, _ = peft_kl(m, made["rs64"], out)
    assert kl > 1e-6
    assert rep["cost"]["mean_kl"] == pytest.approx(kl, rel=1e-3, abs=1e-9)


def test_dora_becomes_plain_lora(fx, made, tmp_path):
    m = fx / "models" / "llama"
    out = tmp_path / "dora-vllm"
    rep = api.convert_for_runtime(made["dora"], out, "vllm", max_rank=32, base=m)
    check_rules(out, "vllm", 32)
    d = rep["steps"]["dora"]
    assert len(d["modules"]) == 6 and all(v["rank"] == 32 for v in d["modules"].values())
    assert 0 < d["retained"] <= 1
    kl, _, _ = peft_kl(m, made["dora"], out)
    assert kl > 0
    assert rep["cost"]["mean_kl"] == pytest.approx(kl, rel=1e-3, abs=1e-9)
    # at full rank (64 = min(out, in) of every module) the factorization is exact: PEFT's DoRA logits
    full = tmp_path / "dora-full"
    rep = api.convert_for_runtime(made["dora"], full, "sglang", max_rank=64, base=m)
    assert rep["steps"]["dora"]["retained"] == pytest.approx(1.0, abs=1e-6)
    kl, orig, conv = peft_kl(m, made["dora"], full)
    assert max(float(np.abs(x - y).max()) for x, y in zip(orig, conv)) <= 1e-4


def test_modules_to_save_head_becomes_lora_where_the_runtime_takes_it(fx, made, tmp_path, run_cli):
    m = fx / "models" / "llama"
    code, _, err = run_cli("convert", made["mts"], "--for", "vllm", "--base", m, "-o", tmp_path / "v")
    assert code == 4 and "lm_head" in err and "modules_to_save" in err and not (tmp_path / "v").exists()
    assert len(err.strip().splitlines()) == 1
    out = tmp_path / "sg"
    rep = api.convert_for_runtime(made["mts"], out, "sglang", max_rank=64, base=m)
    check_rules(out, "sglang", 64)
    assert "lm_head" in read_peft(out).modules
    assert rep["steps"]["modules_to_save"]["modules"]["lm_head"]["rank"] == 64
    kl, orig, conv = peft_kl(m, made["mts"], out)
    assert rep["cost"]["mean_kl"] == pytest.approx(kl, rel=1e-3, abs=1e-9)
    assert max(float(np.abs(x - y).max()) for x, y in zip(orig, conv)) <= 1e-4  # rank 64 = hidden: exact


def test_embedding_lora_refused_by_name_where_not_taken(fx, made, tmp_path, run_cli):
    m = fx / "models" / "llama"
    for rt in ("vllm", "onnxruntime"):
        out = tmp_path / f"emb-{rt}"
        code, _, err = run_cli("convert", made["emb"], "--for", rt, "--base", m, "-o", out)
        assert code == 4 and "embed_tokens" in err and not out.exists(), err
    out = tmp_path / "emb-sglang"
    rep = api.convert_for_runtime(made["emb"], out, "sglang", base=m)
    assert not rep["lossy"]
    check_rules(out, "sglang", None)
    _, orig, conv = peft_kl(m, made["emb"], out)
    assert max(float(np.abs(x - y).max()) for x, y in zip(orig, conv)) <= 1e-5


def test_llama_cpp_profile_in_llama_cpp(fx, made, tmp_path):
    pytest.importorskip("llama_cpp")
    from loratools.formats.gguf_model import export_gguf
    from loratools.runtimes import llamacpp

    m = fx / "models" / "llama"
    base_gguf = tmp_path / "base.gguf"
    export_gguf(m, base_gguf, outtype="f32")
    ids = ids_of(m)[1]
    for name in ("rs64", "emb", "mts"):
        out = tmp_path / f"{name}.gguf"
        rep = api.convert_for_runtime(made[name], out, "llama.cpp", base=m, max_rank=64 if name == "mts" else None)
        assert rep["gguf"]["modules"] > 0
        want = load_model(m, adapters=[api.load_adapter(made[name], base=m)])(torch.tensor([ids]))[0][0].numpy()
        got = llamacpp.logits(base_gguf, ids, lora=out)
        assert np.abs(want - load_model(m)(torch.tensor([ids]))[0][0].numpy()).max() > 0.05  # the adapter matters
        assert (want.argmax(-1) == got.argmax(-1)).all()
        assert np.abs(want - got).max() < 1e-3 * max(float(np.abs(want).max()), 1.0)
    # DoRA (lossy at the default: the module's own rank): llama.cpp computes the converted plain LoRA
    from loratools.ops.serve import convert_for

    res, _ = convert_for(api.load_adapter(made["dora"], base=m), "llama.cpp", None, m)
    out = tmp_path / "dora.gguf"
    api.convert_for_runtime(made["dora"], out, "llama.cpp", base=m)
    want = load_model(m, adapters=[res])(torch.tensor([ids]))[0][0].numpy()
    got = llamacpp.logits(base_gguf, ids, lora=out)
    assert np.abs(want - load_model(m)(torch.tensor([ids]))[0][0].numpy()).max() > 0.05
    assert np.abs(want - got).max() < 1e-3 * max(float(np.abs(want).max()), 1.0)


def test_onnxruntime_profile_in_onnxruntime(fx, made, tmp_path):
    pytest.importorskip("onnxruntime")
    from loratools.formats.onnx_model import export_onnx
    from loratools.runtimes.onnxruntime import Runner

    m = fx / "models" / "llama"
    slots = tmp_path / "slots"
    export_onnx(m, slots, lora_slots="all-linear")
    out = tmp_path / "rs64.onnx_adapter"
    rep = api.convert_for_runtime(made["rs64"], out, "onnxruntime", base=m)
    assert not rep["lossy"]
    ids = ids_of(m)[0]
    want = load_model(m, adapters=[api.load_adapter(made["rs64"], base=m)])(torch.tensor([ids]))[0][0].numpy()
    got = Runner(slots, adapter=out).run(ids)[0]
    assert np.abs(want - got).max() <= 1e-4


def test_bad_inputs_one_line_nothing_written(fx, made, tmp_path, run_cli):
    m = fx / "models" / "llama"
    cases = [
        (("convert", made["rs64"], "--for", "vllm", "--max-rank", "24"), 2, "--max-rank 24 is not a rank vLLM accepts"),
        (("convert", made["dora"], "--for", "vllm"), 2, "pass --base"),
        (("convert", made["rs64"], "--for", "vllm", "--base", m, "--max-kl", "1e-9"), 1, "--max-kl"),
        (("convert", made["rs64"], "--for", "llama.cpp"), 2, "pass --base"),
        (("convert", made["rs64"], "--for", "vllm", "--max-kl", "1"), 2, "--max-kl needs --base"),
        (("convert", made["mts"], "--for", "sglang"), 2, "pass --base"),
    ]
    for i, (args, want_code, text) in enumerate(cases):
        out = tmp_path / f"bad{i}"
        code, _, err = run_cli(*args, "-o", out)
        assert code == want_code and text in err and not out.exists(), (args, code, err)
        assert len(err.strip().splitlines()) == 1


def test_inspect_for_runtime(fx, made, tmp_path, run_cli):
    m = fx / "models" / "llama"
    code, out, _ = run_cli("inspect", made["rs64"], "--for", "vllm", "--json")
    d = json.loads(out)["serving"]
    assert code == 1 and d["refused"]
    whats = {i["what"]: i["action"] for i in d["issues"]}
    assert whats["rank"] == "refuse" and whats["scale"] == "differs" and whats["rank_pattern"] == "differs"
    code, out, _ = run_cli("inspect", made["dora"], "--for", "sglang")
    assert code == 1 and "DoRA" in out and "REFUSES" in out
    code, out, _ = run_cli("inspect", made["mts"], "--for", "llama.cpp", "--json")
    assert code == 1 and {i["what"] for i in json.loads(out)["serving"]["issues"]} == {"modules_to_save"}
    # a converted adapter passes the same lint
    conv = tmp_path / "conv"
    api.convert_for_runtime(made["rs64"], conv, "vllm")
    code, out, _ = run_cli("inspect", conv, "--for", "vllm", "--json")
    assert code == 0 and json.loads(out)["serving"]["issues"] == []
    code, out, _ = run_cli("inspect", fx / "adapters" / "llama-rslora", "--for", "sglang")
    assert code == 0 and "differs" in out and "use_rslora is not read" in out
