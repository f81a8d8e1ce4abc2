"""`shoal serve | chat | generate | bench | plan | doctor | conformance`.

Subcommands owned by other packages register themselves through `add_*_parser` hooks, imported
lazily so `shoal --version` and `shoal plan` never import torch.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable

from shoal import __version__


def _add_engine_args(p: argparse.ArgumentParser) -> None:
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


def _sampling(args: argparse.Namespace) -> Any:
    from shoal.sampling_params import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
        max_tokens=args.max_tokens, repetition_penalty=args.repetition_penalty,
    )


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def _stream(llm: Any, prompt: Any, params: Any) -> str:
    """Generate one request, printing text as it arrives; returns the full text."""
    eng = llm.engine
    rid = eng.add_request(None, prompt, params)
    shown = ""
    while eng.has_unfinished():
        for out in eng.step():
            if out.request_id != rid:
                continue
            text = out.outputs[0].text
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    return shown


def cmd_generate(args: argparse.Namespace) -> int:
    from shoal.engine.llm import LLM

    llm = LLM(args.model, **engine_options(args))
    prompt = args.prompt
    if args.chat_template:
        msgs = [{"role": "user", "content": prompt}]
        prompt = {"prompt_token_ids": llm.tokenizer.encode(
            llm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True), add_special_tokens=False)}
    _stream(llm, prompt, _sampling(args))
    sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from shoal.engine.llm import LLM

    llm = LLM(args.model, **engine_options(args))
    tok = llm.tokenizer
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print(f"shoal {__version__} chat with {llm.engine.source.name} — /exit to quit, /reset to clear", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        ids = tok.encode(tok.apply_chat_template(history, add_generation_prompt=True), add_special_tokens=False)
        if len(ids) >= llm.engine.max_model_len - 1:
            print("[conversation is longer than the context; /reset to start over]", file=sys.stderr)
            history.pop()
            continue
        reply = _stream(llm, {"prompt_token_ids": ids}, _sampling(args))
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": reply})


def _hook(module: str, fn: str) -> Callable[[Any], None] | None:
    import importlib

    try:
        return getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError):
        return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shoal", description="Serve DeepSeek-family models on any chip.")
    p.add_argument("--version", action="version", version=f"shoal {__version__}")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="complete a prompt, streaming to stdout")
    g.add_argument("prompt")
    g.add_argument("--chat-template", action="store_true", help="wrap the prompt as a user chat message")
    _add_engine_args(g)
    _add_sampling_args(g, 128)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat with the model's chat template")
    c.add_argument("--system", default=None, help="system prompt")
    _add_engine_args(c)
    _add_sampling_args(c, 512)
    c.set_defaults(func=cmd_chat)

    for module, fn in [
        ("shoal.server.cli", "add_serve_parser"),
        ("shoal.bench.cli", "add_bench_parser"),
        ("shoal.planner.cli", "add_plan_parser"),
        ("shoal.backends.cli", "add_doctor_parser"),
        ("shoal.backends.cli", "add_conformance_parser"),
    ]:
        hook = _hook(module, fn)
        if hook is not None:
            hook(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from shoal.errors import user_error_types

    try:
        return int(args.func(args) or 0)
    except user_error_types() as exc:
        print(f"shoal: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
