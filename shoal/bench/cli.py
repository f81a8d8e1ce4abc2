"""`shoal bench serve | throughput | latency`: each verb registers itself from its own module."""

from __future__ import annotations

import argparse
import importlib


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
