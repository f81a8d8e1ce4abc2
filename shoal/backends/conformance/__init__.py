"""`shoal conformance`: does this device compute what shoal computes on the CPU?

1. Ops: every op in the platform's table, on its device in each tested dtype, against the native
   op run in float64 on the CPU (and that reference against an independent slow oracle), on fresh
   random inputs in the shapes the supported models use (`checks.py`).
2. End to end: tiny random Llama, Qwen2 and DeepSeek-V3 checkpoints generated greedily through
   shoal on the device vs on the CPU in float32 (`e2e.py`).

The result is a `ConformanceReport` that renders to Markdown and JSON (`report.py`). Nothing is
reported as passed that did not run: a known op missing from the table, an op without a check,
or a model shoal cannot load yet is a visible "skip" / "not run" line.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import torch

from shoal.backends.base import Platform
from shoal.backends.conformance.checks import CHECKS, OpContext
from shoal.backends.conformance.compare import DTYPES, CaseResult, dtype_name
from shoal.backends.conformance.report import ConformanceReport, environment
from shoal.backends.native import KNOWN_OPS

__all__ = ["CHECKS", "ConformanceReport", "run_conformance", "run_op_checks"]


def _say(log: Callable[[str], None] | None, line: str) -> None:
    if log is not None:
        log(line)


def run_op_checks(
    platform: Platform,
    dtypes: list[torch.dtype],
    seed: int,
    ops: list[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[CaseResult]:
    """Every check of every op (or of `ops`) in every dtype; exceptions become "error" rows."""
    table = platform.op_table()
    sources = platform.op_sources()
    names = list(dict.fromkeys(list(table) + list(KNOWN_OPS)))
    if ops is not None:
        unknown = set(ops) - set(names)
        if unknown:
            raise ValueError(f"unknown op(s) {', '.join(sorted(unknown))}; ops: {', '.join(names)}")
        names = [n for n in names if n in ops]
    gen = torch.Generator().manual_seed(seed)
    results: list[CaseResult] = []
    for name in names:
        if name not in table:
            results.append(CaseResult(name, "-", "-", "-", "skip", detail="not in table: this op does not exist "
                                      "in shoal yet, so nothing was checked"))
            _say(log, f"  skip  {name}: not in table")
            continue
        check = CHECKS.get(name)
        if check is None:
            results.append(CaseResult(name, "-", "-", sources.get(name, "?"), "skip",
                                      detail="no conformance check for this op yet: it is NOT verified"))
            _say(log, f"  skip  {name}: no check")
            continue
        for dtype in dtypes:
            ctx = OpContext(platform, dtype, gen, platform.kv_block_size)
            for case, thunk in check(ctx):
                try:
                    res = thunk()
                except Exception as exc:  # noqa: BLE001 — a crashing op is a result, not a crash
                    res = CaseResult(name, case, dtype_name(dtype), sources.get(name, "?"), "error",
                                     detail=f"{type(exc).__name__}: {exc}"[:500])
                results.append(res)
                err = f"{res.error:.1e}" if res.error is not None else "-"
                _say(log, f"  {res.status:5} {name:16} {res.dtype:9} {err:>8}  {res.case}"
                          + (f"  ({res.detail})" if res.status != "pass" and res.detail else ""))
    return results


def run_conformance(
    platform: Platform,
    dtypes: list[str] | None = None,
    seed: int | None = None,
    ops: list[str] | None = None,
    e2e: bool = True,
    models: list[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> ConformanceReport:
    """The whole suite on one platform. `dtypes` defaults to every dtype the platform supports."""
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    if dtypes is None:
        dts = [d for d in platform.supported_dtypes() if dtype_name(d) in DTYPES]
    else:
        unknown = [d for d in dtypes if d not in DTYPES]
        if unknown:
            raise ValueError(f"unknown dtype(s) {', '.join(unknown)}; choose from {', '.join(DTYPES)}")
        dts = [DTYPES[d] for d in dtypes]
    start = time.time()
    _say(log, f"shoal conformance on {platform.name} ({platform.device_name()}), dtypes "
              f"{', '.join(dtype_name(d) for d in dts)}, seed {seed}")
    _say(log, "ops vs the float64 CPU reference:")
    op_results = run_op_checks(platform, dts, seed, ops, log)
    e2e_results = []
    if e2e:
        from shoal.backends.conformance.e2e import run_e2e

        _say(log, "end-to-end greedy parity vs the CPU in float32:")
        e2e_results = run_e2e(platform, [dtype_name(d) for d in dts], seed, models, log)
    return ConformanceReport(
        environment=environment(platform),
        dtypes=[dtype_name(d) for d in dts],
        seed=seed,
        ops=op_results,
        e2e=e2e_results,
        seconds=time.time() - start,
    )
