"""Intel GPUs (Data Center GPU Max, Arc) through torch's built-in XPU backend (torch >= 2.5).

intel-extension-for-pytorch is optional and only reported, never imported here. Collectives use
"xccl" (torch >= 2.8) where torch has it, else oneCCL's "ccl", else gloo.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.distributed

from shoal.backends.base import Platform


def _xpu_dist_backend() -> str:
    try:
        if torch.distributed.is_available() and torch.distributed.is_xccl_available():  # type: ignore[attr-defined]
            return "xccl"
    except AttributeError:
        pass
    if importlib.util.find_spec("oneccl_bindings_for_pytorch") is not None:
        return "ccl"
    return "gloo"


class XpuPlatform(Platform):
    name = "xpu"
    device_type = "xpu"
    kv_block_size = 64
    vendor_libraries = ("intel-extension-for-pytorch", "oneccl-bind-pt")

    def __init__(self, index: int = 0) -> None:
        super().__init__(index)
        self.dist_backend = _xpu_dist_backend()

    def unavailable_reason(self) -> str | None:
        xpu = getattr(torch, "xpu", None)
        if xpu is None:
            return f"torch {torch.__version__} has no XPU backend (needs torch >= 2.5 built with XPU)"
        try:
            if not xpu.is_available() or xpu.device_count() == 0:
                return "torch sees no Intel GPU (torch build without XPU, or no driver)"
        except Exception as exc:  # noqa: BLE001
            return f"XPU initialisation failed: {exc}"
        return None

    def _idx(self, index: int | None) -> int:
        return self.index if index is None else index

    def device_count(self) -> int:
        return torch.xpu.device_count()

    def device_name(self, index: int | None = None) -> str:
        return torch.xpu.get_device_name(self._idx(index))

    def memory_info(self, index: int | None = None) -> tuple[int, int]:
        i = self._idx(index)
        if hasattr(torch.xpu, "mem_get_info"):
            free, total = torch.xpu.mem_get_info(i)
            return int(free), int(total)
        total = torch.xpu.get_device_properties(i).total_memory
        return int(total - torch.xpu.memory_reserved(i)), int(total)

    def supported_dtypes(self) -> list[torch.dtype]:
        bf16 = getattr(torch.xpu, "is_bf16_supported", lambda: True)()
        return [torch.float32, torch.bfloat16, torch.float16] if bf16 else [torch.float32, torch.float16]

    def synchronize(self, index: int | None = None) -> None:
        torch.xpu.synchronize(self._idx(index))

    def seed_everything(self, seed: int) -> None:
        torch.manual_seed(seed)
        torch.xpu.manual_seed_all(seed)

    def graph_capture(self) -> str | None:
        return None  # no graph capture API in torch.xpu yet; torch.compile is the fast path
