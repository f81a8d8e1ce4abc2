#!/usr/bin/env bash
# llama.cpp's Python binding in its own venv, built for the ISA this CPU has (never GGML_NATIVE, which
# produced "Illegal instruction" on a CI-class Xeon: docs/performance.md). ≈ 6 minutes on 2 cores.
# LLAMACPP_ISA=avx2 builds the AVX2 variant on an AVX-512 CPU too (in .bench-venvs/llamacpp-avx2), so
# that shoal's avx2 tier (SHOAL_CPU_ISA=avx2) meets llama.cpp on the same instructions.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PY="${PY:-python3}"
flags="$(grep -m1 '^flags' /proc/cpuinfo || true)"
has() { [[ " $flags " == *" $1 "* ]]; }
ISA="${LLAMACPP_ISA:-}"
if [ -z "$ISA" ]; then
  if has avx512f && has avx512bw && has avx512vl; then ISA=avx512; elif has avx2 && has fma && has f16c; then ISA=avx2; else ISA=generic; fi
fi
case "$ISA" in
  avx512)
    has avx512f || { echo "LLAMACPP_ISA=avx512: this CPU has no AVX-512" >&2; exit 1; }
    CMAKE="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON"
    has avx512_vnni && CMAKE="$CMAKE -DGGML_AVX512_VNNI=ON"
    has avx512_bf16 && CMAKE="$CMAKE -DGGML_AVX512_BF16=ON"
    VENV="$ROOT/.bench-venvs/llamacpp" ;;
  avx2)
    CMAKE="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF"
    has avx_vnni && CMAKE="$CMAKE -DGGML_AVX_VNNI=ON"
    # on an AVX2-only CPU this is the default build
    if has avx512f; then VENV="$ROOT/.bench-venvs/llamacpp-avx2"; else VENV="$ROOT/.bench-venvs/llamacpp"; fi ;;
  generic)
    CMAKE="-DGGML_NATIVE=OFF -DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF"
    VENV="$ROOT/.bench-venvs/llamacpp-generic" ;;
  *) echo "LLAMACPP_ISA must be avx512, avx2 or generic" >&2; exit 1 ;;
esac
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
if "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "llama-cpp-python ($ISA) already in $VENV"; exit 0
fi
"$VENV/bin/pip" install -q --upgrade pip
echo "building llama-cpp-python for $ISA: $CMAKE"
CMAKE_ARGS="$CMAKE" CMAKE_BUILD_PARALLEL_LEVEL=2 "$VENV/bin/pip" install --no-cache-dir "llama-cpp-python==0.3.36"
echo "$ISA" > "$VENV/ISA"
echo done
