"""The serving engine on a tiny DeepSeek-V3 (MLA latent cache, MoE): batch invariance over 32
mixed-length prompts, prefix caching and preemption, each compared token for token."""

from __future__ import annotations

import random

import pytest

from shoal import LLM, SamplingParams
from tests.parity.ds_utils import make_deepseek

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_deepseek(tmp_path_factory.mktemp("dsv3"), "v3", max_position_embeddings=1024))


def _prompts(n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lens = [lo, hi] + [rng.randint(lo, hi) for _ in range(n - 2)]
    return [[rng.randrange(8, 256) for _ in range(k)] for k in lens]


def test_cache_holds_only_the_latent(model_dir):
    llm = LLM(model_dir, dtype="bfloat16", progress=False, kv_cache_memory=2**20)
    cfg = llm.engine.model_config
    assert llm.engine.runner.kv_bytes_per_token == cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2


@pytest.mark.slow
def test_batch_invariance_32_prompts(model_dir):
    llm = LLM(model_dir, dtype="float32", progress=False, kv_cache_memory=32 * 2**20, max_model_len=1024)
    prompts = _prompts(32, 1, 600, seed=0)
    together = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    for p, out in zip(prompts, together):
        alone = llm.generate({"prompt_token_ids": p}, GREEDY)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids, f"prompt of {len(p)} tokens differs"


def test_prefix_cache_and_preemption_keep_tokens(model_dir):
    rng = random.Random(3)
    system = [rng.randrange(8, 256) for _ in range(64)]
    prompts = [system + [rng.randrange(8, 256) for _ in range(rng.randint(2, 30))] for _ in range(8)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    reference = LLM(model_dir, dtype="float32", progress=False, kv_cache_memory=8 * 2**20,
                    enable_prefix_caching=False)
    want = [o.outputs[0].token_ids for o in reference.generate([{"prompt_token_ids": p} for p in prompts], params)]
    cached = LLM(model_dir, dtype="float32", progress=False, kv_cache_memory=8 * 2**20)
    first = cached.generate({"prompt_token_ids": prompts[0]}, params)
    rest = cached.generate([{"prompt_token_ids": p} for p in prompts[1:]], params)
    assert [o.outputs[0].token_ids for o in first + rest] == want
    assert all(o.metrics.num_cached_tokens == 64 for o in rest)
    tiny = LLM(model_dir, dtype="float32", progress=False, num_blocks_override=10, max_model_len=160)
    outs = tiny.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert tiny.engine.stats()["num_preemptions"] > 0
    assert tiny.engine.block_manager.usage == 0
