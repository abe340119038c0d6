"""Reliability, second round (issue 17): outputs checked against every input, signals, llama.cpp
isolated in validate, concurrent runs, long output names. Each test fails on the code before it."""
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _digest(path: Path) -> dict:
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _lines(err: str) -> list[str]:
    """stderr without the per-stage progress lines (and the blank line click writes on an interrupt)."""
    return [ln for ln in err.strip().splitlines() if ln.strip() and not ln.startswith("loratools: [")]


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


# -- 1. outputs, work folders and scratch folders vs inputs ------------------------------------
@pytest.fixture(scope="module")
def slots(fx, tmp_path_factory):
    from loratools.cli import main

    out = tmp_path_factory.mktemp("rel2") / "slots"
    assert main(["export", "onnx", str(fx / "models" / "llama"), "--lora-slots", "-o", str(out), "--quiet"]) == 0
    return out


def test_no_output_or_work_folder_is_an_input(fx, tmp_path, run_cli, slots):
    import shutil

    # train keeps its state in OUT.train: with --model X.train -o X that folder is the input model
    model = tmp_path / "m.train"
    shutil.copytree(fx / "models" / "llama", model)
    before = _digest(model)
    code, _, err = run_cli("train", "--model", model, "--data", fx / "data" / "chat-train.jsonl", "-o", tmp_path / "m",
                           "--max-steps", "1", "--seq-len", "16", "--quiet")
    assert code == 5 and "work folder" in err and len(_lines(err)) == 1, err
    assert _digest(model) == before and not (tmp_path / "m").exists()

    # export onnx-adapter -o F --model F --overwrite: F is the slot model it reads
    onnx = slots / "model.onnx"
    before = _digest(onnx)
    code, _, err = run_cli("export", "onnx-adapter", fx / "adapters" / "llama-rslora", "-o", onnx, "--model", onnx,
                           "--overwrite")
    assert code == 5 and "input" in err and len(_lines(err)) == 1, err
    assert _digest(onnx) == before


def test_a_failed_overwrite_keeps_the_previous_output(fx, tmp_path, run_cli, slots):
    a, out = fx / "adapters" / "llama-rslora", tmp_path / "a.onnx_adapter"
    assert run_cli("export", "onnx-adapter", a, "-o", out, "--model", slots)[0] == 0
    before = _digest(out)
    # an fp16 adapter does not fit the fp32 slots: the check after writing fails
    code, _, err = run_cli("export", "onnx-adapter", a, "-o", out, "--model", slots, "--dtype", "fp16", "--overwrite")
    assert code == 3 and "float16" in err and str(out) in err and len(_lines(err)) == 1, err
    assert _digest(out) == before and _temps(tmp_path) == []


# -- 6. signals ----------------------------------------------------------------------------------
SLOW_MERGE = """
import sys, time
sys.path.insert(0, {root!r})
import loratools.st as st
orig = st.SafetensorsWriter.write
def slow(self, *a, **k):
    time.sleep(0.05)
    return orig(self, *a, **k)
st.SafetensorsWriter.write = slow
from loratools.cli import main
sys.exit(main({args!r}))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_end_like_ctrl_c_and_leave_no_temp_files(fx, tmp_path, sig):
    out = tmp_path / "merged"
    args = ["merge", "--base", str(fx / "models" / "llama"), "-a", str(fx / "adapters" / "llama-rslora"), "-o", str(out),
            "--max-shard-size", "40KB", "--quiet"]
    p = subprocess.Popen([sys.executable, "-c", SLOW_MERGE.format(root=str(ROOT), args=args)], stderr=subprocess.PIPE,
                         text=True, env=ENV)
    t0 = time.monotonic()
    while not _temps(tmp_path) and p.poll() is None and time.monotonic() - t0 < 120:
        time.sleep(0.005)
    assert _temps(tmp_path), "the merge never started writing"
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, err
    assert _lines(err) == [f"loratools: terminated by {signal.Signals(sig).name}"], err
    assert _temps(tmp_path) == [] and not out.exists()


INTERRUPT_ON_TORCH = """
import builtins, os, runpy, signal, sys
sys.argv = ["loratools"] + {args!r}
orig = builtins.__import__
def imp(name, *a, **k):
    if name == "torch" and not getattr(imp, "sent", False):
        imp.sent = True
        os.kill(os.getpid(), signal.SIGINT)
    return orig(name, *a, **k)
builtins.__import__ = imp
runpy.run_module("loratools", run_name="__main__", alter_sys=True)
"""


def test_ctrl_c_while_loading_is_one_line(fx):
    args = ["inspect", str(fx / "adapters" / "llama-rslora")]
    p = subprocess.run([sys.executable, "-c", INTERRUPT_ON_TORCH.format(args=args)], capture_output=True, text=True,
                       env=ENV, cwd=ROOT, timeout=300)
    assert p.returncode == 130 and _lines(p.stderr) == ["loratools: interrupted"], p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""


def test_a_later_run_removes_stale_temp_files(fx, tmp_path, run_cli):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".out.tmp-{pid}-0123abcd"
    stale.mkdir()
    (stale / "model-00001.safetensors").write_bytes(b"\0" * 4096)
    (tmp_path / f".out.tmp-{pid}-89abcdef.f32.gguf").write_bytes(b"GGUF")
    mine = tmp_path / f".out.tmp-{os.getpid()}-fedcba98"  # a live process's: kept
    mine.write_bytes(b"")
    other = tmp_path / f".other.tmp-{pid}-0123abcd"  # another output's: kept
    other.write_bytes(b"")
    code, _, err = run_cli("scale", fx / "adapters" / "llama-rslora", "--factor", "0.5", "-o", tmp_path / "out")
    assert code == 0, err
    assert _temps(tmp_path) == sorted([mine.name, other.name])


# -- 9. validate: llama.cpp in a child process ---------------------------------------------------
def test_validate_reports_a_gguf_that_aborts_llama_cpp_as_failed(fx, tmp_path, run_cli):
    import gguf
    import numpy as np

    m = fx / "models" / "llama"
    good, bad = tmp_path / "good.gguf", tmp_path / "bad.gguf"
    assert run_cli("export", "gguf", m, "--outtype", "f32", "-o", good, "--quiet")[0] == 0
    bad.write_bytes(good.read_bytes())
    r = gguf.GGUFReader(bad, "r+")
    f = r.fields["llama.attention.layer_norm_rms_epsilon"]
    f.parts[f.data[0]][0] = np.float32(-1e-5)  # llama.cpp asserts eps >= 0 and aborts
    del r
    p = subprocess.run([sys.executable, "-m", "loratools", "validate", "--base", str(m), str(good), str(bad),
                        "--tokens", "2", "--quiet"], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert p.returncode == 1, (p.returncode, p.stderr[-2000:])
    rows = {ln.split()[0]: ln for ln in p.stdout.splitlines() if ln.strip().endswith(("pass", ")")) and ".gguf" in ln}
    assert rows["good.gguf"].endswith("pass"), p.stdout
    assert "FAIL (llama.cpp" in rows["bad.gguf"] and "eps" in rows["bad.gguf"], p.stdout
    assert "validation FAILED" in p.stdout
    assert "Traceback" not in p.stderr and "gdb" not in p.stderr and "backtrace" not in p.stderr.lower(), p.stderr


# -- 10. concurrent runs writing the same new output --------------------------------------------
def test_the_final_rename_refuses_an_output_that_appeared_meanwhile(tmp_path):
    from loratools.errors import OutputError
    from loratools.fsutil import atomic_dir, atomic_file, check_output

    f, d = tmp_path / "out.safetensors", tmp_path / "out"
    for dest, ctx in ((f, atomic_file), (d, atomic_dir)):
        check_output(dest, [], overwrite=False)
        if ctx is atomic_file:  # the other run finishes between this run's check and its rename
            dest.write_text("the other run's")
        else:
            dest.mkdir()
            (dest / "x").write_text("the other run's")
        with pytest.raises(OutputError, match="already exists"):
            with ctx(dest) as tmp:
                (tmp if ctx is atomic_file else tmp / "x").write_text("mine")
        assert (dest if ctx is atomic_file else dest / "x").read_text() == "the other run's"
    assert _temps(tmp_path) == []


def test_two_runs_writing_one_new_output_exactly_one_succeeds(fx, tmp_path):
    out = tmp_path / "scaled"
    runs = [subprocess.Popen([sys.executable, "-m", "loratools", "scale", str(fx / "adapters" / "llama-rslora"), "--factor", w,
                              "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                             cwd=ROOT) for w in ("0.5", "2")]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in runs]
    for p in runs:
        p.stdout.close()
        p.stderr.close()
    codes = sorted(c for c, _ in results)
    assert codes == [0, 5], results
    err = next(e for c, e in results if c == 5)
    assert len(_lines(err)) == 1 and "already exists" in err, err
    assert _temps(tmp_path) == []


# -- 11. output names near 255 bytes -------------------------------------------------------------
def test_an_output_name_of_250_bytes_is_written(fx, tmp_path, run_cli):
    kohya = tmp_path / ("k" * 238 + ".safetensors")
    folder = tmp_path / ("é" * 125)  # 250 bytes of UTF-8
    assert len(os.fsencode(kohya.name)) == 250 and len(os.fsencode(folder.name)) == 250
    code, _, err = run_cli("scale", fx / "adapters" / "mistral-kohya.safetensors", "--factor", "0.5", "-o", kohya)
    assert code == 0 and kohya.is_file(), err
    code, _, err = run_cli("scale", fx / "adapters" / "llama-rslora", "--factor", "0.5", "-o", folder)
    assert code == 0 and (folder / "adapter_config.json").is_file(), err
    assert _temps(tmp_path) == []


# -- a file output that names a folder ------------------------------------------------------------
def test_a_file_output_never_replaces_or_becomes_a_folder(fx, tmp_path, run_cli):
    """`-o DIR --overwrite` for a one-file output would swap the folder out and remove it; `-o new/`
    would write a file named `new`. Both are refused before any work, and the folder is kept."""
    a, base = fx / "adapters" / "llama-rslora", fx / "models" / "llama"
    keep = tmp_path / "models"
    keep.mkdir()
    (keep / "precious.txt").write_text("keep me")
    for argv in (["export", "gguf-adapter", a, "--base", base, "-o", keep, "--overwrite"],
                 ["export", "gguf", base, "-o", keep, "--outtype", "f32", "--overwrite", "--quiet"],
                 ["convert", a, "--to", "kohya", "-o", keep, "--overwrite"],
                 ["export", "gguf-adapter", a, "--base", base, "-o", f"{tmp_path / 'new'}/"]):
        code, _, err = run_cli(*argv)
        assert code == 5 and "names a folder" in err and len(_lines(err)) == 1, (argv, err)
        assert (keep / "precious.txt").read_text() == "keep me" and sorted(os.listdir(keep)) == ["precious.txt"]
        assert not (tmp_path / "new").exists() and _temps(tmp_path) == []


def test_publish_never_swaps_a_folder_for_a_file(tmp_path):
    from loratools.errors import OutputError
    from loratools.fsutil import atomic_file

    d = tmp_path / "d"
    d.mkdir()
    (d / "x").write_text("x")
    with pytest.raises(OutputError, match="is a folder"):
        with atomic_file(d, replace=True) as tmp:
            tmp.write_text("file")
    assert (d / "x").read_text() == "x" and _temps(tmp_path) == []
