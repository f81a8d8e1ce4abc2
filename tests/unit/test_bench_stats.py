"""`shoal bench serve` statistics: percentiles match numpy's default, TPOT and throughput arithmetic."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.bench.serve import RequestResult, aggregate, file_dataset, format_table, percentile, random_dataset, tpot


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=50), st.sampled_from([0, 1, 25, 50, 90, 99, 100]))
def test_percentile_matches_numpy(xs, q):
    assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-9, abs=1e-6)


def test_percentile_empty_is_nan():
    assert math.isnan(percentile([], 50))


def test_aggregate():
    rs = [
        RequestResult(ok=True, ttft=0.1, latency=1.1, itl=[0.1] * 10, output_tokens=11, prompt_tokens=5),
        RequestResult(ok=True, ttft=0.3, latency=0.3, itl=[], output_tokens=1, prompt_tokens=5),
        RequestResult(ok=False, error="HTTP 503"),
    ]
    assert tpot(rs[0]) == pytest.approx(0.1) and tpot(rs[1]) is None
    a = aggregate(rs, duration=2.0)
    assert (a["completed"], a["failed"]) == (2, 1)
    assert a["output_throughput_tok_s"] == pytest.approx(6.0)
    assert a["total_token_throughput_tok_s"] == pytest.approx(11.0)
    assert a["request_throughput_rps"] == pytest.approx(1.0)
    assert a["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert a["tpot_ms"]["p50"] == pytest.approx(100.0)
    assert a["itl_ms"]["p99"] == pytest.approx(100.0)
    assert a["errors"] == ["HTTP 503"]
    assert "TTFT" in format_table(a)


def test_datasets(tmp_path):
    ds = random_dataset(3, 10, 7, seed=1)
    assert len(ds) == 3 and all(len(d.prompt.split()) == 10 and d.output_len == 7 for d in ds)
    assert [d.prompt for d in ds] == [d.prompt for d in random_dataset(3, 10, 7, seed=1)]
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "a"}) + "\n\n" + json.dumps({"prompt": "b", "output_len": 3}) + "\n")
    ds = file_dataset(str(f), 5, 9, seed=0)
    assert len(ds) == 5 and {(d.prompt, d.output_len) for d in ds} == {("a", 9), ("b", 3)}
    f.write_text("{\"text\": 1}\n")
    with pytest.raises(ValueError, match="prompt"):
        file_dataset(str(f), 1, 9, seed=0)
