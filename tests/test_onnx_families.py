"""ONNX export of every family in ONNX Runtime against transformers and PEFT, parametrized over
fixtures/families.py (each family of the registry has a fixture there, built by transformers' own
classes): merged fp32 logits, the KV cache (prefill, then one token at a time), fp16, LoRA slots
fed a PEFT adapter's .onnx_adapter (all linear modules, fused qkv_proj / gate_up_proj included),
and ``validate`` on the ONNX candidates.

Measured max |Δlogit| (fp32, logits of magnitude 1-10) are at most about 1e-5; the bound is 1e-4.
Three exports per fixture (adapter merged in fp32 and fp16, LoRA slots): the base model is
checked through the slot export fed nothing."""

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


def slot_errors(c, ids):
    """max |Δlogit| of the LoRA-slot export ``c["dir"]/slots``: fed nothing against ``c["base"]`` and
    fed ``a.onnx_adapter`` against ``c["want"]``, each in one call and cached (prefill, then one token
    at a time); each within FP32."""
    base = Runner(c["dir"] / "slots")
    r = Runner(c["dir"] / "slots", adapter=c["dir"] / "a.onnx_adapter")
    out = (float(np.abs(base.run(ids)[0] - c["base"]).max()),
           float(np.abs(_cached(base, ids, PREFILL, N)[0] - c["base"]).max()),
           float(np.abs(r.run(ids)[0] - c["want"]).max()),
           float(np.abs(_cached(r, ids, PREFILL, N)[0] - c["want"]).max()))
    assert max(out) <= FP32, out
    return out


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


def _peft(hf, out):
    """A PEFT adapter with random (non-zero) B on every linear layer of the text decoder's blocks
    (fused qkv_proj / gate_up_proj as they are; PEFT's all-linear would take a multimodal vision
    tower too), saved by PEFT itself; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    targets = [n for n, mod in hf.named_modules() if isinstance(mod, torch.nn.Linear) and ".layers." in n
               and "vision" not in n]
    torch.manual_seed(5)
    pm = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)).eval()
    pm.save_pretrained(str(out))
    return pm


@pytest.fixture(scope="module")
def case(fam, work):
    """name -> what a family's tests share: transformers' logits of the base and PeftModel's with
    a PEFT adapter; three exports (adapter merged in fp32 and fp16, LoRA slots) and the adapter's
    .onnx_adapter."""
    cache = {}

    def get(name):
        if name not in cache:
            m, d = fam / name, work / name
            d.mkdir(exist_ok=True)
            ids = _ids(m)
            hf = _hf(m, name)
            c = {"model": m, "dir": d, "ids": ids, "base": _logits(hf, ids)}
            pm = _peft(hf, d / "peft")
            c["want"], c["want_short"] = _logits(pm, ids), _logits(pm, ids[:SHORT])
            c["peft_modules"] = sorted(n.removeprefix("base_model.model.") for n, mod in pm.named_modules()
                                       if hasattr(mod, "lora_A") and "default" in mod.lora_A)
            del pm, hf
            a = api.load_adapter(d / "peft", base=m)
            export_onnx(m, d / "merged", [a])
            export_onnx(m, d / "merged16", [a], dtype="fp16")
            export_onnx(m, d / "slots", lora_slots="all-linear")
            export_onnx_adapter(a, d / "a.onnx_adapter", base=m)
            c["adapter"] = d / "peft"
            cache[name] = c
        return cache[name]

    return get


def _slot_names(onnx_dir):
    import onnx

    g = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False).graph
    return sorted(i.name.removesuffix(".lora_A") for i in g.input if i.name.endswith(".lora_A"))


def _cached(r, ids, prefill, upto):
    """Logits of ids[:upto] with a KV cache: ``prefill`` tokens at once, then one at a time."""
    lg, past = r.run(ids[:prefill])
    rows = list(lg)
    for t in range(prefill, upto):
        lg, past = r.run([ids[t]], past, t)
        rows.append(lg[-1])
    return np.stack(rows), past


def test_every_registry_family_has_an_onnx_case():
    """A family added to the registry is exported here as soon as fixtures/families.py builds it."""
    from tests.conftest import ARCHS

    from fixtures.families import MOE_FIXTURES

    # ARCHS: tests/test_onnx.py as well; MOE_FIXTURES: tests/test_moe_onnx.py
    covered = {fx.family for fx in FIXTURES.values()} | set(ARCHS) | {fx.family for fx in MOE_FIXTURES.values()}
    missing = [f for f, s in FAMILIES.items() if s.implemented and f not in covered]
    assert not missing, f"families without an ONNX test fixture: {missing}"


@pytest.mark.parametrize("name", NAMES)
def test_merged_fp32_and_kv_cache_match_transformers(case, name):
    """The merged export (fp32) equals transformers + PEFT on a prompt longer than every sliding
    window, on a short one (LongRoPE's short factors), and with the KV cache (prefill past the
    windows, then one token at a time; and within the short regime)."""
    c = case(name)
    r = Runner(c["dir"] / "merged")
    ids, want, short = c["ids"], c["want"], c["want_short"]
    got = r.run(ids)[0]
    d_full = float(np.abs(got - want).max())
    assert d_full <= FP32, d_full
    assert (got.argmax(-1) == want.argmax(-1)).all()
    d_short = float(np.abs(r.run(ids[:SHORT])[0] - short).max())
    assert d_short <= FP32, d_short
    d_cache = float(np.abs(_cached(r, ids, PREFILL, N)[0] - want).max())
    assert d_cache <= FP32, d_cache
    lg, past = _cached(r, ids, 4, SHORT)
    d_cache_short = float(np.abs(lg - short).max())
    assert d_cache_short <= FP32, d_cache_short
    # one past/present pair per layer with its own cache (KV-shared layers have none), all SHORT long
    cfg = load_config(c["model"])
    assert r.layers == cfg.num_hidden_layers - cfg.kv_shared_layers
    for k in [n for n in past if n.endswith(".key")]:
        assert past[k].shape[2] == SHORT and past[k].shape[:3] == past[k.replace(".key", ".value")].shape[:3]
    print(f"\n{name}: fp32 merged max|Δ| full {d_full:.2e} short {d_short:.2e} cached {d_cache:.2e} / {d_cache_short:.2e}")


@pytest.mark.parametrize("name", NAMES)
def test_batch_with_left_padding_equals_single_rows(case, name):
    """Batch 2, the second row left-padded (attention_mask 0, position_ids from 0 at its first
    token): each row's logits at its real positions equal its own batch-1 run (which equals
    transformers, above)."""
    c = case(name)
    r = Runner(c["dir"] / "merged")
    pad, ids = 5, c["ids"]
    rows = [ids, [0] * pad + ids[:N - pad]]
    feeds = {"input_ids": np.asarray(rows, dtype=np.int64),
             "attention_mask": np.asarray([[1] * N, [0] * pad + [1] * (N - pad)], dtype=np.int64),
             "position_ids": np.asarray([list(range(N)), [0] * pad + list(range(N - pad))], dtype=np.int64)}
    feeds.update(r._empty_past(2))
    logits = r.sess.run(["logits"], feeds)[0]
    assert np.abs(logits[0] - r.run(ids)[0]).max() <= FP32
    assert np.abs(logits[1, pad:] - r.run(ids[:N - pad])[0]).max() <= FP32


def test_longrope_switch_is_in_the_graph(fam, case):
    """LongRoPE picks short or long factors per call from the furthest position (as transformers):
    one ONNX graph gives both regimes; generation across the switch point recomputes the cache
    once, as transformers' generate does."""
    names = [n for n in NAMES if any(r is not None and r.rope_type == "longrope" for r in load_config(fam / n).layer_ropes)]
    assert names  # the registry has a LongRoPE family (phi3)
    for name in names:
        c = case(name)
        assert np.abs(c["want"][:SHORT] - c["want_short"]).max() > 1e-2  # the two regimes differ
        r = Runner(c["dir"] / "merged")
        switch = r.longrope
        assert switch is not None and SHORT < switch < N
        n = switch - SHORT + 6
        pm = _hf(c["model"], name)
        from peft import PeftModel

        pm = PeftModel.from_pretrained(pm, str(c["adapter"])).eval()
        with torch.no_grad():
            ref = pm.generate(torch.tensor([c["ids"][:SHORT]]), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False)[0, SHORT:].tolist()
        assert r.greedy(c["ids"][:SHORT], n, cache=True) == ref == r.greedy(c["ids"][:SHORT], n, cache=False)


@pytest.mark.parametrize("name", NAMES)
def test_fp16_export_is_close(case, name):
    c = case(name)
    got = Runner(c["dir"] / "merged16").run(c["ids"])[0]
    want = c["want"]
    d = float(np.abs(got - want).max())
    assert d <= 0.05 * float(np.abs(want).max()), d
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95
    print(f"\n{name}: fp16 merged max|Δ| {d:.2e} (logits up to {np.abs(want).max():.1f})")


@pytest.mark.parametrize("name", NAMES)
def test_lora_slots_with_peft_adapter_match_peft(case, name):
    """The LoRA-slot export: fed nothing it is the base model (full run and KV cache against
    transformers); fed the PEFT adapter's .onnx_adapter it equals PeftModel."""
    c = case(name)
    ids = c["ids"]
    slots = _slot_names(c["dir"] / "slots")
    cfg = load_config(c["model"])
    assert slots == sorted(cfg.to_internal(n) for n in c["peft_modules"])  # every linear layer of the blocks, fused ones included
    d_base, d_base_cache, d, d_cache = slot_errors(c, ids)
    assert np.abs(c["want"] - c["base"]).max() > 0.1  # the adapter changes the logits
    # without the base model, the slot names come from the known layouts (a multimodal prefix too)
    import onnxruntime as ort

    export_onnx_adapter(api.load_adapter(c["adapter"]), c["dir"] / "nobase.onnx_adapter", overwrite=True)
    params = [ort.AdapterFormat.read_adapter(str(c["dir"] / f)).get_parameters() for f in ("a.onnx_adapter", "nobase.onnx_adapter")]
    assert sorted(params[0]) == sorted(params[1]) == sorted(f"{n}.lora_{x}" for n in slots for x in "AB")
    print(f"\n{name}: slots base max|Δ| {d_base:.2e} (cached {d_base_cache:.2e}); slots+adapter vs PEFT {d:.2e} "
          f"(cached {d_cache:.2e})")


def test_fp16_lora_slots_on_fused_modules(fam, case):
    """An fp16 slot model fed an fp16 .onnx_adapter (fused qkv_proj / gate_up_proj slots) is
    close to PeftModel; an fp32 adapter on it is refused in one line."""
    from loratools.formats.onnx_model import check_adapter_fits

    names = [n for n in NAMES if load_config(fam / n).fused_qkv]
    assert names
    for name in names:
        c = case(name)
        d = c["dir"]
        export_onnx(c["model"], d / "slots16", dtype="fp16", lora_slots="all-linear")
        export_onnx_adapter(api.load_adapter(c["adapter"]), d / "a16.onnx_adapter", dtype="fp16")
        check_adapter_fits(d / "slots16" / "model.onnx", d / "a16.onnx_adapter")
        got = Runner(d / "slots16", adapter=d / "a16.onnx_adapter").run(c["ids"])[0]
        assert np.abs(got - c["want"]).max() <= 0.05 * np.abs(c["want"]).max()
        assert (got.argmax(-1) == c["want"].argmax(-1)).mean() >= 0.95
        with pytest.raises(IncompatibleError, match="float32 but the slot takes float16"):
            check_adapter_fits(d / "slots16" / "model.onnx", d / "a.onnx_adapter")
        print(f"\n{name}: fp16 slots+fp16 adapter max|Δ| {np.abs(got - c['want']).max():.2e}")


@pytest.mark.parametrize("name", NAMES)
def test_validate_passes_on_onnx_candidates(case, name):
    c = case(name)
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
    c = case(fused)
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
    cs, cd = case(src), case(dst)
    from loratools.formats.onnx_model import check_adapter_fits

    with pytest.raises(IncompatibleError, match="but the slot is"):
        check_adapter_fits(cd["dir"] / "slots" / "model.onnx", cs["dir"] / "a.onnx_adapter")
    code, _, err = run_cli("validate", "--base", cd["model"], "-a", cd["adapter"], f"{cd['dir'] / 'slots'}+{cs['dir'] / 'a.onnx_adapter'}")
    assert code == 3 and "but the slot is" in err and len(err.strip().splitlines()) == 1, err


def test_adapter_file_with_a_broken_pair_is_one_line(case, work):
    """An .onnx_adapter missing one factor of a pair, or whose factors disagree on the rank (ONNX
    Runtime would fail mid-run): refused before anything runs."""
    import onnxruntime as ort

    from loratools.formats.onnx_model import check_adapter_fits

    c = case(next(n for n in NAMES if FIXTURES[n].family == "phi3"))
    params = {k: v.numpy() for k, v in ort.AdapterFormat.read_adapter(str(c["dir"] / "a.onnx_adapter")).get_parameters().items()}
    a_name = next(k for k in sorted(params) if k.endswith("qkv_proj.lora_A"))
    for label, edit in (("has no", lambda d: d.pop(a_name)),
                        ("disagree on the rank", lambda d: d.__setitem__(a_name, np.concatenate([d[a_name], d[a_name]])))):
        broken = dict(params)
        edit(broken)
        fmt = ort.AdapterFormat()
        fmt.set_adapter_version(1)
        fmt.set_model_version(1)
        fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in broken.items()})
        path = work / "broken.onnx_adapter"
        fmt.export_adapter(str(path))
        with pytest.raises(IncompatibleError, match=label):
            check_adapter_fits(c["dir"] / "slots" / "model.onnx", path)
