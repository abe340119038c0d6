"""Bad inputs through the CLI: every one is refused with a non-zero exit code and exactly one line
on stderr (``loratools: error: <file>: <problem>``) naming the offending file, never a traceback.
Bad inputs are made by copying fixture files into tmp_path and corrupting them."""
from __future__ import annotations

import collections
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

from loratools import st
from loratools.errors import IncompatibleError, InputError, LoratoolsError, UnsupportedError

SHARDED = "llama-bf16-sharded"
FIRST_SHARD = "model-00001-of-00007.safetensors"
LAST_SHARD = "model-00007-of-00007.safetensors"


# -- helpers -------------------------------------------------------------------------------------
def assert_refused(result, where, *words, code=None):
    """Non-zero exit (``code`` if given), exactly one stderr line naming ``where`` (a path or a
    file name) and containing every one of ``words`` (case-insensitive), no traceback."""
    rc, out, err = result
    assert rc != 0, f"expected a refusal, got exit 0; stdout:\n{out}"
    if code is not None:
        assert rc == code, (rc, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.splitlines()
    assert len(lines) == 1, f"stderr is not one line: {err!r}"
    line = lines[0]
    assert line.startswith("loratools: error: "), line
    assert str(where) in line, f"{where} not named in: {line}"
    for w in words:
        assert w.lower() in line.lower(), f"{w!r} not in: {line}"
    return line


def copy_model(fx: Path, tmp_path: Path, arch: str) -> Path:
    dst = tmp_path / arch
    shutil.copytree(fx / "models" / arch, dst)
    return dst


def copy_adapter(fx: Path, tmp_path: Path, name: str) -> Path:
    src = fx / "adapters" / name
    dst = tmp_path / name
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copyfile(src, dst)
    return dst


def read_raw(path: Path) -> tuple[dict, bytes]:
    """(header dict incl. __metadata__, data region) of a safetensors file."""
    b = path.read_bytes()
    (n,) = struct.unpack("<Q", b[:8])
    return json.loads(b[8:8 + n]), b[8 + n:]


def write_raw(path: Path, header, data: bytes) -> None:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def edit_json(path: Path, fn) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d, indent=2))


def tensors_by_size(header: dict) -> list[tuple[str, dict]]:
    return sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])


# -- paths that are not inputs at all ------------------------------------------------------------
@pytest.mark.parametrize("cmd", ["inspect", "forward"])
def test_missing_path(run_cli, tmp_path, cmd):
    p = tmp_path / "nope"
    args = ("inspect", p) if cmd == "inspect" else ("forward", p, "--ids", "1,2,3")
    assert_refused(run_cli(*args), p, "no such file", code=2)


def test_missing_adapter(run_cli, fx, tmp_path):
    p = tmp_path / "no-adapter"
    assert_refused(run_cli("forward", fx / "models" / "llama", "-a", p, "--ids", "1,2,3"), p, "no such file", code=2)


def test_directory_neither_checkpoint_nor_adapter(run_cli, tmp_path):
    d = tmp_path / "junk"
    d.mkdir()
    (d / "notes.txt").write_text("hello")
    assert_refused(run_cli("inspect", d), d, "neither", "adapter_config.json", "config.json", code=2)


@pytest.mark.parametrize("cmd", ["inspect", "forward"])
def test_checkpoint_without_weights(run_cli, fx, tmp_path, cmd):
    d = tmp_path / "noweights"
    d.mkdir()
    shutil.copyfile(fx / "models" / "llama" / "config.json", d / "config.json")
    args = ("inspect", d) if cmd == "inspect" else ("forward", d, "--ids", "1,2,3")
    assert_refused(run_cli(*args), d, "not a checkpoint", "safetensors", code=2)


def test_unrecognised_file_type(run_cli, tmp_path):
    p = tmp_path / "weights.txt"
    p.write_text("not weights")
    assert_refused(run_cli("inspect", p), p, "unrecognised file type", code=2)


# -- safetensors ---------------------------------------------------------------------------------
def _truncate_data(p: Path):
    b = p.read_bytes()
    p.write_bytes(b[:-100])


def _truncate_header(p: Path):
    b = p.read_bytes()
    (n,) = struct.unpack("<Q", b[:8])
    p.write_bytes(b[:8 + n // 2])


def _tiny(p: Path):
    p.write_bytes(b"\x10\x00\x00")


def _header_too_long(p: Path):
    b = p.read_bytes()
    p.write_bytes(struct.pack("<Q", len(b)) + b[8:])


def _header_absurd(p: Path):
    b = p.read_bytes()
    p.write_bytes(struct.pack("<Q", 2**60) + b[8:])


def _bad_json(p: Path):
    b = p.read_bytes()
    (n,) = struct.unpack("<Q", b[:8])
    p.write_bytes(b[:8] + b"{not json".ljust(n) + b[8 + n:])


def _not_object(p: Path):
    b = p.read_bytes()
    (n,) = struct.unpack("<Q", b[:8])
    p.write_bytes(b[:8] + b"[1, 2, 3]".ljust(n) + b[8 + n:])


def _edit_header(fn):
    def corrupt(p: Path):
        h, data = read_raw(p)
        fn(h, len(data))
        write_raw(p, h, data)
    return corrupt


def _unknown_dtype(h, _):
    tensors_by_size(h)[0][1]["dtype"] = "Q4_K"


def _dtype_not_string(h, _):
    tensors_by_size(h)[0][1]["dtype"] = ["F32"]


def _shape_mismatch(h, _):
    ent = tensors_by_size(h)[0][1]
    ent["shape"] = [ent["shape"][0] + 1] + ent["shape"][1:]


def _offsets_out_of_range(h, data_len):
    ent = tensors_by_size(h)[-1][1]
    b, e = ent["data_offsets"]
    ent["data_offsets"] = [data_len, data_len + (e - b)]


def _overlap(h, _):
    ents = tensors_by_size(h)
    size = lambda ent: ent["data_offsets"][1] - ent["data_offsets"][0]  # noqa: E731
    a, b = next((a, b) for i, (_, a) in enumerate(ents) for _, b in ents[i + 1:] if size(a) == size(b) and a["dtype"] == b["dtype"])
    b["data_offsets"] = list(a["data_offsets"])
    b["shape"] = list(a["shape"])


def _negative_shape(h, _):
    ent = tensors_by_size(h)[0][1]
    ent["shape"] = [-ent["shape"][0]] + ent["shape"][1:]


def _float_shape(h, _):
    ent = tensors_by_size(h)[0][1]
    ent["shape"] = [float(d) for d in ent["shape"]]


def _bad_metadata(h, _):
    h["__metadata__"] = {"format": 1}


ST_CASES = {
    "truncated-data": (_truncate_data, ["truncated"]),
    "truncated-header": (_truncate_header, ["truncated", "header"]),
    "shorter-than-8-bytes": (_tiny, ["truncated", "8-byte"]),
    "header-length-past-eof": (_header_too_long, ["header claims"]),
    "header-length-absurd": (_header_absurd, ["header", str(2**60)]),
    "header-invalid-json": (_bad_json, ["header", "invalid JSON"]),
    "header-not-object": (_not_object, ["header", "not a JSON object"]),
    "unknown-dtype": (_edit_header(_unknown_dtype), ["dtype", "Q4_K"]),
    "dtype-not-string": (_edit_header(_dtype_not_string), ["dtype"]),
    "shape-bytes-mismatch": (_edit_header(_shape_mismatch), ["shape", "bytes"]),
    "offsets-out-of-range": (_edit_header(_offsets_out_of_range), ["data region"]),
    "overlapping-offsets": (_edit_header(_overlap), ["overlap"]),
    "negative-shape": (_edit_header(_negative_shape), ["invalid shape"]),
    "float-shape": (_edit_header(_float_shape), ["invalid shape"]),
    "bad-metadata": (_edit_header(_bad_metadata), ["__metadata__"]),
}


@pytest.mark.parametrize("how", ["inspect-file", "inspect-dir", "forward"])
@pytest.mark.parametrize("case", list(ST_CASES))
def test_corrupt_safetensors_model(run_cli, fx, tmp_path, case, how):
    corrupt, words = ST_CASES[case]
    d = copy_model(fx, tmp_path, "llama")
    f = d / "model.safetensors"
    corrupt(f)
    if how == "inspect-file":
        res = run_cli("inspect", f)
    elif how == "inspect-dir":
        res = run_cli("inspect", d)
    else:
        res = run_cli("forward", d, "--ids", "1,2,3")
    assert_refused(res, f, *words, code=2)


@pytest.mark.parametrize("case", ["truncated-data", "header-length-absurd", "header-invalid-json", "overlapping-offsets"])
def test_corrupt_safetensors_adapter(run_cli, fx, tmp_path, case):
    corrupt, words = ST_CASES[case]
    a = copy_adapter(fx, tmp_path, "llama-rslora")
    f = a / "adapter_model.safetensors"
    corrupt(f)
    assert_refused(run_cli("inspect", a), f, *words, code=2)
    assert_refused(run_cli("forward", fx / "models" / "llama", "-a", a, "--ids", "1,2,3"), f, *words, code=2)


@pytest.mark.parametrize("case", ["truncated-data", "truncated-header", "shape-bytes-mismatch"])
def test_corrupt_kohya_file(run_cli, fx, tmp_path, case):
    corrupt, words = ST_CASES[case]
    f = copy_adapter(fx, tmp_path, "mistral-kohya.safetensors")
    corrupt(f)
    assert_refused(run_cli("inspect", f), f, *words, code=2)


def test_absurd_header_does_not_allocate(tmp_path, fx):
    """The length is checked before anything is read: a 2**60-byte claim must fail fast."""
    f = tmp_path / "absurd.safetensors"
    f.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(InputError, match="header"):
        st.read_header(f)


# -- model.safetensors.index.json ----------------------------------------------------------------
def _index(d: Path) -> Path:
    return d / "model.safetensors.index.json"


def _set_map(d: Path, name_pred, value):
    def fn(idx):
        for k in idx["weight_map"]:
            if name_pred(k, idx["weight_map"][k]):
                idx["weight_map"][k] = value
    edit_json(_index(d), fn)


def _first_name_in(d: Path, shard: str) -> str:
    wm = json.loads(_index(d).read_text())["weight_map"]
    return next(k for k, v in wm.items() if v == shard)


def idx_malformed(d, tmp_path):
    _index(d).write_text('{"weight_map": {"a": "b",}')
    return _index(d), ["malformed JSON"]


def idx_not_a_map(d, tmp_path):
    _index(d).write_text('{"weight_map": ["model-00001-of-00007.safetensors"]}')
    return _index(d), ["weight_map"]


def idx_dotdot(d, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copyfile(d / FIRST_SHARD, outside / FIRST_SHARD)
    _set_map(d, lambda k, v: v == FIRST_SHARD, f"../elsewhere/{FIRST_SHARD}")
    return _index(d), ["outside", "../elsewhere"]


def idx_absolute(d, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copyfile(d / FIRST_SHARD, outside / FIRST_SHARD)
    _set_map(d, lambda k, v: v == FIRST_SHARD, str(outside / FIRST_SHARD))
    return _index(d), ["absolute"]


def idx_symlink_out(d, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(d / FIRST_SHARD, outside / FIRST_SHARD)
    os.symlink(outside / FIRST_SHARD, d / FIRST_SHARD)
    return _index(d), ["outside", FIRST_SHARD]


def idx_symlink_loop(d, tmp_path):
    (d / FIRST_SHARD).unlink()
    os.symlink(d / FIRST_SHARD, d / FIRST_SHARD)
    return _index(d), [FIRST_SHARD]


def idx_missing_shard(d, tmp_path):
    (d / LAST_SHARD).unlink()
    return _index(d), ["missing", LAST_SHARD]


def idx_tensor_in_two_shards(d, tmp_path):
    name = _first_name_in(d, LAST_SHARD)
    first = st.load_file(d / FIRST_SHARD)
    first[name] = st.load_file(d / LAST_SHARD)[name]
    st.save_file(first, d / FIRST_SHARD)
    return _index(d), ["two shards", name]


def idx_tensor_not_in_shard(d, tmp_path):
    name = _first_name_in(d, LAST_SHARD)
    _set_map(d, lambda k, v: k == name, FIRST_SHARD)
    return _index(d), ["does not contain", name, FIRST_SHARD]


def idx_nul_in_name(d, tmp_path):
    _set_map(d, lambda k, v: v == FIRST_SHARD, "model\x00.safetensors")
    return _index(d), ["weight_map"]


INDEX_CASES = [idx_malformed, idx_not_a_map, idx_dotdot, idx_absolute, idx_symlink_out, idx_symlink_loop, idx_missing_shard,
               idx_tensor_in_two_shards, idx_tensor_not_in_shard, idx_nul_in_name]


@pytest.mark.parametrize("cmd", ["inspect", "forward"])
@pytest.mark.parametrize("case", INDEX_CASES, ids=lambda f: f.__name__[4:])
def test_bad_index(run_cli, fx, tmp_path, case, cmd):
    d = copy_model(fx, tmp_path, SHARDED)
    where, words = case(d, tmp_path)
    args = ("inspect", d) if cmd == "inspect" else ("forward", d, "--ids", "1,2,3")
    assert_refused(run_cli(*args), where, *words, code=2)


def test_sharded_fixture_is_fine(run_cli, fx, tmp_path):
    d = copy_model(fx, tmp_path, SHARDED)
    code, out, err = run_cli("inspect", d)
    assert code == 0, err
    assert "7 shard(s)" in out


# -- config.json ---------------------------------------------------------------------------------
def cfg_malformed(p):
    p.write_text(p.read_text()[:-5])
    return ["malformed JSON"], 2


def cfg_not_object(p):
    p.write_text("[]")
    return ["expected a JSON object"], 2


def cfg_no_model_type(p):
    edit_json(p, lambda c: c.pop("model_type"))
    return ["missing", "model_type"], 2


def cfg_unknown_model_type(p):
    edit_json(p, lambda c: c.update(model_type="gpt2"))
    return ["unsupported", "gpt2"], 4


def cfg_model_type_list(p):
    edit_json(p, lambda c: c.update(model_type=["llama"]))
    return ["model_type"], 2


def cfg_hidden_size_string(p):
    edit_json(p, lambda c: c.update(hidden_size="64"))
    return ["hidden_size", "'64'"], 2


def cfg_heads_not_multiple(p):
    edit_json(p, lambda c: c.update(num_key_value_heads=3))
    return ["num_attention_heads=4", "not a multiple", "num_key_value_heads=3"], 2


def cfg_zero_layers_type(p):
    edit_json(p, lambda c: c.update(num_hidden_layers=2.0))
    return ["num_hidden_layers"], 2


CONFIG_CASES = [cfg_malformed, cfg_not_object, cfg_no_model_type, cfg_unknown_model_type, cfg_model_type_list,
                cfg_hidden_size_string, cfg_heads_not_multiple, cfg_zero_layers_type]


@pytest.mark.parametrize("cmd", ["forward", "inspect"])
@pytest.mark.parametrize("case", CONFIG_CASES, ids=lambda f: f.__name__[4:])
def test_bad_config(run_cli, fx, tmp_path, case, cmd):
    d = copy_model(fx, tmp_path, "llama")
    p = d / "config.json"
    words, code = case(p)
    args = ("forward", d, "--ids", "1,2,3") if cmd == "forward" else ("inspect", d)
    if cmd == "inspect" and case is cfg_unknown_model_type:  # tensor operations need no architecture
        rc, out, err = run_cli(*args)
        assert rc == 0 and "gpt2 checkpoint" in out and "tensor operations only" in out, err
        return
    assert_refused(run_cli(*args), p, *words, code=code)


def test_bad_base_config_for_adapter(run_cli, fx, tmp_path):
    """Fitting an adapter to a base reads names, shapes and config.json's tie_word_embeddings only:
    a bad field there is refused; one the tensor operations do not read is not their business."""
    d = copy_model(fx, tmp_path, "llama")
    edit_json(d / "config.json", lambda c: c.update(tie_word_embeddings="yes"))
    assert_refused(run_cli("inspect", fx / "adapters" / "llama-patterns", "--base", d), d / "config.json",
                   "tie_word_embeddings", code=2)
    edit_json(d / "config.json", lambda c: c.update(tie_word_embeddings=False, hidden_size="64"))
    assert run_cli("inspect", fx / "adapters" / "llama-patterns", "--base", d)[0] == 0


# -- adapter_config.json -------------------------------------------------------------------------
def ad_malformed(a):
    p = a / "adapter_config.json"
    p.write_text(p.read_text().replace('"peft_type": "LORA",', '"peft_type": LORA,'))
    return p, ["malformed JSON"], 2


def ad_no_peft_type(a):
    edit_json(a / "adapter_config.json", lambda c: c.pop("peft_type"))
    return a / "adapter_config.json", ["missing", "peft_type"], 2


def ad_ia3(a):
    edit_json(a / "adapter_config.json", lambda c: c.update(peft_type="IA3"))
    return a / "adapter_config.json", ["IA3", "not supported", "LORA"], 4


def ad_r_string(a):
    edit_json(a / "adapter_config.json", lambda c: c.update(r="8"))
    return a / "adapter_config.json", ["'r'", "positive integer"], 2


def ad_r_float(a):
    edit_json(a / "adapter_config.json", lambda c: c.update(r=8.5))
    return a / "adapter_config.json", ["'r'", "positive integer"], 2


def ad_r_disagrees(a):
    edit_json(a / "adapter_config.json", lambda c: c.update(r=6))
    return a, ["rank 8", "says 6"], 2


def ad_rank_pattern_disagrees(a):
    edit_json(a / "adapter_config.json", lambda c: c["rank_pattern"].update({"model.layers.0.mlp.down_proj": 3}))
    return a, ["model.layers.0.mlp.down_proj", "rank 2", "says 3"], 2


def ad_lora_a_without_b(a):
    f = a / "adapter_model.safetensors"
    sd = st.load_file(f)
    key = next(k for k in sorted(sd) if k.endswith("lora_B.weight"))
    del sd[key]
    st.save_file(sd, f)
    mod = key[len("base_model.model."):-len(".lora_B.weight")]
    return f, [mod, "lora_A", "no lora_B"], 2


def ad_ranks_disagree(a):
    f = a / "adapter_model.safetensors"
    sd = st.load_file(f)
    key = next(k for k in sorted(sd) if k.endswith("q_proj.lora_B.weight"))
    sd[key] = sd[key][:, :-1].contiguous()
    st.save_file(sd, f)
    return f, ["ranks disagree"], 2


def ad_pickle_list(a):
    f = a / "adapter_model.safetensors"
    sd = st.load_file(f)
    f.unlink()
    torch.save(list(sd.values()), a / "adapter_model.bin")
    return a / "adapter_model.bin", ["dict of tensors"], 2


def ad_no_weights(a):
    (a / "adapter_model.safetensors").unlink()
    return a, ["no adapter_model.safetensors"], 2


def ad_alpha_nan(a):
    edit_json(a / "adapter_config.json", lambda c: c.update(lora_alpha=float("nan")))  # json writes NaN, which json reads
    return a / "adapter_config.json", ["lora_alpha", "finite number"], 2


def ad_alpha_pattern_inf(a):
    edit_json(a / "adapter_config.json", lambda c: c.update(alpha_pattern={"q_proj": float("inf")}))
    return a / "adapter_config.json", ["alpha_pattern", "finite numbers"], 2


def ad_rank_pattern_zero(a):
    edit_json(a / "adapter_config.json", lambda c: c["rank_pattern"].update({"model.layers.0.mlp.down_proj": 0}))
    return a / "adapter_config.json", ["rank_pattern", "positive integers"], 2


ADAPTER_CASES = [ad_malformed, ad_no_peft_type, ad_ia3, ad_r_string, ad_r_float, ad_r_disagrees,
                 ad_rank_pattern_disagrees, ad_lora_a_without_b, ad_ranks_disagree, ad_pickle_list, ad_no_weights,
                 ad_alpha_nan, ad_alpha_pattern_inf, ad_rank_pattern_zero]


@pytest.mark.parametrize("cmd", ["inspect", "forward"])
@pytest.mark.parametrize("case", ADAPTER_CASES, ids=lambda f: f.__name__[3:])
def test_bad_adapter(run_cli, fx, tmp_path, case, cmd):
    a = copy_adapter(fx, tmp_path, "llama-patterns")
    where, words, code = case(a)
    if cmd == "inspect":
        res = run_cli("inspect", a, "--allow-pickle")
    else:
        res = run_cli("forward", fx / "models" / "llama", "-a", a, "--ids", "1,2,3")
        if case is ad_pickle_list:  # forward never loads pickles
            words, code = ["--allow-pickle"], 4
    assert_refused(res, where, *words, code=code)


@pytest.mark.parametrize("name", ["qwen3-dora", "llama-patterns", "llama-rslora", "qwen2-bias", "mistral-kohya.safetensors"])
def test_good_adapters_inspect(run_cli, fx, name):
    code, out, err = run_cli("inspect", fx / "adapters" / name)
    assert code == 0, err
    assert err == ""
    if name == "qwen3-dora":
        assert "DoRA" in out


# -- adapters that do not fit the base -----------------------------------------------------------
def test_forward_with_mismatching_adapter(run_cli, fx):
    # (the qwen2 fixture has exactly llama's shapes, so llama-patterns fits it; qwen3 has head_dim 32)
    a, m = fx / "adapters" / "llama-patterns", fx / "models" / "qwen3"
    line = assert_refused(run_cli("forward", m, "-a", a, "--ids", "1,2,3"), a, "shape", code=3)
    assert str(m) in line


@pytest.mark.parametrize("adapter,base", [("llama-patterns", "qwen3"), ("qwen3-dora", "llama"), ("qwen2-bias", "qwen3"),
                                          ("mistral-kohya.safetensors", "qwen3")])
def test_inspect_with_mismatching_base(run_cli, fx, adapter, base):
    a, m = fx / "adapters" / adapter, fx / "models" / base
    line = assert_refused(run_cli("inspect", a, "--base", m), a, code=3)
    assert str(m) in line


def test_adapter_module_missing_from_base(run_cli, fx, tmp_path):
    a = copy_adapter(fx, tmp_path, "qwen2-bias")
    f = a / "adapter_model.safetensors"
    sd = st.load_file(f)
    st.save_file({k.replace("layers.1.", "layers.7."): v for k, v in sd.items()}, f)
    assert_refused(run_cli("inspect", a, "--base", fx / "models" / "qwen2"), a, "model.layers.7", "does not have", code=3)


def test_inspect_base_is_not_a_checkpoint(run_cli, fx, tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    assert_refused(run_cli("inspect", fx / "adapters" / "llama-patterns", "--base", d), d, "config.json", code=2)


def test_checkpoint_given_as_adapter(run_cli, fx):
    m = fx / "models" / "llama"
    assert_refused(run_cli("forward", m, "-a", m, "--ids", "1,2,3"), m, "not an adapter", code=2)


# -- pickle --------------------------------------------------------------------------------------
class _Payload:
    """A non-tensor object: weights_only=True must refuse to rebuild it."""

    def __init__(self):
        self.x = 1


class _MyDict(collections.OrderedDict):
    pass


def _pickle_model(fx, tmp_path, obj=None, name="pytorch_model.bin", **save_kw) -> Path:
    d = tmp_path / "pt"
    d.mkdir()
    shutil.copyfile(fx / "models" / "llama" / "config.json", d / "config.json")
    if obj is None:
        obj = st.load_file(fx / "models" / "llama" / "model.safetensors")
    torch.save(obj, d / name, **save_kw)
    return d


@pytest.mark.parametrize("target", ["dir", "file"])
def test_pickle_refused_without_flag(run_cli, fx, tmp_path, target):
    d = _pickle_model(fx, tmp_path)
    f = d / "pytorch_model.bin"
    assert_refused(run_cli("inspect", d if target == "dir" else f), f, "pickle", "--allow-pickle", code=4)


def test_pickle_refused_by_forward(run_cli, fx, tmp_path):
    d = _pickle_model(fx, tmp_path)
    assert_refused(run_cli("forward", d, "--ids", "1,2,3"), d / "pytorch_model.bin", "--allow-pickle", code=4)


@pytest.mark.parametrize("target", ["dir", "file"])
def test_pickle_allowed_with_flag(run_cli, fx, tmp_path, target):
    d = _pickle_model(fx, tmp_path)
    code, out, err = run_cli("inspect", d if target == "dir" else d / "pytorch_model.bin", "--allow-pickle")
    assert code == 0, err
    assert "checkpoint" in out


def test_legacy_pickle_allowed_with_flag(run_cli, fx, tmp_path):
    """torch.save(..., _use_new_zipfile_serialization=False) files cannot be mmap'ed but are valid."""
    d = _pickle_model(fx, tmp_path, _use_new_zipfile_serialization=False)
    code, out, err = run_cli("inspect", d, "--allow-pickle")
    assert code == 0, err


@pytest.mark.parametrize("obj,cls", [
    pytest.param(lambda sd: {"weights": _Payload()}, "_Payload", id="custom-class"),
    pytest.param(lambda sd: _MyDict(sd), "_MyDict", id="ordereddict-subclass"),
    pytest.param(lambda sd: {**sd, "extra": _Payload()}, "_Payload", id="tensor-dict-with-object"),
])
def test_pickle_with_objects_refused_even_with_flag(run_cli, fx, tmp_path, obj, cls):
    sd = st.load_file(fx / "models" / "llama" / "model.safetensors")
    d = _pickle_model(fx, tmp_path, obj(sd))
    f = d / "pytorch_model.bin"
    for target in (d, f):
        line = assert_refused(run_cli("inspect", target, "--allow-pickle"), f, "weights_only", "non-tensor object", cls, code=2)
        assert "\x1b" not in line


@pytest.mark.parametrize("obj", [
    pytest.param(lambda sd: list(sd.values()), id="list"),
    pytest.param(lambda sd: {"a": 1, "b": "x"}, id="dict-of-non-tensors"),
    pytest.param(lambda sd: {i: v for i, v in enumerate(sd.values())}, id="int-keys"),
])
def test_pickle_not_a_state_dict(run_cli, fx, tmp_path, obj):
    sd = st.load_file(fx / "models" / "llama" / "model.safetensors")
    d = _pickle_model(fx, tmp_path, obj(sd))
    assert_refused(run_cli("inspect", d, "--allow-pickle"), d / "pytorch_model.bin", "dict of tensors", code=2)


def test_pickle_garbage(run_cli, fx, tmp_path):
    d = _pickle_model(fx, tmp_path)
    (d / "pytorch_model.bin").write_bytes(b"this is not a pickle at all")
    assert_refused(run_cli("inspect", d, "--allow-pickle"), d / "pytorch_model.bin", "cannot load", code=2)


@pytest.mark.parametrize("obj,cls", [
    pytest.param(lambda sd: {"weights": _Payload()}, "_Payload", id="custom-class"),
    pytest.param(lambda sd: _MyDict(sd), "_MyDict", id="ordereddict-subclass"),
])
def test_pickle_adapter_with_objects_refused(run_cli, fx, tmp_path, obj, cls):
    a = copy_adapter(fx, tmp_path, "llama-patterns")
    sd = st.load_file(a / "adapter_model.safetensors")
    (a / "adapter_model.safetensors").unlink()
    torch.save(obj(sd), a / "adapter_model.bin")
    f = a / "adapter_model.bin"
    assert_refused(run_cli("inspect", a), f, "--allow-pickle", code=4)
    assert_refused(run_cli("inspect", a, "--allow-pickle"), f, "weights_only", "non-tensor object", cls, code=2)


def test_pickle_adapter_allowed_with_flag(run_cli, fx, tmp_path):
    a = copy_adapter(fx, tmp_path, "llama-patterns")
    sd = st.load_file(a / "adapter_model.safetensors")
    (a / "adapter_model.safetensors").unlink()
    torch.save(sd, a / "adapter_model.bin")
    code, out, err = run_cli("inspect", a, "--allow-pickle")
    assert code == 0, err


# -- --debug and exit codes ----------------------------------------------------------------------
def test_debug_propagates_exception(fx, tmp_path, capsys):
    from loratools.cli import main

    with pytest.raises(InputError, match="no such file"):
        main(["--debug", "inspect", str(tmp_path / "nope")])
    a = copy_adapter(fx, tmp_path, "llama-patterns")
    edit_json(a / "adapter_config.json", lambda c: c.update(peft_type="IA3"))
    with pytest.raises(UnsupportedError, match="IA3"):
        main(["--debug", "inspect", str(a)])
    with pytest.raises(IncompatibleError):
        main(["--debug", "forward", str(fx / "models" / "qwen3"), "-a", str(fx / "adapters" / "llama-patterns"),
              "--ids", "1,2,3"])
    # without --debug the same error is one line
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_exit_codes_match_error_classes(run_cli, fx, tmp_path):
    assert (InputError.exit_code, IncompatibleError.exit_code, UnsupportedError.exit_code) == (2, 3, 4)
    assert LoratoolsError.exit_code == 2  # a bad option value: a usage error, exit 2 like click's own
    a = copy_adapter(fx, tmp_path, "llama-patterns")
    edit_json(a / "adapter_config.json", lambda c: c.update(peft_type="IA3"))
    cases = [
        (InputError, ("inspect", tmp_path / "nope"), lambda: st.read_header(tmp_path / "nope.safetensors")),
        (IncompatibleError, ("forward", fx / "models" / "qwen3", "-a", fx / "adapters" / "llama-patterns", "--ids", "1,2,3"), None),
        (UnsupportedError, ("inspect", a), None),
    ]
    from loratools import api

    for cls, args, direct in cases:
        code, _, err = run_cli(*args)
        assert code == cls.exit_code, (cls, code, err)
        if direct is not None:
            with pytest.raises(cls):
                direct()
    with pytest.raises(UnsupportedError):
        api.inspect(a)
    with pytest.raises(IncompatibleError):
        api.load_adapter(fx / "adapters" / "llama-patterns", base=fx / "models" / "qwen3")


# -- exports of a checkpoint that does not fit its own config ------------------------------------
FIT_CASES = {
    "extra": (lambda sd: sd.__setitem__("model.layers.0.mlp.extra.weight", torch.zeros(2, 2)), "not part of"),
    "shape": (lambda sd: sd.__setitem__("model.layers.0.mlp.up_proj.weight", torch.zeros(3, 3)), "shape"),
    "missing": (lambda sd: sd.pop("model.layers.1.mlp.down_proj.weight"), "lacks"),
}


@pytest.mark.parametrize("cmd", ["onnx", "gguf"])
@pytest.mark.parametrize("case", list(FIT_CASES))
def test_export_of_a_checkpoint_that_does_not_fit_its_config(run_cli, fx, tmp_path, case, cmd):
    d = copy_model(fx, tmp_path, "llama")
    f = d / "model.safetensors"
    sd = st.load_file(f)
    edit, word = FIT_CASES[case]
    edit(sd)
    st.save_file(sd, f)
    out = tmp_path / ("o" if cmd == "onnx" else "o.gguf")
    assert_refused(run_cli("export", cmd, d, "-o", out), d, word, code=3)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["llama"]
