"""Huawei Ascend NPUs through `torch_npu` (the CANN adapter), which registers the "npu" device.

`torch_npu` is imported only inside this module's methods and only when it is installed, so
importing this module (or detecting platforms) never needs it. Collectives go over HCCL.
No op is overridden yet; torch_npu's fused kernels (npu_rms_norm, npu_fused_infer_attention_score,
…) belong here as overrides once someone can run `shoal conformance --device npu` on hardware.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from shoal.backends.base import Platform


def _torch_npu() -> Any:
    import torch_npu  # noqa: F401 — registers torch.npu

    return torch.npu  # type: ignore[attr-defined]


class NpuPlatform(Platform):
    name = "npu"
    device_type = "npu"
    dist_backend = "hccl"
    kv_block_size = 128  # Ascend attention kernels work on 128-token pages
    vendor_libraries = ("torch-npu",)

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("torch_npu") is None:
            return "torch_npu is not installed (pip install torch-npu, matching your CANN version)"
        try:
            npu = _torch_npu()
            if not npu.is_available() or npu.device_count() == 0:
                return "torch_npu sees no NPU (driver/CANN missing, or ASCEND_RT_VISIBLE_DEVICES hides them)"
        except Exception as exc:  # noqa: BLE001
            return f"torch_npu failed to initialise: {type(exc).__name__}: {exc}"
        return None

    def _idx(self, index: int | None) -> int:
        return self.index if index is None else index

    def device_count(self) -> int:
        return _torch_npu().device_count()

    def device_name(self, index: int | None = None) -> str:
        return _torch_npu().get_device_name(self._idx(index))

    def memory_info(self, index: int | None = None) -> tuple[int, int]:
        free, total = _torch_npu().mem_get_info(self._idx(index))
        return int(free), int(total)

    def supported_dtypes(self) -> list[torch.dtype]:
        npu = _torch_npu()
        bf16 = getattr(npu, "is_bf16_supported", lambda: False)()  # Atlas A2 (910B) and newer
        return [torch.float32, torch.bfloat16, torch.float16] if bf16 else [torch.float32, torch.float16]

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.supports_bf16() else torch.float16

    def supports_fp8(self) -> bool:
        return False  # no fp8 matmul on Atlas A2/A3; fp8 checkpoints are dequantized at load

    def synchronize(self, index: int | None = None) -> None:
        _torch_npu().synchronize(self._idx(index))

    def seed_everything(self, seed: int) -> None:
        torch.manual_seed(seed)
        _torch_npu().manual_seed_all(seed)

    def graph_capture(self) -> str | None:
        return "npu_graph" if hasattr(_torch_npu(), "NPUGraph") else None  # ACL graph (torch.npu.NPUGraph)

    def library_versions(self) -> dict[str, str]:
        out = super().library_versions()
        if importlib.util.find_spec("torch_npu") is not None:
            try:
                import torch_npu

                out["torch_npu"] = getattr(torch_npu, "__version__", "?")
                cann = getattr(getattr(torch_npu, "version", None), "cann", None)
                if cann:
                    out["cann"] = str(cann)
            except Exception as exc:  # noqa: BLE001
                out["torch_npu"] = f"import failed: {exc}"
        return out
