"""Prometheus metrics for `GET /metrics`.

Two sources: the server observes each request (status counts, latency histograms measured from the
engine's own timestamps), and a collector reads `engine.stats()` at scrape time (running/waiting
requests, KV-cache and prefix-cache state, token counters), so a gauge can never drift from the
engine's truth. Each app gets its own `CollectorRegistry`, so tests can build many apps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics", "RequestTimer"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)


class _EngineCollector:
    """Reads the engine's stats snapshot at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, float]], model: str) -> None:
        self._stats = stats
        self._model = model

    def describe(self) -> list:  # no describe-time scrape of the engine
        return []

    def collect(self) -> Iterator[Any]:
        s = self._stats()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([self._model], float(value))
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric([self._model], float(value))
            return c

        queries = s.get("prefix_cache_queries", 0) or 0
        hits = s.get("prefix_cache_hits", 0) or 0
        yield gauge("shoal_num_requests_running", "Requests the scheduler is running now.", s.get("num_running", 0))
        yield gauge("shoal_num_requests_waiting", "Requests waiting to be scheduled.", s.get("num_waiting", 0))
        yield gauge("shoal_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0-1).", s.get("kv_cache_usage", 0))
        yield gauge("shoal_kv_cache_blocks_used", "KV-cache blocks referenced by requests.", s.get("kv_blocks_used", 0))
        yield gauge("shoal_kv_cache_blocks_total", "KV-cache blocks allocated at start-up.", s.get("kv_blocks_total", 0))
        yield gauge("shoal_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / tokens looked up.",
                    hits / queries if queries else 0.0)
        yield counter("shoal_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", queries)
        yield counter("shoal_prefix_cache_hits", "Prompt tokens found in the prefix cache.", hits)
        yield counter("shoal_prompt_tokens", "Prompt tokens of admitted requests.", s.get("prompt_tokens", 0))
        yield counter("shoal_generation_tokens", "Tokens generated.", s.get("generation_tokens", 0))
        yield counter("shoal_num_preemptions", "Requests preempted (KV blocks taken back; recomputed later).",
                      s.get("num_preemptions", 0))


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict[str, float]], model: str) -> None:
        self.registry = CollectorRegistry()
        self.model = model
        r = self.registry
        self.requests = Counter(
            "shoal_http_requests", "HTTP requests by endpoint and status code.", ["endpoint", "status"], registry=r
        )
        self.finished = Counter(
            "shoal_request_finished", "Generation requests by finish reason (stop, length, abort, error).",
            ["model_name", "finish_reason"], registry=r,
        )
        self.ttft = Histogram(
            "shoal_time_to_first_token_seconds", "Arrival to first generated token.", ["model_name"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            "shoal_inter_token_latency_seconds", "Time between successive generated tokens of a request.",
            ["model_name"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            "shoal_e2e_request_latency_seconds", "Arrival to the last token (or abort).", ["model_name"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.prompt_len = Histogram(
            "shoal_request_prompt_tokens", "Prompt length per request.", ["model_name"], buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.gen_len = Histogram(
            "shoal_request_generation_tokens", "Generated tokens per request (all n choices).", ["model_name"],
            buckets=_TOKEN_BUCKETS, registry=r,
        )
        r.register(_EngineCollector(stats, model))

    def count(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def timer(self) -> "RequestTimer":
        return RequestTimer(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Follows one request's cumulative outputs and observes its latencies once."""

    def __init__(self, m: ServerMetrics) -> None:
        self.m = m
        self.arrival = time.monotonic()
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0
        self.prompt_tokens = 0
        self.done = False

    def update(self, out: Any) -> None:
        """`out` is a cumulative RequestOutput."""
        t = time.monotonic()
        metrics = getattr(out, "metrics", None)
        if metrics is not None and getattr(metrics, "arrival_time", None):
            self.arrival = min(self.arrival, metrics.arrival_time)
        self.prompt_tokens = len(out.prompt_token_ids)
        n = sum(len(c.token_ids) for c in out.outputs)
        new = n - self.tokens
        if new <= 0:
            return
        label = self.m.model
        if self.first is None:
            self.first = t
            self.m.ttft.labels(label).observe(t - self.arrival)
            new -= 1
        if new > 0 and self.last is not None:
            gap = (t - self.last) / new
            for _ in range(new):
                self.m.itl.labels(label).observe(gap)
        self.last = t
        self.tokens = n

    def finish(self, finish_reasons: list[str | None]) -> None:
        if self.done:
            return
        self.done = True
        label = self.m.model
        self.m.e2e.labels(label).observe(time.monotonic() - self.arrival)
        self.m.prompt_len.labels(label).observe(self.prompt_tokens)
        self.m.gen_len.labels(label).observe(self.tokens)
        for r in finish_reasons:
            self.m.finished.labels(label, r or "abort").inc()
