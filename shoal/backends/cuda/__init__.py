"""NVIDIA GPUs through torch's CUDA build, and AMD GPUs through torch's ROCm (HIP) build, which
exposes them as "cuda" devices. Vendor kernel libraries (flash-attn, …) are looked up by
distribution name only; an op override that uses one imports it inside the override.

No op is overridden yet: the native ops already reach cuDNN/flash SDPA through torch.
"""

from __future__ import annotations

import torch

from shoal.backends.base import Platform


def _cuda_reason(want_hip: bool) -> str | None:
    hip = getattr(torch.version, "hip", None)
    if want_hip and not hip:
        return f"torch {torch.__version__} is not a ROCm (HIP) build"
    if not want_hip and hip:
        return f"torch {torch.__version__} is a ROCm build (use the rocm platform)"
    if not want_hip and not torch.version.cuda:
        return f"torch {torch.__version__} was built without CUDA"
    try:
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            return "torch sees no GPU (driver missing, or CUDA_VISIBLE_DEVICES hides them)"
    except Exception as exc:  # noqa: BLE001 — a broken driver is a reason, not a crash
        return f"CUDA initialisation failed: {exc}"
    return None


class CudaPlatform(Platform):
    name = "cuda"
    device_type = "cuda"
    dist_backend = "nccl"
    kv_block_size = 16
    vendor_libraries = ("nvidia-cuda-runtime-cu12", "nvidia-cudnn-cu12", "nvidia-nccl-cu12", "flash-attn",
                        "triton")

    def unavailable_reason(self) -> str | None:
        return _cuda_reason(want_hip=False)

    def _idx(self, index: int | None) -> int:
        return self.index if index is None else index

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def device_name(self, index: int | None = None) -> str:
        return torch.cuda.get_device_name(self._idx(index))

    def memory_info(self, index: int | None = None) -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info(self._idx(index))
        return int(free), int(total)

    def capability(self, index: int | None = None) -> tuple[int, int]:
        return torch.cuda.get_device_capability(self._idx(index))

    def supported_dtypes(self) -> list[torch.dtype]:
        dts = [torch.float32, torch.float16]
        if torch.cuda.is_bf16_supported(including_emulation=False):  # Ampere (sm80) and newer
            dts.insert(1, torch.bfloat16)
        return dts

    def supports_fp8(self) -> bool:
        return self.capability() >= (8, 9)  # Ada (sm89) and Hopper (sm90) have fp8 tensor cores

    def synchronize(self, index: int | None = None) -> None:
        torch.cuda.synchronize(self._idx(index))

    def seed_everything(self, seed: int) -> None:
        torch.manual_seed(seed)
        torch.cuda.manual_seed_all(seed)

    def graph_capture(self) -> str | None:
        return "cuda_graph"  # torch.cuda.CUDAGraph

    def library_versions(self) -> dict[str, str]:
        out = super().library_versions()
        out["cuda (torch build)"] = str(torch.version.cuda)
        if torch.backends.cudnn.is_available():
            out["cudnn"] = str(torch.backends.cudnn.version())
        try:
            out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001
            pass
        if self.is_available():
            out["compute capability"] = "%d.%d" % self.capability()
        return out


class RocmPlatform(CudaPlatform):
    """AMD Instinct/Radeon through torch's HIP build: same torch API, RCCL behind "nccl"."""

    name = "rocm"
    vendor_libraries = ("pytorch-triton-rocm", "flash-attn")

    def unavailable_reason(self) -> str | None:
        return _cuda_reason(want_hip=True)

    def arch(self, index: int | None = None) -> str:
        return getattr(torch.cuda.get_device_properties(self._idx(index)), "gcnArchName", "")

    def supported_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]  # every ROCm-supported Instinct GPU (gfx90a+)

    def supports_fp8(self) -> bool:
        return self.arch().startswith(("gfx94", "gfx95", "gfx12"))  # MI300/MI350, RDNA4

    def graph_capture(self) -> str | None:
        return "hip_graph"  # torch.cuda.CUDAGraph on HIP

    def library_versions(self) -> dict[str, str]:
        out = Platform.library_versions(self)
        out["hip (torch build)"] = str(torch.version.hip)
        if self.is_available():
            out["arch"] = self.arch()
        return out
