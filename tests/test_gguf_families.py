"""GGUF for every family of the registry, checked in llama.cpp (llama-cpp-python) against transformers and PEFT.

Parametrized over fixtures/families.FIXTURES (every registry family has one): a family added there is
picked up here; one whose GGUF path is excluded (gguf_arch.EXCLUDED) is tested to be refused with its
reason, never skipped.

Tolerances (max |Δlogit| on a 24-token prompt, longer than every sliding window and past Phi-3's
LongRoPE original length) were measured on these fixtures; TOL keeps about 3x headroom:

    fixture       |logit|max  f32       f16      q8_0 (top-1)   adapter (f32 base + f32 LoRA, vs PEFT)
    llama         3.7         2.5e-6    4.4e-3   0.13 (0.92)    3.0e-6
    mistral       3.8         2.7e-6    4.3e-3   0.12 (0.96)    3.2e-6
    qwen2         3.6         3.9e-6    4.2e-3   0.15 (1.00)    3.4e-6
    qwen3         3.6         2.7e-6    5.6e-3   0.13 (0.92)    2.7e-6
    gemma2        2.0         1.8e-3    5.4e-3   0.10 (1.00)    1.4e-3
    gemma3_text   2.0         1.5e-3    4.8e-3   0.11 (0.83)    1.5e-3
    gemma3        5.2         1.7e-3    6.9e-3   0.13 (0.88)    1.7e-3
    phi3          3.9         6.3e-6    9.4e-3   0.25 (1.00)    4.9e-6
    phi4_mini     3.8         5.4e-6    8.9e-3   0.15 (0.92)    4.4e-6
    olmo2         3.9         2.6e-6    4.3e-3   0.17 (1.00)    2.9e-6
    granite       2.0         1.0e-6    1.4e-3   0.038 (1.00)   8.3e-7
    smollm3       3.7         3.5e-6    6.1e-3   0.13 (0.92)    5.2e-6
    gemma4_text   1.3         2.2e-3    6.6e-3   0.20 (0.83)    2.9e-3
    gemma4_kv     1.9         1.9e-3    7.6e-3   0.20 (0.92)    2.8e-3
    gemma4        1.4         1.9e-3    3.4e-3   0.14 (0.88)    2.1e-3

(f32 and the adapter: top-1 100% on every row; f16 top-1 >= 0.958; q8_0 >= 0.83. Gemma logits are
flat (soft-capped), so a flip where the reference's top-2 gap is within twice the max error -- a
near-tie the fp16 GELU table can flip; seen once on an earlier gemma4_kv fixture, gap 3.6e-4 -- is
counted as agreement, at most one per check.)

Why Gemma's f32 error is 1e-3, not 1e-6: ggml's CPU GELU reads an fp16 lookup table
(ggml-cpu/vec.h, GGML_GELU_FP16), so every MLP activation carries fp16 rounding. SiLU families run
fp32 kernels in another summation order (1e-6..1e-5).

Where a fixture needs another value for llama.cpp to compute the same model, LLAMA_CPP_VARIANT says
which and why; the unchanged fixture is tested to be refused (or warned about) in one line.
"""
import contextlib
import io
import json
import shutil

import numpy as np
import pytest
import torch

from fixtures.families import FIXTURES, MOE_FIXTURES, make_family
from loratools import api
from loratools.arch import FAMILIES as REGISTRY, load_config
from loratools.checkpoint import Checkpoint
from loratools.errors import IncompatibleError, UnsupportedError
from loratools.formats import gguf_arch
from loratools.formats.gguf_adapter import export_gguf_adapter
from loratools.formats.gguf_model import export_gguf, import_gguf

llamacpp = pytest.importorskip("loratools.runtimes.llamacpp")
pytest.importorskip("llama_cpp")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IDS = [int(x) for x in torch.randint(3, 380, (24,), generator=torch.Generator().manual_seed(5))]
NAMES = list(FIXTURES)
GGUF_NAMES = [n for n in NAMES if FIXTURES[n].family in gguf_arch.FAMILIES]
EXCLUDED_NAMES = [n for n in NAMES if FIXTURES[n].family not in gguf_arch.FAMILIES]

_GEMMA_SCALE = "llama.cpp scales Gemma queries by 1/sqrt(head_dim) (as the released 2B/9B/4B/12B models do), not by query_pre_attn_scalar"
LLAMA_CPP_VARIANT = {
    "gemma2": ({"query_pre_attn_scalar": 32}, _GEMMA_SCALE),
    "gemma3_text": ({"query_pre_attn_scalar": 32}, _GEMMA_SCALE),
    "gemma3": ({"query_pre_attn_scalar": 32}, _GEMMA_SCALE),
    "phi3": ({"sliding_window": None}, "llama.cpp's phi3 graph ignores sliding windows (a warning says so)"),
    "mistral": ({"sliding_window": None}, "llama.cpp's llama graph ignores sliding windows (a warning says so)"),
}
TOL = {  # max |Δlogit| allowed: f32, f16, q8_0 vs transformers; adapter (llama.cpp + LoRA GGUF) vs PEFT
    "llama": (1e-4, 3e-2, 1.0, 1e-4),
    "mistral": (1e-4, 3e-2, 1.0, 1e-4),
    "qwen2": (1e-4, 3e-2, 1.0, 1e-4),
    "qwen3": (1e-4, 3e-2, 1.0, 1e-4),
    "gemma2": (1e-2, 2e-2, 0.4, 1e-2),
    "gemma3_text": (1e-2, 2e-2, 0.5, 1e-2),
    "gemma3": (1e-2, 3e-2, 0.6, 1e-2),
    "gemma4_text": (1e-2, 5e-2, 0.6, 1e-2),
    "gemma4_kv": (1e-2, 3e-2, 0.6, 1e-2),
    "gemma4": (1e-2, 5e-2, 0.6, 1e-2),
    "phi3": (1e-4, 3e-2, 0.6, 1e-4),
    "phi4_mini": (1e-4, 3e-2, 1.0, 1e-4),
    "olmo2": (1e-4, 3e-2, 0.5, 1e-4),
    "granite": (1e-4, 3e-3, 0.06, 1e-4),
    "smollm3": (1e-4, 5e-2, 1.0, 1e-4),
}
TOP1_MIN = {"f32": 1.0, "f16": 0.95, "q8_0": 0.8}
# correlation with transformers' logits of the 5/4-bit files (measured min of the others: q4_0 0.895, smollm3).
# gemma4_text (5 layers, per-layer inputs quantized too, logits soft-capped at 1.5) measured q5_1 0.928,
# q4_0 0.753 on its fixture, 0.92..0.98 / 0.73..0.92 over seeds 100..104; a wrong block layout gives ~0
LOW_BIT_MIN = {"gemma4_text": {"q5_1": 0.9, "q4_0": 0.7}}


def _compare(ref, got, ties=False):
    """(max |Δlogit|, top-1 agreement). With ``ties``: a disagreement where the reference's top-1/top-2
    gap is within twice the measured max |Δlogit| (a near-tie the kernels' error can flip: Gemma's fp16
    GELU table) counts as agreement -- at most one such position; any other disagreement counts."""
    dmax = float(np.abs(ref - got).max())
    same = ref.argmax(-1) == got.argmax(-1)
    if ties:
        top2 = np.sort(ref, -1)[:, -2:]
        tie = top2[:, 1] - top2[:, 0] <= 2 * dmax
        assert (~same & tie).sum() <= 1, "more than one near-tie flipped"
        same = same | tie
    return dmax, float(same.mean())


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """name -> the fixture folder as llama.cpp can run it (LLAMA_CPP_VARIANT applied), built once."""
    root = tmp_path_factory.mktemp("families")
    made = {}

    def get(name, variant=True):
        key = (name, variant)
        if key not in made:
            ov = LLAMA_CPP_VARIANT.get(name, ({}, ""))[0] if variant else {}
            with contextlib.redirect_stderr(io.StringIO()):  # save_pretrained's progress bars
                made[key] = make_family(root / f"{name}{'-v' if variant and ov else ''}", name,
                                        seed=100 + NAMES.index(name), **ov)
        return made[key]

    get.root = root
    return get


def hf_model(name, path):
    return getattr(transformers, FIXTURES[name].model_class).from_pretrained(str(path), dtype=torch.float32).eval()


def hf_logits(model, ids=IDS):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def test_fused_qkv_rows_on_a_norm_rope_architecture_permute_q_and_k_parts():
    """No family has both today; the role transform handles it: Q and K parts permuted, V as is."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, q_size=4 * 8, kv_size=2 * 8, norm_offset=0.0)
    w = torch.randn(32 + 16 + 16, 5)
    q, k, v = w.split([32, 16, 16])
    got = gguf_arch.to_gguf(gguf_arch.FAMILIES["llama"], "blk.0.attn_qkv.weight", w, cfg)
    want = torch.cat([gguf_arch.permute_qk(q, 4), gguf_arch.permute_qk(k, 2), v])
    assert torch.equal(got, want) and not torch.equal(got, w)
    assert torch.equal(gguf_arch.from_gguf(gguf_arch.FAMILIES["llama"], "blk.0.attn_qkv.weight", got, cfg), w)
    assert torch.equal(gguf_arch.lora_b_to_gguf(gguf_arch.FAMILIES["llama"], "blk.0.attn_qkv.weight", w, cfg), want)
    assert torch.equal(gguf_arch.to_gguf(gguf_arch.FAMILIES["phi3"], "blk.0.attn_qkv.weight", w, cfg), w)


def test_every_registry_family_has_a_gguf_path_or_a_stated_exclusion():
    for family in REGISTRY:
        assert family in gguf_arch.FAMILIES or gguf_arch.EXCLUDED.get(family), family
    assert set(REGISTRY) <= {f.family for f in [*FIXTURES.values(), *MOE_FIXTURES.values()]}


@pytest.mark.parametrize("name", EXCLUDED_NAMES or ["(none)"])
def test_excluded_families_are_refused_with_their_reason(fam, tmp_path, name):
    if name == "(none)":
        assert not EXCLUDED_NAMES  # every fixture family has a GGUF path
        return
    why = gguf_arch.EXCLUDED[FIXTURES[name].family]
    with pytest.raises(UnsupportedError, match="no GGUF export") as e:
        export_gguf(fam(name, variant=False), tmp_path / "x.gguf", outtype="f32")
    assert why in str(e.value) and not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("name", GGUF_NAMES)
def test_models_in_llama_cpp_match_transformers(fam, tmp_path, name):
    """f32: top-1 100% and max |Δlogit| within TOL; f16 and q8_0 run and stay close."""
    m = fam(name)
    ref = hf_logits(hf_model(name, m))
    assert np.abs(ref).max() > 0.5
    for i, outtype in enumerate(("f32", "f16", "q8_0")):
        out = tmp_path / f"{outtype}.gguf"
        rep = export_gguf(m, out, outtype=outtype)
        assert rep["arch"] == gguf_arch.FAMILIES[FIXTURES[name].family].arch
        dmax, top1 = _compare(ref, llamacpp.logits(out, IDS), ties=outtype == "f32")
        assert top1 >= TOP1_MIN[outtype] and dmax <= TOL[name][i], (outtype, dmax, top1)


@pytest.mark.parametrize("name", GGUF_NAMES)
def test_low_bit_models_run_in_llama_cpp(fam, tmp_path, name):
    """bf16 and the 5/4-bit block types load and track transformers (a wrong block layout or a
    transform applied after quantizing would give noise)."""
    m = fam(name)
    ref = hf_logits(hf_model(name, m))
    low = LOW_BIT_MIN.get(name, {})
    for outtype, corr_min in (("bf16", 0.999), ("q5_1", low.get("q5_1", 0.93)), ("q4_0", low.get("q4_0", 0.8))):
        out = tmp_path / f"{outtype}.gguf"
        export_gguf(m, out, outtype=outtype)
        got = llamacpp.logits(out, IDS)
        assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] >= corr_min, outtype


def _targets(name):
    fused = FIXTURES[name].family == "phi3"
    leaves = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] if fused else \
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if FIXTURES[name].text_config is not None:  # multimodal: the text decoder only
        return rf".*language_model.*\.({'|'.join(leaves)})"
    return leaves


def make_peft(name, model_dir, out, seed=0):
    """A real PEFT LoRA (random A and B, rank 4, alpha 8) on every linear layer of the decoder; returns
    PEFT's own logits for IDS."""
    model = hf_model(name, model_dir)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=_targets(name),
                                                    init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(0.5)
    pm.save_pretrained(str(out))
    return hf_logits(pm)


@pytest.mark.parametrize("name", GGUF_NAMES)
def test_adapter_gguf_in_llama_cpp_matches_peft(fam, tmp_path, name):
    """Q/K LoRA B rows permuted where llama.cpp's rope layout needs it (granite, smollm3), fused
    qkv_proj / gate_up_proj LoRA onto llama.cpp's attn_qkv / ffn_up (phi3)."""
    m = fam(name)
    want = make_peft(name, m, tmp_path / "peft")
    base_ref = hf_logits(hf_model(name, m))
    assert np.abs(want - base_ref).max() > 0.1  # the adapter matters
    base = tmp_path / "base.gguf"
    export_gguf(m, base, outtype="f32")
    a = api.load_adapter(tmp_path / "peft")  # export_gguf_adapter checks it against the base (decoder names)
    rep = export_gguf_adapter(a, m, tmp_path / "lora.gguf")
    assert rep["modules"] == len(a.modules) > 0
    got = llamacpp.logits(base, IDS, lora=tmp_path / "lora.gguf")
    dmax, top1 = _compare(want, got, ties=True)
    assert top1 == 1.0 and dmax <= TOL[name][3], (dmax, top1)


@pytest.mark.parametrize("name", GGUF_NAMES)
def test_import_gives_back_the_source_checkpoint(fam, tmp_path, name):
    """f32 GGUF -> HF: every tensor bit-exact, except (1 + w) norms (Gemma), stored w + 1 for llama.cpp:
    there (1 + w_back) == (1 + w) in fp32, the value the norm computes with; transformers loads it."""
    m = fam(name)
    g = tmp_path / "m.gguf"
    export_gguf(m, g, outtype="f32")
    rep = import_gguf(g, tmp_path / "back")
    fx = FIXTURES[name]
    with Checkpoint.open(m) as a, Checkpoint.open(tmp_path / "back") as b:
        cfg = load_config(m)
        src = {cfg.to_internal(k): k for k in a.keys() if cfg.to_internal(k) is not None}
        assert set(src) == set(b.keys())
        offset = 0
        for own, k in src.items():
            x, y = a.get(k), b.get(own)
            if torch.equal(x, y):
                continue
            assert fx.norm_offset and "norm" in own and x.dim() == 1, own
            assert torch.equal(1 + x, 1 + y), own
            offset += 1
    assert (offset > 0) == fx.norm_offset
    back_cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    cls = fx.model_class if fx.text_config is None else gguf_arch.FAMILIES[fx.family].import_as[1]
    assert back_cfg["architectures"] == [cls] and rep["tensors"] == len(src)
    model = getattr(transformers, cls).from_pretrained(str(tmp_path / "back"), dtype=torch.float32).eval()
    assert np.abs(hf_logits(model) - hf_logits(hf_model(name, m))).max() <= 1e-5


def test_gemma4_per_layer_rows_off_the_quant_block_run_in_f32_and_refuse_q8_0(fam, tmp_path):
    """Per-layer input table rows are layers x per-layer size (5 x 8 = 40 here, Gemma 4 E2B 35 x 256):
    f32 runs, q8_0 (32-element blocks) is refused in one line naming the tensor, nothing written."""
    with contextlib.redirect_stderr(io.StringIO()):
        m = make_family(fam.root / "g4-ple8", "gemma4_text", seed=7, hidden_size_per_layer_input=8)
    ref = hf_logits(hf_model("gemma4_text", m))
    export_gguf(m, tmp_path / "f32.gguf", outtype="f32")
    dmax, top1 = _compare(ref, llamacpp.logits(tmp_path / "f32.gguf", IDS), ties=True)
    assert top1 == 1.0 and dmax <= TOL["gemma4_text"][0]
    with pytest.raises(IncompatibleError, match="embed_tokens_per_layer.*not a multiple of the 32-element block"):
        export_gguf(m, tmp_path / "q8.gguf", outtype="q8_0")
    assert not (tmp_path / "q8.gguf").exists()


@pytest.mark.parametrize("name", [n for n in GGUF_NAMES
                                  if gguf_arch.FAMILIES[FIXTURES[n].family].arch in gguf_arch.IMPORTS])
def test_import_without_the_source_config_rebuilds_it_from_the_keys(fam, tmp_path, monkeypatch, name):
    """A GGUF from another tool has no loratools.source_config: config.json comes from the keys
    (gguf_arch.IMPORTS); transformers loads the result and computes what the source did."""
    from loratools.formats import gguf_model

    m = fam(name)
    with monkeypatch.context() as mp:
        mp.setattr(gguf_model, "SOURCE_CONFIG_KEY", "other.tool.note")
        export_gguf(m, tmp_path / "m.gguf", outtype="f32")
    if load_config(m).rope_type == "llama3":  # rope_freqs keeps the divisors, not the four parameters
        with pytest.raises(UnsupportedError, match="rope_freqs"):
            import_gguf(tmp_path / "m.gguf", tmp_path / "back")
        return
    import_gguf(tmp_path / "m.gguf", tmp_path / "back")
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    cls = gguf_arch.IMPORTS[gguf_arch.FAMILIES[FIXTURES[name].family].arch][1]  # Mistral comes back as Llama
    assert back["architectures"] == [cls]
    model = getattr(transformers, cls).from_pretrained(str(tmp_path / "back"), dtype=torch.float32)
    assert np.abs(hf_logits(model.eval()) - hf_logits(hf_model(name, m))).max() <= 1e-5


def test_import_of_a_family_whose_source_config_cannot_be_rebuilt_is_one_line(fam, tmp_path, monkeypatch, run_cli):
    from loratools.formats import gguf_model

    with monkeypatch.context() as mp:
        mp.setattr(gguf_model, "SOURCE_CONFIG_KEY", "other.tool.note")
        export_gguf(fam("gemma2"), tmp_path / "g.gguf", outtype="f32")
    code, _, err = run_cli("import", "gguf", tmp_path / "g.gguf", "-o", tmp_path / "back")
    assert code == 4 and "gemma2" in err and "cannot be imported" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "back").exists()


# -- what llama.cpp cannot compute: one line, nothing written -------------------------------------
def test_gemma_query_scalar_llama_cpp_does_not_read_is_refused(fam, tmp_path, run_cli):
    m = fam("gemma2", variant=False)  # query_pre_attn_scalar 24 != head_dim 32
    code, _, err = run_cli("export", "gguf", m, "-o", tmp_path / "g.gguf", "--outtype", "f32")
    assert code == 4 and "attention_scale" in err and "gemma2" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "g.gguf").exists()


def test_phi3_sliding_window_is_warned_about(fam, tmp_path):
    with pytest.warns(UserWarning, match="ignores sliding_window=8"):
        export_gguf(fam("phi3", variant=False), tmp_path / "p.gguf", outtype="f32")


def test_gemma_without_its_tokenizer_is_one_line_and_writes_nothing(fam, tmp_path, run_cli):
    src = fam("gemma2")
    m = tmp_path / "no-tok"
    shutil.copytree(src, m)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (m / f).unlink()
    code, _, err = run_cli("export", "gguf", m, "-o", tmp_path / "g.gguf")
    assert code == 2 and "tokenizer.json" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "g.gguf").exists() and not list(tmp_path.glob(".g.gguf*"))


def _lora(out, rows_in, names):
    from loratools.adapter import Adapter, LoraModule
    from loratools.formats.peft import write_peft

    g = torch.Generator().manual_seed(0)
    mods = {n: LoraModule(torch.randn(2, rows_in[n][1], generator=g), torch.randn(rows_in[n][0], 2, generator=g), 1.0)
            for n in names}
    return write_peft(Adapter(modules=mods, config={"r": 2, "lora_alpha": 2}), out, num_layers=2)


def test_fused_adapter_on_split_checkpoint_and_the_reverse_are_one_line(fx, fam, tmp_path, run_cli):
    # qkv_proj / gate_up_proj LoRA (Phi-3 layout) on Llama, and q_proj LoRA on Phi-3
    llama = fx / "models" / "llama"
    fused = _lora(tmp_path / "fused", {"model.layers.0.self_attn.qkv_proj": (64 + 2 * 32, 64)},
                  ["model.layers.0.self_attn.qkv_proj"])
    phi = fam("phi3")
    split = _lora(tmp_path / "split", {"model.layers.0.self_attn.q_proj": (64, 64)}, ["model.layers.0.self_attn.q_proj"])
    for base, ad in ((llama, fused), (phi, split)):
        out = tmp_path / f"{ad.name}.gguf"
        code, _, err = run_cli("export", "gguf-adapter", ad, "--base", base, "-o", out)
        assert code in (2, 3) and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert ("qkv_proj" in err or "q_proj" in err) and not out.exists()
        with pytest.raises(IncompatibleError):
            export_gguf_adapter(api.load_adapter(ad), base, out)


# -- part 6: an adapter that changes one side of tied embeddings, exported directly ----------------
@pytest.mark.parametrize("kind", ["lora_on_lm_head", "modules_to_save"])
def test_export_with_an_adapter_that_unties_the_embeddings(fx, tmp_path, kind):
    """qwen2 fixture (tied): the GGUF gets its own output.weight, as merge unties; llama.cpp runs it
    and agrees with PEFT."""
    m = fx / "models" / "qwen2"
    model = transformers.Qwen2ForCausalLM.from_pretrained(str(m), dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings
    torch.manual_seed(1)
    if kind == "lora_on_lm_head":
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"], init_lora_weights=False)
    else:
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"],
                              init_lora_weights=False)
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(0.5)
            if "modules_to_save" in n and n.endswith("weight"):
                p.add_(0.05 * torch.randn_like(p))
    pm.save_pretrained(str(tmp_path / "ad"))
    want = hf_logits(pm)
    a = api.load_adapter(tmp_path / "ad", base=m)
    rep = export_gguf(m, tmp_path / "u.gguf", [a], outtype="f32")
    assert rep["untied_embeddings"]
    from loratools.formats.gguf_model import open_gguf, field
    r = open_gguf(tmp_path / "u.gguf")
    assert "output.weight" in {t.name for t in r.tensors}
    assert json.loads(field(r, "loratools.source_config"))["tie_word_embeddings"] is False
    dmax, top1 = _compare(want, llamacpp.logits(tmp_path / "u.gguf", IDS))
    assert top1 == 1.0 and dmax <= 1e-4, dmax
    assert np.abs(want - hf_logits(transformers.Qwen2ForCausalLM.from_pretrained(str(m)).eval())).max() > 0.1


def test_untying_is_refused_where_llama_cpp_has_no_output_tensor(fam, tmp_path):
    """Gemma 2's llama.cpp graph always multiplies by token_embd: an untied head cannot be written."""
    m = fam("gemma2")
    model = hf_model("gemma2", m)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "ad"))
    with pytest.raises(UnsupportedError, match="token_embd"):
        export_gguf(m, tmp_path / "g.gguf", [api.load_adapter(tmp_path / "ad", base=m)], outtype="f32")
    assert not (tmp_path / "g.gguf").exists()
