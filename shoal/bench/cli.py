"""`shoal bench serve | throughput | latency`: each verb registers itself from its own module."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any


def add_offline_args(p: argparse.ArgumentParser, runs: int) -> None:
    """Options every offline benchmark verb shares: the engine's, plus runs/seed/eager/json."""
    from shoal.engine.args import add_engine_args

    add_engine_args(p)
    p.add_argument("--runs", type=int, default=runs)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--enforce-eager", action="store_true", help="do not compile the decode step")
    p.add_argument("--json", default=None, help="also write the result here")


def offline_llm(args: argparse.Namespace, **overrides: Any) -> Any:
    """The offline engine for a benchmark verb, from its parsed options."""
    from shoal.engine.args import engine_options
    from shoal.engine.llm import LLM

    opts = engine_options(args) | {"enforce_eager": args.enforce_eager} | overrides
    return LLM(args.model, progress=sys.stderr.isatty(), **opts)


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="load-test a server or measure offline throughput/latency")
    verbs = p.add_subparsers(dest="bench_command", metavar="VERB")
    for module, fn in [
        ("shoal.server.cli", "add_bench_serve_parser"),
        ("shoal.bench.throughput", "add_bench_throughput_parser"),
        ("shoal.bench.latency", "add_bench_latency_parser"),
    ]:
        try:
            hook = getattr(importlib.import_module(module), fn)
        except (ImportError, AttributeError):
            continue
        hook(verbs)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
