"""Checkpoint reading and writing: lazy per-tensor reads, sharding with an index, atomic writes."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from loratools import st
from loratools.checkpoint import Checkpoint, parse_size, save_state_dict

ROOT = Path(__file__).resolve().parents[1]


def tensors(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(n):
        dt = [torch.float32, torch.float16, torch.bfloat16][i % 3]
        out[f"layer.{i}.weight"] = torch.randn(16 + i, 8, generator=g).to(dt)
    out["scalar"] = torch.tensor(3.5)
    out["empty"] = torch.zeros(0, 4)
    out["ids"] = torch.arange(10, dtype=torch.int64)
    return out


def test_sharded_round_trip_is_exact(tmp_path):
    sd = tensors()
    out = save_state_dict(tmp_path / "ck", sd, max_shard_size=1500, config={"model_type": "llama"})
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(sd)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    with Checkpoint.open(out) as ck:
        assert set(ck.keys()) == set(sd)
        for k, v in sd.items():
            got = ck.get(k)
            assert got.dtype == v.dtype and torch.equal(got, v), k
    for f in out.glob("*.safetensors"):  # each shard stays under the cap unless one tensor is bigger
        infos, _, _ = st.read_header(f)
        assert sum(i.nbytes for i in infos.values()) <= 1500 or len(infos) == 1


def test_safetensors_library_reads_our_files_and_we_read_its(tmp_path):
    from safetensors.torch import load_file, save_file
    sd = tensors()
    st.save_file(sd, tmp_path / "ours.safetensors")
    theirs = load_file(str(tmp_path / "ours.safetensors"))
    assert all(torch.equal(theirs[k], v) for k, v in sd.items())
    save_file(sd, str(tmp_path / "theirs.safetensors"))
    back = st.load_file(tmp_path / "theirs.safetensors")
    assert all(torch.equal(back[k], v) for k, v in sd.items())


def test_aux_files_are_carried(fx, tmp_path):
    src = fx / "models" / "llama"
    with Checkpoint.open(src) as ck:
        sd = {k: ck.get(k) for k in ck.keys()}
    out = save_state_dict(tmp_path / "copy", sd, aux_from=src)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())


def test_written_checkpoint_loads_in_transformers(fx, tmp_path):
    transformers = pytest.importorskip("transformers")
    src = fx / "models" / "qwen3"
    with Checkpoint.open(src) as ck:
        sd = {k: ck.get(k).to(torch.bfloat16) for k in ck.keys()}
    out = save_state_dict(tmp_path / "bf16", sd, aux_from=src, max_shard_size="60KB")
    assert (out / "model.safetensors.index.json").exists()
    m = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)
    w = m.state_dict()["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(w, sd["model.layers.1.mlp.down_proj.weight"])


def test_parse_size():
    assert parse_size("2GB") == 2_000_000_000 and parse_size("1GiB") == 1024**3
    assert parse_size("500MB") == 500_000_000 and parse_size(123) == 123


def test_fixtures_are_deterministic(tmp_path):
    from fixtures.generate import make_all

    def digest(root):
        h = {}
        for p in sorted(Path(root).rglob("*")):
            if p.is_file():
                h[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        return h

    a, b = digest(make_all(tmp_path / "a")), digest(make_all(tmp_path / "b"))
    assert a == b and len(a) > 20


WRITER = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {root!r})
    from loratools import st
    from loratools.checkpoint import write_checkpoint
    specs = [st.TensorInfo(f"t{{i}}", torch.float32, (256, 256)) for i in range(200)]
    def produce(s):
        if s.name == "t3":
            print("writing", flush=True)
        time.sleep(0.02)
        return torch.full((256, 256), float(s.name[1:]))
    write_checkpoint({dest!r}, specs, produce, max_shard_size=1_000_000)
    print("done", flush=True)
""")


@pytest.mark.parametrize("existing", [False, True])
def test_killed_write_leaves_nothing_at_destination(tmp_path, existing):
    dest = tmp_path / "out"
    if existing:  # an older complete output must survive an interrupted --overwrite
        save_state_dict(dest, {"old": torch.ones(3)})
    script = tmp_path / "w.py"
    script.write_text(WRITER.format(root=str(ROOT), dest=str(dest)))
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    time.sleep(0.3)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    if existing:
        with Checkpoint.open(dest, require_config=False) as ck:
            assert ck.keys() == ["old"]
    else:
        assert not dest.exists()
    leftovers = [x for x in tmp_path.iterdir() if x.name.startswith(".out.tmp-")]
    assert leftovers  # the partial write went to a temp name beside the destination


def test_hugging_face_cache_layout_with_blob_symlinks_loads(fx, tmp_path):
    """<repo>/snapshots/<rev>/shard -> ../../blobs/<hash>: the one layout whose links leave the folder."""
    src = fx / "models" / "llama-bf16-sharded"
    repo = tmp_path / "models--x--y"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in src.iterdir():
        blob = blobs / hashlib.sha256(f.name.encode()).hexdigest()
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    with Checkpoint.open(snap) as ck, Checkpoint.open(src) as ref:
        assert ck.keys() == ref.keys()
        assert all(torch.equal(ck.get(k), ref.get(k)) for k in ref.keys())
