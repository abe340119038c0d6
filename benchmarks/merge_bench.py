"""Merge: loratools (streamed) vs PEFT merge_and_unload + save_pretrained, side by side.

    .venv/bin/python benchmarks/merge_bench.py [--quick] [--layers N]

Builds (in a temp folder) a Llama-shaped bf16 checkpoint — by default TinyLlama-1.1B's shape:
hidden 2048, intermediate 5632, 22 layers, 32 heads (4 KV), vocab 32000: 2.2 GB — and a
rank-16 all-linear PEFT adapter. Each method runs in
its own child process; the parent samples the child's RssAnon (private anonymous memory) every
5 ms and reports the peak. Wall time is measured in the child around the work alone.
Afterwards the two merged checkpoints are compared tensor by tensor.
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._peak import machine, run_child  # noqa: E402
from loratools import st  # noqa: E402
from loratools.adapter import Adapter, LoraModule  # noqa: E402
from loratools.checkpoint import Checkpoint, CheckpointWriter  # noqa: E402
from loratools.formats.peft import write_peft  # noqa: E402
from loratools.models.config import parse_config  # noqa: E402
from loratools.models.decoder import DecoderLM  # noqa: E402

RSS = "int([l for l in open('/proc/self/status') if l.startswith('RssAnon:')][0].split()[1])"
OURS = """
import json, time, torch
from loratools.cli import main
base_kb = """ + RSS + """
t = time.perf_counter()
assert main(["merge", "--base", {base!r}, "-a", {adapter!r}, "-o", {out!r}, "--max-shard-size", "200MB",
             "--device", "cpu", "--quiet"]) == 0
print(json.dumps({{"seconds": time.perf_counter() - t, "base_mib": base_kb / 1024}}))
"""
PEER = """
import json, time, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base_kb = """ + RSS + """
t = time.perf_counter()
m = AutoModelForCausalLM.from_pretrained({base!r}, dtype=torch.bfloat16)
m = PeftModel.from_pretrained(m, {adapter!r}).merge_and_unload()
m.save_pretrained({out!r}, max_shard_size="200MB")
print(json.dumps({{"seconds": time.perf_counter() - t, "base_mib": base_kb / 1024}}))
"""


def build(root: Path, layers: int, hidden: int, inter: int, vocab: int) -> tuple[Path, Path]:
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 32 if hidden >= 2048 else 16,
           "num_key_value_heads": 4, "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "max_position_embeddings": 2048, "tie_word_embeddings": False, "dtype": "bfloat16", "hidden_act": "silu"}
    with torch.device("meta"):
        model = DecoderLM(parse_config(cfg))
    specs = [st.TensorInfo(n, torch.bfloat16, tuple(p.shape)) for n, p in model.named_parameters()]
    g = torch.Generator().manual_seed(0)
    base = root / "base"
    with CheckpointWriter(base, specs, max_shard_size="200MB", config=cfg) as w:
        for s in specs:
            t = torch.ones(s.shape) if len(s.shape) == 1 else torch.randn(s.shape, generator=g) / math.sqrt(s.shape[-1])
            w.write(s.name, t.to(torch.bfloat16))
    mods = {}
    for n, p in model.named_parameters():
        if n.endswith("proj.weight"):
            out_f, in_f = p.shape
            mods[n[:-7]] = LoraModule(torch.randn(16, in_f, generator=g) / math.sqrt(in_f),
                                      torch.randn(out_f, 16, generator=g) * 0.01, 2.0, 32.0)
    adapter = write_peft(Adapter(modules=mods, format="peft"), root / "adapter", num_layers=layers)
    return base, adapter


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--layers", type=int, default=22)
    args = ap.parse_args()
    layers, hidden, inter, vocab = (2, 256, 704, 4000) if args.quick else (args.layers, 2048, 5632, 32000)
    root = Path(tempfile.mkdtemp(prefix="lt-merge-"))
    try:
        base, adapter = build(root, layers, hidden, inter, vocab)
        size = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e6
        print(f"machine: {machine()}")
        print(f"checkpoint: {size:.0f} MB bf16, {layers} layers; adapter rank 16 on all linear layers\n")
        rows = []
        for name, code in (("loratools merge (CLI)", OURS), ("PEFT merge_and_unload+save_pretrained", PEER)):
            out = root / name.split()[0]
            res, peak = run_child(code.format(base=str(base), adapter=str(adapter), out=str(out)))
            rows.append((name, res["seconds"], peak, peak - res["base_mib"]))
        print(f"{'method':<40} {'wall s':>8} {'peak RssAnon MiB':>17} {'over imports MiB':>17}")
        for name, sec, peak, over in rows:
            print(f"{name:<40} {sec:>8.2f} {peak:>17.0f} {over:>17.0f}")
        (o, to, po, oo), (_, tp, pp, op) = rows
        print(f"\nloratools / PEFT: time {to / tp:.2f}x, peak RssAnon {po / pp:.2f}x, over imports {oo / op:.3f}x "
              f"(targets: time ≤ 1x, memory ≤ 1/3)")
        with Checkpoint.open(root / "loratools") as a, Checkpoint.open(root / "PEFT") as b:
            worst = 0.0
            for k in a.keys():
                d = (a.get(k).float() - b.get(k).float()).abs().max()
                worst = max(worst, float(d))
            print(f"max |difference| between the two merged checkpoints: {worst:.3g} (bf16 rounding of the same sums)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
