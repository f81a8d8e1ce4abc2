"""`shoal bench serve` against the real server: every request completes, the token counts come from
the server's usage, and --json prints strict JSON with the documented keys."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.e2e.conftest import ROOT, Server


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("mode", [["--concurrency", "2"], ["--request-rate", "20", "--endpoint", "chat"]])
def test_bench_serve_json(default_server: Server, mode: list[str]):
    out = subprocess.run(
        [sys.executable, "-m", "shoal.bench.serve", "--base-url", default_server.url, "--num-prompts", "4",
         "--input-len", "16", "--output-len", "8", "--json", "--no-progress", *mode],
        capture_output=True, text=True, timeout=600, cwd=ROOT, check=False,
    )
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert (res["completed"], res["failed"]) == (4, 0)
    assert res["total_output_tokens"] == 32  # ignore_eos: exactly --output-len each
    assert res["total_input_tokens"] >= 4 * 16
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms"):
        assert set(res[key]) == {"mean", "p50", "p90", "p99"}
        assert 0 < res[key]["p50"] <= res[key]["p99"]
    assert res["e2e_latency_ms"]["mean"] >= res["ttft_ms"]["mean"]
    assert res["output_throughput_tok_s"] > 0 and res["request_throughput_rps"] > 0
