"""The OpenAI-compatible HTTP server: `build_app(engine, name)` for an app, `shoal serve` to run one."""

from __future__ import annotations

from typing import Any

__all__ = ["build_app", "run_server"]


def __getattr__(name: str) -> Any:  # lazy: `shoal --help` must not import FastAPI and torch
    if name in __all__:
        from shoal.server import api

        return getattr(api, name)
    raise AttributeError(name)
