"""Apple silicon GPUs through torch's Metal (MPS) backend: one device, unified memory.

bfloat16 needs macOS 14 or newer; there is no fp8 and no multi-device collective (gloo on CPU).
"""

from __future__ import annotations

import torch

from shoal.backends.base import Platform
from shoal.backends.cpu import _meminfo


class MpsPlatform(Platform):
    name = "mps"
    device_type = "mps"
    dist_backend = "gloo"
    kv_block_size = 16
    kv_cache_fraction = 0.5  # unified memory: the rest of the machine lives in it too

    def unavailable_reason(self) -> str | None:
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_built():
            return f"torch {torch.__version__} was built without MPS (Apple silicon, macOS only)"
        if not mps.is_available():
            return "MPS is built but not available (needs macOS 12.3+ on Apple silicon)"
        return None

    def device(self, index: int | None = None) -> torch.device:
        return torch.device("mps")

    def device_count(self) -> int:
        return 1

    def device_name(self, index: int | None = None) -> str:
        return "Apple silicon GPU (MPS)"

    def memory_info(self, index: int | None = None) -> tuple[int, int]:
        rec = getattr(torch.mps, "recommended_max_memory", None)
        total = int(rec()) if rec else _meminfo()[1]
        used = int(torch.mps.driver_allocated_memory())
        return max(0, total - used), total

    def supported_dtypes(self) -> list[torch.dtype]:
        newer = getattr(torch.backends.mps, "is_macos_or_newer", None)
        bf16 = bool(newer and newer(14, 0))
        return [torch.float32, torch.bfloat16, torch.float16] if bf16 else [torch.float32, torch.float16]

    def synchronize(self, index: int | None = None) -> None:
        torch.mps.synchronize()

    def seed_everything(self, seed: int) -> None:
        torch.manual_seed(seed)
        torch.mps.manual_seed(seed)
