"""`shoal bench throughput`: offline batch throughput, nano-vllm's recipe scaled to the machine.

All requests are submitted at once (random token ids, EOS ignored) and the engine runs until every
one is done; throughput = output tokens / wall time (prompt tokens are reported, not counted).
Recipes: `nano` = 64 requests, input 32–512, output 32–256 tokens; `ci` = 32 requests, input
64–192, output 64 (the one the peers were first measured with). One warm-up run precedes the
measured ones; the median is reported.

    shoal bench throughput --recipe ci --runs 3
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

RECIPES = {
    "nano": dict(num_requests=64, input_len=(32, 512), output_len=(32, 256)),
    "ci": dict(num_requests=32, input_len=(64, 192), output_len=(64, 64)),
}


def make_workload(recipe: str = "nano", seed: int = 0, lo: int = 100, hi: int = 49000
                  ) -> tuple[list[list[int]], list[int]]:
    """Same ids as benchmarks/common.py `throughput_workload` for the same recipe and seed."""
    r = RECIPES[recipe]
    rng = random.Random(seed)
    ilo, ihi = r["input_len"]
    olo, ohi = r["output_len"]
    prompts = [[rng.randrange(lo, hi) for _ in range(rng.randint(ilo, ihi))] for _ in range(r["num_requests"])]
    outs = [rng.randint(olo, ohi) for _ in range(r["num_requests"])]
    return prompts, outs


def run_throughput(llm: Any, prompts: list[list[int]], output_lens: list[int]) -> dict[str, float]:
    from shoal.sampling_params import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in output_lens]
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    dt = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"seconds": dt, "output_tokens": n_out, "prompt_tokens": sum(map(len, prompts)),
            "output_tok_s": n_out / dt}


def add_bench_throughput_parser(verbs: argparse._SubParsersAction) -> None:
    from shoal.bench.cli import add_offline_args

    p = verbs.add_parser("throughput", help="offline batch throughput (output tokens/s)")
    add_offline_args(p, runs=3)
    p.add_argument("--recipe", choices=sorted(RECIPES), default="nano")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from shoal.bench.cli import offline_llm

    llm = offline_llm(args)
    prompts, outs = make_workload(args.recipe, args.seed)
    run_throughput(llm, prompts[:4], [8] * min(4, len(prompts)))  # warm-up
    runs = [run_throughput(llm, prompts, outs) for _ in range(args.runs)]
    res = {"engine": "shoal", "recipe": args.recipe, "runs": runs,
           "output_tok_s": statistics.median(r["output_tok_s"] for r in runs)}
    print(f"{args.recipe}: {len(prompts)} requests, {runs[0]['output_tokens']} output tokens: "
          f"{res['output_tok_s']:.0f} output tokens/s (median of {args.runs})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0
