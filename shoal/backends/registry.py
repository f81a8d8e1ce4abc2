"""Resolve the platform once: third-party plug-ins, then built-ins in detection order.

Built-ins, in detection order: cuda (NVIDIA; `rocm` on torch's HIP build), npu (Ascend, through
torch_npu), xpu (Intel), mps (Apple), cpu. Each lives in `backends/<vendor>/` and imports its
vendor library only inside its own methods, so importing this module never needs one.

Third-party platforms declare an entry point in the group `shoal.platforms`:

    [project.entry-points."shoal.platforms"]
    mychip = "mychip_shoal:MyChipPlatform"

and are loaded on first use. A plug-in that fails to load is reported with its name and left
out: auto-detection falls back to the built-ins, while `--device <that plug-in>` stops with the
plug-in's error. `SHOAL_PLUGINS=a,b` loads only the named plug-ins (empty: none);
`SHOAL_DEVICE` is the default for `--device`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
from dataclasses import dataclass

from shoal.backends.base import Platform
from shoal.config import ConfigError

log = logging.getLogger("shoal")

PLUGIN_GROUP = "shoal.platforms"

# name -> "module:Class", in detection order (first available wins)
BUILTIN_PLATFORMS = {
    "cuda": "shoal.backends.cuda:CudaPlatform",
    "rocm": "shoal.backends.cuda:RocmPlatform",
    "npu": "shoal.backends.npu:NpuPlatform",
    "xpu": "shoal.backends.xpu:XpuPlatform",
    "mps": "shoal.backends.mps:MpsPlatform",
    "cpu": "shoal.backends.cpu:CpuPlatform",
}

_ACTIVE: Platform | None = None
_PLUGINS: "PluginScan | None" = None


class PlatformError(ConfigError):
    """The requested device cannot be used; the message says why and what to do."""


@dataclass(slots=True)
class PluginInfo:
    name: str
    value: str  # "module:Class"
    dist: str | None  # the distribution that declared it
    cls: type[Platform] | None = None
    error: str | None = None  # one line: why it failed to load


@dataclass(slots=True)
class PluginScan:
    plugins: list[PluginInfo]

    @property
    def loaded(self) -> dict[str, type[Platform]]:
        return {p.name: p.cls for p in self.plugins if p.cls is not None}

    @property
    def failed(self) -> list[PluginInfo]:
        return [p for p in self.plugins if p.error is not None]


def _load_class(value: str) -> type[Platform]:
    module, _, attr = value.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, Platform)):
        raise TypeError(f"{value} is not a subclass of shoal.backends.base.Platform")
    return obj


def builtin_platforms() -> dict[str, type[Platform]]:
    return {name: _load_class(value) for name, value in BUILTIN_PLATFORMS.items()}


def scan_plugins(refresh: bool = False) -> PluginScan:
    """Load every `shoal.platforms` entry point once; failures are recorded, never raised."""
    global _PLUGINS
    if _PLUGINS is not None and not refresh:
        return _PLUGINS
    allow = os.environ.get("SHOAL_PLUGINS")
    allowed = None if allow is None else {a.strip() for a in allow.split(",") if a.strip()}
    found: list[PluginInfo] = []
    try:
        eps = importlib.metadata.entry_points(group=PLUGIN_GROUP)
    except Exception as exc:  # noqa: BLE001 — a broken metadata dir must not stop shoal
        log.warning("shoal: could not read %s entry points: %s", PLUGIN_GROUP, exc)
        eps = []
    seen: set[str] = set()
    for ep in eps:
        if ep.name in seen or (allowed is not None and ep.name not in allowed):
            continue
        seen.add(ep.name)
        dist = getattr(getattr(ep, "dist", None), "name", None)
        info = PluginInfo(ep.name, ep.value, dist)
        try:
            info.cls = _load_class(ep.value)
        except BaseException as exc:  # noqa: BLE001 — SystemExit from a plug-in is still its error
            if isinstance(exc, KeyboardInterrupt):
                raise
            info.error = f"{type(exc).__name__}: {exc}"
            log.warning(
                "shoal: platform plug-in %r (%s%s) failed to load: %s; continuing without it",
                ep.name, ep.value, f", from {dist}" if dist else "", info.error,
            )
        found.append(info)
    _PLUGINS = PluginScan(found)
    return _PLUGINS


def all_platforms() -> dict[str, type[Platform]]:
    """Plug-ins first (a vendor package was installed on purpose), then built-ins. A plug-in
    with a built-in's name replaces it."""
    plugins = scan_plugins().loaded
    out = dict(plugins)
    for name, cls in builtin_platforms().items():
        out.setdefault(name, cls)
    return out


def _instantiate(name: str, cls: type[Platform], index: int) -> Platform:
    try:
        p = cls()
    except Exception as exc:
        raise PlatformError(f"platform {name!r} ({cls.__module__}.{cls.__qualname__}) failed to start: "
                            f"{type(exc).__name__}: {exc}") from exc
    p.index = index
    return p


def detect_platform() -> Platform:
    """The first available platform in detection order (cpu is always available)."""
    for name, cls in all_platforms().items():
        try:
            p = _instantiate(name, cls, 0)
            if p.is_available():
                return p
        except Exception as exc:  # noqa: BLE001 — one broken platform must not hide the rest
            log.warning("shoal: skipping platform %r during detection: %s", name, exc)
    from shoal.backends.cpu import CpuPlatform

    return CpuPlatform()


def resolve_platform(device: str | None = None) -> Platform:
    """`--device` value ("cuda", "cuda:1", "npu", a plug-in name, "auto"/None) → a Platform."""
    device = device or os.environ.get("SHOAL_DEVICE") or "auto"
    if device == "auto":
        return detect_platform()
    name, _, idx = device.partition(":")
    try:
        index = int(idx) if idx else 0
    except ValueError:
        raise PlatformError(f"bad device {device!r}: the index after ':' must be a number") from None
    plats = all_platforms()
    if name not in plats:
        failed = {p.name: p for p in scan_plugins().failed}
        if name in failed:
            p = failed[name]
            raise PlatformError(f"platform plug-in {name!r} ({p.value}{', from ' + p.dist if p.dist else ''}) "
                                f"failed to load: {p.error}")
        raise PlatformError(f"unknown device {device!r}; known: auto, {', '.join(plats)}")
    p = _instantiate(name, plats[name], index)
    reason = p.unavailable_reason()
    if reason is not None and name == "cuda":
        # torch's HIP build exposes AMD GPUs as "cuda" devices
        rocm = _instantiate("rocm", plats["rocm"], index)
        if rocm.is_available():
            return rocm
    if reason is not None:
        raise PlatformError(f"device {device!r} is not available: {reason}")
    if index >= p.device_count():
        raise PlatformError(f"device {device!r}: {name} has {p.device_count()} device(s)")
    return p


def set_platform(p: Platform) -> None:
    global _ACTIVE
    _ACTIVE = p


def current_platform() -> Platform:
    global _ACTIVE
    if _ACTIVE is None:
        _ACTIVE = resolve_platform(None)
    return _ACTIVE
