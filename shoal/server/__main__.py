"""`python -m shoal.server [--model M] [--port P] ...`: the same as `shoal serve`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from shoal.server.cli import add_serve_args, cmd_serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shoal.server", description="OpenAI-compatible server")
    add_serve_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return cmd_serve(args)


if __name__ == "__main__":
    sys.exit(main())
