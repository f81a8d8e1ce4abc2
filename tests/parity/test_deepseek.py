"""Parity of shoal's DeepSeek-V2/V3 model (MLA + DeepSeekMoE + YaRN) against `transformers`.

Tiny random checkpoints saved by `transformers` itself (see ds_utils.VARIANTS for what each covers).
Proves, in fp32: (1) the logits of every token of a batch of mixed-length prompts, prefilled together
through the paged latent cache, match the reference run on each prompt alone (max abs diff ≤ 1e-4),
in both MLA forms; (2) 32 greedy tokens per prompt, decoded step by step as decode-only batches with
the absorbed form, equal the reference's, and each step's logits match; (3) the same through the
engine (`LLM.generate`).
"""

from __future__ import annotations

import random

import pytest
import torch

from shoal import LLM, SamplingParams
from tests.parity.ds_utils import (
    PagedHarness, first_near_tie, hf_greedy_logits, hf_model, make_deepseek, one_thread, shoal_model,  # noqa: F401
)

PROMPT_LENS = [1, 5, 17, 40, 63]
GREEDY_SEED = 2  # prompts whose reference continuations have no near-ties (top-2 margin ≥ 1e-3)
ATOL = 1e-4


def _prompts(vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(8, vocab) for _ in range(n)] for n in PROMPT_LENS]


@pytest.fixture(scope="module", params=["v3", "v3-qnull-dense2", "v2-lite", "v2-grouped"])
def ckpt(request, tmp_path_factory):
    path = make_deepseek(tmp_path_factory.mktemp(request.param), request.param)
    return path, hf_model(path)


@pytest.fixture(scope="module")
def reference_greedy(ckpt):
    """The reference's 32 greedy tokens (and logits) for the decode prompts, computed once."""
    _, ref = ckpt
    prompts = _prompts(ref.config.vocab_size, seed=GREEDY_SEED)
    expected = [hf_greedy_logits(ref, p, 32) for p in prompts]
    for p, (_, rows) in zip(prompts, expected):
        tie = first_near_tie(rows)
        assert tie == 32, f"reference near-tie at step {tie} for prompt len {len(p)}: pick another seed"
    return prompts, expected


@pytest.mark.parametrize("mode", ["naive", "absorbed"])
def test_prefill_logits_match_reference(ckpt, mode):
    path, ref = ckpt
    model = shoal_model(path, mla_mode=mode)
    prompts = _prompts(ref.config.vocab_size, seed=0)
    logits, fb, _ = PagedHarness(model, len(prompts)).step(dict(enumerate(prompts)))
    start = 0
    with torch.no_grad():
        for p in prompts:
            expect = ref(torch.tensor([p])).logits[0]
            diff = (logits[start : start + len(p)] - expect).abs().max().item()
            assert diff <= ATOL, f"{mode}: prompt of {len(p)} tokens: max abs diff {diff:.2e}"
            start += len(p)


def test_greedy_decode_matches_reference(ckpt, reference_greedy):
    path, _ = ckpt
    prompts, expected = reference_greedy
    model = shoal_model(path, mla_mode="auto")  # decode-only batches always take the absorbed form
    got, got_rows = PagedHarness(model, len(prompts)).greedy(prompts, 32)
    for p, toks, rows, (expect, expect_rows) in zip(prompts, got, got_rows, expected):
        assert toks == expect, f"prompt len {len(p)}: {toks} vs {expect}"
        diff = max((a - b).abs().max().item() for a, b in zip(rows, expect_rows))
        assert diff <= ATOL, f"prompt len {len(p)}: max abs logit diff over 32 steps {diff:.2e}"


def test_engine_greedy_matches_reference(ckpt, reference_greedy):
    path, _ = ckpt
    prompts, expected = reference_greedy
    llm = LLM(str(path), dtype="float32", progress=False, block_size=16)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True))
    for p, out, (expect, _) in zip(prompts, outs, expected):
        assert list(out.outputs[0].token_ids) == expect, f"prompt len {len(p)}"
