"""The LoRA training loop on loratools' reference decoder.

Defaults follow current practice: LoRA on all linear layers of the blocks, scale alpha/r (or
alpha/√r with rsLoRA), A Kaiming-uniform and B zero (the adapter starts as a no-op), base frozen
and only the LoRA factors in AdamW, warmup then cosine decay, gradient clipping, and a learning
rate about 10x what a full fine-tune of a model this size would use.

Determinism: the data order of epoch e is a permutation seeded by (seed, e), the schedule is a
function of the step, and there is no dropout; a checkpoint holds the factors, AdamW's moments
and the step, so ``resume`` continues with exactly the losses of an uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import st
from ..adapter import Adapter, LoraModule, lora_scale
from ..errors import IncompatibleError, InputError, LoratoolsError, OutputError, TrainInterrupted  # noqa: F401 - re-exported
from ..formats.peft import write_peft
from ..fsutil import atomic_dir, check_output, clear_stale_temps
from ..models.decoder import LoraSlot, load_model
from ..ops import gemm
from ..device import pick_device
from . import data

# fused qkv_proj / gate_up_proj (Phi-3) are targeted as one module each, as PEFT does
TARGET_SETS = {"all-linear": ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj",
                              "down_proj"),
               "attention": ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj"),
               "mlp": ("gate_proj", "up_proj", "gate_up_proj", "down_proj")}


@dataclass
class TrainConfig:
    rank: int = 16
    alpha: float = 32.0
    rslora: bool = False
    targets: str = "all-linear"
    lr: float | None = None
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 512
    warmup: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 50
    checkpoint_every: int = 100
    seed: int = 0
    dtype: str = "fp32"
    gradient_checkpointing: bool = False
    device: str = "auto"
    stop_after: int | None = None  # stop (as if interrupted) after this many steps; for tests


def default_lr(num_params: int) -> tuple[float, float]:
    """(LoRA LR, the full fine-tuning LR it is 10x of). Full fine-tuning LRs shrink with model
    size: about 1e-4 at 100M parameters, 3e-5 at 7B, 2e-5 at 70B (∝ N^-1/4)."""
    ft = 1e-4 * (1e8 / max(num_params, 1)) ** 0.25
    return 10 * ft, ft


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def targets_of(spec: str) -> tuple[str, ...]:
    if spec in TARGET_SETS:
        return TARGET_SETS[spec]
    leaves = tuple(t.strip() for t in spec.split(",") if t.strip())
    known = set(TARGET_SETS["all-linear"])
    bad = [t for t in leaves if t not in known]
    if not leaves or bad:
        raise LoratoolsError(f"--targets: unknown module {bad[0] if bad else spec!r} (all-linear, attention, mlp, or a "
                             f"comma-separated list of {', '.join(sorted(known))})")
    return leaves


def add_lora(model, cfg: TrainConfig) -> dict[str, LoraSlot]:
    """Attach trainable LoRA factors (A Kaiming-uniform, B zero) to the targeted linear layers."""
    gen = torch.Generator().manual_seed(cfg.seed)
    scale = lora_scale(cfg.alpha, cfg.rank, cfg.rslora)
    dev = model.inv_freq.device
    slots = {}
    leaves = targets_of(cfg.targets)
    # routed experts' leaves by their role (Mixtral's w1 / w3 / w2 are gate / up / down)
    moe = getattr(model.cfg, "moe", None)
    role = dict(zip(moe.leaves, ("gate_proj", "up_proj", "down_proj"))) if moe is not None else {}
    for name, mod in model.linear_modules().items():
        leaf = name.rsplit(".", 1)[-1]
        if ".experts." in name:
            leaf = role.get(leaf, leaf)
        if not name.startswith("model.layers.") or leaf not in leaves:
            continue
        out_f, in_f = mod.weight.shape
        A = torch.empty(cfg.rank, in_f)
        torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=gen)
        slot = LoraSlot(torch.nn.Parameter(A.to(dev)), torch.nn.Parameter(torch.zeros(out_f, cfg.rank, device=dev)), scale)
        mod.loras.append(slot)
        slots[name] = slot
    return slots


def make_optimizer(params: list, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW over the LoRA factors: PyTorch's fused kernel where this build has it for the
    device (one pass over all factors instead of a dozen ops per tensor), else the default."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


class Batches:
    """Step i → its (inputs, labels): epoch e's examples in a permutation seeded by (seed, e),
    packed to seq_len, rows taken in order (wrapping around)."""

    def __init__(self, ds: data.Dataset, cfg: TrainConfig, steps_per_epoch: int):
        self.ds, self.cfg, self.spe = ds, cfg, steps_per_epoch
        self._epoch, self._packed = None, None

    def at(self, i: int):
        epoch, within = divmod(i, self.spe)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)
            order = torch.randperm(len(self.ds.examples), generator=g).tolist()
            self._epoch, self._packed = epoch, data.pack(self.ds, self.cfg.seq_len, self.ds.report["eos_id"], order)
        x, y = self._packed
        rows = self.cfg.batch_size * self.cfg.grad_accum
        idx = [(within * rows + j) % x.shape[0] for j in range(rows)]
        return x[idx], y[idx]


def _loss(model, x, y):
    """Summed cross-entropy over the positions that carry loss, computing only what that needs
    (exact, as attention is causal): columns after the batch's last labelled position are
    dropped, and the last block's output projection and MLP, the final norm and the LM head (a
    vocab-sized GEMM) run only at labelled positions, not at every prompt token."""
    keep = y != -100
    cols = keep.any(0).nonzero()
    end = int(cols[-1]) + 1 if len(cols) else 1  # no label at all: a zero loss, still a graph
    # both counts are rounded up to a few sizes, so the GEMM kernels compiled per shape are reused
    grain = max(16, x.shape[1] // 8)
    end = min(x.shape[1], -(-end // grain) * grain)
    x, y, keep = x[:, :end], y[:, :end], keep[:, :end]
    rows = keep.reshape(-1).nonzero().squeeze(1)
    n = len(rows)
    padded = torch.cat([rows, rows[-1:].expand(gemm.bucket(n) - n)]) if n else rows  # extra rows carry no loss
    h, _ = model.hidden(x, rows=padded)
    logits = model.head(h)[:n]
    return F.cross_entropy(logits, y.reshape(-1)[rows], reduction="sum")


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, batch_size: int, dev) -> float:
    total, count = 0.0, 0
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i:i + batch_size].to(dev), y[i:i + batch_size].to(dev)
        total += float(_loss(model, xb, yb))
        count += int((yb != -100).sum())
    return total / max(count, 1)


class _Checkpoints:
    """``<dir>/step-000123/{lora.safetensors, state.json}`` — no pickle."""

    def __init__(self, root: Path):
        self.root = root

    def latest(self) -> Path | None:
        steps = sorted(self.root.glob("step-*")) if self.root.is_dir() else []
        return steps[-1] if steps else None

    def save(self, step: int, slots: dict[str, LoraSlot], opt: torch.optim.Optimizer, meta: dict) -> Path:
        tensors = {}
        params = [p for s in slots.values() for p in (s.A, s.B)]
        for i, p in enumerate(params):
            tensors[f"param.{i}"] = p.detach().cpu()
            stt = opt.state.get(p, {})
            for k in ("exp_avg", "exp_avg_sq", "step"):
                if k in stt:
                    tensors[f"opt.{i}.{k}"] = stt[k].detach().cpu().reshape(stt[k].shape)
        out = self.root / f"step-{step:06d}"
        self.root.mkdir(parents=True, exist_ok=True)
        clear_stale_temps(out)
        with atomic_dir(out, replace=True) as tmp:  # a step saved again (a stop at a checkpoint step) replaces itself
            st.save_file(tensors, tmp / "lora.safetensors")
            (tmp / "state.json").write_text(json.dumps({**meta, "step": step, "modules": list(slots)}, indent=2))
        return out

    def load(self, path: Path, slots: dict[str, LoraSlot], opt: torch.optim.Optimizer) -> dict:
        meta = json.loads((path / "state.json").read_text())
        if meta["modules"] != list(slots):
            raise InputError("checkpoint was made for other target modules; resume with the same options", path)
        t = st.load_file(path / "lora.safetensors")
        params = [p for s in slots.values() for p in (s.A, s.B)]
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(t[f"param.{i}"])
                if f"opt.{i}.exp_avg" in t:
                    # the fused AdamW kernel wants its step counters on the parameters' device too
                    step_dev = p.device if opt.defaults.get("fused") else torch.device("cpu")
                    opt.state[p] = {k: t[f"opt.{i}.{k}"].to(p.device if k != "step" else step_dev)
                                    for k in ("exp_avg", "exp_avg_sq", "step")}
        return meta


class _StopOnInterrupt:
    """While active (main thread only), the first SIGINT asks the loop to stop after the current
    step, so the checkpoint it writes is the exact state of a completed step; a second SIGINT
    interrupts at once (KeyboardInterrupt)."""

    def __init__(self, log):
        self.log, self.requested, self._old = log, False, None

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        import signal

        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.log("interrupt: finishing this step and writing a checkpoint (Ctrl-C again to stop at once)")

    def __exit__(self, *exc):
        import signal

        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def train(model_dir: str | os.PathLike, data_path: str | os.PathLike, out: str | os.PathLike, cfg: TrainConfig,
          eval_path: str | os.PathLike | None = None, resume: bool = False, overwrite: bool = False,
          quiet: bool = True, log=print) -> dict:
    """Train a LoRA adapter; write it (PEFT) to ``out``. Checkpoints and the metrics log live in
    ``<out>.train/`` until the run completes."""
    from tqdm import tqdm

    model_dir, out = Path(model_dir), Path(out)
    if cfg.rank < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1 or cfg.seq_len < 2 or cfg.epochs < 1:
        raise LoratoolsError("--rank, --batch-size, --grad-accum, --epochs must be ≥ 1 and --seq-len ≥ 2")
    work = out.with_name(out.name + ".train")
    check_output(out, [model_dir, data_path, eval_path], overwrite, work=[work])  # a fresh start clears work
    ckpts = _Checkpoints(work / "checkpoints")
    if ckpts.latest() is not None and not resume:
        if not overwrite:
            raise OutputError(f"{work} holds checkpoints of an earlier run: pass --resume to continue it or --overwrite "
                              "to start again", work)
    if not resume and work.exists():
        shutil.rmtree(work)  # a fresh start: no metrics or checkpoints of an interrupted earlier run carry over
    dev = pick_device(cfg.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.dtype]
    torch.manual_seed(cfg.seed)
    ds = data.load(data_path, model_dir, cfg.seq_len)
    ev = data.load(eval_path, model_dir, cfg.seq_len) if eval_path else None
    model = load_model(model_dir, dtype=dtype, device=str(dev), mmap=True)  # the base is frozen
    for d in (ds, ev):
        if d is not None:
            data.check_ids(d, model.model.embed_tokens.weight.shape[0], model_dir / "tokenizer.json")
    model.gradient_checkpointing = cfg.gradient_checkpointing
    n_params = sum(p.numel() for p in model.parameters())
    lr, ft_lr = (cfg.lr, None) if cfg.lr is not None else default_lr(n_params)
    slots = add_lora(model, cfg)
    if not slots:
        raise LoratoolsError(f"--targets {cfg.targets!r} matched no layer of the model")
    params = [p for s in slots.values() for p in (s.A, s.B)]
    opt = make_optimizer(params, lr, cfg.weight_decay)
    eos = ds.report["eos_id"]
    packed_x, packed_y = data.pack(ds, cfg.seq_len, eos, list(range(len(ds.examples))))
    rows_per_epoch = packed_x.shape[0]
    ds.report["loss_tokens_after_truncation"] = kept = int((packed_y != -100).sum())
    if kept == 0:
        raise InputError(f"no token carries loss once examples are truncated to --seq-len {cfg.seq_len} (the "
                         "completions / assistant turns all lie beyond it); raise --seq-len", data_path)
    steps_per_epoch = max(1, math.ceil(rows_per_epoch / (cfg.batch_size * cfg.grad_accum)))
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    ev_xy = data.pack(ev, cfg.seq_len, ev.report["eos_id"], list(range(len(ev.examples)))) if ev else None
    report = {"model": str(model_dir), "data": ds.report, "eval": ev.report if ev else None, "config": asdict(cfg),
              "lr": lr, "full_finetune_lr": ft_lr, "trainable_parameters": sum(p.numel() for p in params),
              "model_parameters": n_params, "steps": total, "device": str(dev), "losses": [], "eval_losses": []}
    log(f"lr {lr:.3g}" + (f" (10x {ft_lr:.3g}, a full fine-tuning LR for {n_params / 1e6:.0f}M parameters)" if ft_lr else "")
        + f"; {len(slots)} LoRA layers, {report['trainable_parameters']:,} trainable parameters; {total} steps")
    if cfg.warmup >= total:
        log(f"warning: --warmup {cfg.warmup} is not shorter than the run ({total} steps): the LR never reaches {lr:.3g} "
            "and never decays; lower --warmup")
    # what a resumed run must share with the interrupted one to continue it exactly
    same = {k: v for k, v in asdict(cfg).items() if k not in ("eval_every", "checkpoint_every", "device", "stop_after",
                                                             "gradient_checkpointing")}
    same.update(lr=lr, data=str(Path(data_path).resolve()), model=str(model_dir.resolve()),
                examples=len(ds.examples), tokens=ds.report["tokens"])
    step = 0
    work.mkdir(parents=True, exist_ok=True)
    metrics = work / "metrics.jsonl"
    if resume:
        last = ckpts.latest()
        if last is None:
            raise InputError("--resume: no checkpoint to resume from", work)
        saved = json.loads((last / "state.json").read_text()).get("run")
        if saved is not None and saved != same:
            diff = sorted(k for k in set(saved) | set(same) if saved.get(k) != same.get(k))
            raise IncompatibleError(f"--resume with other options than the interrupted run ({', '.join(diff)}: "
                                    f"{', '.join(f'{saved.get(k)!r} then, {same.get(k)!r} now' for k in diff[:2])}); "
                                    "resume with the same options or start again with --overwrite", last)
        meta = ckpts.load(last, slots, opt)
        step = meta["step"]
        report["losses"], report["eval_losses"] = meta["losses"], meta["eval_losses"]
        report["eval_loss_initial"] = meta.get("eval_loss_initial")
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        metrics.write_text("".join(l + "\n" for l in lines if json.loads(l)["step"] <= step))
        log(f"resumed from {last.name}")
    def save_checkpoint() -> None:
        ckpts.save(step, slots, opt, {"losses": report["losses"], "eval_losses": report["eval_losses"],
                                      "eval_loss_initial": report.get("eval_loss_initial"), "run": same})

    batches = Batches(ds, cfg, steps_per_epoch)
    batch = batches.at

    model.train()
    if ev_xy is not None and step == 0:
        model.eval()
        report["eval_loss_initial"] = evaluate(model, *ev_xy, cfg.batch_size, dev)
        model.train()
    bar = tqdm(total=total, initial=step, disable=quiet or not sys.stderr.isatty(), desc="train", unit="step",
               dynamic_ncols=True)
    t0, seen = time.perf_counter(), 0
    stop = _StopOnInterrupt(log)  # the first Ctrl-C: finish this step, checkpoint it, stop; a second: stop now
    try:
        with stop, open(metrics, "a") as mlog:
            while step < total:
                x, y = batch(step)
                cur = lr_at(step, total, lr, cfg.warmup)
                for g in opt.param_groups:
                    g["lr"] = cur
                n_tok = int((y != -100).sum())
                loss_sum = 0.0
                for k in range(cfg.grad_accum):
                    sl = slice(k * cfg.batch_size, (k + 1) * cfg.batch_size)
                    loss = _loss(model, x[sl].to(dev), y[sl].to(dev)) / max(n_tok, 1)
                    loss.backward()
                    loss_sum += loss.item()
                gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                seen += x.numel()
                tps = seen / max(time.perf_counter() - t0, 1e-9)
                rec = {"step": step, "loss": loss_sum, "lr": cur, "grad_norm": gnorm, "tokens_per_s": tps}
                report["losses"].append(loss_sum)
                if ev_xy is not None and (step % cfg.eval_every == 0 or step == total):
                    rec["eval_loss"] = evaluate(model, *ev_xy, cfg.batch_size, dev)
                    report["eval_losses"].append([step, rec["eval_loss"]])
                mlog.write(json.dumps(rec) + "\n")
                mlog.flush()
                bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{cur:.2e}", tok_s=f"{tps:.0f}")
                bar.update(1)
                if step % cfg.checkpoint_every == 0 and step < total:
                    save_checkpoint()
                if cfg.stop_after is not None and step >= cfg.stop_after and step < total:
                    save_checkpoint()
                    bar.close()
                    report["stopped_at"] = step
                    return report
                if stop.requested and step < total:
                    if step % cfg.checkpoint_every:
                        save_checkpoint()
                    raise KeyboardInterrupt
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM / SIGHUP (errors.Terminated)
        bar.close()
        last = ckpts.latest()
        raise TrainInterrupted(step, total, out, int(last.name.split("-")[1]) if last is not None else None,
                               getattr(e, "signum", None)) from None
    bar.close()
    model.eval()
    report["tokens_per_s"] = seen / max(time.perf_counter() - t0, 1e-9)
    if ev_xy is not None and not report["eval_losses"]:
        report["eval_losses"].append([step, evaluate(model, *ev_xy, cfg.batch_size, dev)])
    mods = {model.cfg.to_external(n): LoraModule(A=s.A.detach().float().cpu().contiguous(), B=s.B.detach().float().cpu().contiguous(),
                          scale=s.scale, alpha=cfg.alpha) for n, s in slots.items()}
    adapter = Adapter(modules=mods, format="peft",
                      config={"r": cfg.rank, "lora_alpha": cfg.alpha, "use_rslora": cfg.rslora, "task_type": "CAUSAL_LM"})
    write_peft(adapter, out, str(model_dir), num_layers=model.cfg.num_hidden_layers,
               extra_files={"train_report.json": json.dumps(report, indent=2, default=str) + "\n",
                            "metrics.jsonl": metrics.read_text()})
    shutil.rmtree(work, ignore_errors=True)
    return report
