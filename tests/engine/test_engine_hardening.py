"""The engine under hostile or careless input. One request can never hurt another: a failure while
sampling or detokenizing one row of a batch ends that request with an error, and every other request
in the batch finishes with exactly the tokens it gets when run without the failing one. Bad values
are refused before they reach a step, and a KV cache too small for one sequence at start-up."""

from __future__ import annotations

import pytest

from shoal import LLM, SamplingParams
from shoal.engine.outputs import RequestFailed
from shoal.layers import sampler
from tests.tiny import make_llama

N = 16
POISON = 15  # the request that fails; the others are greedy or seeded, so their tokens are exact
MARK = 1.2345  # repetition_penalty that marks the poisoned row for the injected failure


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = make_llama(tmp_path_factory.mktemp("llama"), max_position_embeddings=256)
    return LLM(str(path), dtype="float32", progress=False, kv_cache_memory=8 * 2**20, max_model_len=256)


def _batch() -> tuple[list[dict], list[SamplingParams]]:
    prompts = [{"prompt_token_ids": [10 + i, 20 + i, 30 + i]} for i in range(N)]
    params = []
    for i in range(N):
        if i % 2:
            params.append(SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i, max_tokens=12, ignore_eos=True,
                                         logprobs=2))
        else:
            params.append(SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    return prompts, params


def _reference(llm) -> list[list[int]]:
    prompts, params = _batch()
    outs = llm.generate(prompts[:POISON] + prompts[POISON + 1:], params[:POISON] + params[POISON + 1:])
    return [o.outputs[0].token_ids for o in outs]


def _check_others(outs, reference) -> None:
    others = [o for i, o in enumerate(outs) if i != POISON]
    assert [o.outputs[0].token_ids for o in others] == reference
    assert all(o.outputs[0].finish_reason == "length" and o.error is None for o in others)


def test_a_sampling_failure_in_one_row_ends_only_that_request(llm, monkeypatch):
    reference = _reference(llm)
    real = sampler._apply_penalties

    def failing(logits, rows):
        if any(r.params.repetition_penalty == MARK for r in rows):
            raise RuntimeError("injected failure")
        return real(logits, rows)

    monkeypatch.setattr(sampler, "_apply_penalties", failing)
    prompts, params = _batch()
    params[POISON] = SamplingParams(temperature=0.7, repetition_penalty=MARK, max_tokens=12, ignore_eos=True)
    outs = llm.generate(prompts, params)
    bad = outs[POISON]
    assert bad.finished and isinstance(bad.error, RequestFailed) and not bad.error.client_error
    assert "injected failure" in str(bad.error) and bad.outputs[0].finish_reason == "error"
    _check_others(outs, reference)
    assert not llm.engine.has_unfinished()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_a_detokenizer_failure_in_one_row_ends_only_that_request(llm):
    reference = _reference(llm)
    prompts, params = _batch()
    eng = llm.engine
    ids = [eng.add_request(None, p, sp) for p, sp in zip(prompts, params)]
    group = eng.groups[ids[POISON]]

    def broken(tok: int) -> str:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")

    group.samples[0].detok.add = broken  # type: ignore[method-assign]
    done = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    outs = [done[i] for i in ids]
    assert outs[POISON].error is not None and "UnicodeDecodeError" in str(outs[POISON].error)
    _check_others(outs, reference)
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_non_finite_logits_end_the_request_as_a_client_error(llm):
    """repetition_penalty 1e-300 turns logits into ±inf: that request gets a client error (a 400 in
    the server), its batch-mates their exact tokens."""
    reference = _reference(llm)
    prompts, params = _batch()
    params[POISON] = SamplingParams(temperature=1.0, repetition_penalty=1e-300, logprobs=1, max_tokens=12,
                                    ignore_eos=True)
    outs = llm.generate(prompts, params)
    err = outs[POISON].error
    assert isinstance(err, RequestFailed) and err.client_error and "non-finite" in str(err)
    _check_others(outs, reference)


@pytest.mark.parametrize("kw, param", [
    ({"seed": 2**64}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"top_k": 10**30}, "top_k"),
    ({"stop_token_ids": [10**6], "min_tokens": 2}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty"),
    ({"temperature": float("inf")}, "temperature"),
])
def test_values_the_engine_cannot_use_are_refused_before_any_step(llm, kw, param):
    with pytest.raises(ValueError) as e:
        llm.engine.add_request(None, {"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=4, **kw))
    assert e.value.param == param  # type: ignore[attr-defined]
    assert not llm.engine.has_unfinished()


def test_child_seeds_wrap_into_64_bits(llm):
    top = 2**63 - 1
    out = llm.generate({"prompt_token_ids": [5, 6]}, SamplingParams(n=3, seed=top, temperature=1.0, max_tokens=4,
                                                                    ignore_eos=True))[0]
    assert len(out.outputs) == 3 and all(len(o.token_ids) == 4 for o in out.outputs)
    assert SamplingParams(seed=top).child_seed(1) == -(2**63)


def test_a_cache_that_cannot_hold_one_full_sequence_is_refused_at_start_up(tmp_path):
    from shoal.config import ConfigError

    path = make_llama(tmp_path / "llama", max_position_embeddings=256)
    with pytest.raises(ConfigError, match=r"holds 32 tokens .*--max-model-len 256.*--kv-cache-memory"):
        LLM(str(path), dtype="float32", progress=False, num_blocks_override=2, max_model_len=256)
