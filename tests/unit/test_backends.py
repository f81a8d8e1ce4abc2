"""The Platform interface and the registry: detection order, `--device` resolution and its
errors, vendor modules that import without their vendor library, op dispatch and the op table."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys

import pytest
import torch

from shoal.backends import ops, registry
from shoal.backends.base import Platform
from shoal.backends.cpu import CpuPlatform
from shoal.backends.native import KNOWN_OPS, NATIVE_OPS
from shoal.config import ConfigError

VENDOR_MODULES = ["shoal.backends.cuda", "shoal.backends.npu", "shoal.backends.xpu", "shoal.backends.mps"]


@pytest.fixture(autouse=True)
def _restore_platform():
    prev = registry._ACTIVE
    yield
    registry.set_platform(prev) if prev is not None else setattr(registry, "_ACTIVE", None)


def test_builtin_detection_order_ends_with_cpu():
    names = list(registry.builtin_platforms())
    assert names == ["cuda", "rocm", "npu", "xpu", "mps", "cpu"]


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="torch_npu is installed here")
def test_npu_module_imports_without_torch_npu_and_detection_skips_it():
    # in a fresh interpreter, so no other test has imported anything first
    code = (
        "import sys, shoal.backends.npu as m\n"
        "p = m.NpuPlatform()\n"
        "assert 'torch_npu' not in sys.modules\n"
        "assert not p.is_available() and 'torch_npu is not installed' in p.unavailable_reason()\n"
        "from shoal.backends.registry import detect_platform\n"
        "assert detect_platform().name != 'npu'\n"
        "assert 'torch_npu' not in sys.modules\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


@pytest.mark.parametrize("module", VENDOR_MODULES)
def test_vendor_modules_import_and_describe_without_hardware(module):
    mod = importlib.import_module(module)
    classes = [c for c in vars(mod).values() if isinstance(c, type) and issubclass(c, Platform) and c.__module__ == module]
    assert classes
    for cls in classes:
        p = cls()
        info = p.describe()  # never raises, even with no device
        assert info["name"] == cls.name
        assert set(info["op_sources"]) >= set(NATIVE_OPS)
        if not torch.cuda.is_available() and module == "shoal.backends.cuda":
            assert not info["available"] and info["reason"]


def test_platform_facts_of_builtins():
    from shoal.backends.cuda import CudaPlatform, RocmPlatform
    from shoal.backends.mps import MpsPlatform
    from shoal.backends.npu import NpuPlatform
    from shoal.backends.xpu import XpuPlatform

    assert (CudaPlatform.dist_backend, RocmPlatform.dist_backend, NpuPlatform.dist_backend) == ("nccl", "nccl", "hccl")
    assert XpuPlatform().dist_backend in ("xccl", "ccl", "gloo")
    assert MpsPlatform.dist_backend == CpuPlatform.dist_backend == "gloo"
    assert NpuPlatform.kv_block_size == 128
    assert CudaPlatform().device(1) == torch.device("cuda", 1)
    assert NpuPlatform(index=3).device() == torch.device("npu", 3) if hasattr(torch, "npu") else True


def test_cpu_platform_facts():
    p = CpuPlatform()
    free, total = p.memory_info()
    assert 0 < free <= total
    assert p.device() == torch.device("cpu")
    assert p.supports_bf16() and not p.supports_fp8()
    assert p.default_dtype() == torch.float32
    assert p.graph_capture() is None
    assert p.kv_cache_budget(2**40) == 2 * 2**30  # capped
    assert p.kv_cache_budget(2**30) == 2**28
    info = p.describe()
    assert info["available"] and info["devices"][0]["memory_total"] == total


def test_resolve_cpu_auto_and_index():
    assert isinstance(registry.resolve_platform("cpu"), CpuPlatform)
    assert registry.resolve_platform("auto").is_available()


def test_resolve_errors_are_clear_user_errors(monkeypatch):
    with pytest.raises(registry.PlatformError, match="unknown device 'tpu9'.*known: auto, .*cpu"):
        registry.resolve_platform("tpu9")
    with pytest.raises(registry.PlatformError, match="index after ':' must be a number"):
        registry.resolve_platform("cpu:x")
    with pytest.raises(registry.PlatformError, match="cpu has 1 device"):
        registry.resolve_platform("cpu:2")
    assert issubclass(registry.PlatformError, ConfigError)  # the CLI prints it as one line
    if not torch.cuda.is_available():
        with pytest.raises(registry.PlatformError, match="device 'cuda' is not available: torch .* without CUDA"):
            registry.resolve_platform("cuda")
    monkeypatch.setenv("SHOAL_DEVICE", "cpu")
    assert registry.resolve_platform(None).name == "cpu"


def test_ops_dispatch_to_the_active_platforms_override():
    calls = []

    def my_linear(x, w, b):
        calls.append(x.shape)
        return NATIVE_OPS["linear"](x, w, b)

    class Chip(CpuPlatform):
        name = "chip"
        op_overrides = {"linear": my_linear}

    p = Chip()
    registry.set_platform(p)
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    assert torch.equal(ops.linear(x, w, None), x @ w.t())
    assert calls == [torch.Size([2, 4])]
    assert ops.rms_norm is NATIVE_OPS["rms_norm"]
    assert p.op_sources()["linear"].endswith("my_linear") and p.op_sources()["rms_norm"] == "native"
    with pytest.raises(AttributeError, match="no op 'warp_drive'"):
        ops.warp_drive


def test_a_platforms_own_rms_norm_runs_after_the_add_when_it_has_no_fused_form():
    calls = []

    def my_norm(x, w, eps):
        calls.append(x.shape)
        return x * 2

    class Chip(Platform):
        name = "chip"
        op_overrides = {"rms_norm": my_norm}

    p = Chip()
    x, r = torch.randn(3, 4), torch.randn(3, 4)
    normed, total = p.op("add_rms_norm")(x, r, torch.ones(4), 1e-6)
    assert torch.equal(total, x + r) and torch.equal(normed, (x + r) * 2) and calls == [torch.Size([3, 4])]
    assert p.op_sources()["add_rms_norm"].startswith("add, then ") and p.op_sources()["add_rms_norm"].endswith("my_norm")
    assert Platform().op("add_rms_norm") is NATIVE_OPS["add_rms_norm"]


def test_op_sources_list_known_ops_missing_from_the_table():
    src = Platform().op_sources()  # no overrides
    assert list(src)[: len(NATIVE_OPS)] == list(NATIVE_OPS)
    for name in KNOWN_OPS:
        assert src[name] == ("native" if name in NATIVE_OPS else "not in table")
    monkey = dict(NATIVE_OPS)
    monkey.pop("sample")
    import shoal.backends.base as base

    old = base.NATIVE_OPS
    base.NATIVE_OPS = monkey
    try:
        assert Platform().op_sources()["sample"] == "not in table"
    finally:
        base.NATIVE_OPS = old


def test_native_ops_run_in_float64():
    """The conformance reference runs every native op in float64: no op may drop to float32."""
    x = torch.randn(3, 8, dtype=torch.float64)
    w = torch.rand(8, dtype=torch.float64)
    y = NATIVE_OPS["rms_norm"](x, w, 1e-6)
    assert y.dtype == torch.float64
    expect = x * w / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)
    assert (y - expect).abs().max() < 1e-14  # float32 arithmetic would leave ~1e-7
