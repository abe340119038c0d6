"""ONNX export of the mixture-of-experts families in ONNX Runtime against transformers and PEFT
(fixtures.families.MOE_FIXTURES): merged fp32 logits with expert / router / shared-expert LoRA,
the KV cache (prefill past every window, then one token at a time), a left-padded batch, and the
LoRA-slot export (slots on attention, router, shared expert and every expert matrix) fed nothing
(the base model) and fed the adapter's .onnx_adapter (PeftModel). The traced graph runs every
expert on every token, weighted by the scattered routing weights (decoder.MoE)."""
import numpy as np
import pytest
import torch

from fixtures.families import MOE_FIXTURES
from loratools import api
from loratools.arch import load_config
from loratools.formats.onnx_model import export_onnx, export_onnx_adapter
from loratools.runtimes.onnxruntime import Runner
from tests.test_moe_decoder import canonical_adapter, hf_model, peft_moe
from tests.test_onnx_families import N, PREFILL, _cached, _ids, _slot_names, slot_errors

NAMES = list(MOE_FIXTURES)
FP32 = 1e-4  # as tests/test_onnx_families.py (measured about 1e-5)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("moe-onnx")


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.fixture(scope="module")
def case(moe_families, work):
    """name -> transformers' base logits, PeftModel's with LoRA on experts (target_parameters),
    router, attention (and Qwen2-MoE's shared expert), saved by PEFT and read by load_adapter;
    the LoRA-slot export and the adapter's .onnx_adapter."""
    cache = {}

    def get(name):
        if name not in cache:
            m, d = moe_families / name, work / name
            d.mkdir(exist_ok=True)
            ids = _ids(m)
            c = {"model": m, "dir": d, "ids": ids, "base": _logits(hf_model(m), ids)}
            pm = peft_moe(m, name, seed=3)
            c["want"] = _logits(pm, ids)
            pm.save_pretrained(str(d / "peft"))
            canonical = canonical_adapter(pm, load_config(m), name)  # built from PEFT's deltas
            del pm
            c["adapter"] = a = api.load_adapter(d / "peft", base=m)  # read from PEFT's files
            assert set(a.modules) == set(canonical.modules)
            export_onnx(m, d / "slots", lora_slots="all-linear")
            export_onnx_adapter(a, d / "a.onnx_adapter", base=m)
            cache[name] = c
        return cache[name]

    return get


@pytest.mark.parametrize("name", NAMES)
def test_merged_fp32_and_kv_cache_match_peft(case, name):
    c = case(name)
    export_onnx(c["model"], c["dir"] / "merged", [c["adapter"]])
    r = Runner(c["dir"] / "merged")
    ids, want = c["ids"], c["want"]
    d_full = float(np.abs(r.run(ids)[0] - want).max())
    assert d_full <= FP32, d_full
    d_cache = float(np.abs(_cached(r, ids, PREFILL, N)[0] - want).max())
    assert d_cache <= FP32, d_cache
    assert np.abs(want - c["base"]).max() > 0.1  # the adapter changes the logits
    # a left-padded row of a batch of 2 equals its own batch-1 run
    pad = 5
    feeds = {"input_ids": np.asarray([ids, [0] * pad + ids[:N - pad]], dtype=np.int64),
             "attention_mask": np.asarray([[1] * N, [0] * pad + [1] * (N - pad)], dtype=np.int64),
             "position_ids": np.asarray([list(range(N)), [0] * pad + list(range(N - pad))], dtype=np.int64)}
    feeds.update(r._empty_past(2))
    logits = r.sess.run(["logits"], feeds)[0]
    assert np.abs(logits[1, pad:] - r.run(ids[:N - pad])[0]).max() <= FP32
    print(f"\n{name}: ONNX merged vs PEFT max|Δ| full {d_full:.2e} cached {d_cache:.2e}")


@pytest.mark.parametrize("name", NAMES)
def test_lora_slots_with_expert_adapter_match_peft(case, name):
    """Slots on every linear layer of the blocks, each expert matrix one slot (its canonical
    per-expert name); fed nothing the export is the base model, fed the .onnx_adapter PeftModel."""
    c = case(name)
    cfg = load_config(c["model"])
    slots = _slot_names(c["dir"] / "slots")
    experts = [s for s in slots if ".experts." in s]
    assert len(experts) == 3 * cfg.moe.experts * sum(cfg.moe.layers)
    assert set(c["adapter"].modules) <= set(slots)
    ids = c["ids"]
    d_base, d_base_cache, d, d_cache = slot_errors(c, ids)
    print(f"\n{name}: ONNX slots base max|Δ| {d_base:.2e} (cached {d_base_cache:.2e}); slots+adapter vs PEFT {d:.2e} "
          f"(cached {d_cache:.2e})")


@pytest.mark.parametrize("name", ["qwen2_moe", "gpt_oss"])  # shared expert and dense layer; sinks, YaRN, fused experts
def test_validate_passes_on_onnx_candidates(case, name):
    """validate: the merged fp32 and fp16 exports and the slot export + .onnx_adapter against the
    reference (base + the PEFT adapter unmerged), which agrees with PeftModel."""
    from loratools.validate import validate

    c = case(name)
    d = c["dir"]
    if not (d / "merged").exists():
        export_onnx(c["model"], d / "merged", [c["adapter"]])
    export_onnx(c["model"], d / "merged16", [c["adapter"]], dtype="fp16")
    rep = validate(c["model"], [d / "peft"], [str(d / "merged"), str(d / "merged16"), f"{d / 'slots'}+{d / 'a.onnx_adapter'}"],
                   tokens=6, device="cpu")
    assert rep["passed"], [(x["candidate"], x["failed_checks"], x["metrics"]) for x in rep["candidates"]]
    assert [x["precision"] for x in rep["candidates"]] == ["fp32", "fp16", "fp32"]
    assert rep["candidates"][0]["metrics"]["max_abs"] <= FP32 and rep["candidates"][2]["metrics"]["max_abs"] <= FP32
    assert rep["independent_reference"]["agrees"]
    print(f"\n{name}: validate max|Δ| merged fp32 {rep['candidates'][0]['metrics']['max_abs']:.2e}, fp16 "
          f"{rep['candidates'][1]['metrics']['max_abs']:.2e}, slots+adapter {rep['candidates'][2]['metrics']['max_abs']:.2e}; "
          f"reference vs PEFT {rep['independent_reference']['max_abs_vs_reference']:.2e}")


def test_mxfp4_export(moe_families, case, work):
    """An MXFP4 gpt-oss exports (experts dequantized, one at a time) and runs as the reference
    decoder, base and with the expert adapter merged."""
    from fixtures.mxfp4 import make_mxfp4
    from loratools.models import load_model

    q = make_mxfp4(moe_families / "gpt_oss", work / "mxfp4")
    c = case("gpt_oss")
    a = api.load_adapter(c["dir"] / "peft", base=q)
    ids = c["ids"]
    for out, adapters in ((work / "mxfp4-base", []), (work / "mxfp4-merged", [a])):
        export_onnx(q, out, adapters)
        with torch.no_grad():
            want = load_model(q, adapters=adapters)(torch.tensor([ids]))[0][0].numpy()
        d = float(np.abs(Runner(out).run(ids)[0] - want).max())
        assert d <= FP32, (out.name, d)
