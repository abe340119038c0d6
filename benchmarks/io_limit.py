"""Streaming commands against the copy floor: time and peak anonymous memory, with their peers.

    .venv/bin/python benchmarks/io_limit.py [--cache DIR] [--only merge,unmerge,...] [--skip-peers]
                                            [--repeat 3] [--settle 10]
    .venv/bin/python benchmarks/io_limit.py --vocab 32000,65536,152064   # the peak against the vocabulary

The checkpoint is Llama-2-7B-shaped but 4 layers deep (hidden 4096, intermediate 11008, 32 heads,
vocabulary 49,152, untied head), bf16, 2.4 GB in 3 shards (at most 1.2 GB each), with a rank-16 PEFT adapter on every linear
layer; it is built once under --cache (default /tmp/lt-io-limit) with loratools' own writer and the
fixtures' byte-level BPE tokenizer (padded to the vocabulary).

The floor: ``dd if=SHARD of=OUT bs=16M conv=fsync`` per shard, page cache warm — copying the bytes
through user space and onto the disk; beside it the same with ``oflag=direct`` (no page cache: the
disk's own speed). Each step runs ``--repeat`` times: settle, buffered floor, settle, direct floor,
settle, the command (settle: sync, no dirty pages left, ``--settle`` seconds of quiet, so that every
measurement starts from the same state of the page cache and of free memory); medians are shown.
Each command is the CLI in a child process (wall time around ``main()``, imports excluded); the
parent samples its RssAnon (private anonymous memory) every 5 ms.
Peers in the same run: PEFT merge_and_unload + save_pretrained, llama.cpp's convert_hf_to_gguf.py
(LORATOOLS_LLAMA_CPP_SRC, f16, on the merged checkpoint), mergekit's LoRA extraction when installed.
The load average is printed: on a shared machine the numbers move with it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._peak import machine, run_child  # noqa: E402

CLI = """
import json, time
from loratools.cli import main
t = time.perf_counter()
code = main({args!r})
assert code == 0, code
print(json.dumps({{"seconds": time.perf_counter() - t}}))
"""
PEFT = """
import json, time, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
t = time.perf_counter()
m = AutoModelForCausalLM.from_pretrained({base!r}, dtype=torch.bfloat16)
m = PeftModel.from_pretrained(m, {adapter!r}).merge_and_unload()
m.save_pretrained({out!r}, max_shard_size={shard!r})
print(json.dumps({{"seconds": time.perf_counter() - t}}))
"""
LLAMA_CPP = """
import json, runpy, sys, time
sys.path.insert(0, {src!r} + "/gguf-py"); sys.path.insert(0, {src!r})
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"  # the fixture tokenizer is not in its hash list
sys.argv = ["convert_hf_to_gguf.py", {model!r}, "--outfile", {out!r}, "--outtype", "f16"]
t = time.perf_counter()
try:
    runpy.run_path({src!r} + "/convert_hf_to_gguf.py", run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
print(json.dumps({{"seconds": time.perf_counter() - t}}))
"""

SHAPE = dict(hidden=4096, inter=11008, heads=32, layers=4)


def build(root: Path, vocab: int, layers: int, vocab_lora: bool = False) -> tuple[Path, Path]:
    """(base, adapter) under root, built once. ``vocab_lora``: the adapter also changes the embedding
    (an embedding LoRA) and the head, so that merge and export compute the vocabulary-sized tensors."""
    from fixtures.generate import make_tokenizer, tokenizer_config
    from loratools import st
    from loratools.adapter import Adapter, LoraModule
    from loratools.checkpoint import CheckpointWriter
    from loratools.formats.peft import write_peft
    from loratools.models.config import parse_config
    from loratools.models.decoder import DecoderLM

    base, adapter = root / "base", root / "adapter"
    if (root / ".done").exists():
        return base, adapter
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    h = SHAPE["hidden"]
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": h,
           "intermediate_size": SHAPE["inter"], "num_hidden_layers": layers, "num_attention_heads": SHAPE["heads"],
           "num_key_value_heads": SHAPE["heads"], "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "max_position_embeddings": 4096, "tie_word_embeddings": False, "dtype": "bfloat16", "hidden_act": "silu",
           "bos_token_id": 1, "eos_token_id": 2}
    with torch.device("meta"):
        model = DecoderLM(parse_config(cfg))
    specs = [st.TensorInfo(n, torch.bfloat16, tuple(p.shape)) for n, p in model.named_parameters()]
    total = sum(s.nbytes for s in specs)
    g = torch.Generator().manual_seed(0)
    with CheckpointWriter(base, specs, max_shard_size=total // 2 + 1, config=cfg) as w:
        for s in specs:
            t = torch.ones(s.shape) if len(s.shape) == 1 else torch.randn(s.shape, generator=g) / math.sqrt(s.shape[-1])
            w.write(s.name, t.to(torch.bfloat16))
            del t
    make_tokenizer().save(str(base / "tokenizer.json"))
    (base / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    mods = {}
    for n, p in model.named_parameters():
        if n.endswith("proj.weight"):
            out_f, in_f = p.shape
            mods[n[:-7]] = LoraModule(torch.randn(16, in_f, generator=g) / math.sqrt(in_f),
                                      torch.randn(out_f, 16, generator=g) * 0.01, 2.0, 32.0)
    if vocab_lora:
        mods["model.embed_tokens"] = LoraModule(torch.randn(16, vocab, generator=g) * 0.5,
                                                torch.randn(h, 16, generator=g) * 0.01, 2.0, 32.0, kind="embedding")
        mods["lm_head"] = LoraModule(torch.randn(16, h, generator=g) / math.sqrt(h),
                                     torch.randn(vocab, 16, generator=g) * 0.01, 2.0, 32.0)
    write_peft(Adapter(modules=mods, format="peft"), adapter, num_layers=layers)
    (root / ".done").touch()
    return base, adapter


def shards(model: Path) -> list[Path]:
    return sorted(model.glob("*.safetensors"))


def warm(paths) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


def settle(seconds: float) -> None:
    """The same starting point for every measurement: written data on the disk (sync, then no dirty
    or writeback pages left), then ``seconds`` of quiet. On this VM freed memory goes back to the
    host within about a second (free page reporting), and a page taken again costs a host fault:
    after the quiet every run, floor or command, starts with the same cold free memory, where
    back-to-back runs would find the pages the previous one freed still warm."""
    os.sync()
    t = time.time()
    while time.time() - t < 120:
        with open("/proc/meminfo") as f:
            left = sum(int(line.split()[1]) for line in f if line.startswith(("Dirty:", "Writeback:")))
        if left < 8192:
            break
        time.sleep(0.2)
    time.sleep(seconds)


def floor(model: Path, out: Path, direct: bool = False) -> float:
    """Seconds to copy the shards with dd (16 MiB blocks, fsync at the end of each; ``direct``:
    oflag=direct, bypassing the page cache as loratools' writers do)."""
    warm(shards(model))
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    for s in shards(model):
        subprocess.run(["dd", f"if={s}", f"of={out / s.name}", "bs=16M", "conv=fsync", "status=none"]
                       + (["oflag=direct"] if direct else []), check=True)
    sec = time.perf_counter() - t
    shutil.rmtree(out)
    return sec


def timed(code: str, inputs) -> tuple[float, float]:
    warm(inputs)
    res, peak = run_child(code)
    return res["seconds"], peak


def cli(*args) -> str:
    return CLI.format(args=[str(a) for a in args])


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def rng(xs) -> str:
    return f"{min(xs):.2f}-{max(xs):.2f}"


def full(args) -> None:
    root = Path(args.cache) / "llama7b-shaped"
    base, adapter = build(root, 49152, SHAPE["layers"])
    size = sum(s.stat().st_size for s in shards(base))
    work = root / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    print(f"machine: {machine()}")
    print(f"checkpoint: {size / 1e9:.2f} GB bf16 in {len(shards(base))} shards, {SHAPE['layers']} layers, hidden "
          f"{SHAPE['hidden']}, vocab 49152; adapter rank 16 on every linear layer; load average at start {load()}")
    print(f"each step {args.repeat} time(s): settle, dd floor (buffered), settle, dd floor (oflag=direct), settle, "
          f"the command; settle = sync, no dirty pages, {args.settle:g} s quiet\n")
    shard = f"{size // 2 // 10**6 + 1}MB"
    merged, gg = work / "merged", work / "model.gguf"
    out = work / "out"
    only = set(args.only.split(",")) if args.only else None
    steps = [
        ("merge", "loratools merge", cli("merge", "--base", base, "-a", adapter, "-o", out, "--max-shard-size", shard,
                                         "--device", "cpu", "--quiet"), [base]),
        ("unmerge", "loratools unmerge", cli("unmerge", "--base", merged, "-a", adapter, "-o", out,
                                             "--max-shard-size", shard, "--device", "cpu", "--quiet"), [merged]),
        ("gguf", "loratools export gguf f16 (adapter merged)",
         cli("export", "gguf", base, "-a", adapter, "-o", out, "--outtype", "f16", "--quiet"), [base]),
        ("import", "loratools import gguf (f16 -> f16)", cli("import", "gguf", gg, "-o", out, "--quiet"), [gg]),
        ("onnx", "loratools export onnx (adapter merged)",
         cli("export", "onnx", base, "-a", adapter, "-o", out, "--dtype", "fp16"), [base]),
        ("extract", "loratools extract --rank 16",
         cli("extract", "--base", base, "--tuned", merged, "-o", out, "--rank", "16"), [base, merged]),
    ]
    peers = {"merge": ("PEFT merge_and_unload + save_pretrained",
                       PEFT.format(base=str(base), adapter=str(adapter), out=str(out), shard=shard)),
             "gguf": ("llama.cpp convert_hf_to_gguf.py f16 (merged checkpoint)", None)}
    print(f"{'command':<58} {'wall s median (range)':>22} {'x floor':>8} {'x direct':>8} {'peak RssAnon MiB':>17}  note",
          flush=True)

    def row(name, secs, floors, dfloors, peak, note=""):
        if not secs:
            print(f"{name:<58} {'-':>22} {'-':>8} {'-':>8} {'-':>17}  {note}", flush=True)
            return
        m = median(secs)
        rel = f"{m / median(floors):8.2f}" if floors else f"{'':>8}"
        drel = f"{m / median(dfloors):8.2f}" if dfloors else f"{'':>8}"
        p = f"{peak:17.0f}" if peak is not None else f"{'-':>17}"
        print(f"{name:<58} {f'{m:.2f} ({rng(secs)})':>22} {rel} {drel} {p}  {note}", flush=True)

    def clear():
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()

    def attempt(code, files):
        """(seconds, peak, None) of one settled run of ``code``, or (None, None, its last error line);
        its output is removed either way."""
        settle(args.settle)
        try:
            return (*timed(code, files), None)
        except RuntimeError as e:
            return None, None, str(e).splitlines()[-1][:80]
        finally:
            clear()

    all_floors, all_direct, summary = [], [], []
    for key, name, code, inputs in steps:
        if only is not None and key not in only:
            continue
        if key in ("unmerge", "extract", "gguf") and not merged.exists():
            subprocess.run([sys.executable, "-c", cli("merge", "--base", base, "-a", adapter, "-o", merged, "--max-shard-size",
                                                      shard, "--device", "cpu", "--quiet")], check=True, cwd=ROOT)
        if key == "import" and not gg.exists():
            subprocess.run([sys.executable, "-c", cli("export", "gguf", base, "-a", adapter, "-o", gg, "--outtype", "f16",
                                                      "--quiet")], check=True, cwd=ROOT)
        files = [x for i in inputs for x in (shards(i) if i.is_dir() else [i])]
        floors, dfloors, secs, peaks, err = [], [], [], [], None
        for _ in range(args.repeat):
            settle(args.settle)
            floors.append(floor(base, work / "dd"))
            settle(args.settle)
            dfloors.append(floor(base, work / "dd", direct=True))
            sec, peak, err = attempt(code, files)
            if err:
                break
            secs.append(sec)
            peaks.append(peak)
        all_floors += floors
        all_direct += dfloors
        row(f"  copy floor before it: dd conv=fsync", floors, floors, dfloors, None)
        row(f"  copy floor before it: dd oflag=direct conv=fsync", dfloors, floors, dfloors, None)
        row(name, secs, floors, dfloors, max(peaks) if peaks else None, err or "")
        if secs:
            summary.append((name, median(secs) / median(floors), median(secs) / median(dfloors)))
        if key in peers and not args.skip_peers:
            pname, pcode = peers[key]
            if key == "gguf":
                src = os.environ.get("LORATOOLS_LLAMA_CPP_SRC")
                if not src:
                    row(pname, [], [], [], None, "LORATOOLS_LLAMA_CPP_SRC not set")
                    continue
                pcode = LLAMA_CPP.format(src=src, model=str(merged), out=str(out))
            psecs, ppeaks, perr = [], [], None
            for _ in range(args.repeat):
                psec, ppeak, perr = attempt(pcode, shards(merged if key == "gguf" else base))
                if perr:
                    break
                psecs.append(psec)
                ppeaks.append(ppeak)
            note = f"loratools {median(psecs) / median(secs):.2f}x faster" if psecs and secs else perr or ""
            row(pname, psecs, floors, dfloors, max(ppeaks) if ppeaks else None, note)
        if key == "extract" and not args.skip_peers:
            import importlib.util
            row("mergekit extract", [], [], [], None,
                "not installed" if importlib.util.find_spec("mergekit") is None else "installed: not run here")
    if summary:
        print(f"\nall floors: dd conv=fsync {median(all_floors):.2f} s median ({rng(all_floors)}), oflag=direct "
              f"{median(all_direct):.2f} s ({rng(all_direct)})")
        for name, r, d in summary:
            print(f"  {name:<56} {r:5.2f}x the buffered floor, {d:5.2f}x the direct floor")
    print(f"\nload average at end: {load()}")
    shutil.rmtree(work, ignore_errors=True)


def sweep(args) -> None:
    vocabs = [int(v) for v in args.vocab.split(",")]
    print(f"machine: {machine()}")
    print(f"peak RssAnon (MiB) against the vocabulary: 2 layers of the shape above, untied embedding and head, the "
          f"adapter on every linear layer, the embedding and the head (merge and export compute them); load {load()}\n",
          flush=True)
    cols = ["merge", "export gguf f16", "extract --rank 16", "export onnx fp16"]
    print(f"{'vocab':>8} {'embedding MiB (bf16)':>21} " + " ".join(f"{c:>18}" for c in cols))
    for v in vocabs:
        root = Path(args.cache) / f"sweep-{v}"
        base, adapter = build(root, v, 2, vocab_lora=True)
        work = root / "work"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        merged = work / "merged"
        peaks = []
        steps = (("merge", cli("merge", "--base", base, "-a", adapter, "-o", merged, "--device", "cpu", "--quiet")),
                 ("gguf", cli("export", "gguf", base, "-a", adapter, "-o", work / "m.gguf", "--outtype", "f16", "--quiet")),
                 ("extract", cli("extract", "--base", base, "--tuned", merged, "-o", work / "ex", "--rank", "16")),
                 ("onnx", cli("export", "onnx", base, "-a", adapter, "-o", work / "onnx", "--dtype", "fp16")))
        for key, code in steps:
            if args.only and key not in args.only.split(","):
                if key == "merge":  # extract compares with the merged checkpoint
                    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
                peaks.append(f"{'-':>18}")
                continue
            try:
                peaks.append(f"{timed(code, shards(base))[1]:18.0f}")
            except RuntimeError as e:
                peaks.append(f"{'failed':>18}")
                print(str(e).splitlines()[-1][:200], file=sys.stderr)
        print(f"{v:>8} {v * SHAPE['hidden'] * 2 / 2**20:>21.0f} " + " ".join(peaks), flush=True)
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=os.environ.get("LORATOOLS_BENCH_CACHE", "/tmp/lt-io-limit"))
    ap.add_argument("--only", help="comma-separated steps: merge,unmerge,gguf,import,onnx,extract (sweep: merge,gguf,extract,onnx)")
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each step and of its floors (medians are shown)")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds of quiet after sync before each measurement")
    ap.add_argument("--vocab", help="sweep mode: comma-separated vocabulary sizes")
    ap.add_argument("--keep", action="store_true", help="sweep: keep the built checkpoints")
    args = ap.parse_args()
    sweep(args) if args.vocab else full(args)


if __name__ == "__main__":
    main()
