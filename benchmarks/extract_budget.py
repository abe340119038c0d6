"""extract --budget: peak memory of the global rank allocation on a 1.1B-shaped model.

    .venv/bin/python benchmarks/extract_budget.py [--quick] [--layers N] [--budget 20M]

Builds (in a temp folder) the TinyLlama-1.1B-shaped bf16 checkpoint of merge_bench.py and a
"fine-tune" of it (the base merged with a rank-16 all-linear adapter, rounded to bf16, so every
delta is a rank-16 signal plus full-rank rounding noise), then runs `loratools extract --budget`
in a child process, sampling its RssAnon every 5 ms. The budget needs every module's spectrum
before any rank is known: each module is factored at the cap rank (256) first. The figure to
compare is the size of all those cap-rank factors, which a run holding them in memory until the
allocation would add to its peak.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._peak import machine, run_child  # noqa: E402
from benchmarks.merge_bench import RSS, build  # noqa: E402

EXTRACT = """
import json, time
from loratools.cli import main
base_kb = """ + RSS + """
t = time.perf_counter()
assert main(["extract", "--base", {base!r}, "--tuned", {tuned!r}, "-o", {out!r}, "--budget", {budget!r},
             "--device", "cpu", "--quiet"]) == 0
print(json.dumps({{"seconds": time.perf_counter() - t, "base_mib": base_kb / 1024}}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--budget", default="20M")
    args = ap.parse_args()
    layers, hidden, inter, vocab = (2, 256, 704, 4000) if args.quick else (args.layers, 2048, 5632, 32000)
    root = Path(tempfile.mkdtemp(prefix="lt-budget-"))
    try:
        import torch

        from loratools.checkpoint import Checkpoint
        from loratools.formats.peft import read_peft
        from loratools.ops.merge import merge

        base, adapter = build(root, layers, hidden, inter, vocab)
        tuned = root / "tuned"
        merge(base, [read_peft(adapter)], tuned, dtype=torch.bfloat16, device="cpu")
        with Checkpoint.open(base) as ck:
            cap_bytes = sum(min(256, *ck.info(n).shape) * sum(ck.info(n).shape) * 4
                            for n in ck.keys() if len(ck.info(n).shape) == 2)
        print(f"machine: {machine()}")
        print(f"model: {layers} layers, hidden {hidden}, intermediate {inter}, vocab {vocab} (bf16); budget {args.budget}\n")
        res, peak = run_child(EXTRACT.format(base=str(base), tuned=str(tuned), out=str(root / "out"), budget=args.budget))
        report = json.loads((root / "out" / "extract_report.json").read_text())
        ranks = list(report["ranks"].values())
        print(f"wall s {res['seconds']:.1f}; peak RssAnon {peak:.0f} MiB ({peak - res['base_mib']:.0f} over imports)")
        print(f"all cap-rank (256) factors: {cap_bytes / 2**20:.0f} MiB (what holding them until the allocation adds)")
        print(f"adapter: {report['parameters']:,} parameters, ranks {min(ranks)}-{max(ranks)} over {len(ranks)} modules, "
              f"retained energy {report['retained_energy']:.4f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
