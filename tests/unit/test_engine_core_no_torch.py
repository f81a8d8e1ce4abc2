"""The engine core (request, block manager, scheduler) is pure Python: importing it loads no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_engine_core_imports_without_torch() -> None:
    code = (
        "import sys\n"
        "import shoal.engine.request, shoal.engine.block_manager, shoal.engine.scheduler\n"
        "heavy = sorted(m for m in ('torch', 'numpy') if m in sys.modules)\n"
        "assert not heavy, f'engine core imported {heavy}'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
