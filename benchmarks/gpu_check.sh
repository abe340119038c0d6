#!/usr/bin/env bash
# Validation of every output path, on CUDA when the machine has it, plus the main benchmarks.
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # full: under 5 minutes on a CUDA machine
#   QUICK=1 bash benchmarks/gpu_check.sh OUT_DIR  # small settings (CPU; what CI runs)
# Writes OUT_DIR/summary.md and OUT_DIR/validate.json; exits non-zero if any validation fails.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-build/gpu_check}
PY=${PY:-.venv/bin/python}
LT="$PY -m loratools"
mkdir -p "$OUT"
FX="$OUT/fixtures"
rm -rf "$FX" "$OUT/art"
mkdir -p "$OUT/art"
A="$OUT/art"
DEVICE=$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
$PY -m fixtures.generate "$FX" > /dev/null
M="$FX/models/llama"; AD="$FX/adapters/llama-rslora"
$LT merge --base "$M" -a "$AD" -o "$A/merged" --quiet > /dev/null
$LT merge --base "$M" -a "$AD" -o "$A/merged-bf16" --dtype bf16 --quiet > /dev/null
$LT export gguf "$M" -o "$A/base.gguf" --outtype f32 --quiet > /dev/null
$LT export gguf "$M" -a "$AD" -o "$A/merged-f16.gguf" --outtype f16 --quiet > /dev/null
$LT export gguf "$M" -a "$AD" -o "$A/merged-q8.gguf" --outtype q8_0 --quiet > /dev/null
$LT export gguf-adapter "$AD" --base "$M" -o "$A/adapter.gguf" > /dev/null
$LT export onnx "$M" -a "$AD" -o "$A/onnx" > /dev/null
$LT export onnx "$M" -a "$AD" -o "$A/onnx16" --dtype fp16 > /dev/null
$LT export onnx "$M" --lora-slots all-linear -o "$A/slots" > /dev/null
$LT export onnx-adapter "$AD" -o "$A/a.onnx_adapter" --model "$A/slots" > /dev/null
status=0
$LT validate --base "$M" -a "$AD" --device auto --tokens 16 --json \
  "$A/merged" "$A/merged-bf16" "$A/merged-f16.gguf" "$A/merged-q8.gguf" "$A/base.gguf+$A/adapter.gguf" \
  "$A/onnx" "$A/onnx16" "$A/slots+$A/a.onnx_adapter" > "$OUT/validate.json" || status=$?
{
  echo "# gpu_check summary"
  echo
  echo "device: $DEVICE; $($PY -c 'import benchmarks._peak as p; print(p.machine())')"
  echo
  $PY - "$OUT/validate.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
print("| candidate | runtime | precision | max abs | mean KL | top-1 | greedy | result |")
print("|---|---|---|--:|--:|--:|--:|---|")
for c in r["candidates"]:
    m = c["metrics"]
    print(f"| {c['candidate'].split('/')[-1]} | {c['runtime']} | {c['precision']} | {m['max_abs']:.3g} | {m['mean_kl']:.2e} | "
          f"{100*m['top1']:.1f}% | {100*m['greedy_match']:.1f}% | {'pass' if c['passed'] else 'FAIL'} |")
print()
print("all passed" if r["passed"] else "VALIDATION FAILED")
PYEOF
} > "$OUT/summary.md"
if [ "${QUICK:-0}" = "1" ]; then
  $PY benchmarks/resize_extract.py --quick >> "$OUT/summary.md"
  $PY benchmarks/merge_bench.py --quick >> "$OUT/summary.md"
else
  $PY benchmarks/resize_extract.py >> "$OUT/summary.md"
  $PY benchmarks/merge_bench.py >> "$OUT/summary.md"
  $PY benchmarks/onnx_bench.py >> "$OUT/summary.md"
fi
cat "$OUT/summary.md"
exit $status
