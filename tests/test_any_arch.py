"""The tensor operations need no architecture: a checkpoint whose config.json names a model_type
loratools has never heard of ("my_decoder") merges, unmerges, extracts, resizes, combines,
scales, subtracts, converts and inspects like a known one; the paths that run the model say in
one line which family is missing, and write nothing.

The fixture is made by transformers (LlamaForCausalLM + save_pretrained, tied embeddings), then
made unknown: model_type and architectures renamed, tie_word_embeddings dropped (the tensors
decide: no lm_head.weight), the MLP renamed ``ffn`` and a 2-D tensor of an unusual name added."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from loratools import st
from loratools.adapter import Adapter, LoraModule
from loratools.formats.peft import read_peft, write_peft

transformers = pytest.importorskip("transformers")

LAYERS = 2


def _unknown(src: Path, out: Path, dtype: torch.dtype) -> Path:
    out.mkdir(parents=True)
    sd = st.load_file(src / "model.safetensors")
    sd = {k.replace(".mlp.", ".ffn."): v.to(dtype) for k, v in sd.items()}
    g = torch.Generator().manual_seed(7)
    sd["model.extra_proj.weight"] = (torch.randn(48, 64, generator=g) / 8).to(dtype)
    st.save_file(sd, out / "model.safetensors", {"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type="my_decoder", architectures=["MyDecoderForCausalLM"])
    cfg["dtype"] = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    cfg.pop("tie_word_embeddings", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (src / f).exists():
            shutil.copyfile(src / f, out / f)
    return out


@pytest.fixture(scope="module")
def unk(tmp_path_factory):
    """{"fp32", "bf16", "tuned"}: the unknown-family checkpoints (tuned: fp32 base + a known delta)."""
    from fixtures.generate import make_tokenizer, tokenizer_config

    root = tmp_path_factory.mktemp("unknown")
    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, tie_word_embeddings=True)
    m = transformers.LlamaForCausalLM(cfg)
    m.save_pretrained(root / "hf")
    tok.save(str(root / "hf" / "tokenizer.json"))
    (root / "hf" / "tokenizer_config.json").write_text(json.dumps(tokenizer_config()))
    assert "lm_head.weight" not in st.read_header(root / "hf" / "model.safetensors")[0]
    out = {"fp32": _unknown(root / "hf", root / "fp32", torch.float32),
           "bf16": _unknown(root / "hf", root / "bf16", torch.bfloat16)}
    # the "fine-tune": a rank-3 delta plus a small full-rank tail on a few 2-D weights, and the embedding
    g = torch.Generator().manual_seed(3)
    sd = st.load_file(out["fp32"] / "model.safetensors")
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.ffn.down_proj.weight",
              "model.extra_proj.weight", "model.embed_tokens.weight"):
        a, b = sd[k].shape
        sd[k] = sd[k] + 0.05 * torch.randn(a, 3, generator=g) @ torch.randn(3, b, generator=g) \
            + 1e-4 * torch.randn(a, b, generator=g)
    (root / "tuned").mkdir()
    st.save_file(sd, root / "tuned" / "model.safetensors", {"format": "pt"})
    shutil.copyfile(out["fp32"] / "config.json", root / "tuned" / "config.json")
    out["tuned"] = root / "tuned"
    return out


def _adapter(model: Path, seed: int, rank: int = 4, bias: bool = False) -> Adapter:
    """A LoRA on a renamed module, the unusual tensor, the tied head, and an embedding LoRA."""
    hdr = st.read_header(model / "model.safetensors")[0]
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.ffn.down_proj", "model.extra_proj"):
        out_f, in_f = hdr[f"{name}.weight"].shape
        mods[name] = LoraModule(torch.randn(rank, in_f, generator=g) / math.sqrt(in_f),
                                torch.randn(out_f, rank, generator=g) * 0.2, scale=2.0, alpha=2.0 * rank,
                                bias=(0.1 * torch.randn(out_f, generator=g)) if bias else None)
    return Adapter(modules=mods, config={"r": rank, "lora_alpha": 2.0 * rank}, format="peft")


def _with_head(a: Adapter, model: Path, seed: int) -> Adapter:
    vocab, hidden = st.read_header(model / "model.safetensors")[0]["model.embed_tokens.weight"].shape
    g = torch.Generator().manual_seed(seed)
    r = a.modules["model.extra_proj"].rank
    a.modules["lm_head"] = LoraModule(torch.randn(r, hidden, generator=g) / 8, torch.randn(vocab, r, generator=g) * 0.2,
                                      scale=2.0, alpha=2.0 * r)
    return a


def _delta64(m: LoraModule) -> torch.Tensor:
    d = m.scale * (m.B.double() @ m.A.double())
    return d.T if m.kind == "embedding" else d


def _load(d: Path) -> dict:
    return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in st.load_file(f).items()}


def _rounded_once(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """``got`` (fp32 compute, one rounding to bf16) equals the float64 value rounded to bf16,
    except where the exact value lies within fp32's error (~2⁻²⁴ of the operands) of a bf16
    rounding boundary: there it may round to the neighbour (a few in 10⁵ elements), never further."""
    bad = got != want
    assert bad.float().mean() <= 1e-3, (name, int(bad.sum()))
    if bad.any():
        g, w = got[bad].float(), want[bad].float()
        ulp = torch.ldexp(torch.ones_like(w), torch.frexp(w.abs().clamp(min=1e-30))[1] - 8)
        assert ((g - w).abs() <= torch.maximum(ulp, 2 ** -20 * want.float().abs().max())).all(), name


# -- merge / unmerge ------------------------------------------------------------------------------
def test_merge_and_unmerge_are_exact_on_an_unknown_family(unk, tmp_path, run_cli):
    base = unk["bf16"]
    a = _with_head(_adapter(base, 1), base, 2)
    write_peft(a, tmp_path / "a", num_layers=LAYERS)
    code, out, err = run_cli("merge", "--base", base, "-a", tmp_path / "a", "-o", tmp_path / "m", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["untied_embeddings"] is True
    W, M = _load(base), _load(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "my_decoder" and cfg["tie_word_embeddings"] is False
    assert set(M) == set(W) | {"lm_head.weight"}
    a = read_peft(tmp_path / "a")
    for name, m in a.modules.items():
        src = "model.embed_tokens.weight" if name == "lm_head" else f"{name}.weight"
        want = (W[src].double() + _delta64(m)).to(torch.bfloat16)
        _rounded_once(M[f"{name}.weight"], want, name)
    for k in W:  # the rest, embedding included (the head was untied from it), unchanged to the bit
        if k[: -len(".weight")] not in a.modules:
            assert torch.equal(M[k], W[k]), k
    # unmerge inverts: W' − s·B·A, rounded once (the untied head stays written)
    code, _, err = run_cli("unmerge", "--base", tmp_path / "m", "-a", tmp_path / "a", "-o", tmp_path / "u")
    assert code == 0, err
    U = _load(tmp_path / "u")
    for name, m in a.modules.items():
        k = f"{name}.weight"
        _rounded_once(U[k], (M[k].double() - _delta64(m)).to(torch.bfloat16), name)
        src = "model.embed_tokens.weight" if name == "lm_head" else k
        # back to W up to the two bf16 roundings (of W' and of W' − ΔW), each ≤ half an ulp of |W'|
        assert (U[k].float() - W[src].float()).abs().max() <= 2 ** -7 * M[k].float().abs().max()


def test_fp32_merge_matches_a_float64_reference(unk, tmp_path):
    from loratools import api

    base = unk["fp32"]
    write_peft(_adapter(base, 5), tmp_path / "a", num_layers=LAYERS)
    api.merge(base, [tmp_path / "a"], tmp_path / "m")
    W, M, a = _load(base), _load(tmp_path / "m"), read_peft(tmp_path / "a")
    assert "lm_head.weight" not in M  # nothing touched the tie: it stays tied
    for name, m in a.modules.items():
        want = W[f"{name}.weight"].double() + _delta64(m)
        assert (M[f"{name}.weight"].double() - want).abs().max() <= 2 ** -22 * want.abs().max()


# -- extract --------------------------------------------------------------------------------------
def test_extract_is_optimal_on_an_unknown_family(unk, tmp_path, run_cli):
    base, tuned = unk["fp32"], unk["tuned"]
    code, out, err = run_cli("extract", "--base", base, "--tuned", tuned, "-o", tmp_path / "x", "--rank", "3",
                             "--exact", "--json")
    assert code == 0, err
    rep = json.loads(out)
    a = read_peft(tmp_path / "x")
    W, T = _load(base), _load(tuned)
    assert set(a.modules) == {"model.layers.0.self_attn.q_proj", "model.layers.1.ffn.down_proj", "model.extra_proj",
                              "model.embed_tokens", "lm_head"}
    assert rep["embeddings"]["lm_head"] == {"tied_to": "model.embed_tokens"}  # tied: the head moved with it
    for name, m in a.modules.items():
        if name == "lm_head":
            continue
        D = T[f"{name}.weight"].double() - W[f"{name}.weight"].double()
        S = torch.linalg.svdvals(D)
        best = float(S[3:].pow(2).sum().sqrt())
        err_ = float((D - _delta64(m)).norm())
        assert err_ <= best * (1 + 1e-3) + 1e-7, (name, err_, best)
    e, h = a.modules["model.embed_tokens"], a.modules["lm_head"]
    assert torch.allclose(_delta64(e), _delta64(h), atol=1e-7)


def test_extract_refuses_a_different_family(unk, tmp_path, fx, run_cli):
    code, _, err = run_cli("extract", "--base", fx / "models" / "llama", "--tuned", unk["tuned"], "-o", tmp_path / "x")
    assert code == 3 and "base is llama but tuned is my_decoder" in err and len([l for l in err.strip().splitlines() if not l.startswith("loratools: [")]) == 1
    assert not (tmp_path / "x").exists()


# -- adapter arithmetic and conversion -------------------------------------------------------------
def test_resize_combine_scale_subtract_convert(unk, tmp_path, run_cli):
    base = unk["fp32"]
    write_peft(_adapter(base, 1, rank=8), tmp_path / "a", num_layers=LAYERS)
    write_peft(_adapter(base, 2, rank=4), tmp_path / "b", num_layers=LAYERS)
    A, B = read_peft(tmp_path / "a"), read_peft(tmp_path / "b")

    assert run_cli("resize", tmp_path / "a", "-o", tmp_path / "r", "--rank", "3", "--base", base)[0] == 0
    R = read_peft(tmp_path / "r")
    for n, m in A.modules.items():
        S = torch.linalg.svdvals(_delta64(m))
        assert R.modules[n].rank == 3
        assert abs(float((_delta64(m) - _delta64(R.modules[n])).norm()) - float(S[3:].pow(2).sum().sqrt())) <= 1e-5

    code, _, err = run_cli("combine", tmp_path / "a", tmp_path / "b", "--weights", "0.5,2", "-o", tmp_path / "c",
                           "--base", base)
    assert code == 0, err
    C = read_peft(tmp_path / "c")
    for n in A.modules:
        assert torch.allclose(_delta64(C.modules[n]), 0.5 * _delta64(A.modules[n]) + 2 * _delta64(B.modules[n]), atol=1e-6)

    assert run_cli("scale", tmp_path / "a", "--factor", "-0.25", "-o", tmp_path / "s")[0] == 0
    S_ = read_peft(tmp_path / "s")
    assert all(torch.allclose(_delta64(S_.modules[n]), -0.25 * _delta64(m), atol=1e-7) for n, m in A.modules.items())

    assert run_cli("subtract", tmp_path / "a", tmp_path / "b", "-o", tmp_path / "d")[0] == 0
    D = read_peft(tmp_path / "d")
    assert all(torch.allclose(_delta64(D.modules[n]), _delta64(m) - _delta64(B.modules[n]), atol=1e-6)
               for n, m in A.modules.items())

    # peft -> kohya -> peft through the base's own module names (ffn, extra_proj: no table knows them)
    assert run_cli("convert", tmp_path / "a", "--to", "kohya", "-o", tmp_path / "k.safetensors", "--base", base)[0] == 0
    code, _, err = run_cli("convert", tmp_path / "k.safetensors", "--to", "peft", "-o", tmp_path / "p", "--base", base)
    assert code == 0, err
    P = read_peft(tmp_path / "p")
    assert set(P.modules) == set(A.modules)
    assert all(torch.allclose(_delta64(P.modules[n]), _delta64(m), atol=1e-7) for n, m in A.modules.items())


def test_inspect_an_unknown_family(unk, tmp_path, run_cli):
    code, out, err = run_cli("inspect", unk["bf16"], "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["architecture"] == "my_decoder" and d["known_architecture"] is False
    assert d["tie_word_embeddings"] is True and d["num_hidden_layers"] == LAYERS
    code, out, err = run_cli("inspect", unk["bf16"])
    assert code == 0 and "my_decoder checkpoint" in out and "tensor operations only" in out
    write_peft(_with_head(_adapter(unk["bf16"], 1), unk["bf16"], 2), tmp_path / "a", num_layers=LAYERS)
    code, out, err = run_cli("inspect", tmp_path / "a", "--base", unk["bf16"], "--json")
    assert code == 0, err
    assert set(json.loads(out)["modules"]) == {"model.layers.0.self_attn.q_proj", "model.layers.1.ffn.down_proj",
                                               "model.extra_proj", "lm_head"}


# -- bad input: one line, nothing written -----------------------------------------------------------
@pytest.mark.parametrize("what", ["missing", "shape"])
def test_adapter_that_does_not_fit_is_one_line(unk, tmp_path, run_cli, what):
    base = unk["fp32"]
    a = _adapter(base, 1)
    m = a.modules.pop("model.extra_proj")
    if what == "missing":
        a.modules["model.extra_gate"] = m
    else:
        a.modules["model.extra_proj"] = LoraModule(m.A[:, :32].contiguous(), m.B, m.scale, m.alpha)
    write_peft(a, tmp_path / "a", num_layers=LAYERS)
    for cmd in (["merge", "--base", base, "-a", tmp_path / "a", "-o", tmp_path / "m"],
                ["convert", tmp_path / "a", "--to", "kohya", "-o", tmp_path / "k.safetensors", "--base", base]):
        code, out, err = run_cli(*cmd)
        assert code == 3, err
        assert len([l for l in err.strip().splitlines() if not l.startswith("loratools: [")]) == 1
        assert ("does not have" if what == "missing" else "LoRA expects a weight of shape") in err
    assert not (tmp_path / "m").exists() and not (tmp_path / "k.safetensors").exists()


def test_lora_bias_without_a_known_switch_is_refused(unk, tmp_path, run_cli):
    base = unk["fp32"]
    write_peft(_adapter(base, 1, bias=True), tmp_path / "a", num_layers=LAYERS)
    code, _, err = run_cli("merge", "--base", base, "-a", tmp_path / "a", "-o", tmp_path / "m")
    assert code == 3 and "model_type 'my_decoder' has no config switch" in err and len([l for l in err.strip().splitlines() if not l.startswith("loratools: [")]) == 1
    assert not (tmp_path / "m").exists()


def test_paths_that_run_the_model_name_the_missing_family(unk, tmp_path, run_cli):
    base = unk["fp32"]
    write_peft(_adapter(base, 1), tmp_path / "a", num_layers=LAYERS)
    data = tmp_path / "d.txt"
    data.write_text("hello world\n" * 8)
    cases = {
        "gguf": ["export", "gguf", base, "-o", tmp_path / "o.gguf"],
        "gguf-adapter": ["export", "gguf-adapter", tmp_path / "a", "--base", base, "-o", tmp_path / "o-a.gguf"],
        "onnx": ["export", "onnx", base, "-o", tmp_path / "onnx"],
        "validate": ["validate", base, "--base", base],
        "forward": ["forward", base, "--ids", "1,2,3"],
        "train": ["train", "--model", base, "--data", data, "-o", tmp_path / "t", "--max-steps", "1"],
        "validate-extraction": ["validate-extraction", "--base", base, "--tuned", unk["tuned"], "-a", tmp_path / "a"],
    }
    before = sorted(p.name for p in tmp_path.iterdir())
    for name, argv in cases.items():
        code, out, err = run_cli(*argv)
        assert code == 4, (name, err)
        assert "my_decoder" in err and len([l for l in err.strip().splitlines() if not l.startswith("loratools: [")]) == 1, (name, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# -- the tied-head rule and multimodal prefixes ------------------------------------------------------
def test_tied_rule_and_language_model_prefix():
    from loratools.modelinfo import ModelInfo, head_name, tied_pair, with_tied_head

    plain = ["model.embed_tokens.weight", "model.norm.weight"]
    assert tied_pair(ModelInfo("x", None, 2), plain) == ("model.embed_tokens.weight", "lm_head.weight")
    assert tied_pair(ModelInfo("x", None, 2), plain + ["lm_head.weight"]) is None
    assert tied_pair(ModelInfo("x", True, 2), plain + ["lm_head.weight"]) is not None  # transformers ties it anyway
    assert tied_pair(ModelInfo("x", False, 2), plain) is not None  # no head to compute with but the embedding
    mm = ["language_model.model.embed_tokens.weight", "vision_tower.vision_model.embeddings.patch_embedding.weight"]
    assert tied_pair(None, mm) == ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight")
    assert head_name("model.language_model.embed_tokens.weight") == "lm_head.weight"
    shapes = with_tied_head({mm[0]: (10, 4)}, tied_pair(None, mm))
    assert shapes["language_model.lm_head.weight"] == (10, 4)


def test_model_info_errors_name_config_json(tmp_path):
    from loratools.errors import InputError
    from loratools.modelinfo import read_model_info

    for cfg, msg in (({}, "missing field 'model_type'"), ({"model_type": 3}, "'model_type' must be a string"),
                     ({"model_type": "x", "tie_word_embeddings": "yes"}, "'tie_word_embeddings' must be a boolean"),
                     ({"model_type": "x", "num_hidden_layers": 0}, "must be positive")):
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(InputError, match=msg) as e:
            read_model_info(tmp_path)
        assert "config.json" in str(e.value)


def test_lora_bias_merged_into_exports_runs_in_llama_cpp_and_onnx_runtime(fx, tmp_path, run_cli):
    """export gguf / onnx -a merge through MergedView: a lora_bias adapter on Llama (no biases) turns
    attention_bias on there too; llama.cpp and ONNX Runtime agree with base + adapter unmerged."""
    from fixtures.generate import random_adapter

    m = fx / "models" / "llama"
    write_peft(random_adapter(m, ["o_proj"], {"r": 4, "lora_alpha": 8}, seed=1, lora_bias=True), tmp_path / "a",
               num_layers=LAYERS)
    for argv in (["export", "gguf", m, "-a", tmp_path / "a", "-o", tmp_path / "x.gguf", "--outtype", "f32"],
                 ["export", "onnx", m, "-a", tmp_path / "a", "-o", tmp_path / "onnx"]):
        code, _, err = run_cli(*argv)
        assert code == 0, err
    code, out, err = run_cli("validate", "--base", m, "-a", tmp_path / "a", tmp_path / "x.gguf", tmp_path / "onnx",
                             "--tokens", "4", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["passed"] and all(c["metrics"]["max_abs"] <= 1e-4 for c in rep["candidates"])


def test_multimodal_language_model_prefix_passes_through(unk, tmp_path, run_cli):
    """Gemma 3's multimodal layout: the text model under ``language_model.``, a vision tower beside
    it, tie_word_embeddings in text_config. Names pass through; the tied head is found beside the
    prefixed embedding and untied there."""
    src = unk["fp32"]
    d = tmp_path / "mm"
    d.mkdir()
    sd = {f"language_model.{k}": v for k, v in st.load_file(src / "model.safetensors").items()}
    sd["vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.ones(8, 12)
    st.save_file(sd, d / "model.safetensors", {"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({"model_type": "my_multimodal", "architectures": ["X"],
                                               "text_config": {**cfg, "tie_word_embeddings": True}}))
    a = _with_head(_adapter(src, 1), src, 2)
    a = Adapter(modules={f"language_model.{k}": m for k, m in a.modules.items()}, config=a.config, format="peft")
    write_peft(a, tmp_path / "a", num_layers=LAYERS)
    code, out, err = run_cli("merge", "--base", d, "-a", tmp_path / "a", "-o", tmp_path / "m", "--json")
    assert code == 0, err
    M, W = _load(tmp_path / "m"), sd
    assert set(M) == set(W) | {"language_model.lm_head.weight"}
    head = a.modules["language_model.lm_head"]
    want = W["language_model.model.embed_tokens.weight"].double() + _delta64(head)
    assert (M["language_model.lm_head.weight"].double() - want).abs().max() <= 2 ** -22 * want.abs().max()
    assert torch.equal(M["language_model.model.embed_tokens.weight"], W["language_model.model.embed_tokens.weight"])
    out_cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert out_cfg["tie_word_embeddings"] is False and out_cfg["text_config"]["tie_word_embeddings"] is False
