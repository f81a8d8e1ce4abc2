"""Command-line hooks: `shoal serve` and `shoal bench serve`. The top-level CLI (`shoal/cli.py`)
calls `add_serve_parser(subparsers)` and `add_bench_serve_parser(bench_subparsers)`."""

from __future__ import annotations

import argparse
import os
from typing import Any


def add_serve_args(p: argparse.ArgumentParser) -> None:
    from shoal.engine.args import add_engine_args, parse_size

    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("SHOAL_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $SHOAL_API_KEY, else none)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients send; the first is reported (default: the model's name)")
    p.add_argument("--max-body-bytes", type=parse_size, default=8 * 2**20,
                   help="largest request body, e.g. 8MiB (larger bodies get 413)")
    p.add_argument("--max-waiting", type=int, default=None,
                   help="requests allowed to wait for a slot before the server answers 503 (default: engine's)")
    p.add_argument("--shutdown-timeout", type=int, default=30,
                   help="seconds SIGTERM waits for in-flight requests; then each gets an error (streams: an "
                        "error event and [DONE])")
    limits = p.add_argument_group("limits per request (each refusal is a 400 naming the flag)")
    limits.add_argument("--max-n", type=int, default=128, help="most samples (n) per request")
    limits.add_argument("--max-logprob-entries", type=int, default=2**18,
                        help="most logprob entries one request may return: prompts x n x tokens x (1 + top_logprobs)")
    limits.add_argument("--request-header-timeout", type=float, default=10.0,
                        help="seconds a connection has to send a complete request head (slow clients are dropped)")
    limits.add_argument("--request-body-timeout", type=float, default=30.0,
                        help="seconds each part of a request body may take to arrive (else 408)")
    limits.add_argument("--max-header-bytes", type=parse_size, default=16 * 2**10,
                        help="largest request head (request line and headers), e.g. 16KiB")
    limits.add_argument("--chat-template-timeout", type=float, default=2.0,
                        help="seconds a request's own chat_template may render (--allow-request-chat-template)")
    limits.add_argument("--chat-template-memory", type=parse_size, default=256 * 2**20,
                        help="memory a request's own chat_template may use while rendering, e.g. 256MiB")
    limits.add_argument("--chat-template-max-chars", type=int, default=4 * 2**20,
                        help="longest prompt a request's own chat_template may render")
    p.add_argument("--reasoning-parser", choices=["auto", "deepseek_r1", "none"], default="auto",
                   help="split <think>...</think> into reasoning_content (auto: when the model knows <think>)")
    p.add_argument("--allow-request-chat-template", action="store_true",
                   help="let requests send their own chat_template (rendered in the same Jinja sandbox)")


def cmd_serve(args: argparse.Namespace) -> int:
    from shoal.server.api import run_server

    return run_server(args)


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, metrics)")
    add_serve_args(p)
    p.set_defaults(func=cmd_serve)
    return p


def add_bench_serve_parser(bench_subparsers: Any) -> argparse.ArgumentParser:
    from shoal.bench.serve import add_args, cmd_bench_serve

    p = bench_subparsers.add_parser("serve", help="load-test any OpenAI-compatible server (TTFT, TPOT, ITL, E2E)")
    add_args(p)
    p.set_defaults(func=cmd_bench_serve)
    return p
