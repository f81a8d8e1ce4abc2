"""Suite-wide settings.

- hypothesis: no deadlines and no "too slow" health check: no test may depend on how fast or how busy
  the machine is.
- `cpu_tier`: a test (or module) that asks for it runs once per ISA tier of shoal's CPU kernels this
  CPU has (generic, avx2, avx512, amx: backends/cpu/isa.py), capped by SHOAL_CPU_ISA, each against the
  same plain-torch references. A tier the CPU has whose kernels did not build or load fails the test;
  the summary at the end says which tiers ran.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

from shoal.backends.cpu import isa

settings.register_profile("shoal", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("shoal")

_cap = isa.requested()
TIERS = tuple(t for t in isa.cpu_tiers() if _cap is None or isa.at_least(_cap, t))
_ran: set[str] = set()


@pytest.fixture(params=TIERS)
def cpu_tier(request: pytest.FixtureRequest) -> str:
    """Switch shoal's CPU kernels to one tier for the test, then back."""
    from shoal.backends.cpu import kernels

    if kernels.library() is None:
        pytest.skip("no C compiler: shoal's CPU kernels are not built here")
    tier = request.param
    with kernels.use_tier(tier):
        _ran.add(tier)
        yield tier


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001, ARG001
    have = ", ".join(isa.cpu_tiers())
    ran = ", ".join(t for t in isa.TIERS if t in _ran) or "none"
    terminalreporter.write_line(f"shoal CPU kernel tiers: this CPU has {have}; kernel tests ran on {ran}"
                                + (f" (SHOAL_CPU_ISA={_cap})" if _cap else ""))
