"""Parity of shoal's Llama and Qwen2 against `transformers` on tiny random checkpoints.

Proves: (1) last-position logits of a batch of mixed-length prompts, prefilled together through the
paged cache, match the reference run on each prompt alone (fp32, max abs diff ≤ 1e-4); (2) 32
greedy tokens per prompt, generated as one continuous batch, equal the reference's.
"""

from __future__ import annotations

import random

import pytest
import torch

from shoal import LLM, SamplingParams
from shoal.engine.request import Request
from tests.tiny import first_divergence, hf_greedy, hf_model, make_llama, make_qwen2

PROMPT_LENS = [1, 5, 17, 40, 63]


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(8, vocab) for _ in range(n)] for n in PROMPT_LENS]


@pytest.fixture(scope="module", params=["llama", "llama-tied-rope3", "qwen2"])
def model_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "llama":
        return make_llama(path)
    if request.param == "llama-tied-rope3":
        return make_llama(path, seed=1, tie_word_embeddings=True, num_key_value_heads=1, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
    return make_qwen2(path)


def test_prefill_logits_match_reference(model_dir):
    ref = hf_model(model_dir)
    llm = LLM(str(model_dir), dtype="float32", progress=False, block_size=16)
    eng = llm.engine
    prompts = _prompts(ref.config.vocab_size)
    reqs = [Request(f"r{i}", p, SamplingParams(max_tokens=1)) for i, p in enumerate(prompts)]
    for r in reqs:
        eng.scheduler.add_request(r)
    out = eng.scheduler.schedule()
    assert len(out.scheduled) == len(prompts) and all(s.samples for s in out.scheduled)
    sampling, logits = eng.runner.forward_logits(out)
    with torch.no_grad():
        for req, row in zip(sampling, logits):
            expect = ref(torch.tensor([req.prompt_token_ids])).logits[0, -1]
            diff = (row - expect).abs().max().item()
            assert diff <= 1e-4, f"prompt of {req.num_prompt_tokens} tokens: max abs diff {diff:.2e}"


def test_greedy_tokens_match_reference(model_dir):
    ref = hf_model(model_dir)
    llm = LLM(str(model_dir), dtype="float32", progress=False, block_size=16)
    prompts = _prompts(ref.config.vocab_size, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for p, out in zip(prompts, outs):
        expect, margins = hf_greedy(ref, p, 32)
        got = out.outputs[0].token_ids
        assert len(got) == 32
        # compare up to the first near-tie of the reference (float rounding may flip it)
        tie = next((i for i, m in enumerate(margins) if m < 1e-3), 32)
        assert tie >= 8, f"reference near-tie at step {tie}: test prompt is not discriminative"
        div = first_divergence(got[:tie], expect[:tie])
        assert div is None, f"prompt len {len(p)}: diverged at step {div}: {got[:tie]} vs {expect[:tie]}"
