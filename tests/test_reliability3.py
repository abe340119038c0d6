"""Reliability, second hostile-input pass (issue 17, classes 2, 3, 4, 5, 7): side files read
under one policy, bounded chat templates, bounded pattern matching, readers bounded by what they
keep, and bad headers / JSON / token ids / output names as one-line errors. The last test runs
every hostile input through the CLI in a child process under a 3 GB address-space limit."""
import hashlib
import json
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from loratools.errors import InputError, LoratoolsError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = int(os.environ.get("LORATOOLS_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SECRET = "SECRET-3f1c-not-in-any-model"
CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def one_line(err: str) -> str:
    """The single error line of stderr (progress lines of a piped run, ``loratools: [``, aside)."""
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith("loratools: [")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def refused(result, where, *words, code=2):
    rc, out, err = result
    assert rc == code, (rc, out[-2000:], err[-3000:])
    line = one_line(err)
    assert str(where) in line, line
    for w in words:
        assert w.lower() in line.lower(), (w, line)
    return line


def copy_model(fx, tmp_path, arch="llama", name=None) -> Path:
    dst = tmp_path / (name or arch)
    shutil.copytree(fx / "models" / arch, dst)
    return dst


def set_template(m: Path, template: str) -> Path:
    tc = m / "tokenizer_config.json"
    cfg = json.loads(tc.read_text())
    cfg["chat_template"] = template
    tc.write_text(json.dumps(cfg))
    return tc


def tree_hash(*paths) -> str:
    h = hashlib.sha256()
    for root in paths:
        root = Path(root)
        for p in sorted([root] if root.is_file() else root.rglob("*")):
            h.update(str(p).encode())
            if p.is_symlink():
                h.update(os.readlink(p).encode())
            elif p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


# -- class 2: every side file under one read policy ---------------------------------------------
@pytest.mark.parametrize("name", ["tokenizer.json", "chat_template.jinja", "special_tokens_map.json",
                                  "generation_config.json"])
def test_side_file_linked_outside_the_model_is_not_carried(fx, tmp_path, run_cli, name):
    m = copy_model(fx, tmp_path)
    secret = tmp_path / "elsewhere" / name
    secret.parent.mkdir()
    real = m / name
    # a valid file of the right kind, with a secret in it, outside the model folder
    if name.endswith(".jinja"):
        secret.write_text("{{ '" + SECRET + "' }}")
    elif name == "tokenizer.json":
        tj = json.loads(real.read_text())
        tj["added_tokens"].append({"id": 383, "content": SECRET, "single_word": False, "lstrip": False,
                                   "rstrip": False, "normalized": False, "special": True})
        secret.write_text(json.dumps(tj))
    else:
        secret.write_text(json.dumps({"note": SECRET}))
    real.unlink(missing_ok=True)
    real.symlink_to(secret)
    out = tmp_path / "merged"
    refused(run_cli("merge", "--base", m, "-a", fx / "adapters" / "llama-rslora", "-o", out),
            real, "outside the folder")
    assert not out.exists()


def test_config_that_is_a_device_or_fifo_is_refused(fx, tmp_path, run_cli):
    m = copy_model(fx, tmp_path)
    (m / "config.json").unlink()
    os.mkfifo(m / "config.json")  # reading it would block forever
    refused(run_cli("inspect", m), m / "config.json", "not a regular file")
    m2 = copy_model(fx, tmp_path, name="zero")
    (m2 / "config.json").unlink()
    (m2 / "config.json").symlink_to("/dev/zero")
    refused(run_cli("inspect", m2), m2 / "config.json", "refusing to read")


def test_side_file_over_its_cap_is_refused_before_reading(fx, tmp_path):
    from loratools import readpolicy
    p = tmp_path / "big.json"
    with open(p, "wb") as f:
        f.truncate(readpolicy.JSON_CAP + 1)  # sparse: no disk, and never read
    with pytest.raises(InputError, match="bytes such a file may have"):
        readpolicy.read_json(p)


def test_hf_cache_layout_is_read(fx, tmp_path, run_cli):
    """snapshots/<rev>/f -> ../../blobs/<hash>: links out of the folder that are the cache's own."""
    repo = tmp_path / "models--org--llama"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in (fx / "models" / "llama").iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blobs / digest)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    out = tmp_path / "merged"
    code, _, err = run_cli("merge", "--base", snap, "-a", fx / "adapters" / "llama-rslora", "-o", out)
    assert code == 0, err
    assert (out / "tokenizer.json").read_bytes() == (fx / "models" / "llama" / "tokenizer.json").read_bytes()


# -- class 3: bounded chat templates ------------------------------------------------------------
TEMPLATE_BOMBS = {
    "output": ("{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}", "output passes"),
    "repeat": ("{{ 'x' * 10000000000 }}", "repetition"),
    "power": ("{{ 10 ** 100000000 }}", "power"),
    "steps": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "range() steps"),
    "recursion": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recurses"),
    "memory": ("{% set ns = namespace(s='x') %}{% for i in range(45) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
               "{{ ns.s | length }}", "memory"),
    "error": ("{{ 1 // 0 }}", "ZeroDivisionError"),
    "raise": ("{{ raise_exception('no system role') }}", "no system role"),
}


@pytest.mark.parametrize("case", sorted(TEMPLATE_BOMBS))
def test_chat_template_bombs_end_in_one_line(fx, tmp_path, case):
    from loratools.train.data import ChatTemplate
    template, words = TEMPLATE_BOMBS[case]
    m = copy_model(fx, tmp_path)
    tc = set_template(m, template)
    with pytest.raises(InputError) as e:
        ChatTemplate(m).render(CHAT)
    assert str(tc) in str(e.value) and words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_chat_template_time_limit(fx, tmp_path, monkeypatch):
    from loratools.train import data
    monkeypatch.setattr(data, "TEMPLATE_SECONDS", 1.0)
    m = copy_model(fx, tmp_path)
    set_template(m, "{% set s = 'x' * 3000 %}{% for a in s %}{% for b in s %}{% for c in s %}{% endfor %}"
                    "{% endfor %}{% endfor %}")
    with pytest.raises(InputError, match="more than 1 seconds"):
        data.ChatTemplate(m).render(CHAT)


def test_chat_template_bomb_through_train(fx, tmp_path, run_cli):
    m = copy_model(fx, tmp_path)
    tc = set_template(m, TEMPLATE_BOMBS["output"][0])
    d = tmp_path / "chat.jsonl"
    d.write_text(json.dumps({"messages": CHAT}) + "\n")
    refused(run_cli("train", "--model", m, "--data", d, "-o", tmp_path / "out", "--max-steps", "1"), tc, "output passes")


@FUZZ
@given(parts=hs.lists(hs.sampled_from([
    "{{ messages[0].content }}", "{% for m in messages %}", "{% endfor %}", "{% if add_generation_prompt %}",
    "{% endif %}", "{{ 'ab' * 3 }}", "{{ m.role }}", "{{ bos_token }}", "{% for i in range(3) %}", "x", "{{",
    "{{ (messages | length) ** 3 }}", "{{ messages | tojson }}", "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "{{ raise_exception('r') }}", "{{ 'x' * 99999999999 }}", "{{ [1] * 3 }}", "{{ m.content | upper }}",
    "{% set x = 1 %}", "{{ x + 1 }}", "{{ undefined_name.attr }}", "{{ ''.__class__ }}"]), max_size=10))
def test_fuzz_chat_templates(fx, tmp_path, parts):
    """Whatever the template, a render gives text or one InputError line naming the file."""
    from loratools.train.data import ChatTemplate
    m = tmp_path / "m"
    m.mkdir(exist_ok=True)
    (m / "tokenizer_config.json").write_text(json.dumps({"chat_template": "".join(parts) or "x"}))
    try:
        out = ChatTemplate(m).render(CHAT, add_generation_prompt=True)
        assert isinstance(out, str)
    except InputError as e:
        assert "tokenizer_config.json" in str(e) and "\n" not in str(e)


# -- class 4: rank_pattern / alpha_pattern keys -------------------------------------------------
def _patterned_adapter(fx, tmp_path, extra: dict, field="rank_pattern") -> Path:
    a = tmp_path / "adapter"
    shutil.copytree(fx / "adapters" / "llama-patterns", a)
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg[field] = {**extra, **(cfg.get(field) or {})}  # the hostile key first: it is tried on every module
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    return a


def test_catastrophic_pattern_matches_in_bounded_time(fx, tmp_path, run_cli):
    # re.match(r"(.*\.)?((.*)*Z)$", a 31-character module name) backtracks for minutes
    a = _patterned_adapter(fx, tmp_path, {"(.*)*Z": 2, "(\\w+\\.?)+Z": 3})
    code, out, err = run_cli("inspect", a, "--json")
    assert code == 0, err
    plain = run_cli("inspect", fx / "adapters" / "llama-patterns", "--json")
    assert json.loads(out)["modules"] == json.loads(plain[1])["modules"]


@pytest.mark.parametrize("key, words", [("(a*)*\\1Z", "no bounded-time match"), ("q" * 2000, "characters long"),
                                        ("(?=(a+)+)Z", "no bounded-time match")])
def test_unboundable_pattern_is_refused_with_the_key(fx, tmp_path, run_cli, key, words):
    a = _patterned_adapter(fx, tmp_path, {key: 2}, field="alpha_pattern")
    line = refused(run_cli("inspect", a), a / "adapter_config.json", "alpha_pattern", words)
    assert key[:5] in line


_REGEX_ATOMS = ["a", "b", ".", "\\.", "\\d", "\\w", "[ab]", "[^a]", "(", ")", "|", "*", "+", "?", "{1,2}", "^", "$",
                "(?:", "\\b"]


@FUZZ
@given(key=hs.lists(hs.sampled_from(_REGEX_ATOMS), min_size=1, max_size=8).map("".join),
       names=hs.lists(hs.text(alphabet="ab.1_", max_size=10), min_size=1, max_size=8))
def test_fuzz_pattern_keys_match_as_peft_does(key, names):
    """The bounded matcher answers as PEFT's re.match(rf"(.*\\.)?({key})$", name) does (names short
    enough for re's own backtracking), or refuses the key."""
    from loratools.patterns import PatternRefused, compile_key
    from loratools.patterns import _Automaton, P
    try:
        match = compile_key(key)
    except PatternRefused:
        return
    try:
        rx = re.compile(rf"(.*\.)?({key})$")
    except re.error:
        return
    try:
        auto = _Automaton(list(P.parse(rx.pattern))).matches
    except PatternRefused:
        auto = None
    for n in names:
        want = rx.match(n) is not None
        assert match(n) == want, (key, n)
        if auto is not None:
            assert auto(n) == want, (key, n)


def test_fuzz_adapter_configs_with_pathological_patterns(fx, tmp_path):
    """Adapter configs with random and pathological keys load (or are refused) in bounded time."""
    import random
    from loratools.formats import peft
    rng = random.Random(0)
    nasty = ["(.*)*Z", "(a|a)*Z", "(\\w+)+$", "((a+)+)+", "(.*){1,30}Z", "(x+x+)+y", "[" * 3, ")(", "(?i)q_proj",
             "q_proj", "layers\\.0\\..*", "(.*a){12}"]
    for i in range(max(4, EXAMPLES // 4)):
        keys = {rng.choice(nasty) + rng.choice(["", "Z", "\\d*", "(q|k)_proj"]): rng.randint(1, 8) for _ in range(3)}
        a = _patterned_adapter(fx, tmp_path / str(i), {}, field="alpha_pattern")
        cfg = json.loads((a / "adapter_config.json").read_text())
        cfg["alpha_pattern"] = {**keys, **cfg["alpha_pattern"]}
        (a / "adapter_config.json").write_text(json.dumps(cfg))
        try:
            peft.read_peft(a)
        except LoratoolsError:
            pass


# -- class 5: memory bounded by what is kept ----------------------------------------------------
@pytest.fixture(scope="module")
def gguf_file(fx, tmp_path_factory):
    from loratools.formats.gguf_model import export_gguf
    p = tmp_path_factory.mktemp("rel3") / "llama.gguf"
    export_gguf(fx / "models" / "llama", p, outtype="f32")
    return p


def gguf_with_string_array(src: Path, dst: Path, count: int, declared: int | None = None) -> Path:
    """``src`` with one more key-value (an array of ``count`` empty strings, declaring
    ``declared``), inserted after the fixed header; its size a multiple of the alignment so the
    tensor data stays aligned."""
    d = src.read_bytes()
    n_kv = struct.unpack_from("<Q", d, 16)[0]
    body = struct.pack("<IIQ", 9, 8, count if declared is None else declared) + b"\0" * 8 * count
    name_len = 5
    while (8 + name_len + len(body)) % 32:
        name_len += 1
    kv = struct.pack("<Q", name_len) + (b"junk." + b"x" * (name_len - 5)) + body
    dst.write_bytes(d[:16] + struct.pack("<Q", n_kv + 1) + d[24:24] + kv + d[24:])
    return dst


def test_gguf_array_of_a_million_empty_strings_costs_what_it_keeps(gguf_file, tmp_path, run_cli):
    """gguf-py's reader took 1.8 GB for this 8 MB file; the bounded one keeps bytes per string."""
    from loratools.formats.gguf_model import field, open_gguf
    p = gguf_with_string_array(gguf_file, tmp_path / "junk.gguf", 1_000_000)
    r = open_gguf(p)
    assert len(field(r, next(k for k in r.fields if k.startswith("junk.")))) == 1_000_000
    code, _, err = run_cli("import", "gguf", p, "-o", tmp_path / "out")
    assert code == 0, err


def test_gguf_array_count_past_the_file_is_refused_before_allocating(gguf_file, tmp_path, run_cli):
    p = gguf_with_string_array(gguf_file, tmp_path / "claims.gguf", 4, declared=2**40)
    refused(run_cli("import", "gguf", p, "-o", tmp_path / "out"), p, "runs past the end")


def test_gguf_tensor_with_a_huge_dimension_is_refused(gguf_file, tmp_path, run_cli):
    import gguf
    t = gguf.GGUFReader(gguf_file).tensors[0]
    pos = t.field.offset + sum(p.nbytes for p in t.field.parts[:3])  # name length, name, n_dims
    d = bytearray(gguf_file.read_bytes())
    d[pos:pos + 8] = struct.pack("<Q", 2**63)
    p = tmp_path / "dims.gguf"
    p.write_bytes(bytes(d))
    refused(run_cli("import", "gguf", p, "-o", tmp_path / "out"), p, "dimension of 9223372036854775808")


def test_jsonl_line_longer_than_seq_len_can_use_is_refused(fx, tmp_path, run_cli):
    d = tmp_path / "long.jsonl"
    d.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": "word " * 2_000_000}) + "\n")
    refused(run_cli("train", "--model", fx / "models" / "llama", "--data", d, "-o", tmp_path / "out"), d,
            "line 2 is longer than")


def test_text_paragraphs_read_line_by_line_are_cut_as_before(fx, tmp_path):
    """.txt paragraphs are what text.split("\\n\\n") cuts, read line by line."""
    from loratools.train import data
    m = fx / "models" / "llama"
    text = "a b\r\n\r\nc\n\n\nd e\n  \nf\n\n\n\n g\rh\r\rk\n"
    p = tmp_path / "t.txt"
    p.write_bytes(b"\xef\xbb\xbf" + text.encode())
    tok = data.Tokenizer(m)
    want = [tok.encode(x)[0] for x in p.read_text(encoding="utf-8-sig").split("\n\n") if x.strip()]
    assert len(want) == 5 and [e.ids for e in data.load(p, m).examples] == want


# -- class 7: bad values as one-line errors -----------------------------------------------------
def _add_tensor(model: Path, name: str, shape: list) -> Path:
    p = model / "model.safetensors"
    d = p.read_bytes()
    n = struct.unpack_from("<Q", d, 0)[0]
    header = json.loads(d[8:8 + n])
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [end, end]}
    raw = json.dumps(header).encode()
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + d[8 + n:])
    return p


def test_zero_size_tensor_with_a_huge_dimension_is_refused(fx, tmp_path, run_cli):
    m = copy_model(fx, tmp_path)
    p = _add_tensor(m, "extra.weight", [0, 2**63])
    refused(run_cli("inspect", m), p, "dimension")
    refused(run_cli("merge", "--base", m, "-a", fx / "adapters" / "llama-rslora", "-o", tmp_path / "o"), p, "dimension")


def test_json_integer_of_thousands_of_digits_is_refused(fx, tmp_path, run_cli):
    m = copy_model(fx, tmp_path)
    cfg = (m / "config.json").read_text()
    (m / "config.json").write_text(cfg.replace('"vocab_size": ', '"vocab_size": ' + "9" * 5000 + ', "x": ', 1))
    refused(run_cli("inspect", m), m / "config.json", "digits")
    a = _patterned_adapter(fx, tmp_path, {})
    text = (a / "adapter_config.json").read_text()
    (a / "adapter_config.json").write_text(text.replace('"r": ', '"r": ' + "1" * 5000 + ', "y": ', 1))
    refused(run_cli("inspect", a), a / "adapter_config.json", "digits")
    # nesting deep enough for a RecursionError in the parser
    (a / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(run_cli("inspect", a), a / "adapter_config.json", "nested too deeply")


def test_safetensors_header_with_a_huge_integer_is_refused(fx, tmp_path, run_cli):
    m = copy_model(fx, tmp_path)
    p = m / "model.safetensors"
    d = p.read_bytes()
    n = struct.unpack_from("<Q", d, 0)[0]
    raw = d[8:8 + n].replace(b'"shape":[', b'"shape":[' + b"7" * 5000 + b",", 1)
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + d[8 + n:])
    refused(run_cli("inspect", m), p, "corrupt safetensors header")


def test_added_token_past_the_embedding_is_refused_at_load(fx, tmp_path, run_cli):
    m = copy_model(fx, tmp_path)
    rows = json.loads((m / "config.json").read_text())["vocab_size"]
    tj = json.loads((m / "tokenizer.json").read_text())
    tj["added_tokens"].append({"id": rows + 10, "content": "<big>", "single_word": False, "lstrip": False,
                               "rstrip": False, "normalized": False, "special": True})
    (m / "tokenizer.json").write_text(json.dumps(tj))
    d = tmp_path / "d.jsonl"
    d.write_text(json.dumps({"text": "hello <big> world"}) + "\n")
    refused(run_cli("train", "--model", m, "--data", d, "-o", tmp_path / "out", "--max-steps", "1"),
            m / "tokenizer.json", f"token id {rows}", f"embedding has {rows} rows")


@pytest.mark.parametrize("out", ["", ".", "..", "some/dir/.."])
def test_output_path_without_a_name_is_refused(fx, tmp_path, run_cli, out, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "some" / "dir").mkdir(parents=True)
    rc, _, err = run_cli("merge", "--base", fx / "models" / "llama", "-a", fx / "adapters" / "llama-rslora", "-o", out)
    assert rc == 5 and "names no file or folder" in one_line(err), err


# -- acceptance: every hostile input through the CLI under a 3 GB address-space limit -----------
AS_LIMIT = 3 * 1024**3


def _limited():
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


def test_hostile_inputs_under_a_3gb_address_space(fx, tmp_path, gguf_file):
    """A child process per input, under RLIMIT_AS = 3 GB: a one-line error (exit 2-5) or the
    correct output, well within a minute; inputs byte-identical afterwards; nothing from outside
    the model folder in any output."""
    cases = []
    llama = fx / "models" / "llama"
    rsl = fx / "adapters" / "llama-rslora"

    m = copy_model(fx, tmp_path, name="linked")
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"bos_token_id": 1, "note": SECRET}))
    (m / "generation_config.json").unlink()
    (m / "generation_config.json").symlink_to(secret)
    cases.append((["merge", "--base", m, "-a", rsl, "-o", tmp_path / "o1"], {2}, [m, secret]))
    cases.append((["export", "gguf", m, "-o", tmp_path / "o1.gguf"], {2}, [m, secret]))
    cases.append((["export", "onnx", m, "-o", tmp_path / "o1-onnx"], {2}, [m, secret]))

    m = copy_model(fx, tmp_path, name="fifo")
    (m / "config.json").unlink()
    os.mkfifo(m / "config.json")
    cases.append((["inspect", m], {2}, []))
    m = copy_model(fx, tmp_path, name="zero")
    (m / "config.json").unlink()
    (m / "config.json").symlink_to("/dev/zero")
    cases.append((["merge", "--base", m, "-a", rsl, "-o", tmp_path / "o2"], {2}, [m]))

    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": CHAT}) + "\n")
    for case in ("output", "memory", "recursion", "steps"):
        m = copy_model(fx, tmp_path, name=f"tmpl-{case}")
        set_template(m, TEMPLATE_BOMBS[case][0])
        cases.append((["train", "--model", m, "--data", chat, "-o", tmp_path / f"t-{case}", "--max-steps", "1"],
                      {2}, [m, chat]))

    m = copy_model(fx, tmp_path, name="tmpl-generate")
    set_template(m, TEMPLATE_BOMBS["repeat"][0])
    cases.append((["generate", m, "--chat", json.dumps(CHAT[:1]), "--max-new-tokens", "2"], {2}, [m]))

    a = _patterned_adapter(fx, tmp_path, {"(.*)*Z": 2})
    cases.append((["inspect", a], {0}, [a]))
    cases.append((["merge", "--base", llama, "-a", a, "-o", tmp_path / "o3"], {0}, [a, llama]))
    cases.append((["resize", a, "--rank", "2", "-o", tmp_path / "o3-resized"], {0}, [a]))
    cases.append((["export", "gguf-adapter", a, "--base", llama, "-o", tmp_path / "o3.gguf"], {0}, [a, llama]))

    g = gguf_with_string_array(gguf_file, tmp_path / "junk.gguf", 1_000_000)
    cases.append((["import", "gguf", g, "-o", tmp_path / "o4"], {0}, [g]))
    g2 = gguf_with_string_array(gguf_file, tmp_path / "claims.gguf", 4, declared=2**40)
    cases.append((["import", "gguf", g2, "-o", tmp_path / "o5"], {2}, [g2]))

    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"text": "word " * 2_000_000}) + "\n")
    cases.append((["train", "--model", llama, "--data", long, "-o", tmp_path / "o6"], {2}, [long]))

    m = copy_model(fx, tmp_path, name="huge-dim")
    _add_tensor(m, "extra.weight", [0, 2**63])
    cases.append((["merge", "--base", m, "-a", rsl, "-o", tmp_path / "o7"], {2}, [m]))
    m = copy_model(fx, tmp_path, name="digits")
    (m / "config.json").write_text((m / "config.json").read_text().replace('"vocab_size": ', '"vocab_size": ' + "9" * 5000 + ', "x": ', 1))
    cases.append((["export", "gguf", m, "-o", tmp_path / "o8.gguf"], {2}, [m]))
    cases.append((["merge", "--base", llama, "-a", rsl, "-o", ""], {5}, [llama]))

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args, codes, inputs in cases:
        before = {str(p): tree_hash(p) for p in inputs}
        r = subprocess.run([sys.executable, "-m", "loratools", *map(str, args)], capture_output=True, text=True,
                           timeout=180, preexec_fn=_limited, env=env, cwd=tmp_path)
        assert r.returncode in codes, (args, r.returncode, r.stderr[-3000:])
        if r.returncode:
            one_line(r.stderr)
        assert {str(p): tree_hash(p) for p in inputs} == before, args
    for out in tmp_path.glob("o*"):
        for f in [out] if out.is_file() else out.rglob("*"):
            if f.is_file():
                assert SECRET.encode() not in f.read_bytes(), f
