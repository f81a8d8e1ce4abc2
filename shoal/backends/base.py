"""The Platform interface: everything the engine needs to know about, or do on, a device.

A platform is resolved once at start-up (`shoal.backends.registry`): a built-in one (cpu, cuda,
rocm, npu, xpu, mps) or a third-party plug-in from the entry-point group `shoal.platforms`.
Layers never ask which device they run on; they call ops through `shoal.backends.ops`, which
dispatches to the active platform's override or to the plain-torch `native` form.

A new accelerator subclasses `Platform`, fills in the device facts, and overrides only the ops it
does better (`op_overrides`, same signatures as `shoal.backends.native`). `shoal conformance`
then checks every op of its table against a float64 CPU reference.
"""

from __future__ import annotations

import functools
import importlib.metadata
from typing import Any, Callable

import torch

from shoal.backends.native import KNOWN_OPS, NATIVE_OPS, add_then_norm

# Ops that a platform without its own form of them composes from its form of the op under them:
# name -> (the op under it, builder(that op, *args), source label prefix). A platform with its own
# RMSNorm but no fused add + RMSNorm keeps its RMSNorm after the add.
COMPOSED_OPS: dict[str, tuple[str, Callable[..., Any], str]] = {"add_rms_norm": ("rms_norm", add_then_norm, "add, then ")}


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def dist_version(dist: str) -> str | None:
    """Installed version of a distribution, found without importing it (None when absent)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


class Platform:
    name: str = "base"  # what `--device` accepts
    device_type: str = "cpu"  # torch device type the tensors live on
    dist_backend: str = "gloo"  # torch.distributed backend for collectives on this device
    kv_block_size: int = 16  # tokens per paged-cache block the platform's kernels prefer
    # compiled decode: batches up to this size share one graph with a symbolic batch size (the
    # range of the platform's small-batch matmul kernels); larger ones are padded to static sizes
    decode_small_batch_max: int = 8
    kv_layout: str = "NHD"  # "NHD" = cache [blocks, block_size, heads, dim]
    kv_cache_fraction: float = 0.9  # share of free memory (after weights) the KV cache takes by default
    kv_cache_max_bytes: int | None = None  # and at most this much (None: no cap)
    # distributions whose versions `shoal doctor` shows (looked up, never imported)
    vendor_libraries: tuple[str, ...] = ()
    # op name -> callable with the same signature as shoal.backends.native.<name>
    op_overrides: dict[str, Callable[..., Any]] = {}

    def __init__(self, index: int = 0) -> None:
        self.index = index

    # ---- device facts
    def is_available(self) -> bool:
        return self.unavailable_reason() is None

    def unavailable_reason(self) -> str | None:
        """None when the platform can run here, else a sentence saying why not."""
        return None

    def device(self, index: int | None = None) -> torch.device:
        if self.device_type == "cpu":
            return torch.device("cpu")
        return torch.device(self.device_type, self.index if index is None else index)

    def device_count(self) -> int:
        return 1

    def device_name(self, index: int | None = None) -> str:
        return self.device_type

    def memory_info(self, index: int | None = None) -> tuple[int, int]:
        """(free bytes, total bytes) of the device memory."""
        raise NotImplementedError(f"platform {self.name!r} does not report memory")

    def supported_dtypes(self) -> list[torch.dtype]:
        """Compute dtypes the model may run in (weights, activations, KV cache)."""
        return [torch.float32, torch.bfloat16, torch.float16]

    def supports_dtype(self, dtype: torch.dtype) -> bool:
        return dtype in self.supported_dtypes()

    def supports_bf16(self) -> bool:
        return self.supports_dtype(torch.bfloat16)

    def supports_fp8(self) -> bool:
        """Native fp8 matmul (e4m3/e5m2); without it fp8 checkpoints are dequantized at load."""
        return False

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.supports_bf16() else torch.float16

    def library_versions(self) -> dict[str, str]:
        out = {"torch": torch.__version__}
        for dist in self.vendor_libraries:
            out[dist] = dist_version(dist) or "not installed"
        return out

    # ---- execution
    def synchronize(self, index: int | None = None) -> None:
        return None

    def seed_everything(self, seed: int) -> None:
        torch.manual_seed(seed)  # seeds the CPU and every device generator torch knows

    def graph_capture(self) -> str | None:
        """Name of the graph-capture mechanism (e.g. "cuda_graph"), or None."""
        return None

    def warm_up_prompt_tokens(self, chunk: int) -> int:
        """How many prompt tokens the start-up warm-up runs in one step (up to a full prompt chunk):
        enough that every weight form prompt rows need is built before the first request. The
        default is the whole chunk; a platform whose prompt rows use no form a 96-token prompt does
        not build may ask for less, and start faster."""
        return chunk

    def op_kernels(self) -> dict[str, str]:
        """For `shoal doctor`: which kernel (and instruction set) each overridden op runs on this
        device, where the platform can say more than the op's module path."""
        return {}

    def decode_fused(self, model: Any, max_rows: int) -> bool:
        """True when this platform runs every decode step of `model` (caches bound, up to `max_rows`
        rows) as one call through all its layers (`dense_decoder_stack` on the model's
        backends.specs.DenseStackSpec), so that compiling the step
        would add only the compiled graph's own per-call overhead; the model runner then does not
        compile it."""
        return False

    def kv_cache_budget(self, free_bytes: int) -> int:
        """Default KV-cache size in bytes, given the device's free memory once weights are loaded
        (`--kv-cache-memory` overrides it)."""
        budget = int(free_bytes * self.kv_cache_fraction)
        return budget if self.kv_cache_max_bytes is None else min(budget, self.kv_cache_max_bytes)

    def kv_cache_layout(self) -> str:
        """Preferred paged-cache layout: "NHD" = [blocks, block_size, heads, dim]."""
        return self.kv_layout

    # ---- ops
    def _composed(self, name: str) -> tuple[Callable[..., Any], str] | None:
        """A composed op (COMPOSED_OPS) built on this platform's own form of the op under it, with its
        source label; None when the platform has no such form."""
        under, build, label = COMPOSED_OPS.get(name, (None, None, ""))
        fn = self.op_overrides.get(under) if under else None
        return None if fn is None else (functools.partial(build, fn), f"{label}{_qualname(fn)}")

    def op(self, name: str) -> Callable[..., Any]:
        fn = self.op_overrides.get(name)
        if fn is not None:
            return fn
        composed = self._composed(name)
        if composed is not None:
            return composed[0]
        try:
            return NATIVE_OPS[name]
        except KeyError:
            raise AttributeError(f"no op {name!r} in the op table (ops: {', '.join(NATIVE_OPS)})") from None

    def op_table(self) -> dict[str, Callable[..., Any]]:
        """Every op this platform runs: its overrides over the native table."""
        return {name: self.op(name) for name in NATIVE_OPS}

    def op_sources(self) -> dict[str, str]:
        """For each known op, which implementation this platform uses ("native", an override's
        qualified name, "add, then <its rms_norm>" for a composed op, or "not in table" for a known op
        nobody has added yet)."""
        out = {}
        for name in list(NATIVE_OPS) + [n for n in KNOWN_OPS if n not in NATIVE_OPS]:
            fn, composed = self.op_overrides.get(name), self._composed(name)
            if fn is not None:
                out[name] = _qualname(fn)
            elif composed is not None:
                out[name] = composed[1]
            else:
                out[name] = "native" if name in NATIVE_OPS else "not in table"
        return out

    def describe(self) -> dict[str, Any]:
        """The facts `shoal doctor` prints, gathered without raising."""
        info: dict[str, Any] = {"name": self.name, "device_type": self.device_type}
        reason = _safe(self.unavailable_reason)
        info["available"] = reason is None
        if reason is not None:
            info["reason"] = reason
        info["library_versions"] = _safe(self.library_versions)
        info["op_sources"] = _safe(self.op_sources)
        info["op_kernels"] = _safe(self.op_kernels)
        if reason is not None:
            return info
        devices = []
        for i in range(_safe(self.device_count) or 0):
            mem = _safe(lambda i=i: self.memory_info(i))
            devices.append({
                "index": i,
                "name": _safe(lambda i=i: self.device_name(i)),
                "memory_free": mem[0] if isinstance(mem, tuple) else None,
                "memory_total": mem[1] if isinstance(mem, tuple) else None,
            })
        info["devices"] = devices
        info["dtypes"] = [str(d).removeprefix("torch.") for d in (_safe(self.supported_dtypes) or [])]
        dd = _safe(self.default_dtype)
        info["default_dtype"] = str(dd).removeprefix("torch.") if dd is not None else None
        info["fp8"] = _safe(self.supports_fp8)
        info["dist_backend"] = self.dist_backend
        info["graph_capture"] = _safe(self.graph_capture)
        info["kv_block_size"] = self.kv_block_size
        info["kv_layout"] = _safe(self.kv_cache_layout)
        if devices and devices[0]["memory_free"] is not None:
            info["kv_cache_default_bytes"] = _safe(lambda: self.kv_cache_budget(devices[0]["memory_free"]))
        return info

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}:{self.index}>"


def _safe(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 — doctor reports, never crashes
        return f"error: {type(exc).__name__}: {exc}"
