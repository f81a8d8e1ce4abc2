#!/usr/bin/env bash
# llama.cpp's Python binding in its own venv, built with CPU flags that run on CI-class Xeons.
# GGML_NATIVE=ON produced "Illegal instruction" on such a machine (docs/performance.md); the
# explicit AVX-512 set below builds (≈ 6 minutes on 2 cores) and runs.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="$ROOT/.bench-venvs/llamacpp"
PY="${PY:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
if "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "llama-cpp-python already in $VENV"; exit 0
fi
"$VENV/bin/pip" install -q --upgrade pip
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON" \
  "$VENV/bin/pip" install --no-cache-dir "llama-cpp-python==0.3.36"
echo done
