"""`shoal bench latency`: batch-1 prefill and decode speed of the offline engine.

- prefill: a prompt of `--input-len` random token ids (prefix cache off), one output token;
  tokens/s = input_len / time to the first token.
- decode: a short prompt (`--decode-prompt-len`), `--output-len` tokens with EOS ignored;
  tokens/s = (output_len − 1) / (time from the first to the last token).
Each is run `--runs` times after one warm-up; the median is reported (and every run in the JSON).

    shoal bench latency --input-len 512 --output-len 128 --runs 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any


def random_ids(n: int, rng: random.Random, lo: int = 100, hi: int = 49000) -> list[int]:
    """Token ids from the ordinary part of the vocabulary (skips special tokens at the start)."""
    return [rng.randrange(lo, hi) for _ in range(n)]


def _timed_request(engine: Any, ids: list[int], max_tokens: int) -> tuple[float, float, int]:
    """Run one request alone; (seconds to first token, seconds first → last token, tokens)."""
    from shoal.sampling_params import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    engine.add_request(None, {"prompt_token_ids": ids}, sp)
    first = last = None
    n = 0
    while engine.has_unfinished():
        for out in engine.step():
            now = time.perf_counter()
            got = len(out.outputs[0].token_ids)
            if got > n:
                n = got
                first = first or now
                last = now
    assert first is not None and last is not None
    return first - t0, last - first, n


def measure_latency(engine: Any, input_len: int = 512, output_len: int = 128, runs: int = 5,
                    decode_prompt_len: int = 16, seed: int = 0) -> dict[str, Any]:
    rng = random.Random(seed)
    _timed_request(engine, random_ids(input_len, rng), 2)  # warm-up
    _timed_request(engine, random_ids(decode_prompt_len, rng), 8)
    prefill, decode = [], []
    for _ in range(runs):
        ttft, _, _ = _timed_request(engine, random_ids(input_len, rng), 1)
        prefill.append(input_len / ttft)
        _, span, n = _timed_request(engine, random_ids(decode_prompt_len, rng), output_len)
        decode.append((n - 1) / span)
    return {
        "input_len": input_len, "output_len": output_len, "runs": runs,
        "prefill_tok_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode),
        "prefill_runs": prefill, "decode_runs": decode,
    }


def add_bench_latency_parser(verbs: argparse._SubParsersAction) -> None:
    from shoal.bench.cli import add_offline_args

    p = verbs.add_parser("latency", help="batch-1 prefill and decode tokens/s of the offline engine")
    add_offline_args(p, runs=5)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--decode-prompt-len", type=int, default=16)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from shoal.bench.cli import offline_llm

    # batch 1: only the batch-1 decode graph is compiled
    llm = offline_llm(args, enable_prefix_caching=False, max_num_seqs=1)
    res = measure_latency(llm.engine, args.input_len, args.output_len, args.runs, args.decode_prompt_len, args.seed)
    res["engine"] = "shoal"
    print(f"prefill {args.input_len} tokens: {res['prefill_tok_s']:.0f} tokens/s   "
          f"decode batch 1: {res['decode_tok_s']:.1f} tokens/s  (median of {args.runs})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0
