"""Sweep >= 10,000 planner configurations and time it (target: < 2 s on a 2-core CI machine).

    .venv/bin/python benchmarks/planner_sweep.py
Each configuration is one (chip, device count, TP, EP, precision, batch) decode prediction at
ISL 4096 / OSL 1024 for DeepSeek-R1, plus the prefill pool search, exactly as `shoal plan` runs it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shoal.planner.chips import Catalog  # noqa: E402
from shoal.planner.model import ModelSpec  # noqa: E402
from shoal.planner.search import plan_chip  # noqa: E402

CHIPS = ["h800", "h20", "h200", "h100", "b200", "mi300x", "mi325x", "ascend-910c"]
BATCHES = tuple(range(1, 513, 16))


def main() -> int:
    cat = Catalog.load()
    for c in cat.chips.values():  # let multi-node EP be evaluated on every chip (assumed 50 GB/s NIC)
        if c.v("scaleout_gbs") is None and c.v("ep_rdma_gbs") is None:
            c.raw["scaleout_gbs"] = {"value": 50.0, "src": "benchmark assumption", "conf": "user"}
    spec = ModelSpec.load("deepseek-r1")
    t0 = time.perf_counter()
    n = 0
    for name in CHIPS:
        chip = cat.get(name)
        plan = plan_chip(spec, chip, cat.efficiency_for(chip), isl=4096, osl=1024, tpot_ms=1e9,
                         precisions=("fp8", "int8", "bf16"), batches=BATCHES)
        n += plan.evaluated
    dt = time.perf_counter() - t0
    print(f"evaluated {n} configurations in {dt:.2f} s ({dt / n * 1e6:.0f} us each)")
    return 0 if n >= 10_000 else 1


if __name__ == "__main__":
    raise SystemExit(main())
