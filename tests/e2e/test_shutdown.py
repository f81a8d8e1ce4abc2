"""SIGTERM: the server stops accepting connections at once but finishes the stream in flight, then exits 0."""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest

from tests.e2e.conftest import start_server


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_drains_in_flight(tiny_reasoning_dir: str, tmp_path):
    server = start_server(["--model", tiny_reasoning_dir, "--kv-cache-memory", "32MiB", "--shutdown-timeout", "60"],
                          str(tmp_path / "server.log"))
    try:
        body = {"prompt": "hello", "max_tokens": 1500, "ignore_eos": True, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        refused = False
        usage, finish = None, None
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=300) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    break
            server.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not refused:
                try:
                    httpx.get(f"{server.url}/health", timeout=1)
                    time.sleep(0.05)
                except httpx.TransportError:
                    refused = True
            for line in lines:
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                        finish = chunk["choices"][0]["finish_reason"]
        assert refused, "the server kept accepting connections after SIGTERM"
        assert finish == "length" and usage["completion_tokens"] == 1500
        assert server.proc.wait(timeout=60) == 0, server.log_tail()
    finally:
        server.stop()
