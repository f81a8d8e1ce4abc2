"""The CPU kernel choice as a table (backends/cpu/routing.py `linear_kernel`), per ISA tier, and the
tier choice itself (backends/cpu/isa.py) from CPU flag sets of the CPUs shoal meets: no kernels run
here, so every row of each table is checked on any machine."""
from __future__ import annotations

import pytest

from shoal.backends.cpu import isa, routing
from shoal.backends.cpu.routing import linear_kernel, tier_caps

P, Q, G = routing.PACKED_MAX_ROWS, routing.QUANT_GEMM_MAX_ROWS, routing.PANEL_GEMM_MAX_ROWS

# (rows, dtype, n, k, weight) → kernel, per tier
TABLE = [
    # decode rows
    ((1, "bfloat16", 576, 576, "int4"), {"generic": "torch_int4", "avx2": "packed_matmul", "avx512": "packed_matmul",
                                         "amx": "packed_matmul"}),
    ((P, "bfloat16", 576, 576, "int8"), {"generic": "torch_int8", "avx2": "packed_matmul", "avx512": "packed_matmul",
                                         "amx": "packed_matmul"}),
    ((1, "float32", 576, 576, "int4"), dict.fromkeys(isa.TIERS, "torch_int4")),  # fp32: the exact mode
    ((1, "float32", 576, 576, "int8"), dict.fromkeys(isa.TIERS, "torch_int8")),
    ((1, "bfloat16", 570, 576, "int4-other"), dict.fromkeys(isa.TIERS, "dense")
     | {"avx512": "dense_onednn", "amx": "dense_onednn"}),  # no packed form at all (n % 16, group ≠ 32)
    ((1, "bfloat16", 576, 576, "int4-wide"), dict.fromkeys(isa.TIERS, "torch_int4")),  # scales beyond fp16
    # batched decode rows
    ((P + 1, "bfloat16", 576, 576, "int4"), {"generic": "dense", "avx2": "quant_gemm", "avx512": "quant_gemm",
                                             "amx": "quant_gemm"}),
    ((Q, "bfloat16", 576, 576, "int8"), {"generic": "dense", "avx2": "quant_gemm", "avx512": "quant_gemm",
                                         "amx": "quant_gemm"}),
    ((Q, "bfloat16", 570, 576, "int8"), {"generic": "dense", "avx2": "dense", "avx512": "dense_onednn",
                                         "amx": "dense_onednn"}),  # n % 16: no batched kernel
    ((P + 1, "float32", 576, 576, "int4"), dict.fromkeys(isa.TIERS, "dense")),
    # prompt rows
    ((Q + 1, "bfloat16", 576, 576, "int4"), {"generic": "dense", "avx2": "quant_gemm", "avx512": "quant_gemm",
                                             "amx": "panel_gemm"}),
    ((G, "bfloat16", 576, 576, "int4"), {"generic": "dense", "avx2": "quant_gemm", "avx512": "quant_gemm",
                                         "amx": "panel_gemm"}),
    ((G + 1, "bfloat16", 576, 576, "int4"), {"generic": "dense", "avx2": "quant_gemm", "avx512": "quant_gemm",
                                             "amx": "dense_onednn"}),
    ((Q + 1, "bfloat16", 576, 80, "int8"), {"generic": "dense", "avx2": "quant_gemm", "avx512": "quant_gemm",
                                            "amx": "dense_onednn"}),  # k % 32: no AMX panels
    ((512, "float32", 576, 576, "int4"), dict.fromkeys(isa.TIERS, "dense")),
    ((512, "float16", 576, 576, "int4"), dict.fromkeys(isa.TIERS, "dense")),
    ((1, "float64", 576, 576, "int4"), dict.fromkeys(isa.TIERS, "native")),
]


@pytest.mark.parametrize("tier", isa.TIERS)
@pytest.mark.parametrize("case,want", TABLE, ids=[f"{c[0]}-{c[1]}-{c[2]}x{c[3]}-{c[4]}" for c, _ in TABLE])
def test_linear_kernel_table(case, want, tier):
    assert linear_kernel(*case[:4], tier_caps(tier), case[4]) == want[tier]


@pytest.mark.parametrize("tier", ["avx2", "avx512"])
def test_bf16_prompt_activations_send_prompts_to_the_dense_matmul(tier):
    caps = tier_caps(tier, int8_prompts=False)
    assert linear_kernel(Q + 1, "bfloat16", 576, 576, caps) == ("dense" if tier == "avx2" else "dense_onednn")
    assert linear_kernel(Q, "bfloat16", 576, 576, caps) == "quant_gemm"  # batched decode rows unchanged


def test_without_torch_operators_nothing_takes_the_packed_layouts():
    for tier in isa.TIERS:
        caps = tier_caps(tier, ops=False)
        assert linear_kernel(1, "bfloat16", 576, 576, caps) == "torch_int4"
        assert linear_kernel(64, "bfloat16", 576, 576, caps) in ("dense", "dense_onednn")


def test_inside_a_compiled_graph_the_eager_only_kernels_step_aside():
    caps = tier_caps("amx", compiling=True)
    assert linear_kernel(Q + 1, "bfloat16", 576, 576, caps) == "dense"  # no panel_gemm, no oneDNN prepacking
    assert linear_kernel(1, "bfloat16", 576, 576, caps) == "packed_matmul"


def test_thresholds_come_from_the_header_ops_cpp_includes():
    text = routing._HEADER.read_text()
    for name in ("PACKED_MAX_ROWS", "GEMV_MAX_ROWS", "QUANT_GEMM_MAX_ROWS", "PANEL_GEMM_MAX_ROWS", "STORE_KV_MIN_ROWS"):
        assert f"#define SHOAL_{name} {getattr(routing, name)}\n" in text
    ops = (routing._HEADER.parent / "ops.cpp").read_text()
    assert '#include "routing.h"' in ops and "SHOAL_PACKED_MAX_ROWS" in ops and "SHOAL_QUANT_GEMM_MAX_ROWS" in ops


_ZEN3 = frozenset("fpu sse2 ssse3 sse4_1 sse4_2 popcnt avx avx2 fma f16c bmi1 bmi2 abm movbe".split())
_SKYLAKE_SP = _ZEN3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
_ZEN4 = _SKYLAKE_SP | {"avx512_vnni", "avx512_bf16", "avx512vbmi"}
_SAPPHIRE_RAPIDS = _ZEN4 | {"amx_tile", "amx_bf16", "amx_int8", "avx512_fp16"}


@pytest.mark.parametrize("flags,tiers", [
    (frozenset({"sse2"}), ("generic",)),
    (_ZEN3, ("generic", "avx2")),
    (_SKYLAKE_SP, ("generic", "avx2")),  # AVX-512 without VNNI/BF16 runs the avx2 tier
    (_ZEN4, ("generic", "avx2", "avx512")),
    (_SAPPHIRE_RAPIDS, isa.TIERS),
])
def test_cpu_tiers_from_flags(flags, tiers, monkeypatch):
    monkeypatch.setattr(isa, "is_x86", lambda: True)
    assert isa.cpu_tiers(flags) == tiers
    monkeypatch.delenv("SHOAL_CPU_ISA", raising=False)
    assert isa.best_tier(flags) == tiers[-1]


def test_shoal_cpu_isa_caps_the_tier_and_refuses_more_than_the_cpu_has(monkeypatch):
    monkeypatch.setattr(isa, "is_x86", lambda: True)
    monkeypatch.setenv("SHOAL_CPU_ISA", "avx2")
    assert isa.best_tier(_ZEN4) == "avx2"
    monkeypatch.setenv("SHOAL_CPU_ISA", "AVX512")
    with pytest.raises(ValueError, match=r"SHOAL_CPU_ISA=avx512: this CPU runs only generic, avx2 .*avx512_bf16"):
        isa.best_tier(_ZEN3)
    monkeypatch.setenv("SHOAL_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="SHOAL_CPU_ISA must be one of generic, avx2, avx512, amx"):
        isa.best_tier(_ZEN3)


def test_tier_flags_never_name_the_build_machine():
    for tier in isa.TIERS:
        assert not any("native" in f for f in isa.compile_flags(tier))
