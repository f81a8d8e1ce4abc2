"""The offline API's sampling contract on a tiny random Llama: seeds, n, logprobs, stops, limits,
aborts and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from shoal import LLM, SamplingParams
from shoal.engine.llm_engine import PromptTooLong
from shoal.layers.sampler import SamplingRow, sample
from tests.tiny import make_llama

PROMPT = {"prompt_token_ids": [10, 20, 30, 40, 50]}


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = make_llama(tmp_path_factory.mktemp("llama"), max_position_embeddings=256)
    return LLM(str(path), dtype="float32", progress=False, kv_cache_memory=8 * 2**20, max_model_len=256)


def _greedy(llm, n=8, **kw):
    return llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw))[0].outputs[0]


def test_seeded_sampling_is_independent_of_batch(llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate(PROMPT, p)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": [11 + i] * (3 + i)} for i in range(5)]
    batch = llm.generate(others[:2] + [PROMPT] + others[2:], [SamplingParams(temperature=1.0, max_tokens=16)] * 2
                         + [p] + [SamplingParams(temperature=1.0, max_tokens=16)] * 3)
    assert batch[2].outputs[0].token_ids == alone
    different_seed = llm.generate(PROMPT, SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=16,
                                                         ignore_eos=True))[0].outputs[0].token_ids
    assert different_seed != alone


def test_n_samples(llm):
    out = llm.generate(PROMPT, SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 12 and o.finish_reason == "length" for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1


def test_logprobs_are_consistent(llm):
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True))[0].outputs[0]
    assert len(out.logprobs) == 6
    total = 0.0
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == tok
        assert len(lp.top) == 3 and lp.top[0][0] == tok  # greedy picks the most likely token
        assert lp.top[0][2] >= lp.top[1][2] >= lp.top[2][2]
        assert math.isclose(lp.logprob, lp.top[0][2], abs_tol=1e-6) and lp.logprob <= 0
        total += lp.logprob
    assert math.isclose(out.cumulative_logprob, total, rel_tol=1e-6)


def test_stop_string_and_stop_token(llm):
    base = _greedy(llm, 8)
    assert base.finish_reason == "length" and len(base.token_ids) == 8
    words = base.text.split()
    stop_word = words[3]
    first = base.text.find(stop_word)
    out = _greedy(llm, 8, stop=[stop_word])
    assert out.finish_reason == "stop" and out.stop_reason == stop_word
    assert out.text == base.text[:first]
    tok = base.token_ids[4]
    k = base.token_ids.index(tok)
    out = _greedy(llm, 8, stop_token_ids=[tok])
    assert out.finish_reason == "stop" and out.stop_reason == tok
    assert out.token_ids == base.token_ids[: k + 1]


def test_min_tokens_blocks_stop_tokens(llm):
    base = _greedy(llm, 4)
    first = base.token_ids[0]
    out = _greedy(llm, 6, stop_token_ids=[first], min_tokens=3)
    assert len(out.token_ids) >= 3
    assert first not in out.token_ids[:2]


def test_top_k_one_equals_greedy(llm):
    base = _greedy(llm, 8)
    p = SamplingParams(temperature=0.8, top_k=1, seed=3, max_tokens=8, ignore_eos=True)
    assert llm.generate(PROMPT, p)[0].outputs[0].token_ids == base.token_ids


def test_abort_frees_blocks(llm):
    eng = llm.engine
    rid = eng.add_request(None, PROMPT, SamplingParams(max_tokens=50, ignore_eos=True))
    eng.step()
    eng.step()
    assert eng.block_manager.usage > 0
    out = eng.abort_request(rid)
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert eng.block_manager.usage == 0 and not eng.has_unfinished()


def test_bad_input(llm):
    with pytest.raises(PromptTooLong, match="256"):
        llm.generate({"prompt_token_ids": [5] * 300})
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []})
    with pytest.raises(ValueError, match="vocab|\\[0,"):
        llm.generate({"prompt_token_ids": [10**6]})
    for bad in (dict(temperature=-1), dict(top_p=0), dict(n=0), dict(max_tokens=0), dict(logprobs=50)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert not llm.engine.has_unfinished() and llm.engine.block_manager.usage == 0


def test_penalties_unit():
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.5]])
    row = SamplingRow(SamplingParams(temperature=0, repetition_penalty=2.0, logprobs=4), [0], [2], None, [])
    out = sample(logits.clone(), [row])
    lp = dict(out.top_logprobs[0])
    # token 0 (positive) divided by 2, token 2 (negative) multiplied by 2, others unchanged
    expect = torch.tensor([1.0, 1.0, -2.0, 0.5]).log_softmax(-1)
    for i in range(4):
        assert math.isclose(lp[i], expect[i].item(), abs_tol=1e-6)
    row = SamplingRow(SamplingParams(temperature=0, presence_penalty=1.0, frequency_penalty=0.5, logprobs=4),
                      [], [0, 0, 1], None, [])
    lp = dict(sample(logits.clone(), [row]).top_logprobs[0])
    expect = torch.tensor([2.0 - 1.0 - 1.0, 1.0 - 1.0 - 0.5, -1.0, 0.5]).log_softmax(-1)
    for i in range(4):
        assert math.isclose(lp[i], expect[i].item(), abs_tol=1e-6)


def test_top_p_min_p_unit():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        row = SamplingRow(SamplingParams(temperature=1.0, top_p=0.7), [], [], g, [])
        seen.add(sample(logits.clone(), [row]).token_ids[0])
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.7; 2 and 3 are cut
    seen = set()
    for _ in range(200):
        row = SamplingRow(SamplingParams(temperature=1.0, min_p=0.5), [], [], g, [])
        seen.add(sample(logits.clone(), [row]).token_ids[0])
    assert seen == {0, 1}  # min_p 0.5 × 0.5 = 0.25 keeps 0.5 and 0.3


def test_greedy_fast_path_matches_the_fp32_path():
    """All-greedy rows with nothing to adjust take the argmax of the logits as they come (bf16 here);
    the same tokens as the fp32 path, first index on ties, and a row with a penalty or logprobs in
    the batch sends every row through the full path."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 500, generator=g).bfloat16()
    logits[0, 7] = logits[0, 300] = 9.0  # a tie: the first index wins
    plain = [SamplingRow(SamplingParams(temperature=0), [1], [], None, []) for _ in range(6)]
    fast = sample(logits, plain)
    assert fast.token_ids[0] == 7 and fast.logprobs is None
    assert fast.token_ids == logits.float().argmax(dim=-1).tolist()
    with_lp = plain[:5] + [SamplingRow(SamplingParams(temperature=0, logprobs=1), [1], [], None, [])]
    full = sample(logits, with_lp)
    assert full.token_ids == fast.token_ids and full.logprobs is not None
    penalised = plain[:5] + [SamplingRow(SamplingParams(temperature=0, repetition_penalty=2.0), [1], [300], None, [])]
    assert sample(logits, penalised).token_ids[:5] == fast.token_ids[:5]
