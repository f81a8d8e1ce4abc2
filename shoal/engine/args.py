"""Engine options on the command line: one definition for every command that builds an engine
(`shoal generate | chat | serve | bench`), and the flat keyword options `LLM(...)` takes. Imports
nothing heavy, so `shoal --help` stays fast."""

from __future__ import annotations

import argparse
from typing import Any


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine's options, the same on every command that builds one (generate, chat, serve, bench)."""
    p.add_argument("--model", "-m", default=None,
                   help="HF directory, HF-cache id, or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="platform to run on (cpu, cuda, npu, xpu, mps, or a plug-in)")
    p.add_argument("--quantization", default="none", choices=["none", "int8", "int4"],
                   help="quantize weights at load (weight-only)")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-memory", type=str, default=None,
                   help="KV cache budget, e.g. 512MiB or 2GiB (default: a fraction of free memory)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (torch.compile) at start-up: faster decode, slower start")


def parse_size(text: str | None) -> int | None:
    if text is None:
        return None
    units = {"k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30, "b": 1,
             "kb": 10**3, "mb": 10**6, "gb": 10**9}
    t = text.strip().lower()
    for suffix in sorted(units, key=len, reverse=True):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * units[suffix])
    return int(t)


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return dict(
        dtype=args.dtype,
        device=args.device,
        quantization=args.quantization,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory=parse_size(args.kv_cache_memory),
        block_size=args.block_size,
        enable_prefix_caching=not args.no_prefix_caching,
        enforce_eager=not getattr(args, "compile", False),
    )
