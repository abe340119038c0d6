"""Direct I/O outputs (issue 16): ``fsutil.SeqFile`` stages the bytes in aligned chunks and writes
them with O_DIRECT from a thread, turning into positioned writes through the page cache when a
write goes backwards or the filesystem refuses direct writes.

Checked here: any mix of writes, gaps, copies, seeks and truncation gives the bytes of a plain file
(both modes, tiny chunks); a refused direct write (EINVAL) and a backwards write fall back with the
same bytes; the commands that stream (merge, unmerge, GGUF export and import, ONNX export) write
the same files with direct I/O as without, in many chunks, and merge / GGUF export / import stay
direct from the first byte to the last (the tensors are produced in file order); a write error
(the file-size limit) is one line naming the file, exit 5, nothing left behind; no descriptor or
thread is left open."""
import errno
import hashlib
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from fixtures.generate import ARCHS, BASE, _weights, random_adapter
from loratools import api, fsutil, st
from loratools.checkpoint import save_state_dict
from loratools.formats import gguf_model, onnx_model
from loratools.formats.peft import write_peft
from loratools.ops import merge as merge_mod

ROOT = Path(__file__).resolve().parents[1]


def _direct_ok(folder: Path) -> bool:
    """Whether ``folder``'s filesystem opens files with O_DIRECT (ext4, xfs, btrfs, recent tmpfs)."""
    p = folder / ".probe"
    p.write_bytes(b"")
    try:
        fd = os.open(p, os.O_WRONLY | os.O_DIRECT)
    except (OSError, AttributeError):
        return False
    finally:
        p.unlink()
    os.close(fd)
    return True


def _digest(path: Path) -> dict:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {p.name if path.is_file() else str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(fsutil, "_CHUNK", 1 << 16)
    monkeypatch.setattr(fsutil, "_ZERO_GAP", 20_000)
    monkeypatch.setattr(fsutil, "_POOL", [])


def _random_session(f, rnd, src_fd, src):
    ref = bytearray()
    pos = 0
    for _ in range(rnd.randint(1, 30)):
        r = rnd.random()
        n = rnd.choice([1, 7, 4096, 5000, 70000, 130000])
        off = rnd.randint(0, len(ref)) if r < 0.05 else pos + rnd.choice([rnd.randint(0, 9000), 30000]) if r < 0.2 else pos
        if rnd.random() < 0.3:
            so = rnd.randint(0, len(src) - n)
            data = src[so:so + n]
            f.copy_range(src_fd, so, n, off)
        elif rnd.random() < 0.2:
            data = rnd.randbytes(n)
            f.seek(off)
            f.write(data)
        else:
            data = rnd.randbytes(n)
            f.pwrite(data, off)
        ref.extend(bytes(max(0, off + n - len(ref))))
        ref[off:off + n] = data
        pos = off + n
        assert f.tell() == pos
    if rnd.random() < 0.2:
        extra = rnd.randint(0, 5000)
        f.truncate(len(ref) + extra)
        ref.extend(bytes(extra))
    return bytes(ref)


@pytest.mark.parametrize("direct", [True, False])
def test_any_writes_same_bytes(tmp_path, small_chunks, direct):
    rnd = random.Random(7 + direct)
    src = rnd.randbytes(200_000)
    (tmp_path / "src.bin").write_bytes(src)
    fd = os.open(tmp_path / "src.bin", os.O_RDONLY)
    try:
        for trial in range(150):
            path = tmp_path / f"out-{trial % 3}.bin"
            f = fsutil.SeqFile(path, direct=direct)
            assert f.direct == (direct and _direct_ok(tmp_path))
            ref = _random_session(f, rnd, fd, src)
            f.close()
            assert path.read_bytes() == ref, trial
    finally:
        os.close(fd)


def test_sequential_writes_stay_direct(tmp_path, small_chunks):
    """Front to back (a header, tensors, alignment gaps, copies): direct until closed; the tail chunk
    is padded for the write and the file cut to its length."""
    if not _direct_ok(tmp_path):
        pytest.fail(f"{tmp_path}: this test needs a filesystem that takes O_DIRECT (the CI machine's ext4 does)")
    rnd = random.Random(3)
    src = rnd.randbytes(300_000)
    (tmp_path / "src.bin").write_bytes(src)
    fd = os.open(tmp_path / "src.bin", os.O_RDONLY)
    f = fsutil.SeqFile(tmp_path / "out.bin")
    ref = bytearray(b"head" * 11)
    f.write(bytes(ref))
    for i in range(40):
        gap = -len(ref) % 4096 if i % 3 == 0 else 0
        ref.extend(bytes(gap))
        data = rnd.randbytes(rnd.randint(1, 90_000))
        if i % 4 == 1:
            so = rnd.randint(0, len(src) - len(data))
            data = src[so:so + len(data)]
            f.copy_range(fd, so, len(data), len(ref))
        else:
            f.pwrite(data, len(ref))
        ref.extend(data)
        assert f.direct, i
    f.close()
    os.close(fd)
    assert (tmp_path / "out.bin").read_bytes() == bytes(ref)
    assert len(ref) % 4096 != 0  # (the padded tail was cut)


def test_backwards_write_falls_back(tmp_path, small_chunks):
    f = fsutil.SeqFile(tmp_path / "out.bin")
    f.write(b"a" * 100_000)
    f.pwrite(b"B" * 10, 5)
    assert not f.direct
    f.write(b"c" * 10)
    f.close()
    assert (tmp_path / "out.bin").read_bytes() == b"a" * 5 + b"B" * 10 + b"c" * 10 + b"a" * (100_000 - 25)


def test_refused_direct_write_falls_back(tmp_path, small_chunks, monkeypatch):
    """A filesystem that opens with O_DIRECT but rejects the writes (EINVAL: an alignment it needs):
    the chunk goes through the page cache, and so does the rest."""
    real = fsutil._pwrite_all
    refused = []

    def pwrite_all(fd, data, offset, path=None):
        if fcntl_direct(fd):
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset, path)

    import fcntl

    def fcntl_direct(fd):
        return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)

    monkeypatch.setattr(fsutil, "_pwrite_all", pwrite_all)
    rnd = random.Random(1)
    data = rnd.randbytes(500_000)
    f = fsutil.SeqFile(tmp_path / "out.bin")
    if not f.direct:
        pytest.fail("needs a filesystem that takes O_DIRECT")
    for i in range(0, len(data), 33_333):
        f.write(data[i:i + 33_333])
    f.close()
    assert refused and (tmp_path / "out.bin").read_bytes() == data


def test_abort_and_close_leave_nothing_open(tmp_path, small_chunks):
    before = set(os.listdir("/proc/self/fd"))
    threads = threading.active_count()
    for i in range(5):
        f = fsutil.SeqFile(tmp_path / f"{i}.bin")
        f.write(os.urandom(300_000))
        f.abort() if i % 2 else f.close()
    assert set(os.listdir("/proc/self/fd")) == before
    assert threading.active_count() == threads


@pytest.fixture(scope="module")
def wide(tmp_path_factory, fx):
    """A bf16 llama with a vocabulary-sized embedding and head, an fp32 norm among its tensors (the
    file order then differs from the manifest's), and an adapter on every linear layer."""
    import shutil

    root = tmp_path_factory.mktemp("seq-wide")
    cfg = {**BASE, **ARCHS["llama"], "vocab_size": 3000, "intermediate_size": 640, "dtype": "bfloat16",
           "bos_token_id": None, "eos_token_id": 2}
    sd = {k: v.to(torch.bfloat16) for k, v in _weights(cfg, 3).items()}
    sd["model.norm.weight"] = sd["model.norm.weight"].float()
    model = root / "model"
    save_state_dict(model, sd, config=cfg, max_shard_size=300_000)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fx / "models" / "llama" / name, model / name)
    write_peft(random_adapter(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                              {"r": 8, "lora_alpha": 16}, seed=4), root / "adapter", num_layers=2)
    return model, root / "adapter"


def test_commands_same_bytes_direct_or_not(wide, tmp_path, small_chunks, monkeypatch):
    """Merge, unmerge, GGUF export (f16, q8_0) and import, ONNX export (external data and inline): the
    same files with direct I/O as through the page cache, in chunks of 64 KiB; merge, GGUF export and
    import never leave direct mode."""
    model, adapter_dir = wide
    direct_fs = _direct_ok(tmp_path)
    fallbacks = []
    real = fsutil.SeqFile._to_buffered

    def spy(self, rest=b""):
        fallbacks.append(self.path.name)
        return real(self, rest)

    monkeypatch.setattr(fsutil.SeqFile, "_to_buffered", spy)
    ad = [api.load_adapter(adapter_dir, base=model)]
    digests = {}
    for direct in (False, True):
        monkeypatch.setattr(fsutil, "DIRECT_IO", direct)
        out = tmp_path / ("direct" if direct else "buffered")
        out.mkdir()
        merge_mod.merge(model, ad, out / "merged", max_shard_size=200_000)
        merge_mod.merge(out / "merged", ad, out / "unmerged", unmerge=True, dtype=torch.float32)
        gguf_model.export_gguf(model, out / "m.gguf", ad, outtype="f16")
        gguf_model.export_gguf(model, out / "q.gguf", ad, outtype="q8_0")
        gguf_model.import_gguf(out / "m.gguf", out / "imported")
        if direct:
            assert fallbacks == [] or not direct_fs, fallbacks
        onnx_model.export_onnx(model, out / "onnx", ad, dtype="fp16")  # inline weights
        onnx_model.export_onnx(model, out / "onnx-ext", ad, dtype="fp32", external_data_over=0)  # model.onnx_data
        digests[direct] = {name: _digest(out / name) for name in sorted(os.listdir(out))}
    assert digests[True] == digests[False]
    assert any(k.endswith(".safetensors") for k in digests[True]["merged"])


def test_write_error_one_line_named(fx, tmp_path):
    """A write the system refuses (here the file-size limit, as a full disk would): one line naming
    the file and the reason, exit 5, no output and no temporary left."""
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))\n"
            "from loratools.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "merged"
    for args in (["merge", "--base", str(fx / "models" / "llama"), "-a", str(fx / "adapters" / "llama-rslora"),
                  "-o", str(out), "--quiet"],
                 ["export", "gguf", str(fx / "models" / "llama"), "-o", str(tmp_path / "m.gguf"), "--quiet"]):
        p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        lines = [x for x in p.stderr.splitlines() if x and not x.startswith("loratools: [")]
        assert p.returncode == 5, p.stderr
        assert len(lines) == 1 and "File too large" in lines[0] and "Traceback" not in p.stderr, p.stderr
        assert (".safetensors" in lines[0]) if args[0] == "merge" else (".gguf" in lines[0] or "m.gguf" in lines[0])
    assert sorted(os.listdir(tmp_path)) == []
