"""GGUF export and import, validated in llama.cpp itself (llama-cpp-python)."""
import json

import numpy as np
import pytest
import torch

from loratools import api
from loratools.checkpoint import Checkpoint
from loratools.errors import IncompatibleError, UnsupportedError
from loratools.formats.gguf_adapter import export_gguf_adapter
from loratools.formats.gguf_model import export_gguf, import_gguf, permute_qk, unpermute_qk
from loratools.models import load_model

llamacpp = pytest.importorskip("loratools.runtimes.llamacpp")
pytest.importorskip("llama_cpp")

IDS = [int(x) for x in torch.randint(3, 380, (24,), generator=torch.Generator().manual_seed(5))]
ARCHS = ["llama", "qwen2", "qwen3", "mistral"]


def ref_logits(model_dir, adapters=(), ids=IDS):
    return load_model(model_dir, adapters=list(adapters))(torch.tensor([ids]))[0][0].numpy()


def n_ids(arch):
    return IDS[:8] if arch == "mistral" else IDS  # mistral fixture: sliding window 8, which llama.cpp ignores


def compare(ref, got):
    d = np.abs(ref - got)
    return float(d.max()), float((ref.argmax(-1) == got.argmax(-1)).mean()), float(np.abs(ref).max())


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


def test_permutation_round_trip():
    w = torch.randn(4 * 16, 8)
    assert torch.equal(unpermute_qk(permute_qk(w, 4), 4), w)
    assert not torch.equal(permute_qk(w, 4), w)


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_model_matches_reference_in_llama_cpp(fx, gguf_dir, arch):
    out = gguf_dir / f"{arch}-f32.gguf"
    rep = export_gguf(fx / "models" / arch, out, outtype="f32")
    assert rep["tokenizer"]["pre"] == "gpt-2"
    ids = n_ids(arch)
    dmax, top1, scale = compare(ref_logits(fx / "models" / arch, ids=ids), llamacpp.logits(out, ids))
    assert top1 == 1.0
    assert dmax < 1e-3 * max(scale, 1.0)  # measured ~1e-5..1e-4: fp32 kernels, different summation order


@pytest.mark.parametrize("outtype,top1_min,rel_max", [("f16", 1.0, 0.02), ("bf16", 0.95, 0.08), ("q8_0", 0.95, 0.1)])
def test_lower_precision_models(fx, gguf_dir, outtype, top1_min, rel_max):
    out = gguf_dir / f"llama-{outtype}.gguf"
    export_gguf(fx / "models" / "llama", out, outtype=outtype)
    dmax, top1, scale = compare(ref_logits(fx / "models" / "llama"), llamacpp.logits(out, IDS))
    assert top1 >= top1_min and dmax <= rel_max * scale


@pytest.mark.parametrize("arch,adapter", [("llama", "llama-patterns"), ("llama", "llama-rslora"),
                                          ("mistral", "mistral-kohya.safetensors")])
def test_adapter_gguf_in_llama_cpp_matches_peft_semantics(fx, gguf_dir, arch, adapter):
    model = fx / "models" / arch
    a = api.load_adapter(fx / "adapters" / adapter, base=model)
    base_gguf = gguf_dir / f"{arch}-f32.gguf"
    if not base_gguf.exists():
        export_gguf(model, base_gguf, outtype="f32")
    ad = gguf_dir / f"{adapter}.gguf"
    rep = export_gguf_adapter(a, model, ad)
    ids = n_ids(arch)
    ref = ref_logits(model, [a], ids)
    got = llamacpp.logits(base_gguf, ids, lora=ad)
    dmax, top1, scale = compare(ref, got)
    assert (np.abs(ref - ref_logits(model, ids=ids))).max() > 0.1  # the adapter matters
    assert top1 == 1.0 and dmax < 1e-3 * max(scale, 1.0)
    # merged GGUF ≈ base GGUF + adapter GGUF
    merged = gguf_dir / f"{arch}-{adapter}-merged.gguf"
    export_gguf(model, merged, [a], outtype="f32")
    assert np.abs(llamacpp.logits(merged, ids) - got).max() < 1e-3 * max(scale, 1.0)
    if adapter == "llama-patterns":
        assert rep["scales_folded"] > 0  # rank/alpha patterns: per-module factors folded into B
    if adapter == "llama-rslora":
        assert rep["alpha"] == 32.0  # alpha/r must give PEFT's rsLoRA scale 8/sqrt(16) = 2, not 8/16


def test_dropping_the_fold_would_be_caught(fx, gguf_dir):
    """Without folding the rsLoRA scale, llama.cpp computes another adapter: the check above can fail."""
    from loratools.adapter import Adapter, LoraModule
    model = fx / "models" / "llama"
    a = api.load_adapter(fx / "adapters" / "llama-rslora", base=model)
    wrong = Adapter(modules={n: LoraModule(m.A, m.B, 8 / m.rank, 8.0) for n, m in a.modules.items()})
    ad = gguf_dir / "wrong.gguf"
    export_gguf_adapter(wrong, model, ad)
    base_gguf = gguf_dir / "llama-f32.gguf"
    if not base_gguf.exists():
        export_gguf(model, base_gguf, outtype="f32")
    dmax, _, _ = compare(ref_logits(model, [a]), llamacpp.logits(base_gguf, IDS, lora=ad))
    assert dmax > 0.1


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_gguf_f32_hf_is_bit_exact(fx, gguf_dir, tmp_path, arch):
    src = fx / "models" / arch
    g = gguf_dir / f"{arch}-rt.gguf"
    export_gguf(src, g, outtype="f32")
    import_gguf(g, tmp_path / "back")
    with Checkpoint.open(src) as a, Checkpoint.open(tmp_path / "back") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert torch.equal(a.get(k), b.get(k)), k
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == arch
    from tokenizers import Tokenizer
    t0, t1 = Tokenizer.from_file(str(src / "tokenizer.json")), Tokenizer.from_file(str(tmp_path / "back" / "tokenizer.json"))
    for text in ("The quick brown fox", "<|im_start|>user\nhi<|im_end|>", "Café 東京 🙂 42"):
        assert t0.encode(text).ids == t1.encode(text).ids


def test_llama_cpp_tokenization_equals_tokenizer_json(fx, gguf_dir):
    from tokenizers import Tokenizer
    g = gguf_dir / "llama-f32.gguf"
    if not g.exists():
        export_gguf(fx / "models" / "llama", g, outtype="f32")
    tok = Tokenizer.from_file(str(fx / "models" / "llama" / "tokenizer.json"))
    for text in ("The quick brown fox jumps.", "def forward(x):\n    return x", "<|im_start|>user\nWhat?<|im_end|>\n",
                 "Numbers 3.14159 and 2024", "Café, naïve, 東京, 🙂", "  double  spaces\tand tabs"):
        assert llamacpp.tokenize(g, text, add_bos=False) == tok.encode(text).ids, text


def test_refusals(fx, tmp_path):
    model = fx / "models" / "qwen3"
    dora = api.load_adapter(fx / "adapters" / "qwen3-dora")
    with pytest.raises(UnsupportedError, match="DoRA"):
        export_gguf_adapter(dora, model, tmp_path / "d.gguf")
    bias = api.load_adapter(fx / "adapters" / "qwen2-bias")
    with pytest.raises(UnsupportedError, match="lora_bias"):
        export_gguf_adapter(bias, fx / "models" / "qwen2", tmp_path / "b.gguf")
    with pytest.raises(IncompatibleError):
        export_gguf_adapter(api.load_adapter(fx / "adapters" / "llama-patterns"), model, tmp_path / "x.gguf")
    # a quant type the row length does not allow
    odd = tmp_path / "odd"
    from fixtures.generate import make_model
    make_model(odd, "llama", intermediate_size=80)
    with pytest.raises(IncompatibleError, match="not a multiple of the 32-element block"):
        export_gguf(odd, tmp_path / "odd.gguf", outtype="q8_0")  # written here (llama.cpp falls back to F16: test_gguf_quant)
    assert not (tmp_path / "odd.gguf").exists() and not list(tmp_path.glob(".odd.gguf.tmp*"))


def test_bad_gguf_inputs(fx, gguf_dir, tmp_path, run_cli):
    g = gguf_dir / "llama-f32.gguf"
    if not g.exists():
        export_gguf(fx / "models" / "llama", g, outtype="f32")
    data = g.read_bytes()
    cases = {"truncated.gguf": data[: len(data) // 2], "magic.gguf": b"XXXX" + data[4:], "tiny.gguf": data[:10]}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        code, _, err = run_cli("import", "gguf", tmp_path / name, "-o", tmp_path / f"{name}.out")
        assert code != 0 and name in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / f"{name}.out").exists()


def test_cli_export_and_import(fx, tmp_path, run_cli):
    code, out, err = run_cli("export", "gguf", fx / "models" / "qwen2", "-a", fx / "adapters" / "qwen2-bias",
                             "-o", tmp_path / "m.gguf", "--outtype", "f16")
    assert code == 0, err
    assert "wrote GGUF model" in out
    code, out, err = run_cli("import", "gguf", tmp_path / "m.gguf", "-o", tmp_path / "m")
    assert code == 0, err
    a = api.load_adapter(fx / "adapters" / "qwen2-bias")
    ref = ref_logits(fx / "models" / "qwen2", [a])
    back = ref_logits(tmp_path / "m")
    assert (ref.argmax(-1) == back.argmax(-1)).mean() >= 0.95


@pytest.mark.parametrize("outtype,corr_min", [("q5_1", 0.98), ("q5_0", 0.975), ("q4_1", 0.93), ("q4_0", 0.93)])
def test_low_bit_models_run_in_llama_cpp(fx, tmp_path, outtype, corr_min):
    """4/5-bit files load and track the reference (measured on this random fixture: q5 ≈ 0.988,
    q4 ≈ 0.95 correlation of logits); a wrong block layout would give noise (≈ 0)."""
    out = tmp_path / f"llama-{outtype}.gguf"
    export_gguf(fx / "models" / "llama", out, outtype=outtype)
    ref, got = ref_logits(fx / "models" / "llama"), llamacpp.logits(out, IDS)
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] >= corr_min


def test_import_refuses_unknown_architecture(tmp_path, run_cli):
    import gguf
    p = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(p), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    code, _, err = run_cli("import", "gguf", p, "-o", tmp_path / "out")
    assert code == 4 and "gpt2" in err and "cannot be imported" in err and not (tmp_path / "out").exists()


def test_import_refuses_what_would_not_be_a_working_checkpoint(fx, tmp_path, run_cli):
    """An adapter GGUF, a broken source config, and a tensor set that does not match the config
    are one-line refusals, not exit-70 crashes or a checkpoint transformers fills with random weights."""
    from loratools.errors import InputError

    g = tmp_path / "m.gguf"
    export_gguf(fx / "models" / "llama", g, outtype="f32")
    data = g.read_bytes()
    n_layers = json.loads((fx / "models" / "llama" / "config.json").read_text())["num_hidden_layers"]
    assert n_layers < 9
    cases = {  # same-length edits of the stored source config keep every offset valid
        "json": (data.replace(b'{"architectures"', b'["architectures"', 1), "not valid JSON"),
        "layers": (data.replace(f'"num_hidden_layers": {n_layers}'.encode(), f'"num_hidden_layers": {n_layers + 1}'.encode(), 1),
                   "lacks"),
    }
    for name, (blob, words) in cases.items():
        assert blob != data, name
        p = tmp_path / f"{name}.gguf"
        p.write_bytes(blob)
        code, _, err = run_cli("import", "gguf", p, "-o", tmp_path / f"{name}-out")
        assert code in (2, 3) and words in err and str(p) in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / f"{name}-out").exists()
    ad = tmp_path / "a.gguf"
    export_gguf_adapter(api.load_adapter(fx / "adapters" / "llama-rslora"), fx / "models" / "llama", ad)
    with pytest.raises(InputError, match="LoRA adapter GGUF"):
        import_gguf(ad, tmp_path / "ad-out")


def test_embedding_lora_on_a_tied_model_is_refused_for_llama_cpp(fx, tmp_path):
    """llama.cpp applies adapter tensors by name, and a tied model's output layer is token_embd too."""
    from loratools.adapter import Adapter, LoraModule

    m = fx / "models" / "qwen2"
    vocab, hidden = load_model(m).model.embed_tokens.weight.shape
    a = Adapter(modules={"model.embed_tokens": LoraModule(A=torch.randn(2, vocab), B=torch.randn(hidden, 2), scale=1.0,
                                                          kind="embedding")}, format="peft")
    with pytest.raises(UnsupportedError, match="ties the embeddings"):
        export_gguf_adapter(a, m, tmp_path / "e.gguf")
    assert not (tmp_path / "e.gguf").exists()


def test_an_unchanged_saved_embedding_does_not_block_the_gguf_adapter(fx, tmp_path):
    """PEFT saves an embedding targeted by LoRA whole even when unchanged; such a copy of the
    base tensor replaces nothing, so it neither blocks the llama.cpp adapter nor unties a head."""
    from loratools.ops.merge import MergedView

    m = fx / "models" / "llama"
    a = api.load_adapter(fx / "adapters" / "llama-patterns", base=m)
    with Checkpoint.open(m) as ck:
        emb = ck.get("model.embed_tokens.weight")
    a.modules_to_save = {"model.embed_tokens.weight": emb.clone()}
    export_gguf_adapter(a, m, tmp_path / "ok.gguf")
    with Checkpoint.open(m) as ck:
        assert MergedView(ck, [a]).saved == {}
    a.modules_to_save = {"model.embed_tokens.weight": emb + 1e-3}
    with pytest.raises(UnsupportedError, match="modules_to_save"):
        export_gguf_adapter(a, m, tmp_path / "changed.gguf")
    with Checkpoint.open(m) as ck:
        assert list(MergedView(ck, [a]).saved) == ["model.embed_tokens.weight"]
