"""Scheduler: chunked prefill, token budget, max_num_seqs, preemption, prefix reuse — driven by a
deterministic fake model (the next token is a function of all token ids), so any scheduling that is
correct must produce exactly the tokens of a plain one-request-at-a-time run."""

from __future__ import annotations

import random

import pytest

from shoal.config import SchedulerConfig
from shoal.engine.block_manager import BlockManager
from shoal.engine.request import Request, RequestStatus
from shoal.engine.scheduler import Scheduler, SchedulerOutput
from shoal.sampling_params import SamplingParams


def fake_token(ids: list[int]) -> int:
    return (sum(ids) * 31 + len(ids)) % 1000


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    ids = list(prompt)
    for _ in range(max_tokens):
        ids.append(fake_token(ids))
    return ids[len(prompt) :]


def make(num_blocks: int, block_size: int, budget: int = 64, max_seqs: int = 8, caching: bool = True) -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget)
    return Scheduler(cfg, BlockManager(num_blocks, block_size, caching))


def add(s: Scheduler, rid: str, prompt: list[int], max_tokens: int) -> Request:
    r = Request(rid, prompt, SamplingParams(max_tokens=max_tokens))
    s.add_request(r)
    return r


def step(s: Scheduler) -> SchedulerOutput:
    """One engine step with the fake model: sample where a chunk reaches the end, stop at max_tokens."""
    out = s.schedule()
    for sr in out.scheduled:  # the model reads exactly the tokens it is asked to compute
        assert sr.num_new_tokens >= 1
        assert sr.request.num_computed_tokens + sr.num_new_tokens <= sr.request.num_tokens
        assert len(sr.request.block_ids) * s.block_manager.block_size >= sr.request.num_computed_tokens + sr.num_new_tokens
    sampled = {sr.request.request_id: fake_token(sr.request.all_token_ids) for sr in out.scheduled if sr.samples}
    s.update_after_step(out, sampled)
    for rid in sampled:
        r = s.requests[rid]
        if r.num_output_tokens >= r.sampling_params.max_tokens:
            s.finish_request(rid, RequestStatus.FINISHED_LENGTH)
    return out


def run(s: Scheduler, max_steps: int = 10_000) -> list[SchedulerOutput]:
    outs = []
    while s.has_unfinished():
        outs.append(step(s))
        assert len(outs) < max_steps, "scheduler made no progress"
    return outs


def test_chunked_prefill_runs_beside_a_decode() -> None:
    s = make(64, 4, budget=8)
    a = add(s, "a", [1, 2, 3], max_tokens=10)
    out = step(s)
    assert [(x.request.request_id, x.num_new_tokens, x.samples) for x in out.scheduled] == [("a", 3, True)]
    b = add(s, "b", list(range(20)), max_tokens=2)
    plan = []
    for _ in range(3):
        out = step(s)
        plan.append([(x.request.request_id, x.num_new_tokens, x.samples) for x in out.scheduled])
        assert out.num_batched_tokens <= 8
    assert plan == [
        [("a", 1, True), ("b", 7, False)],
        [("a", 1, True), ("b", 7, False)],
        [("a", 1, True), ("b", 6, True)],  # the last chunk samples b's first token
    ]
    assert b.num_output_tokens == 1 and a.num_output_tokens == 4
    run(s)
    assert a.output_token_ids == reference([1, 2, 3], 10)
    assert b.output_token_ids == reference(list(range(20)), 2)


@pytest.mark.parametrize("budget,max_seqs", [(1, 1), (5, 2), (16, 3), (64, 8)])
def test_budget_and_max_num_seqs_hold(budget: int, max_seqs: int) -> None:
    rng = random.Random(budget)
    s = make(200, 4, budget=budget, max_seqs=max_seqs)
    reqs = [add(s, f"r{i}", [rng.randrange(50) for _ in range(rng.randint(1, 30))], rng.randint(1, 6)) for i in range(12)]
    for out in run(s):
        assert out.num_batched_tokens == sum(x.num_new_tokens for x in out.scheduled) <= budget
        assert len(out.scheduled) <= max_seqs
    for r in reqs:
        assert r.status is RequestStatus.FINISHED_LENGTH
        assert r.output_token_ids == reference(r.prompt_token_ids, r.sampling_params.max_tokens)
    assert s.block_manager.usage == 0.0


def test_preempts_the_newest_and_it_still_finishes() -> None:
    s = make(6, 2, budget=64)
    a, b, c = (add(s, rid, [i, i, i, i], max_tokens=3) for i, rid in enumerate("abc"))
    out = step(s)  # all three admitted: 2 blocks each, the cache is full; each sampled a token
    assert [x.request for x in out.scheduled] == [a, b, c] and s.block_manager.num_free_blocks == 0
    out = step(s)  # a needs a 3rd block: c (newest) is preempted; b then fits in c's freed blocks
    assert out.preempted == [c]
    assert [x.request for x in out.scheduled] == [a, b]
    assert c.status is RequestStatus.PREEMPTED and c.num_preemptions == 1
    assert c.num_computed_tokens == 0 and c.block_ids == [] and c.output_token_ids == reference([2] * 4, 1)
    assert list(s.waiting) == [c]
    run(s)
    for r in (a, b, c):
        assert r.status is RequestStatus.FINISHED_LENGTH
        assert r.output_token_ids == reference(r.prompt_token_ids, 3)
    assert s.block_manager.usage == 0.0


def test_tiny_cache_gives_the_same_tokens_as_an_ample_one() -> None:
    rng = random.Random(7)
    prompts = [[rng.randrange(20) for _ in range(rng.randint(1, 12))] for _ in range(10)]
    results = []
    for num_blocks, budget in [(500, 256), (10, 7)]:  # 10 blocks: 20 slots ≥ 12 + 8 - 1
        s = make(num_blocks, 2, budget=budget, max_seqs=4)
        reqs = [add(s, f"r{i}", p, 8) for i, p in enumerate(prompts)]
        outs = run(s)
        results.append([r.output_token_ids for r in reqs])
        preemptions = sum(len(o.preempted) for o in outs)
        assert (preemptions > 0) == (num_blocks == 10)  # the tiny run really was squeezed
    assert results[0] == results[1] == [reference(p, 8) for p in prompts]


@pytest.mark.parametrize("caching", [True, False])
def test_prefix_cache_skips_shared_prompt_tokens(caching: bool) -> None:
    s = make(100, 4, budget=256, caching=caching)
    prefix = list(range(100, 132))  # 32 tokens = 8 full blocks
    first = add(s, "p0", prefix + [0, 1, 2, 3], max_tokens=2)
    computed = [step(s).num_batched_tokens]  # p0's prompt is computed and its blocks hashed
    rest = [add(s, f"p{i}", prefix + [i, i, i, i], max_tokens=2) for i in range(1, 4)]
    computed += [o.num_batched_tokens for o in run(s)]
    prompt_tokens_computed = 36 + 3 * (4 if caching else 36)
    decode_tokens = 1 + 3 * 1  # p0's second output; each other request computes its first output once
    assert sum(computed) == prompt_tokens_computed + decode_tokens
    assert [r.num_cached_tokens for r in rest] == [32 if caching else 0] * 3
    assert first.num_cached_tokens == 0
    for r in [first, *rest]:
        assert r.output_token_ids == reference(r.prompt_token_ids, 2)
    bm = s.block_manager
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == ((4 * 36, 3 * 32) if caching else (0, 0))


def test_request_alone_that_outgrows_the_cache_finishes_by_length() -> None:
    s = make(3, 2)  # 6 tokens of KV in all
    r = add(s, "r", [1, 2, 3, 4], max_tokens=10)
    outs = run(s)
    assert r.status is RequestStatus.FINISHED_LENGTH
    assert r.output_token_ids == reference([1, 2, 3, 4], 3)  # 4 + 3 tokens, the 7th was never computed
    assert outs[-1].finished == [r] and outs[-1].is_empty
    assert s.block_manager.usage == 0.0


def test_waiting_request_longer_than_the_cache_finishes_by_length() -> None:
    s = make(4, 2)
    r = Request("r", [1] * 6, SamplingParams(max_tokens=10), output_token_ids=[5, 6, 7])  # 9 tokens > 8 slots
    s.add_request(r)
    ok = add(s, "ok", [3], max_tokens=1)
    out = s.schedule()
    assert out.finished == [r] and r.status is RequestStatus.FINISHED_LENGTH
    assert [x.request for x in out.scheduled] == [ok]


def test_prompt_larger_than_the_cache_is_refused() -> None:
    s = make(4, 2)
    with pytest.raises(ValueError, match=r"9 tokens needs 5 KV blocks .* only 4 blocks"):
        add(s, "big", list(range(9)), max_tokens=1)
    with pytest.raises(ValueError, match="empty prompt"):
        add(s, "empty", [], max_tokens=1)
    add(s, "x", [1], max_tokens=1)
    with pytest.raises(ValueError, match="duplicate"):
        add(s, "x", [1], max_tokens=1)


def test_finish_and_abort() -> None:
    s = make(16, 2, budget=3, max_seqs=1)
    a = add(s, "a", [1, 2, 3, 4], max_tokens=5)
    b = add(s, "b", [5, 6], max_tokens=5)
    step(s)
    assert a.status is RequestStatus.RUNNING and b.status is RequestStatus.WAITING  # max_num_seqs = 1
    assert s.finish_request("nope", RequestStatus.FINISHED_ABORTED) is None
    assert s.finish_request("b", RequestStatus.FINISHED_ABORTED) is b and b.is_finished
    out = s.schedule()  # a is aborted while this step "runs": its result is dropped
    assert s.finish_request("a", RequestStatus.FINISHED_ABORTED) is a
    s.update_after_step(out, {"a": 1})
    assert a.num_output_tokens == 0 and a.block_ids == [] and a.status.finish_reason == "abort"
    assert not s.has_unfinished() and s.block_manager.usage == 0.0
    with pytest.raises(ValueError):
        s.finish_request("a", RequestStatus.RUNNING)
