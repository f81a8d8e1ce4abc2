"""Benchmarks: `serve` load-tests any OpenAI-compatible endpoint (TTFT, TPOT, ITL, E2E, throughput)."""
