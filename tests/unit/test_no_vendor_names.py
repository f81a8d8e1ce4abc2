"""Model and layer code names no device or vendor: a device-specific path is an op override in
`shoal/backends/`, never an `if is_npu:` in a model (ARCHITECTURE.md)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "shoal"
# whole words, where "_" also separates words (so `x.is_cuda` and `torch_npu` are caught)
VENDOR = re.compile(r"(?<![a-z0-9])(cuda|npu|torch_npu|xpu|mps|hip|rocm|ascend)(?![a-z0-9])", re.IGNORECASE)


def _hits(folder: str) -> list[str]:
    out = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if VENDOR.search(line):
                out.append(f"{path.relative_to(ROOT.parent)}:{n}: {line.strip()}")
    return out


def test_pattern_catches_vendor_names():
    """The scan can fail: it flags the spellings a model file would use."""
    for line in ["if x.is_cuda:", "import torch_npu", "device='xpu'", "torch.backends.mps", "# Ascend 910B",
                 "torch.version.hip", "ROCm path"]:
        assert VENDOR.search(line), line
    for line in ["self.npus_count = mpsx + chips", "relationship", "cudagraphs"]:
        assert not VENDOR.search(line), line  # whole words only


def test_models_name_no_device_or_vendor():
    files = list((ROOT / "models").rglob("*.py"))
    assert files, "no model files found: the scan would prove nothing"
    assert not _hits("models"), "\n".join(_hits("models"))


def test_layers_name_no_device_or_vendor():
    assert list((ROOT / "layers").rglob("*.py"))
    assert not _hits("layers"), "\n".join(_hits("layers"))
