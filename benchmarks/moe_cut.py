"""Peak memory of merge (and extract, GGUF export) on a Qwen3-30B-A3B-shaped MoE cut, beside PEFT.

    .venv/bin/python benchmarks/moe_cut.py [--layers 2] [--quick] [--no-peer] [--only merge,peft]

Builds (in a temp folder) a bf16 checkpoint with the tensor names, shapes and config.json that
transformers saves for Qwen3-MoE (Qwen3MoeConfig + Qwen3MoeForCausalLM on the meta device give
the parameter list; the fused in-memory experts are written as the per-expert tensors
``mlp.experts.E.{gate,up,down}_proj.weight`` that save_pretrained writes; the values are drawn
one tensor at a time): Qwen3-30B-A3B's shape — hidden 2048, 128 experts of width 768, top-8,
32 heads / 4 KV heads of 128, vocabulary 151,936, untied head — cut to a few layers. The adapter
is rank-16 LoRA on every expert (gate/up sharing A, as PEFT's target_parameters LoRA on
gate_up_proj has it) and on q/k/v/o, written by loratools in PEFT's target_parameters form,
which PeftModel loads into the transformers 5 model. A "full fine-tune" (rank-48 changes on
every 2-D weight) feeds extract. Each command runs in its own child process; the parent samples
its RssAnon (private anonymous memory) every 5 ms (benchmarks/_peak.py). Printed: wall time,
peak RssAnon, the peak over the imports, and that figure relative to the largest tensor, one
expert (its three matrices) and one layer of experts (bf16 bytes).
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._peak import machine, run_child  # noqa: E402
from benchmarks import family_cut  # noqa: E402
from benchmarks.family_cut import CLI  # noqa: E402
from loratools import st  # noqa: E402
from loratools.adapter import Adapter, LoraModule  # noqa: E402
from loratools.formats.peft import write_peft  # noqa: E402

PEER = """
import json, time, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base_kb = """ + "int([l for l in open('/proc/self/status') if l.startswith('RssAnon:')][0].split()[1])" + """
t = time.perf_counter()
m = AutoModelForCausalLM.from_pretrained({base!r}, dtype=torch.bfloat16)
m = PeftModel.from_pretrained(m, {adapter!r}).merge_and_unload()
m.save_pretrained({out!r}, max_shard_size="2GB")
print(json.dumps({{"seconds": time.perf_counter() - t, "base_mib": base_kb / 1024}}))
"""


def qwen3_moe_config(layers: int, quick: bool) -> dict:
    from transformers import Qwen3MoeConfig

    if quick:
        shape = dict(hidden_size=256, num_experts=16, moe_intermediate_size=128, intermediate_size=768,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=8192)
    else:  # Qwen/Qwen3-30B-A3B
        shape = dict(hidden_size=2048, num_experts=128, moe_intermediate_size=768, intermediate_size=6144,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936)
    cfg = Qwen3MoeConfig(num_hidden_layers=layers, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                         mlp_only_layers=[], tie_word_embeddings=False, max_position_embeddings=40960,
                         rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **shape)
    d = cfg.to_dict()
    d["dtype"] = "bfloat16"
    d["architectures"] = ["Qwen3MoeForCausalLM"]
    return d


def _experts(cfg: dict) -> int:
    return cfg.get("num_experts", cfg.get("num_local_experts"))  # Qwen3MoeConfig saves num_local_experts


def tensor_specs(cfg: dict) -> list[st.TensorInfo]:
    """The tensors save_pretrained writes: the in-memory parameters with each fused expert stack
    split into per-expert 2-D tensors."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**{k: v for k, v in cfg.items() if k != "dtype"}))
    out = []
    for n, p in model.named_parameters():
        if n.endswith("mlp.experts.gate_up_proj"):
            E, two_i, h = p.shape
            for e in range(E):
                for leaf in ("gate_proj", "up_proj"):
                    out.append(st.TensorInfo(f"{n[:-len('gate_up_proj')]}{e}.{leaf}.weight", torch.bfloat16, (two_i // 2, h)))
        elif n.endswith("mlp.experts.down_proj"):
            E, h, i = p.shape
            out += [st.TensorInfo(f"{n[:-len('down_proj')]}{e}.down_proj.weight", torch.bfloat16, (h, i)) for e in range(E)]
        else:
            out.append(st.TensorInfo(n, torch.bfloat16, tuple(p.shape)))
    return out


def write_checkpoint(path: Path, cfg: dict, specs, seed: int, delta_rank: int = 0) -> None:
    """Random weights (with delta_rank: plus a rank-``delta_rank`` change on every 2-D weight), norms
    around 1 as Qwen stores them."""
    family_cut.write_checkpoint(path, cfg, specs, seed, delta_rank, norm_center=1.0)


def write_adapter(path: Path, specs, cfg: dict) -> Path:
    """Rank-16 LoRA on every expert (gate and up share A) and on q/k/v/o, PEFT target_parameters form."""
    g = torch.Generator().manual_seed(1)
    r = 16
    shapes = {s.name[: -len(".weight")]: s.shape for s in specs if s.name.endswith(".weight") and len(s.shape) == 2}
    mods = {}
    for n, (o, i) in shapes.items():
        leaf = n.rpartition(".")[2]
        if leaf in ("q_proj", "k_proj", "v_proj", "o_proj") or (".experts." in n and leaf in ("gate_proj", "down_proj")):
            A = torch.randn(r, i, generator=g) / math.sqrt(i)
            mods[n] = LoraModule(A, torch.randn(o, r, generator=g) * 0.01, 2.0, 32.0)
            if leaf == "gate_proj":
                up = n[: -len("gate_proj")] + "up_proj"
                mods[up] = LoraModule(A, torch.randn(shapes[up][0], r, generator=g) * 0.01, 2.0, 32.0)
    a = Adapter(modules=mods, format="peft", family="qwen3_moe", num_experts=_experts(cfg))
    return write_peft(a, path, num_layers=cfg["num_hidden_layers"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a small shape, to check the script")
    ap.add_argument("--no-peer", action="store_true", help="skip PEFT's merge (it holds the whole model)")
    ap.add_argument("--only", help="comma-separated subset of: merge, extract, gguf, peft")
    args = ap.parse_args()
    build = ROOT / "build"
    root = Path(tempfile.mkdtemp(prefix="lt-moe-", dir=str(build) if build.is_dir() else None))
    try:
        cfg = qwen3_moe_config(args.layers, args.quick)
        specs = tensor_specs(cfg)
        base, tuned = root / "base", root / "tuned"
        want = set((args.only or "merge,extract,gguf,peft").split(","))
        if args.no_peer:
            want.discard("peft")
        write_checkpoint(base, cfg, specs, seed=0)
        if "extract" in want:
            write_checkpoint(tuned, cfg, specs, seed=0, delta_rank=48)
        adapter = write_adapter(root / "adapter", specs, cfg)
        mib = 2 ** 20
        largest = max(s.nbytes for s in specs) / mib
        expert = sum(s.nbytes for s in specs if ".layers.0.mlp.experts.0." in s.name) / mib
        layer = sum(s.nbytes for s in specs if ".layers.0.mlp.experts." in s.name) / mib
        size = sum(f.stat().st_size for f in base.glob("*.safetensors")) / mib
        print(f"machine: {machine()}")
        print(f"checkpoint: Qwen3-30B-A3B-shaped, {args.layers} layers, {size:,.0f} MiB bf16; largest tensor "
              f"{largest:,.0f} MiB (embed_tokens / lm_head); one expert {expert:.1f} MiB; one layer of experts "
              f"{layer:,.0f} MiB ({_experts(cfg)} experts); adapter rank 16 on every expert and q/k/v/o\n")
        runs = []
        if "merge" in want:
            runs.append(("loratools merge", CLI.format(args=["merge", "--base", str(base), "-a", str(adapter), "-o",
                                                             str(root / "merged"), "--device", "cpu", "--quiet"])))
        if "extract" in want:
            runs.append(("loratools extract --rank 16", CLI.format(args=[
                "extract", "--base", str(base), "--tuned", str(tuned), "-o", str(root / "extracted"), "--rank", "16",
                "--device", "cpu", "--quiet"])))
        if "gguf" in want:
            runs.append(("loratools export gguf --outtype f16 -a", CLI.format(args=[
                "export", "gguf", str(base), "-a", str(adapter), "-o", str(root / "m.gguf"), "--outtype", "f16",
                "--quiet"])))
        if "peft" in want:
            runs.append(("PEFT merge_and_unload + save_pretrained",
                         PEER.format(base=str(base), adapter=str(adapter), out=str(root / "peft"))))
        print("| command | wall s | peak RssAnon MiB | over imports MiB | / largest tensor | / one expert | "
              "/ one layer of experts |")
        print("|---|--:|--:|--:|--:|--:|--:|")
        for name, code in runs:
            try:
                res, peak = run_child(code)
            except RuntimeError as e:
                print(f"| {name} | failed: {str(e).strip().splitlines()[-1][:120]} | | | | | |", flush=True)
                continue
            over = peak - res["base_mib"]
            print(f"| {name} | {res['seconds']:.1f} | {peak:,.0f} | {over:,.0f} | {over / largest:.2f} | "
                  f"{over / expert:.1f} | {over / layer:.2f} |", flush=True)
            if name == "loratools merge" and "peft" in want:
                continue  # kept to compare with PEFT's output below
            for p in (root / "extracted", root / "m.gguf"):
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        if (root / "merged").is_dir() and (root / "peft").is_dir():
            print("\n" + compare(root / "merged", root / "peft", base, adapter))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def compare(ours: Path, theirs: Path, base: Path, adapter: Path) -> str:
    """The two merged checkpoints: the same tensor names? how far each is from W + s·B·A computed
    in float64 (on a sample of changed tensors), in units of the tensor's largest value."""
    from loratools import api
    from loratools.checkpoint import Checkpoint

    a, b, w = Checkpoint.open(ours), Checkpoint.open(theirs), Checkpoint.open(base)
    if sorted(a.keys()) != sorted(b.keys()):
        only = sorted(set(a.keys()) ^ set(b.keys()))
        return f"tensor names differ ({len(only)}: {only[:3]})"
    ad = api.load_adapter(adapter, base)
    same = sum(torch.equal(a.get_mapped(k), b.get_mapped(k)) for k in a.keys())
    e_last = max(int(n.split(".")[5]) for n in ad.modules if ".experts." in n)
    sample = [f"model.layers.0.mlp.experts.{e}.{leaf}" for e in (0, e_last) for leaf in ("gate_proj", "up_proj", "down_proj")]
    sample += ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj"]
    err = {"loratools": 0.0, "PEFT": 0.0}
    for n in sample:
        m = ad.modules[n]
        ref = w.get(n + ".weight").double() + m.scale * (m.B.double() @ m.A.double())
        for who, ck in (("loratools", a), ("PEFT", b)):
            err[who] = max(err[who], ((ck.get(n + ".weight").double() - ref).abs().max() / ref.abs().max()).item())
    return (f"outputs: the same {len(a.keys())} tensor names, {same} tensors bit-identical; largest error against "
            f"W + s·B·A in float64 (relative to the tensor's max, {len(sample)} changed tensors): loratools "
            f"{err['loratools']:.2g}, PEFT {err['PEFT']:.2g}")


if __name__ == "__main__":
    main()
