"""The Platform interface: everything the engine needs to know about, or do on, a device.

A platform is resolved once at start-up (`shoal.backends.registry`). Layers never ask which device
they run on; they call ops through `shoal.backends.ops`, which dispatches to the active platform's
override or to the plain-torch `native` form.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from shoal.backends.native import NATIVE_OPS


class Platform:
    name: str = "base"
    device_type: str = "cpu"
    dist_backend: str = "gloo"
    kv_block_size: int = 16
    # op name -> callable with the same signature as shoal.backends.native.<name>
    op_overrides: dict[str, Callable[..., Any]] = {}

    # ---- device facts
    def is_available(self) -> bool:
        return True

    def device(self, index: int = 0) -> torch.device:
        return torch.device(self.device_type, index) if self.device_type != "cpu" else torch.device("cpu")

    def device_count(self) -> int:
        return 1

    def device_name(self, index: int = 0) -> str:
        return self.device_type

    def memory_info(self, index: int = 0) -> tuple[int, int]:
        """(free bytes, total bytes) of the device memory."""
        raise NotImplementedError

    def kv_cache_budget(self, free_bytes: int) -> int:
        """Bytes for the KV cache when the user gives no --kv-cache-memory (after weights load)."""
        return int(free_bytes * 0.85)

    def supported_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def supports_fp8(self) -> bool:
        return False

    def library_versions(self) -> dict[str, str]:
        return {"torch": torch.__version__}

    # ---- execution
    def synchronize(self, index: int = 0) -> None:
        return None

    def seed_everything(self, seed: int) -> None:
        torch.manual_seed(seed)

    def graph_capture(self) -> str | None:
        """Name of the graph-capture mechanism (e.g. "cuda_graph"), or None."""
        return None

    def kv_cache_layout(self) -> str:
        """Preferred paged-cache layout: "NHD" = [blocks, block_size, heads, dim]."""
        return "NHD"

    # ---- ops
    def op(self, name: str) -> Callable[..., Any]:
        return self.op_overrides.get(name) or NATIVE_OPS[name]

    def op_sources(self) -> dict[str, str]:
        """For each op, which implementation this platform uses."""
        out = {}
        for name in NATIVE_OPS:
            fn = self.op_overrides.get(name)
            out[name] = f"{fn.__module__}.{fn.__qualname__}" if fn else "native"
        return out
