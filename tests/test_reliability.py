"""Reliability: hostile GGUF files, fuzzed inputs, interrupted exports, determinism, disk space."""
import hashlib
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from loratools.errors import LoratoolsError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = int(os.environ.get("LORATOOLS_FUZZ_EXAMPLES", "40"))  # `make fuzz` raises it


@pytest.fixture(scope="module")
def gguf_file(fx, tmp_path_factory):
    from loratools.formats.gguf_model import export_gguf
    p = tmp_path_factory.mktemp("rel") / "llama.gguf"
    export_gguf(fx / "models" / "llama", p, outtype="f32")
    return p


def _tensor_info_offsets(path):
    import gguf
    t = gguf.GGUFReader(path).tensors[0]
    pos, offs = t.field.offset, []
    for part in t.field.parts:  # name length, name, n_dims, dims, type, data offset
        offs.append(pos)
        pos += part.nbytes
    return offs


GGUF_CASES = {
    "bad_magic": (lambda d, o: d.__setitem__(slice(0, 4), b"GGML"), "bad magic"),
    "version": (lambda d, o: d.__setitem__(slice(4, 8), struct.pack("<I", 99)), "unsupported GGUF version 99"),
    "truncated": (lambda d, o: d.__delitem__(slice(len(d) // 2, None)), "past the end"),
    "header_only": (lambda d, o: d.__delitem__(slice(20, None)), "truncated GGUF file"),
    "tensor_count": (lambda d, o: d.__setitem__(slice(8, 16), struct.pack("<Q", 2**60)), "more than a"),
    "kv_count": (lambda d, o: d.__setitem__(slice(16, 24), struct.pack("<Q", 2**60)), "more than a"),
    "string_too_long": (lambda d, o: d.__setitem__(slice(24, 32), struct.pack("<Q", 2**40)), "runs past the end"),
    "unknown_quant_type": (lambda d, o: d.__setitem__(slice(o[4], o[4] + 4), struct.pack("<I", 999)), "unknown tensor type"),
    "data_out_of_range": (lambda d, o: d.__setitem__(slice(o[5], o[5] + 8), struct.pack("<Q", 2**40)), "past the end"),
}


@pytest.mark.parametrize("case", sorted(GGUF_CASES))
def test_hostile_gguf_gives_one_clean_line(gguf_file, tmp_path, run_cli, case):
    mutate, words = GGUF_CASES[case]
    d = bytearray(gguf_file.read_bytes())
    mutate(d, _tensor_info_offsets(gguf_file))
    bad = tmp_path / f"{case}.gguf"
    bad.write_bytes(bytes(d))
    for args in (("import", "gguf", bad, "-o", tmp_path / "out"), ("validate", "--base", ROOT, bad)):
        code, out, err = run_cli(*args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and str(bad) in lines[0] and words in lines[0], (args[0], err)
        assert "Traceback" not in err and not (tmp_path / "out").exists()


# -- fuzzing ---------------------------------------------------------------------------------
def _mutations():
    return hs.lists(hs.tuples(hs.integers(0, 2**31), hs.integers(0, 255)), min_size=1, max_size=8)


def _apply(data: bytes, muts) -> bytes:
    d = bytearray(data)
    for pos, val in muts:
        d[pos % len(d)] = val
    return bytes(d)


FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(muts=_mutations(), cut=hs.one_of(hs.none(), hs.integers(0, 4000)))
def test_fuzz_safetensors(fx, tmp_path, muts, cut):
    from loratools import st
    src = (fx / "adapters" / "llama-rslora" / "adapter_model.safetensors").read_bytes()
    data = _apply(src, muts)
    if cut is not None:
        data = data[: cut % len(data)]
    p = tmp_path / "f.safetensors"
    p.write_bytes(data)
    try:
        with st.SafetensorsFile(p) as f:
            for k in f.keys():
                f.get(k)
    except LoratoolsError:
        pass


@FUZZ
@given(muts=_mutations(), cut=hs.one_of(hs.none(), hs.integers(0, 600_000)))
def test_fuzz_gguf(gguf_file, tmp_path, muts, cut):
    from loratools.formats.gguf_model import config_from_gguf, open_gguf
    data = _apply(gguf_file.read_bytes(), muts)
    if cut is not None:
        data = data[: cut % len(data)]
    p = tmp_path / "f.gguf"
    p.write_bytes(data)
    try:
        r = open_gguf(p)
        config_from_gguf(r, p)
    except LoratoolsError:
        pass


@FUZZ
@given(cfg=hs.dictionaries(hs.sampled_from(["model_type", "hidden_size", "num_attention_heads", "num_key_value_heads",
                                           "num_hidden_layers", "intermediate_size", "vocab_size", "rope_theta",
                                           "rope_scaling", "rope_parameters", "head_dim", "layer_types", "sliding_window",
                                           "tie_word_embeddings", "rms_norm_eps"]),
                           hs.one_of(hs.none(), hs.booleans(), hs.integers(-5, 10**6), hs.floats(allow_nan=True),
                                     hs.text(max_size=8), hs.lists(hs.text(max_size=3), max_size=3),
                                     hs.dictionaries(hs.text(max_size=6), hs.one_of(hs.text(max_size=6), hs.floats()), max_size=3)),
                           max_size=12))
def test_fuzz_config(cfg):
    from loratools.models.config import parse_config
    base = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
            "intermediate_size": 128, "vocab_size": 100}
    try:
        parse_config({**base, **cfg})
    except LoratoolsError:
        pass


# -- interrupted exports ---------------------------------------------------------------------
KILLER = """
import sys, time
sys.path.insert(0, {root!r})
import loratools.st as st
orig = st.SafetensorsWriter.write
def slow(self, *a, **k):
    time.sleep(0.002)
    return orig(self, *a, **k)
st.SafetensorsWriter.write = slow
import gguf
gw = gguf.GGUFWriter.write_tensor_data
def slow_g(self, *a, **k):
    time.sleep(0.01)
    return gw(self, *a, **k)
gguf.GGUFWriter.write_tensor_data = slow_g
from loratools.cli import main
print("start", flush=True)
sys.exit(main({args!r}))
"""


@pytest.mark.parametrize("kind", ["merge", "gguf"])
def test_sigkill_at_random_points_leaves_nothing_or_a_valid_output(fx, tmp_path, kind):
    from loratools.checkpoint import Checkpoint
    from loratools.formats.gguf_model import open_gguf
    rnd = random.Random(1234)
    m, a = fx / "models" / "llama", fx / "adapters" / "llama-rslora"
    complete = 0
    for i in range(6):
        out = tmp_path / (f"m{i}" if kind == "merge" else f"m{i}.gguf")
        args = (["merge", "--base", str(m), "-a", str(a), "-o", str(out), "--max-shard-size", "40KB"] if kind == "merge"
                else ["export", "gguf", str(m), "-a", str(a), "-o", str(out), "--outtype", "q8_0", "--quiet"])
        p = subprocess.Popen([sys.executable, "-c", KILLER.format(root=str(ROOT), args=args)], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "start"
        time.sleep(rnd.uniform(0.0, 0.6))
        p.send_signal(signal.SIGKILL)
        p.wait()
        if out.exists():
            complete += 1
            if kind == "merge":
                with Checkpoint.open(out) as ck:
                    assert len(ck.keys()) == 21 and all(ck.get(k).isfinite().all() for k in ck.keys())
            else:
                assert len(open_gguf(out).tensors) == 22
    assert complete < 6  # some kills landed mid-write (and left nothing at the destination)


# -- determinism -----------------------------------------------------------------------------
def _digest(path: Path) -> dict:
    if path.is_file():
        return {"file": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_every_command_is_byte_deterministic(fx, tmp_path, run_cli):
    m, t = fx / "models" / "llama", fx / "models" / "llama-tuned"
    a, b = fx / "adapters" / "llama-rslora", fx / "adapters" / "llama-patterns"
    data = fx / "data" / "chat-train.jsonl"
    commands = {
        "extract": ["extract", "--base", m, "--tuned", t, "--rank", "4", "-o", "{out}"],
        "extract-budget": ["extract", "--base", m, "--tuned", t, "--budget", "20K", "-o", "{out}"],
        "resize": ["resize", a, "--rank", "3", "-o", "{out}"],
        "combine-dare": ["combine", a, b, "--method", "dare_ties", "--density", "0.5", "--rank", "4", "--seed", "3", "-o", "{out}"],
        "convert": ["convert", fx / "adapters" / "mistral-kohya.safetensors", "--to", "peft", "-o", "{out}"],
        "merge": ["merge", "--base", m, "-a", a, "--dtype", "bf16", "-o", "{out}"],
        "gguf": ["export", "gguf", m, "-a", a, "--outtype", "q4_1", "-o", "{out}.gguf"],
        "gguf-adapter": ["export", "gguf-adapter", b, "--base", m, "-o", "{out}.gguf"],
        "onnx": ["export", "onnx", m, "-a", a, "-o", "{out}"],
        "onnx-adapter": ["export", "onnx-adapter", a, "-o", "{out}.onnx_adapter"],
        "train": ["train", "--model", m, "--data", data, "--max-steps", "5", "--seq-len", "32", "-o", "{out}"],
    }
    for name, cmd in commands.items():
        digests = []
        for run in ("1", "2"):
            out = tmp_path / f"{name}-{run}"
            args = [str(x).replace("{out}", str(out)) for x in cmd]
            code, _, err = run_cli(*args)
            assert code == 0, (name, err)
            target = Path(args[args.index("-o") + 1])
            dg = _digest(target)
            dg.pop("metrics.jsonl", None)
            if "train_report.json" in dg:  # wall-clock figures differ; the adapter itself must not
                dg.pop("train_report.json")
            if "extract_report.json" in dg:
                dg.pop("extract_report.json")
            digests.append(dg)
        assert digests[0] == digests[1], name
    imp = [tmp_path / "imp-1", tmp_path / "imp-2"]
    for d in imp:
        assert run_cli("import", "gguf", tmp_path / "gguf-1.gguf", "-o", d)[0] == 0
    assert _digest(imp[0]) == _digest(imp[1])


# -- disk space ------------------------------------------------------------------------------
def test_refuses_early_without_disk_space(fx, tmp_path, run_cli, monkeypatch):
    import shutil as sh
    from collections import namedtuple
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: Usage(10**12, 10**12 - 1000, 1000))
    m, a = fx / "models" / "llama", fx / "adapters" / "llama-rslora"
    for args, out in ((["merge", "--base", m, "-a", a], tmp_path / "m"), (["export", "gguf", m], tmp_path / "m.gguf"),
                      (["export", "onnx", m], tmp_path / "o")):
        code, _, err = run_cli(*args, "-o", out)
        assert code == 5 and "not enough disk space" in err and not out.exists(), err


def test_onnx_adapter_with_wrong_shapes_is_refused(fx, tmp_path, run_cli):
    from loratools.adapter import Adapter, LoraModule
    from loratools.formats.onnx_model import export_onnx
    from loratools.formats.peft import write_peft
    m = fx / "models" / "llama"
    export_onnx(m, tmp_path / "slots", lora_slots="q_proj")
    bad = Adapter(modules={"model.layers.0.self_attn.q_proj": LoraModule(torch.ones(4, 32), torch.ones(64, 4), 1.0)})
    write_peft(bad, tmp_path / "bad")
    code, _, err = run_cli("export", "onnx-adapter", tmp_path / "bad", "--model", tmp_path / "slots", "-o", tmp_path / "b.onnx_adapter")
    assert code == 3 and "but the slot is" in err and not (tmp_path / "b.onnx_adapter").exists()
