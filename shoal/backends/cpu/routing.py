"""Which CPU kernel runs a weight-only quantized linear layer: one pure function of (rows, dtype,
shape, what the tier in use can do), and the row thresholds it reads from routing.h, the header
ops.cpp includes, so that C++ and Python share one copy of each number. Table-driven tests check it
per tier (tests/unit/test_cpu_routing.py); `backends/cpu.quant_linear` runs what it returns.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

_HEADER = Path(__file__).with_name("routing.h")


def _read_header() -> dict[str, int]:
    text = _HEADER.read_text()
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^#define SHOAL_(\w+) (\d+)\s*$", text, re.M)}


_T = _read_header()
PACKED_MAX_ROWS: int = _T["PACKED_MAX_ROWS"]  # decode rows: the packed kernels up to this many
GEMV_MAX_ROWS: int = _T["GEMV_MAX_ROWS"]  # bf16 rows above this many: the AMX kernel where it runs
QUANT_GEMM_MAX_ROWS: int = _T["QUANT_GEMM_MAX_ROWS"]  # the batched packed kernels and the fused step
PANEL_GEMM_MAX_ROWS: int = _T["PANEL_GEMM_MAX_ROWS"]  # AMX prompt tiles up to this many rows
STORE_KV_MIN_ROWS: int = _T["STORE_KV_MIN_ROWS"]  # the C paged-cache row copy from this many rows


class Caps(NamedTuple):
    """What the CPU kernels in use can do (kernels.caps() reads them off the loaded tier).
    amx: quant_gemm_amx / panel_gemm run (AMX tier, tiles granted); simd: qgemv.c's SIMD GEMV and
    tiles are built (avx2 and up); ops: the C++ torch operators are built; int8_prompts: bf16 prompt
    rows may be quantized to int8 per group of 32 (SHOAL_CPU_PROMPT_ACTIVATIONS); onednn_bf16:
    oneDNN's prepacked bf16 matmul runs on this CPU (AVX-512 or AMX tiers); compiling: inside a
    torch.compile trace (the eager-only kernels step aside). A NamedTuple: a compiled graph builds
    one without a graph break."""
    amx: bool
    simd: bool
    ops: bool = True
    int8_prompts: bool = True
    onednn_bf16: bool = False
    compiling: bool = False


def tier_caps(tier: str, **kw: bool) -> Caps:
    """The capabilities a tier's kernels have on a CPU that runs it (for tests and `shoal doctor`)."""
    return Caps(amx=tier == "amx", simd=tier != "generic", onednn_bf16=tier in ("avx512", "amx"), **kw)


def packed_form(dtype: str, caps: Caps, weight: str, n: int) -> str | None:
    """The packed layout a weight keeps for `dtype` activations: "gemv" (qgemv.c's layouts: bf16
    only, since its int8 activations must not touch float32, the exact reference mode), torch's
    "int8" / "int4" packed kernels, or None. weight: "int8" (per channel), "int4" (group 32),
    "int4-other" (another group size), "int4-wide" (scales outside fp16), "other"."""
    if dtype == "bfloat16" and caps.simd and caps.ops and weight in ("int8", "int4"):
        return "gemv"
    if weight == "int8":
        return "int8"
    if weight.startswith("int4") and n % 16 == 0:
        return "int4"
    return None


def linear_kernel(rows: int, dtype: str, n: int, k: int, caps: Caps, weight: str = "int4") -> str:
    """The kernel for x [rows, k] · Wᵀ (W [n, k], quantized) — one of:
    - "native": dtypes the CPU kernels do not take (the platform-neutral form);
    - "panel_gemm": bf16 prompt rows past QUANT_GEMM_MAX_ROWS up to PANEL_GEMM_MAX_ROWS on AMX tiles;
    - "quant_gemm": bf16 rows past PACKED_MAX_ROWS on qgemv.c's batched kernels (AMX up to
      QUANT_GEMM_MAX_ROWS; the SIMD tiles for any count where prompts take int8 activations);
    - "packed_matmul": decode rows on qgemv.c's GEMV/tiles (shoal::quant_matmul);
    - "torch_int8" / "torch_int4": torch's packed weight-only kernels for decode rows;
    - "dense_onednn" / "dense": a matmul on the dequantized weight (oneDNN's prepacked bf16 one where
      the CPU runs it)."""
    if dtype not in ("float32", "bfloat16", "float16"):
        return "native"
    bf16 = dtype == "bfloat16"
    dense = "dense_onednn" if bf16 and caps.onednn_bf16 and not caps.compiling else "dense"
    form = packed_form(dtype, caps, weight, n)
    if (QUANT_GEMM_MAX_ROWS < rows <= PANEL_GEMM_MAX_ROWS and bf16 and not caps.compiling and caps.amx
            and caps.ops and form == "gemv" and n % 16 == 0 and k % 32 == 0 and k > 0):
        return "panel_gemm"
    batched = rows > PACKED_MAX_ROWS
    int8_prompts = caps.int8_prompts and not caps.amx and caps.simd
    if batched and not (bf16 and (rows <= QUANT_GEMM_MAX_ROWS or int8_prompts)):
        return dense
    if form is None:
        return dense
    if batched:
        gemm = caps.ops and n % 16 == 0 and k > 0 and (k % 2 == 0 if caps.amx else caps.simd)
        return "quant_gemm" if form == "gemv" and gemm else dense
    return {"gemv": "packed_matmul", "int8": "torch_int8", "int4": "torch_int4"}[form]
