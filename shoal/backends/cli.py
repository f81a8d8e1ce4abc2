"""`shoal doctor` and `shoal conformance`, registered into the main CLI through
`add_doctor_parser(subparsers)` / `add_conformance_parser(subparsers)`. Handlers take the parsed
args and return an exit code."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_doctor_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("doctor", help="show platforms, devices, op implementations, and whether the default "
                                      "model loads")
    p.add_argument("--device", default=None, help="platform to check the default model on (default: auto)")
    p.add_argument("--skip-model", action="store_true", help="do not load the default model")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_doctor)
    return p


def cmd_doctor(args: argparse.Namespace) -> int:
    from shoal.backends.doctor import doctor_exit_code, doctor_report, format_report

    rep = doctor_report(args.device, check_model=not args.skip_model)
    print(json.dumps(rep, indent=1, default=str) if args.json else format_report(rep))
    return doctor_exit_code(rep)


def _split(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def add_conformance_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("conformance", help="check every op and tiny-model parity on a device against the CPU")
    p.add_argument("--device", default=None, help="platform to test (cpu, cuda, npu, xpu, mps, a plug-in; "
                                                  "default: auto)")
    p.add_argument("--dtype", action="append", default=None, metavar="DTYPE",
                   help="float32, bfloat16, float16 (repeat or comma-separate; default: all the device supports)")
    p.add_argument("--report", default=None, metavar="FILE",
                   help="write the report: FILE.md (Markdown) and FILE.json side by side")
    p.add_argument("--seed", type=int, default=None, help="input seed (default: fresh; printed in the report)")
    p.add_argument("--ops", action="append", default=None, help="only these ops (comma-separated)")
    p.add_argument("--models", action="append", default=None,
                   help="only these end-to-end models (llama, qwen2, deepseek_v3)")
    p.add_argument("--skip-e2e", action="store_true", help="ops only, no end-to-end parity")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the summary")
    p.set_defaults(func=cmd_conformance)
    return p


def report_paths(path: str) -> tuple[Path, Path]:
    base = Path(path)
    if base.suffix in (".md", ".json"):
        base = base.with_suffix("")
    return base.with_suffix(".md"), base.with_suffix(".json")


def cmd_conformance(args: argparse.Namespace) -> int:
    from shoal.backends.conformance import run_conformance
    from shoal.backends.registry import resolve_platform

    platform = resolve_platform(args.device)
    log = None if args.quiet else (lambda line: print(line, flush=True))
    report = run_conformance(platform, dtypes=_split(args.dtype), seed=args.seed, ops=_split(args.ops),
                             e2e=not args.skip_e2e, models=_split(args.models), log=log)
    if args.report:
        md, js = report_paths(args.report)
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(report.to_markdown())
        js.write_text(report.to_json())
        print(f"report: {md} and {js}")
    for f in report.failures:
        print(f"FAILED: {f.op if hasattr(f, 'op') else f.model} {getattr(f, 'case', '')} "
              f"{f.dtype}: {f.detail}", file=sys.stderr)
    print(report.summary())
    return 0 if report.passed else 1
