"""The compiled decode step (torch.compile, batch buckets, symbolic context length) gives the same
greedy tokens as eager execution, alone and batched, on a tiny random Llama (float32 activations,
int4 weights). Growing contexts cross block boundaries, so the symbolic block-table width is
exercised; the compiled graph is reused, not re-traced per length."""

from __future__ import annotations

import pytest
from torch._dynamo.utils import counters

from shoal import LLM, SamplingParams
from tests.tiny import make_llama

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PROMPTS = [[5, 9, 17, 33], [100, 7, 7, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [3] * 30]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("tiny") / "llama")


def test_compiled_decode_matches_eager(model_dir):
    # int4 weights: the graph holds both the packed-kernel calls and every float op (one variant
    # only, to keep `make test` quick: a cold compile takes ~20 s)
    kw = dict(dtype="float32", quantization="int4", progress=False, max_num_seqs=4, num_blocks_override=64)
    eager = LLM(str(model_dir), enforce_eager=True, **kw)
    compiled = LLM(str(model_dir), enforce_eager=False, **kw)
    runner = compiled.engine.runner
    assert runner._compiled_decode is not None, "compile failed; see the warning in the log"
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    graphs = counters["stats"]["unique_graphs"]
    for p in prompts:  # batch 1
        assert compiled.generate(p, GREEDY)[0].outputs[0].token_ids == eager.generate(p, GREEDY)[0].outputs[0].token_ids
    assert counters["stats"]["unique_graphs"] == graphs, "batch-1 decode was re-traced for a new context length"
    graphs = counters["stats"]["unique_graphs"]
    together_c = [o.outputs[0].token_ids for o in compiled.generate(prompts, GREEDY)]  # batch 3, then 2, 1
    together_e = [o.outputs[0].token_ids for o in eager.generate(prompts, GREEDY)]
    assert together_c == together_e
    # buckets were compiled at start-up; new context lengths and batch sizes reuse them
    assert counters["stats"]["unique_graphs"] == graphs, "decode step was re-traced after warm-up"


def test_padded_decode_batches_match_eager(model_dir):
    # above the GEMV range (8 rows) decode batches are padded to a static size (here max_num_seqs =
    # 10) over the scratch KV block; padded rows must not disturb the real ones or any cache block
    kw = dict(dtype="float32", progress=False, max_num_seqs=10, num_blocks_override=64)
    eager = LLM(str(model_dir), enforce_eager=True, **kw)
    compiled = LLM(str(model_dir), enforce_eager=False, **kw)
    runner = compiled.engine.runner
    assert runner._compiled_decode is not None, "compile failed; see the warning in the log"
    assert runner._padded_sizes == [10] and "padded10" in runner._compiled_decode
    prompts = [{"prompt_token_ids": [7 + i, 3 * i + 1, 50 - i] * (i + 1)} for i in range(9)]  # batch 9 → 10
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    graphs = counters["stats"]["unique_graphs"]
    got = [o.outputs[0].token_ids for o in compiled.generate(prompts, params)]
    assert counters["stats"]["unique_graphs"] == graphs, "padded decode was re-traced after warm-up"
    assert got == [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
    # the scratch block is outside what the block manager hands out
    assert runner.scratch_block == compiled.engine.scheduler.block_manager.num_blocks


def test_compiled_deepseek_decode_matches_eager(tmp_path):
    # an MoE step does not compile as one graph: each decoder layer's forward becomes a frame shared
    # by every layer. Without module guards the frame compiled for layer 0 ran every layer with
    # layer 0's frozen weights (wrong tokens from the second one on); the runner now detects the
    # graph breaks and recompiles with guards. Batch 4 (symbolic graph) and 9 (padded to 10).
    from tests.parity.ds_utils import make_deepseek

    d = make_deepseek(tmp_path / "ds", "v3")
    kw = dict(dtype="float32", progress=False, max_num_seqs=10, num_blocks_override=128)
    eager = LLM(str(d), enforce_eager=True, **kw)
    compiled = LLM(str(d), enforce_eager=False, **kw)
    assert compiled.engine.runner._compiled_decode is not None, "compile failed; see the warning in the log"
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    for n in (4, 9):
        prompts = [{"prompt_token_ids": [5 + i, 9, 17 + 2 * i] * (i + 1)} for i in range(n)]
        got = [o.outputs[0].token_ids for o in compiled.generate(prompts, params)]
        assert got == [o.outputs[0].token_ids for o in eager.generate(prompts, params)], f"batch {n}"
