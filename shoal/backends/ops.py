"""Op dispatch: `ops.rms_norm(...)` calls the active platform's override or the native form.

Layers import this module and nothing device-specific. The lookup is one dict access per call.
"""

from __future__ import annotations

from typing import Any

from shoal.backends.registry import current_platform


def __getattr__(name: str) -> Any:
    return current_platform().op(name)
