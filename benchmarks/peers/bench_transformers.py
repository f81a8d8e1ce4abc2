"""transformers (bf16, the same weights as the GGUF dequantized, from the bf16 HF copy).
Prefill: one forward over 512 tokens; decode: (127) / (time of generate(128) − time of
generate(1)) on a short prompt; throughput: static batching, all requests in one left-padded
batch, generating the longest requested output for everyone (only requested tokens count)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import EOS, HF_COPY, PREFILL_REPEATS, THREADS, emit, latency_prompts, median, throughput_workload  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--recipe", default="ci")
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(THREADS)
    dtype = getattr(torch, a.dtype)
    model = AutoModelForCausalLM.from_pretrained(HF_COPY, dtype=dtype).eval()
    long, short = latency_prompts()

    def gen(ids: list[int], n: int) -> float:
        x = torch.tensor([ids])
        t = time.perf_counter()
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=EOS)
        return time.perf_counter() - t

    with torch.inference_mode():
        model(torch.tensor([long]))
        gen(short, 4)
        prefill, decode = [], []
        for _ in range(a.runs):
            t = time.perf_counter()
            for _ in range(PREFILL_REPEATS):
                model(torch.tensor([long]), use_cache=False)
            prefill.append(len(long) * PREFILL_REPEATS / (time.perf_counter() - t))
            decode.append(127 / (gen(short, 128) - gen(short, 1)))
        w = throughput_workload(a.recipe)
        width = max(map(len, w.prompts))
        ids = torch.full((len(w.prompts), width), EOS, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(w.prompts):  # left padding
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        n = max(w.output_lens)
        tput = []
        for _ in range(max(1, a.runs - 1)):
            t = time.perf_counter()
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=EOS)
            tput.append(sum(w.output_lens) / (time.perf_counter() - t))
    import transformers

    emit({"engine": f"transformers {a.dtype}", "prefill_tok_s": median(prefill), "decode_tok_s": median(decode),
          "throughput_tok_s": median(tput), "prefill_runs": prefill, "decode_runs": decode, "throughput_runs": tput,
          "config": f"transformers {transformers.__version__}, {a.dtype}, {THREADS} threads, static batching"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
