"""Engine behaviour on the real default model: batch invariance, prefix caching, preemption.

Each test compares greedy tokens of two runs that must agree exactly: batched vs alone, prefix
cache on vs off, tiny KV cache (forcing preemption) vs ample.
"""

from __future__ import annotations

import random

import pytest

from shoal import LLM, SamplingParams

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM(None, dtype="float32", progress=False, kv_cache_memory=256 * 2**20)


def _random_prompts(n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lens = [lo, hi] + [rng.randint(lo, hi) for _ in range(n - 2)]
    # token ids from the ordinary vocabulary range (skip the special tokens at the start)
    return [[rng.randrange(100, 49000) for _ in range(k)] for k in lens]


def test_batch_invariance_32_prompts(llm):
    prompts = _random_prompts(32, 1, 600, seed=0)
    together = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    for p, out in zip(prompts, together):
        alone = llm.generate({"prompt_token_ids": p}, GREEDY)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids, f"prompt of {len(p)} tokens differs"


def test_prefix_cache_hits_and_same_tokens():
    rng = random.Random(1)
    system = [rng.randrange(100, 49000) for _ in range(160)]
    prompts = [system + [rng.randrange(100, 49000) for _ in range(rng.randint(3, 20))] for _ in range(6)]
    total = sum(len(p) for p in prompts)
    runs = {}
    for caching in (True, False):
        llm = LLM(None, dtype="float32", progress=False, kv_cache_memory=64 * 2**20, max_model_len=1024,
                  enable_prefix_caching=caching)
        # the first request fills the cache; the rest arrive after it
        first = llm.generate({"prompt_token_ids": prompts[0]}, GREEDY)
        rest = llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], GREEDY)
        stats = llm.engine.stats()
        runs[caching] = ([o.outputs[0].token_ids for o in first + rest], stats,
                         [o.metrics.num_cached_tokens for o in rest])
    (tok_on, st_on, cached_on), (tok_off, st_off, cached_off) = runs[True], runs[False]
    assert tok_on == tok_off
    assert st_off["computed_prompt_tokens"] == total
    # every later request reuses the 10 full blocks (160 tokens) of the shared system prompt
    assert cached_on == [160] * 5 and cached_off == [0] * 5
    assert st_on["computed_prompt_tokens"] == total - 5 * 160
    assert st_on["prefix_cache_hits"] >= 5 * 160


def test_preemption_with_tiny_cache_gives_same_output():
    prompts = _random_prompts(8, 20, 90, seed=2)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ample = LLM(None, dtype="float32", progress=False, kv_cache_memory=64 * 2**20, max_model_len=1024)
    want = [o.outputs[0].token_ids for o in ample.generate([{"prompt_token_ids": p} for p in prompts], params)]
    # 16 blocks of 16 tokens: the longest request alone needs 8; eight together need ~50
    tiny = LLM(None, dtype="float32", progress=False, num_blocks_override=16, enable_prefix_caching=False,
               max_model_len=256)
    eng = tiny.engine
    ids = [eng.add_request(None, {"prompt_token_ids": p}, params) for p in prompts]
    reqs = [eng.groups[i].samples[0].req for i in ids]
    done = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert [done[i] for i in ids] == want
    assert sum(r.num_preemptions for r in reqs) > 0, "the tiny cache should have forced preemption"
    assert eng.block_manager.usage == 0
