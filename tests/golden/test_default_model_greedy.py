"""Golden check on the real default model (SmolLM2-135M-Instruct, Q4_1 GGUF).

shoal's greedy continuation of 5 fixed prompts equals the one `transformers` produces from the
same GGUF file (dequantized to fp32), for the first 16 tokens each. Comparison stops at the first
step where the reference's top-2 logits are within 1e-3 (a near-tie float rounding may flip); such
a stop before token 8 fails the case.
"""

from __future__ import annotations

import os

import pytest
import torch

from shoal import LLM, SamplingParams
from shoal.loader import default_model_path
from tests.tiny import first_divergence, hf_greedy

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
    "Water boils at a temperature of",
]
N = 16

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    d, f = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    return tok, model


def test_greedy_matches_transformers(reference):
    tok, ref = reference
    llm = LLM(None, dtype="float32", progress=False)
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    for p, ids in zip(PROMPTS, prompt_ids):
        assert llm.tokenizer.encode(p) == ids, f"tokenization differs for {p!r}"
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids],
                        SamplingParams(temperature=0, max_tokens=N, ignore_eos=True))
    for p, ids, out in zip(PROMPTS, prompt_ids, outs):
        expect, margins = hf_greedy(ref, ids, N)
        tie = next((i for i, m in enumerate(margins) if m < 1e-3), N)
        assert tie >= 8, f"{p!r}: reference near-tie at step {tie}"
        got = out.outputs[0].token_ids
        div = first_divergence(got[:tie], expect[:tie])
        assert div is None, f"{p!r}: diverged at token {div}: {tok.decode(got)!r} vs {tok.decode(expect)!r}"
