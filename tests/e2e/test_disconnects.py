"""50 concurrent streaming clients, 20 of which hang up mid-stream: the other 30 complete, and once
the dust settles /metrics shows no running requests and no KV blocks in use (aborts freed them)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.e2e.conftest import Server

MODEL = "SmolLM2-135M-Instruct"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_50_clients_20_disconnect(default_server: Server):
    async def one(client, i: int, drop: bool) -> tuple[str, str | None]:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count from {i} upwards."}],
            max_tokens=12, temperature=0, stream=True, extra_body={"ignore_eos": True},
        )
        text, finish = "", None
        async for chunk in stream:
            if not chunk.choices:
                continue
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
            if drop and text:
                await stream.close()  # hang up mid-stream
                return "dropped", None
        return text, finish

    async def main() -> list[tuple[str, str | None]]:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with default_server.aclient(http_client=httpx.AsyncClient(limits=limits, timeout=600)) as client:
            return await asyncio.gather(*(one(client, i, drop=i % 5 < 2) for i in range(50)))

    results = asyncio.run(main())
    dropped = [r for r in results if r[0] == "dropped"]
    completed = [r for r in results if r[0] != "dropped"]
    assert len(dropped) == 20 and len(completed) == 30
    assert all(finish == "length" and text for text, finish in completed)

    deadline = time.monotonic() + 120
    while True:
        m = default_server.metrics()
        if m["shoal_num_requests_running"] == 0 and m["shoal_kv_cache_blocks_used"] == 0:
            break
        assert time.monotonic() < deadline, f"engine did not drain: {m['shoal_num_requests_running']} running, " \
                                            f"{m['shoal_kv_cache_blocks_used']} KV blocks used"
        time.sleep(0.5)
    assert m["shoal_num_requests_waiting"] == 0
    assert m['shoal_request_finished_total{finish_reason="abort",model_name="SmolLM2-135M-Instruct"}'] >= 1
    assert httpx.get(f"{default_server.url}/health", timeout=30).status_code == 200
