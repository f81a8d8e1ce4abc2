"""ISA tiers of shoal's CPU kernels: which ones this CPU runs, and the one in use.

Every kernel family is compiled once per tier, each tier with its own flags (never `-march=native`,
so a build, or a cache copied between machines, runs on any CPU that has the tier's features), and
the best tier the CPU supports is loaded at run time:

| tier    | compiler flags                                   | CPU features it needs                      |
|---------|--------------------------------------------------|--------------------------------------------|
| generic | none (portable C: any x86-64 or aarch64 CPU)     | —                                          |
| avx2    | -march=x86-64-v3                                 | AVX2, FMA, F16C, BMI1/2, LZCNT, MOVBE      |
| avx512  | -march=x86-64-v4 -mavx512vnni -mavx512bf16       | AVX-512 F/BW/CD/DQ/VL, VNNI and BF16       |
| amx     | avx512's, plus -mamx-tile -mamx-bf16 -mamx-int8  | avx512's, plus AMX tiles, BF16 and INT8    |

A CPU with AVX-512 but without VNNI or BF16 (Skylake-SP) runs the avx2 tier.
`SHOAL_CPU_ISA=generic|avx2|avx512|amx` caps the tier (tests run each lower tier against the plain-torch
reference this way); asking for a tier this CPU lacks is an error that names the tiers it has.
Pure stdlib: the planner and `shoal doctor` may ask without torch.
"""
from __future__ import annotations

import os
import platform

TIERS = ("generic", "avx2", "avx512", "amx")

_V3 = {"avx2", "fma", "f16c", "bmi1", "bmi2", "abm", "movbe", "popcnt", "sse4_2", "ssse3"}
_V4 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
NEEDS: dict[str, frozenset[str]] = {
    "generic": frozenset(),
    "avx2": frozenset(_V3),
    "avx512": frozenset(_V3 | _V4 | {"avx512_vnni", "avx512_bf16"}),
    "amx": frozenset(_V3 | _V4 | {"avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}),
}
_X86_FLAGS = {
    "generic": [],
    "avx2": ["-march=x86-64-v3"],
    "avx512": ["-march=x86-64-v4", "-mavx512vnni", "-mavx512bf16"],
    "amx": ["-march=x86-64-v4", "-mavx512vnni", "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-mamx-int8"],
}


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


def buildable() -> tuple[str, ...]:
    """The tiers a compiler for this machine's architecture can build (all four on x86-64, so that
    the build serves any x86-64 CPU; the generic one elsewhere)."""
    return TIERS if is_x86() else ("generic",)


def compile_flags(tier: str) -> list[str]:
    return list(_X86_FLAGS[tier]) if is_x86() else []


def cpuinfo_field(name: str) -> str | None:
    """One field of the first CPU in /proc/cpuinfo ("flags", "model name"); None where there is no
    such file or field. The one place shoal reads it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo names them (empty where there is no such file)."""
    return frozenset((cpuinfo_field("flags") or "").split())


def cpu_tiers(flags: frozenset[str] | None = None) -> tuple[str, ...]:
    """The tiers this CPU can run, lowest first."""
    if not is_x86():
        return ("generic",)
    flags = cpu_flags() if flags is None else flags
    return tuple(t for t in TIERS if NEEDS[t] <= flags)


def requested() -> str | None:
    """SHOAL_CPU_ISA, checked: None when unset."""
    value = os.environ.get("SHOAL_CPU_ISA", "").strip().lower()
    if not value:
        return None
    if value not in TIERS:
        raise ValueError(f"SHOAL_CPU_ISA must be one of {', '.join(TIERS)}, not {value!r}")
    return value


def best_tier(flags: frozenset[str] | None = None, cap: str | None = None) -> str:
    """The tier to run: the best this CPU has, capped at `cap` (default SHOAL_CPU_ISA). A cap above
    what the CPU has is a ValueError naming the CPU's tiers."""
    have = cpu_tiers(flags)
    cap = requested() if cap is None else cap
    if cap is None:
        return have[-1]
    if cap not in have:
        raise ValueError(f"SHOAL_CPU_ISA={cap}: this CPU runs only {', '.join(have)} "
                         f"(the {cap} tier needs {', '.join(sorted(NEEDS[cap] - (flags or cpu_flags())))})")
    return cap


def at_least(tier: str, floor: str) -> bool:
    return TIERS.index(tier) >= TIERS.index(floor)
