"""shoal: batch-1 latency (prefill 512, decode 128) and offline throughput; one JSON result line.
Default configuration: the default model's GGUF blocks packed (int4 layers, int8 LM head), bf16
compute, compiled decode step. Start-up (load + compile) is not timed."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import PREFILL_REPEATS, THREADS, emit, latency_prompts, median, throughput_workload  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--recipe", default="ci")
    ap.add_argument("--quantization", default="none")
    ap.add_argument("--eager", action="store_true")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(THREADS)
    from shoal import LLM
    from shoal.bench.latency import _timed_request
    from shoal.bench.throughput import run_throughput

    t = time.perf_counter()
    llm = LLM(None, progress=False, enforce_eager=a.eager, quantization=a.quantization,
              enable_prefix_caching=False, kv_cache_memory=1 << 30)
    startup = time.perf_counter() - t
    # where the platform runs a decode step's layers as one call, the step is not compiled
    mode = "compiled" if llm.engine.runner._compiled_decode is not None else "as one fused call (not compiled)"
    eng = llm.engine
    long, short = latency_prompts()
    _timed_request(eng, long, 2)
    _timed_request(eng, short, 8)
    prefill, decode = [], []
    for _ in range(a.runs):
        ttfts = [_timed_request(eng, long, 1)[0] for _ in range(PREFILL_REPEATS)]
        prefill.append(len(long) * PREFILL_REPEATS / sum(ttfts))
        _, span, n = _timed_request(eng, short, 128)
        decode.append((n - 1) / span)
    w = throughput_workload(a.recipe)
    run_throughput(llm, w.prompts[:4], [8] * 4)
    tput = [run_throughput(llm, w.prompts, w.output_lens)["output_tok_s"] for _ in range(a.runs)]
    from shoal.backends.cpu import kernels

    emit({"engine": "shoal", "startup_s": startup, "prefill_tok_s": median(prefill), "decode_tok_s": median(decode),
          "throughput_tok_s": median(tput), "prefill_runs": prefill, "decode_runs": decode, "throughput_runs": tput,
          "config": f"GGUF Q4_1 blocks packed (int4 g32 layers, int8 LM head), {str(llm.engine.runner.dtype)[6:]}, "
                    f"kernel tier {kernels.tier()}, "
                    f"{'eager' if a.eager else 'decode ' + mode}, quantization={a.quantization}"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
