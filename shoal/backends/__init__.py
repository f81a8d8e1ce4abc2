"""Hardware backends: the Platform interface, built-in platforms, plug-ins and op dispatch."""

from shoal.backends.base import Platform
from shoal.backends.registry import current_platform, resolve_platform, set_platform

__all__ = ["Platform", "current_platform", "resolve_platform", "set_platform"]
