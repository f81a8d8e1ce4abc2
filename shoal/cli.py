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
from shoal.engine.args import add_engine_args, engine_options


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


def _hook(module: str, fn: str) -> Callable[[Any], None]:
    """A subcommand's parser hook, imported only now (so `shoal --help` stays light). A module that
    fails to import is an error, not a silently missing subcommand."""
    import importlib

    return getattr(importlib.import_module(module), fn)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shoal", description="Serve DeepSeek-family models on any chip.")
    p.add_argument("--version", action="version", version=f"shoal {__version__}")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="complete a prompt, streaming to stdout")
    g.add_argument("prompt")
    g.add_argument("--chat-template", action="store_true", help="wrap the prompt as a user chat message")
    add_engine_args(g)
    _add_sampling_args(g, 128)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat with the model's chat template")
    c.add_argument("--system", default=None, help="system prompt")
    add_engine_args(c)
    _add_sampling_args(c, 512)
    c.set_defaults(func=cmd_chat)

    for module, fn in [
        ("shoal.server.cli", "add_serve_parser"),
        ("shoal.bench.cli", "add_bench_parser"),
        ("shoal.planner.cli", "add_plan_parser"),
        ("shoal.backends.cli", "add_doctor_parser"),
        ("shoal.backends.cli", "add_conformance_parser"),
    ]:
        _hook(module, fn)(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from shoal.errors import ShoalError

    try:
        return int(args.func(args) or 0)
    except ShoalError as exc:
        print(f"shoal: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
