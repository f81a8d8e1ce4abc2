"""Resolve the platform once: built-ins in detection order, then `shoal.platforms` entry points."""

from __future__ import annotations

from shoal.backends.base import Platform

_ACTIVE: Platform | None = None


def builtin_platforms() -> dict[str, type[Platform]]:
    from shoal.backends.cpu import CpuPlatform

    return {"cpu": CpuPlatform}


def resolve_platform(device: str | None = None) -> Platform:
    plats = builtin_platforms()
    name = (device or "cpu").split(":")[0]
    if name not in plats:
        raise ValueError(f"unknown device {device!r}; known: {', '.join(plats)}")
    return plats[name]()


def set_platform(p: Platform) -> None:
    global _ACTIVE
    _ACTIVE = p


def current_platform() -> Platform:
    global _ACTIVE
    if _ACTIVE is None:
        _ACTIVE = resolve_platform(None)
    return _ACTIVE
