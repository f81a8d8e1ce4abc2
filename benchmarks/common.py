"""Shared by every benchmark runner (each peer runs in its own virtual environment, so this file
imports only the standard library): the workloads, as token ids, identical for every engine."""

from __future__ import annotations

import json
import random
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENVS = ROOT / ".bench-venvs"
HF_COPY = VENVS / "smollm2-bf16-hf"  # bf16 safetensors copy of the default model (peers/make_hf_copy.py)
THREADS = 2
# Each prefill sample is the rate over this many back-to-back requests of the 512-token prompt: a
# single request (~0.15 s for the fast engines) varied ±15% from sample to sample on this machine.
PREFILL_REPEATS = 5
EOS = 2  # SmolLM2's <|endoftext|>; every engine is told to ignore it
VOCAB_LO, VOCAB_HI = 100, 49000  # ordinary token ids (skips the special tokens at the start)

# the throughput recipes: nano-vllm's scaled to the machine, and the smaller one the
# peers were first measured with (MACHINE-NOTES: vLLM ≈ 300, transformers ≈ 220 output tokens/s)
RECIPES = {
    "ci": dict(num_requests=32, input_len=(64, 192), output_len=(64, 64)),
    "nano": dict(num_requests=64, input_len=(32, 512), output_len=(32, 256)),
}


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]


def random_ids(n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(VOCAB_LO, VOCAB_HI) for _ in range(n)]


def throughput_workload(recipe: str = "ci", seed: int = 0) -> Workload:
    r = RECIPES[recipe]
    rng = random.Random(seed)
    lo, hi = r["input_len"]
    olo, ohi = r["output_len"]
    prompts = [random_ids(rng.randint(lo, hi), rng) for _ in range(r["num_requests"])]
    outs = [rng.randint(olo, ohi) for _ in range(r["num_requests"])]
    return Workload(prompts, outs)


def latency_prompts(input_len: int = 512, decode_prompt_len: int = 16, seed: int = 1) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    return random_ids(input_len, rng), random_ids(decode_prompt_len, rng)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def emit(result: dict) -> None:
    """Runners print one JSON line, prefixed so the orchestrator can find it among library logs."""
    print("RESULT " + json.dumps(result), flush=True)
    sys.stdout.flush()


__all__ = ["Workload", "asdict", "emit", "latency_prompts", "median", "throughput_workload", "HF_COPY", "THREADS"]
