"""Peak memory of merge, extract and GGUF export on a Gemma-2-9B-shaped cut, against one tensor.

    .venv/bin/python benchmarks/family_cut.py [--layers 4] [--quick]

Builds (in a temp folder) a bf16 checkpoint whose names, shapes and config.json are transformers'
own (Gemma2Config + Gemma2ForCausalLM on the meta device give the tensor list; the values are
written one tensor at a time): Gemma-2-9B's shape — hidden 3584, intermediate 14336, 16 heads
(8 KV) of 256, vocabulary 256,000 (a 1.75 GiB embedding, tied) — cut to a few layers. Also a
"full fine-tune" of it (rank-48 changes on every linear weight) and a rank-16 all-linear PEFT
adapter. Each command runs in its own child process; the parent samples its RssAnon (private
anonymous memory) every 5 ms. Printed: wall time, peak RssAnon, the peak over the imports, and
that figure relative to the largest tensor of the checkpoint (bf16 bytes). PEFT's merge
(from_pretrained + merge_and_unload + save_pretrained) runs as the peer.
"""
from __future__ import annotations

import argparse
import json
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
from loratools.checkpoint import CheckpointWriter  # noqa: E402
from loratools.formats.peft import write_peft  # noqa: E402

RSS = "int([l for l in open('/proc/self/status') if l.startswith('RssAnon:')][0].split()[1])"
CLI = """
import json, time, torch
from loratools.cli import main
base_kb = """ + RSS + """
t = time.perf_counter()
code = main({args!r})
assert code == 0, code
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
m.save_pretrained({out!r}, max_shard_size="2GB")
print(json.dumps({{"seconds": time.perf_counter() - t, "base_mib": base_kb / 1024}}))
"""


def gemma2_config(layers: int, quick: bool) -> dict:
    from transformers import Gemma2Config

    if quick:
        shape = dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=64, vocab_size=8192, query_pre_attn_scalar=64)
    else:  # google/gemma-2-9b
        shape = dict(hidden_size=3584, intermediate_size=14336, num_attention_heads=16, num_key_value_heads=8,
                     head_dim=256, vocab_size=256000, query_pre_attn_scalar=256)
    cfg = Gemma2Config(num_hidden_layers=layers, sliding_window=4096, max_position_embeddings=8192,
                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0, **shape)
    d = cfg.to_dict()
    d["dtype"] = "bfloat16"
    d["architectures"] = ["Gemma2ForCausalLM"]
    return d


def tensor_specs(cfg: dict) -> list[st.TensorInfo]:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    with torch.device("meta"):
        model = Gemma2ForCausalLM(Gemma2Config(**{k: v for k, v in cfg.items() if k != "dtype"}))
    return [st.TensorInfo(n, torch.bfloat16, tuple(p.shape)) for n, p in model.named_parameters()]  # tied: no lm_head


def write_checkpoint(path: Path, cfg: dict, specs, seed: int, delta_rank: int = 0, norm_center: float = 0.0) -> None:
    """Random weights (or, with delta_rank, the same weights plus a rank-``delta_rank`` change on
    every 2-D weight: a stand-in for a full fine-tune), one tensor at a time."""
    from fixtures.generate import make_tokenizer, tokenizer_config

    with CheckpointWriter(path, specs, max_shard_size="2GB", config=cfg) as w:
        for i, s in enumerate(specs):
            g = torch.Generator().manual_seed(seed * 100003 + i)
            if len(s.shape) == 1:
                t = norm_center + 0.1 * torch.randn(s.shape, generator=g)  # norms (Gemma stores them around 0)
            else:
                t = torch.randn(s.shape, generator=g) / math.sqrt(s.shape[-1])
                if delta_rank:
                    gd = torch.Generator().manual_seed(7 + i)
                    u = torch.randn(s.shape[0], delta_rank, generator=gd)
                    v = torch.randn(delta_rank, s.shape[1], generator=gd)
                    t.addmm_(u, v, alpha=0.01 / math.sqrt(s.shape[-1]))
            w.write(s.name, t.to(torch.bfloat16))
            del t
    tok = make_tokenizer()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")


def write_adapter(path: Path, specs, layers: int) -> Path:
    g = torch.Generator().manual_seed(1)
    mods = {}
    for s in specs:
        if s.name.endswith("proj.weight"):
            out_f, in_f = s.shape
            mods[s.name[:-7]] = LoraModule(torch.randn(16, in_f, generator=g) / math.sqrt(in_f),
                                           torch.randn(out_f, 16, generator=g) * 0.01, 2.0, 32.0)
    return write_peft(Adapter(modules=mods, format="peft"), path, num_layers=layers)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="a small shape, to check the script")
    ap.add_argument("--no-peer", action="store_true", help="skip PEFT's merge (it holds the whole model)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lt-cut-", dir=str(Path(__file__).resolve().parents[1] / "build")
                                 if (Path(__file__).resolve().parents[1] / "build").is_dir() else None))
    try:
        cfg = gemma2_config(args.layers, args.quick)
        specs = tensor_specs(cfg)
        base, tuned = root / "base", root / "tuned"
        write_checkpoint(base, cfg, specs, seed=0)
        write_checkpoint(tuned, cfg, specs, seed=0, delta_rank=48)
        adapter = write_adapter(root / "adapter", specs, args.layers)
        largest = max(s.nbytes for s in specs) / 2**20
        size = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 2**20
        print(f"machine: {machine()}")
        print(f"checkpoint: Gemma-2-9B-shaped, {args.layers} layers, {size:,.0f} MiB bf16; largest tensor "
              f"{largest:,.0f} MiB (embed_tokens, tied); adapter rank 16 on every linear layer\n")
        runs = [
            ("loratools merge", CLI.format(args=["merge", "--base", str(base), "-a", str(adapter), "-o",
                                                  str(root / "merged"), "--device", "cpu", "--quiet"])),
            ("loratools extract --rank 16", CLI.format(args=["extract", "--base", str(base), "--tuned", str(tuned),
                                                              "-o", str(root / "extracted"), "--rank", "16",
                                                              "--device", "cpu", "--quiet"])),
            ("loratools export gguf --outtype f16 -a", CLI.format(args=["export", "gguf", str(base), "-a", str(adapter),
                                                                        "-o", str(root / "m.gguf"), "--outtype", "f16",
                                                                        "--quiet"])),
        ]
        if not args.no_peer:
            runs.append(("PEFT merge_and_unload + save_pretrained",
                         PEER.format(base=str(base), adapter=str(adapter), out=str(root / "peft"))))
        print(f"| command | wall s | peak RssAnon MiB | over imports MiB | over imports / largest tensor |")
        print("|---|--:|--:|--:|--:|")
        for name, code in runs:
            res, peak = run_child(code)
            over = peak - res["base_mib"]
            print(f"| {name} | {res['seconds']:.1f} | {peak:,.0f} | {over:,.0f} | {over / largest:.2f} |", flush=True)
            for p in (root / "merged", root / "extracted", root / "m.gguf", root / "peft"):
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
