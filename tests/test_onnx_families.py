"""ONNX export of every family in ONNX Runtime against transformers and PEFT, parametrized over
fixtures/families.py (each family of the registry has a fixture there, built by transformers' own
classes): merged fp32 logits, the KV cache (prefill, then one token at a time), fp16, LoRA slots
fed a PEFT adapter's .onnx_adapter (all linear modules, fused qkv_proj / gate_up_proj included),
and ``validate`` on the ONNX candidates.

Measured max |Δlogit| (fp32, logits of magnitude 1-10) are about 1e-5; the bound is 1e-4."""

import warnings

import numpy as np
import pytest
import torch

from fixtures.families import FIXTURES
from loratools import api
from loratools.arch.registry import FAMILIES
from loratools.errors import IncompatibleError
from loratools.formats.onnx_model import export_onnx, export_onnx_adapter
from loratools.models.config import load_config
from loratools.runtimes.onnxruntime import Runner
from loratools.validate import validate

NAMES = list(FIXTURES)
N = 28      # longer than every fixture's sliding window and LongRoPE's original length
SHORT = 10  # within LongRoPE's original length (its short factors)
PREFILL = 18
FP32 = 1e-4
# every linear module of the text decoder (PEFT's all-linear would take a multimodal vision tower too)
TEXT_LINEAR = (r"^(?!.*vision_tower).*\.(q_proj|k_proj|v_proj|qkv_proj|o_proj|gate_proj|up_proj|gate_up_proj|down_proj"
               r"|per_layer_input_gate|per_layer_projection)$")  # the last two: Gemma 4's per-layer input branch


@pytest.fixture(scope="module")
def fam(request, tmp_path_factory):
    try:
        return request.getfixturevalue("families")  # the session-wide fixture tree, when conftest has it
    except pytest.FixtureLookupError:
        from fixtures.families import make_families

        return make_families(tmp_path_factory.mktemp("families"))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-families")


def _ids(model_dir, n=N, seed=9):
    vocab = load_config(model_dir).vocab_size
    return [int(x) for x in torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed))]


def _hf(model_dir, name):
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cls = getattr(transformers, FIXTURES[name].model_class)
        return cls.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager").eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _peft_adapter(model_dir, name, out):
    """A PEFT adapter on every linear module of the text decoder (fused ones as they are), with
    random (non-zero) B, saved by PEFT itself; returns (folder, the PeftModel)."""
    from peft import LoraConfig, get_peft_model

    hf = _hf(model_dir, name)
    torch.manual_seed(5)
    pm = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=TEXT_LINEAR, init_lora_weights=False)).eval()
    pm.save_pretrained(str(out))
    return out, pm


@pytest.fixture(scope="module")
def case(fam, work):
    """name -> what a family's tests share (exports, reference logits); ``adapter=True`` adds a
    PEFT adapter, PeftModel's logits, the merged / fp16 / slot exports and the .onnx_adapter."""
    cache = {}

    def get(name, adapter=False):
        m, d = fam / name, work / name
        if name not in cache:
            d.mkdir(exist_ok=True)
            ids = _ids(m)
            hf = _hf(m, name)
            c = {"model": m, "dir": d, "ids": ids, "want": _logits(hf, ids), "want_short": _logits(hf, ids[:SHORT])}
            del hf
            export_onnx(m, d / "fp32", overwrite=True)
            cache[name] = c
        c = cache[name]
        if adapter and "adapter" not in c:
            ad, pm = _peft_adapter(m, name, d / "peft")
            c["peft_want"] = _logits(pm, c["ids"])
            c["peft_modules"] = sorted(n.removeprefix("base_model.model.") for n, mod in pm.named_modules()
                                       if hasattr(mod, "lora_A") and "default" in mod.lora_A)
            del pm
            a = api.load_adapter(ad, base=m)
            export_onnx(m, d / "merged", [a], overwrite=True)
            export_onnx(m, d / "merged16", [a], dtype="fp16", overwrite=True)
            export_onnx(m, d / "slots", lora_slots="all-linear", overwrite=True)
            export_onnx_adapter(a, d / "a.onnx_adapter", base=m, overwrite=True)
            c["adapter"] = ad
        return c

    return get


def _slot_names(onnx_dir):
    import onnx

    g = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False).graph
    return sorted(i.name.removesuffix(".lora_A") for i in g.input if i.name.endswith(".lora_A"))


def test_every_registry_family_has_an_onnx_case():
    """A family added to the registry is exported here once fixtures/families.py builds it (the
    four original families are covered by tests/test_onnx.py on fixtures/generate.py)."""
    from tests.conftest import ARCHS

    covered = {fx.family for fx in FIXTURES.values()} | set(ARCHS)
    missing = [f for f, s in FAMILIES.items() if s.implemented and f not in covered]
    assert not missing, f"families without an ONNX test fixture: {missing}"


@pytest.mark.parametrize("name", NAMES)
def test_merged_fp32_and_kv_cache_match_transformers(case, name):
    c = case(name)
    r = Runner(c["dir"] / "fp32")
    ids, want = c["ids"], c["want"]
    got = r.run(ids)[0]
    d_full = float(np.abs(got - want).max())
    assert d_full <= FP32, d_full
    assert (got.argmax(-1) == want.argmax(-1)).all()
    # a prompt within LongRoPE's original length (short factors, where the family has LongRoPE)
    d_short = float(np.abs(r.run(ids[:SHORT])[0] - c["want_short"]).max())
    assert d_short <= FP32, d_short
    # KV cache: prefill past every sliding window, then one token at a time, each step equal to the full run
    lg, past = r.run(ids[:PREFILL])
    worst = float(np.abs(lg - want[:PREFILL]).max())
    for t in range(PREFILL, len(ids)):
        lg, past = r.run([ids[t]], past, t)
        worst = max(worst, float(np.abs(lg[-1] - want[t]).max()))
    assert worst <= FP32, worst
    # and within the short regime: prefill 4, steps to SHORT, against transformers' short run
    lg, past = r.run(ids[:4])
    short_worst = float(np.abs(lg - c["want_short"][:4]).max())
    for t in range(4, SHORT):
        lg, past = r.run([ids[t]], past, t)
        short_worst = max(short_worst, float(np.abs(lg[-1] - c["want_short"][t]).max()))
    assert short_worst <= FP32, short_worst
    # every layer with its own cache has one past/present pair; kv heads and head_dim as the config says
    cfg = load_config(c["model"])
    assert r.layers == cfg.num_hidden_layers - cfg.kv_shared_layers
    for k in [n for n in past if n.endswith(".key")]:
        assert past[k].shape[2] == SHORT and past[k].shape == past[k.replace(".key", ".value")].shape
    print(f"\n{name}: fp32 max|Δ| full {d_full:.2e} short {d_short:.2e} cached {worst:.2e} / {short_worst:.2e}")


def test_longrope_switch_is_in_the_graph(fam, case):
    """LongRoPE picks short or long factors per call from the furthest position (as transformers):
    one ONNX graph gives both regimes. Checked on the fixtures whose rope is LongRoPE."""
    names = [n for n in NAMES if any(r is not None and r.rope_type == "longrope"
                                     for r in load_config(fam / n).layer_ropes)]
    assert names  # the registry has a LongRoPE family (phi3)
    for name in names:
        c = case(name)
        # transformers itself: the first SHORT positions differ between a short and a long call
        assert np.abs(c["want"][:SHORT] - c["want_short"]).max() > 1e-2
        r = Runner(c["dir"] / "fp32")
        got_long = r.run(c["ids"])[0][:SHORT]
        assert np.abs(got_long - c["want"][:SHORT]).max() <= FP32
        # greedy generation across the switch point equals transformers' generate (which recomputes
        # the cache once on crossing), with and without the cache
        switch = r.longrope
        assert switch is not None and SHORT < switch
        n = switch - SHORT + 6
        with torch.no_grad():
            ref = _hf(c["model"], name).generate(torch.tensor([c["ids"][:SHORT]]), max_new_tokens=n, min_new_tokens=n,
                                                  do_sample=False)[0, SHORT:].tolist()
        assert r.greedy(c["ids"][:SHORT], n, cache=True) == ref == r.greedy(c["ids"][:SHORT], n, cache=False)


@pytest.mark.parametrize("name", NAMES)
def test_fp16_export_is_close(case, name):
    c = case(name, adapter=True)
    got = Runner(c["dir"] / "merged16").run(c["ids"])[0]
    want = c["peft_want"]
    d = float(np.abs(got - want).max())
    assert d <= 0.05 * float(np.abs(want).max()), d
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95
    print(f"\n{name}: fp16 merged max|Δ| {d:.2e} (logits up to {np.abs(want).max():.1f})")


@pytest.mark.parametrize("name", NAMES)
def test_lora_slots_with_peft_adapter_match_peft(case, name):
    c = case(name, adapter=True)
    ids = c["ids"]
    base = Runner(c["dir"] / "slots")
    slots = _slot_names(c["dir"] / "slots")
    cfg = load_config(c["model"])
    assert slots == sorted(cfg.to_internal(n) for n in c["peft_modules"])  # PEFT's all-linear, fused modules included
    assert np.abs(base.run(ids)[0] - c["want"]).max() <= FP32  # nothing fed: the base model
    got = Runner(c["dir"] / "slots", adapter=c["dir"] / "a.onnx_adapter").run(ids)[0]
    d = float(np.abs(got - c["peft_want"]).max())
    assert d <= FP32, d
    assert np.abs(c["peft_want"] - c["want"]).max() > 0.1  # the adapter changes the logits
    d_merged = float(np.abs(Runner(c["dir"] / "merged").run(ids)[0] - c["peft_want"]).max())
    assert d_merged <= FP32, d_merged
    print(f"\n{name}: slots+adapter max|Δ| vs PEFT {d:.2e}, merged {d_merged:.2e}")


@pytest.mark.parametrize("name", NAMES)
def test_validate_passes_on_onnx_candidates(case, name):
    c = case(name, adapter=True)
    d = c["dir"]
    rep = validate(c["model"], [c["adapter"]], [str(d / "merged"), str(d / "merged16"), f"{d / 'slots'}+{d / 'a.onnx_adapter'}"],
                   tokens=6, device="cpu")
    assert rep["passed"], [(x["candidate"], x["failed_checks"], x["metrics"]) for x in rep["candidates"]]
    assert [x["precision"] for x in rep["candidates"]] == ["fp32", "fp16", "fp32"]
    assert rep["independent_reference"]["agrees"]


def test_adapter_that_does_not_fit_the_slot_model_is_one_line(fam, case, work, run_cli):
    """A fused adapter on a slot model without those slots, and an adapter of another shape:
    refused in one line (exit 3), nothing written."""
    cfgs = {n: load_config(fam / n) for n in NAMES}
    fused = next(n for n in NAMES if cfgs[n].fused_qkv)
    c = case(fused, adapter=True)
    few = work / f"{fused}-o-slots"
    export_onnx(c["model"], few, lora_slots="o_proj,down_proj")
    out = work / "nofit.onnx_adapter"
    code, _, err = run_cli("export", "onnx-adapter", c["adapter"], "-o", out, "--model", few)
    assert code == 3 and "qkv_proj" in err and "matches no LoRA slot" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    # the same module names, other shapes: a split-projection family's adapter on another's slot model
    plain = [n for n in NAMES if not cfgs[n].fused_qkv and not FIXTURES[n].text_config]
    src, dst = next((a, b) for a in plain for b in plain if cfgs[a].q_size != cfgs[b].q_size
                     and cfgs[a].num_hidden_layers == cfgs[b].num_hidden_layers)
    cs, cd = case(src, adapter=True), case(dst, adapter=True)
    from loratools.formats.onnx_model import check_adapter_fits

    with pytest.raises(IncompatibleError, match="but the slot is"):
        check_adapter_fits(cd["dir"] / "slots" / "model.onnx", cs["dir"] / "a.onnx_adapter")
    code, _, err = run_cli("validate", "--base", cd["model"], "-a", cd["adapter"], f"{cd['dir'] / 'slots'}+{cs['dir'] / 'a.onnx_adapter'}")
    assert code == 3 and "but the slot is" in err and len(err.strip().splitlines()) == 1, err
