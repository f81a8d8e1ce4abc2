"""The CPU platform: plain torch with oneDNN/AMX underneath; memory from /proc/meminfo."""

from __future__ import annotations

import os

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
    except OSError:
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

    def device_count(self) -> int:
        return 1

    def device_name(self, index: int = 0) -> str:
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return "cpu"

    def memory_info(self, index: int = 0) -> tuple[int, int]:
        return _meminfo()

    def kv_cache_budget(self, free_bytes: int) -> int:
        # host memory is shared with everything else: a tenth of what is free, at most 2 GiB
        return min(free_bytes // 10, 2 * 2**30)

    def has_fast_bf16(self) -> bool:
        flags = _cpu_flags()
        return "avx512_bf16" in flags or "amx_bf16" in flags

    def default_dtype(self) -> torch.dtype:
        return torch.float32

    def physical_cores(self) -> int:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
