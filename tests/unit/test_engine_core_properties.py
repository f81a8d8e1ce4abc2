"""Property tests (hypothesis) for the scheduler + block manager together.

Random interleavings of add / step / abort / stop on random cache and block sizes, prefix caching on
and off, with a deterministic fake model. After every step the block bookkeeping must be exact;
at the end every block is free, no request is lost, and every request's tokens are a prefix of (or,
when it ran to max_tokens, equal to) what a plain run of that request alone would produce.
"""

from __future__ import annotations

from collections import defaultdict

from hypothesis import event, given, settings
from hypothesis import strategies as st

from shoal.config import SchedulerConfig
from shoal.engine.block_manager import BlockManager
from shoal.engine.request import Request, RequestStatus
from shoal.engine.scheduler import Scheduler
from shoal.sampling_params import SamplingParams

BASE = [7, 3, 7, 1, 0, 2, 2, 5, 1, 3, 3, 0, 6, 4, 1, 1, 2, 0, 5, 7]  # shared prefixes come from here


def fake_token(ids: list[int]) -> int:
    return (sum(ids) * 31 + len(ids)) % 8  # a tiny vocabulary makes accidental prefix matches common


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    ids = list(prompt)
    for _ in range(max_tokens):
        ids.append(fake_token(ids))
    return ids[len(prompt) :]


def check_invariants(s: Scheduler) -> None:
    bm, bs = s.block_manager, s.block_manager.block_size
    holders: dict[int, list[tuple[Request, int]]] = defaultdict(list)
    for r in s.running:
        assert r.status is RequestStatus.RUNNING
        assert len(set(r.block_ids)) == len(r.block_ids)
        assert r.num_computed_tokens <= r.num_tokens
        assert len(r.block_ids) * bs >= r.num_computed_tokens
        for i, b in enumerate(r.block_ids):
            holders[b].append((r, i))
    for r in s.waiting:
        assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert r.block_ids == [] and r.num_computed_tokens == 0
    assert set(s.requests) == {r.request_id for r in [*s.running, *s.waiting]}
    assert len(s.running) <= s.config.max_num_seqs
    referenced = 0
    for b in range(bm.num_blocks):
        hs = holders.get(b, [])
        assert bm.ref_count(b) == len(hs)  # ref count = number of requests holding the block
        referenced += bool(hs)
        h = bm.block_hash(b)
        if len(hs) > 1:  # only a cached prefix block is shared, at the same position, same hash
            assert h is not None and len({i for _, i in hs}) == 1
            assert all(r.block_hashes[i] == h for r, i in hs)
        if h is not None:
            for r, i in hs:  # a hashed block holds exactly the tokens its hash stands for
                assert r.num_computed_tokens >= (i + 1) * bs
                assert r.block_hashes[i] == h
    assert bm.num_free_blocks + referenced == bm.num_blocks
    # the block manager's own partition: free (unhashed) | evictable (hashed) | referenced
    free, evictable = set(bm._free), set(bm._evictable)
    assert len(free) == len(bm._free) and not free & evictable
    assert free | evictable == {b for b in range(bm.num_blocks) if bm.ref_count(b) == 0}
    assert all(bm.block_hash(b) is None for b in free) and all(bm.block_hash(b) is not None for b in evictable)
    assert bm._hash_to_block == {bm.block_hash(b): b for b in range(bm.num_blocks) if bm.block_hash(b) is not None}


def step(s: Scheduler) -> None:
    had_work = s.has_unfinished()
    out = s.schedule()
    if had_work:  # progress: something ran, or the scheduler changed some request's state
        assert out.scheduled or out.preempted or out.finished
    assert out.num_batched_tokens == sum(x.num_new_tokens for x in out.scheduled) <= s.config.max_num_batched_tokens
    assert all(x.num_new_tokens >= 1 for x in out.scheduled)
    assert len({id(x.request) for x in out.scheduled}) == len(out.scheduled)
    sampled = {x.request.request_id: fake_token(x.request.all_token_ids) for x in out.scheduled if x.samples}
    s.update_after_step(out, sampled)
    for rid in sampled:
        r = s.requests[rid]
        if r.num_output_tokens >= r.sampling_params.max_tokens:
            s.finish_request(rid, RequestStatus.FINISHED_LENGTH)
    check_invariants(s)
    # what the examples exercised (pytest --hypothesis-show-statistics)
    if out.preempted:
        event("preemption")
    if out.finished:
        event("scheduler ended a request that outgrew the cache")
    if any(x.request.num_cached_tokens for x in out.scheduled):
        event("prefix cache hit")
    if any(not x.samples for x in out.scheduled):
        event("chunked prefill")
    if len(out.scheduled) > 1:
        event("batch of several requests")


# a request: a shared prefix of BASE (length 0, 3, 8 or 20) + its own tail, and max_tokens
ADD = st.tuples(st.just("add"), st.sampled_from([0, 3, 8, 20]), st.lists(st.integers(0, 7), max_size=10), st.integers(1, 8))
OPS = st.one_of(
    ADD,
    st.tuples(st.just("step")),
    st.tuples(st.just("step")),
    st.tuples(st.just("abort"), st.integers(0, 30)),
    st.tuples(st.just("stop"), st.integers(0, 30)),
)


@settings(max_examples=500, deadline=None)
@given(
    num_blocks=st.integers(1, 32),
    block_size=st.sampled_from([1, 2, 3, 4, 8]),
    budget=st.integers(1, 40),
    max_seqs=st.integers(1, 6),
    caching=st.booleans(),
    first=st.lists(ADD, min_size=1, max_size=8),
    ops=st.lists(OPS, max_size=40),
)
def test_random_workloads_keep_the_books(
    num_blocks: int, block_size: int, budget: int, max_seqs: int, caching: bool, first: list[tuple], ops: list[tuple]
) -> None:
    bm = BlockManager(num_blocks, block_size, caching)
    s = Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget), bm)
    added: list[Request] = []
    ended: dict[str, RequestStatus] = {}  # how the test itself ended a request
    for op in first + ops:
        if op[0] == "add":
            prompt = (BASE[: op[1]] + op[2]) or [0]
            r = Request(f"r{len(added)}", prompt, SamplingParams(max_tokens=op[3]))
            if -(-len(prompt) // block_size) > num_blocks:
                try:
                    s.add_request(r)
                    raise AssertionError("a prompt larger than the cache was accepted")
                except ValueError:
                    continue
            s.add_request(r)
            added.append(r)
        elif op[0] == "step":
            step(s)
        elif added:
            r = added[op[1] % len(added)]
            if op[0] == "abort":
                live = not r.is_finished
                got = s.finish_request(r.request_id, RequestStatus.FINISHED_ABORTED)
                assert (got is r) == live and (got is None) == (not live)
                ended.setdefault(r.request_id, RequestStatus.FINISHED_ABORTED)
            elif r.status is RequestStatus.RUNNING:  # a stop token / stop string, seen by the engine
                assert s.finish_request(r.request_id, RequestStatus.FINISHED_STOPPED) is r
                ended[r.request_id] = RequestStatus.FINISHED_STOPPED
            check_invariants(s)
    for _ in range(5000):
        if not s.has_unfinished():
            break
        step(s)
    assert not s.has_unfinished()
    assert bm.usage == 0.0 and bm.num_free_blocks == num_blocks
    assert all(bm.ref_count(b) == 0 for b in range(num_blocks))
    for r in added:  # nobody lost; tokens match a lone run of the same request
        assert r.is_finished
        want = reference(r.prompt_token_ids, r.sampling_params.max_tokens)
        if r.request_id in ended:
            assert r.status is ended[r.request_id] or r.status is RequestStatus.FINISHED_LENGTH
            assert r.output_token_ids == want[: r.num_output_tokens]
        elif r.num_tokens > num_blocks * block_size:  # outgrew the whole cache: the scheduler ended it
            assert r.status is RequestStatus.FINISHED_LENGTH
            assert r.output_token_ids == want[: r.num_output_tokens]
        else:
            assert r.status is RequestStatus.FINISHED_LENGTH and r.output_token_ids == want
    if caching:
        assert bm.prefix_cache_hits <= bm.prefix_cache_queries
