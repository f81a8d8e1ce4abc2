"""The CPU platform: plain torch with oneDNN underneath; memory from /proc/meminfo.

Every op uses its native form here, so the CPU run of `shoal conformance` checks the native ops
themselves (against the independent slow references in the suite).
"""

from __future__ import annotations

import os
import platform as _pyplatform

import torch

from shoal.backends.base import Platform


def _meminfo() -> tuple[int, int]:
    vals = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                k, v = line.split(":", 1)
                vals[k] = int(v.strip().split()[0]) * 1024
        return vals.get("MemAvailable", 0), vals.get("MemTotal", 0)
    except (OSError, ValueError, IndexError):
        pass
    try:  # other POSIX systems: total only; report it as free too rather than nothing
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total, total
    except (ValueError, OSError, AttributeError):
        return 0, 0


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"
    kv_block_size = 16
    # RAM is shared with the OS and every other process: a quarter of what is available, ≤ 4 GiB
    kv_cache_fraction = 0.25
    kv_cache_max_bytes = 4 * 2**30

    def device_count(self) -> int:
        return 1

    def device_name(self, index: int | None = None) -> str:
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return _pyplatform.processor() or "cpu"

    def memory_info(self, index: int | None = None) -> tuple[int, int]:
        return _meminfo()

    def has_fast_bf16(self) -> bool:
        flags = _cpu_flags()
        return "avx512_bf16" in flags or "amx_bf16" in flags

    def default_dtype(self) -> torch.dtype:
        return torch.float32

    def library_versions(self) -> dict[str, str]:
        out = super().library_versions()
        out["threads"] = str(torch.get_num_threads())
        out["onednn"] = "yes" if torch.backends.mkldnn.is_available() else "no"
        out["fast bf16 (avx512_bf16/amx)"] = "yes" if self.has_fast_bf16() else "no"
        return out

    def physical_cores(self) -> int:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
