"""The CPU's feature flags as Linux reports them, read independently of shoal's own probes, so a
test can say which kernel must have run on this machine."""

from __future__ import annotations


def has_cpu_flag(name: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and name in line.split() for line in f)
    except OSError:
        return False
