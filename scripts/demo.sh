#!/usr/bin/env bash
# The main job on the embedded default: the whole pipeline on a fixture model, on the CPU,
# ending with one validation table of every written path. `make demo` runs it.
#   bash scripts/demo.sh [OUT_DIR]     (PY=python to use another interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
F=${1:-build/fixtures}
PY=${PY:-.venv/bin/python}
lt() { echo "+ loratools $*"; "$PY" -m loratools "$@"; }
rm -rf "$F" && "$PY" -m fixtures.generate "$F" > /dev/null
M=$F/models/llama
lt inspect "$M"
lt inspect "$F/adapters/llama-patterns" --base "$M"
lt forward "$M" --adapter "$F/adapters/llama-patterns" --prompt "The quick brown fox"
lt convert "$F/adapters/mistral-kohya.safetensors" --to peft -o "$F/mistral-from-kohya" --base "$F/models/mistral"
lt train --model "$M" --data "$F/data/chat-train.jsonl" --eval "$F/data/chat-eval.jsonl" -o "$F/trained" --epochs 4 --seq-len 64 --lr 1e-2 --quiet
lt extract --base "$M" --tuned "$F/models/llama-tuned" -o "$F/extracted" --energy 0.9 --max-rank 8 --embeddings skip --quiet
lt validate-extraction --base "$M" --tuned "$F/models/llama-tuned" -a "$F/extracted"
lt resize "$F/extracted" -o "$F/resized" --rank 2
lt combine "$F/resized" "$F/trained" --weights 1,0.5 -o "$F/combined"
C=$F/combined
lt merge --base "$M" -a "$C" -o "$F/merged" --dtype bf16 --quiet
lt export gguf "$M" -a "$C" -o "$F/merged-q8_0.gguf" --outtype q8_0 --quiet
lt export gguf "$M" -o "$F/base-f32.gguf" --outtype f32 --quiet
lt export gguf-adapter "$C" --base "$M" -o "$F/combined.gguf"
lt import gguf "$F/merged-q8_0.gguf" -o "$F/from-gguf" --quiet
lt export onnx "$M" -a "$C" -o "$F/onnx-merged-fp16" --dtype fp16
lt export onnx "$M" --lora-slots all-linear -o "$F/onnx-slots"
lt export onnx-adapter "$C" --model "$F/onnx-slots" -o "$F/combined.onnx_adapter"
echo
echo "== summary: every written path against base + adapter (torch, fp32) =="
"$PY" -m loratools validate --base "$M" -a "$C" --tokens 8 \
  "$F/merged" "$F/merged-q8_0.gguf" "$F/base-f32.gguf+$F/combined.gguf" "$F/onnx-merged-fp16" \
  "$F/onnx-slots+$F/combined.onnx_adapter"
