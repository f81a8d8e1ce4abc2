"""`shoal plan` command line: plan (default), `validate` and `calibrate`.

    shoal plan --model deepseek-r1 --chip h800,ascend-910c,h20 --isl 4096 --osl 1024 --tpot-ms 50
    shoal plan validate [--data FILE] [--json] [--refit] [--cv]
    shoal plan calibrate RESULTS.json [-o overlay.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .chips import EFFICIENCY_FILE, Catalog
from .model import ModelSpec


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("args", nargs="*", help="optional verb: validate | calibrate RESULTS.json (default: plan)")
    p.add_argument("--model", default="deepseek-r1", help="config.json/.gguf path or shipped name (deepseek-v3, r1, v2-lite, r1-distill-*)")
    p.add_argument("--chip", default="h800,h20,ascend-910c,mi300x", help="comma-separated chip ids from the catalog")
    p.add_argument("--isl", type=int, default=4096, help="input tokens per request")
    p.add_argument("--osl", type=int, default=1024, help="output tokens per request")
    p.add_argument("--tpot-ms", type=float, default=50.0, help="time-per-output-token target")
    p.add_argument("--ttft-ms", type=float, default=None, help="time-to-first-token target for one prefill batch")
    p.add_argument("--precision", default="fp8,int8,bf16", help="precisions to consider (fp8,int8,bf16,int4,fp4)")
    p.add_argument("--max-devices", type=int, default=256)
    p.add_argument("--mtp", type=int, default=0, help="MTP draft tokens per step")
    p.add_argument("--mtp-accept", type=float, default=0.8, help="MTP acceptance rate per draft token")
    p.add_argument("--node-size", type=int, default=None, help="devices per scale-up domain (default: catalog, else 8)")
    p.add_argument("--scaleout-gbs", type=float, default=None,
                   help="assumed per-device scale-out (NIC) bandwidth in GB/s for chips whose catalog value is unknown")
    p.add_argument("--price", default=None, help="rent per chip-hour, e.g. h20=1.2,ascend-910c=1.5 (overrides the catalog)")
    p.add_argument("--objective", choices=("throughput", "cost"), default="throughput")
    p.add_argument("--chips", action="append", default=[], help="extra chip JSON file (overlay); repeatable")
    p.add_argument("--efficiency", default=None, help="efficiency JSON replacing data/efficiency.json")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--plot", default=None, help="write the Pareto plot (PNG) here")
    # validate
    p.add_argument("--data", default=None, help="validate: measurement file (CSV or JSON, documented format)")
    p.add_argument("--refit", action="store_true", help="validate: refit the global knobs on the FIT rows first")
    p.add_argument("--save-efficiency", default=None, help="validate --refit: write the refitted efficiency JSON here")
    p.add_argument("--cv", action="store_true", help="validate: also run leave-one-source-out cross-validation")
    # calibrate
    p.add_argument("-o", "--out", default="chips-calibrated.json", help="calibrate: overlay file to write")


def add_plan_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="predict throughput, latency and cost on accelerators",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_options(p)
    p.set_defaults(func=run)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shoal plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_options(p)
    return p


def _catalog(ns: argparse.Namespace) -> Catalog:
    cat = Catalog.load(ns.chips, ns.efficiency)
    if ns.scaleout_gbs:
        for c in cat.chips.values():
            if c.v("scaleout_gbs") is None and c.v("ep_rdma_gbs") is None:
                c.raw["scaleout_gbs"] = {"value": ns.scaleout_gbs, "src": "user (--scaleout-gbs)", "conf": "user"}
    return cat


def _fmt(x: float | None, nd: int = 0) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.{nd}f}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    w = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w[i]) for i, h in enumerate(headers)) + " |"
    sep = "|" + "|".join("-" * (x + 2) for x in w) + "|"
    body = ["| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |" for r in rows]
    return "\n".join([line, sep, *body])


def cmd_plan(ns: argparse.Namespace, out=None) -> int:
    out = out or sys.stdout
    from .search import DEV_COUNTS, plan_chip

    cat = _catalog(ns)
    spec = ModelSpec.load(ns.model)
    prices: dict[str, float] = {}
    if ns.price:
        for kv in ns.price.split(","):
            k, v = kv.split("=")
            prices[cat.get(k.strip()).id] = float(v)
    devs = [d for d in DEV_COUNTS if d <= ns.max_devices]
    plans = []
    for name in [c.strip() for c in ns.chip.split(",") if c.strip()]:
        chip = cat.get(name)
        rent = prices.get(chip.id, chip.v("rent_usd_hr"))
        plans.append(plan_chip(spec, chip, cat.efficiency_for(chip), isl=ns.isl, osl=ns.osl, tpot_ms=ns.tpot_ms,
                               ttft_ms=ns.ttft_ms, precisions=ns.precision.split(","), dev_counts=devs, rent=rent,
                               mtp=ns.mtp, mtp_accept=ns.mtp_accept, node_size=ns.node_size, objective=ns.objective))
    if ns.objective == "cost":
        plans.sort(key=lambda p: (p.cost_per_mtok is None, p.cost_per_mtok or 0))
    if ns.plot:
        from .plot import plot_pareto

        plot_pareto(plans, ns.plot, title=f"{spec.name}: ISL {ns.isl} / OSL {ns.osl}, TPOT <= {ns.tpot_ms:g} ms",
                    tpot_ms=ns.tpot_ms)
    if ns.json:
        json.dump({"model": spec.summary(), "isl": ns.isl, "osl": ns.osl, "tpot_ms": ns.tpot_ms,
                   "plans": [p.as_dict() for p in plans]}, out, indent=1)
        out.write("\n")
        return 0
    s = spec.summary()
    out.write(f"{spec.name}: {s['total_params'] / 1e9:.1f}B params ({s['active_params'] / 1e9:.1f}B active), "
              f"KV {s['kv_bytes_per_token_bf16']:,} B/token (bf16); ISL {ns.isl}, OSL {ns.osl}, TPOT <= {ns.tpot_ms:g} ms\n\n")
    rows = []
    for p in plans:
        d = p.decode
        rows.append([
            p.chip.name, d.layout.describe() if d else "-", str(d.layout.n_dev) if d else "-",
            f"{d.batch_per_dev:g}" if d else "-", _fmt(d.tpot_ms, 1) if d else "-", _fmt(d.tok_s_per_dev) if d else "-",
            _fmt(d.tok_s_per_user, 1) if d else "-", _fmt(p.prefill_tok_s_per_dev),
            p.prefill_layout.describe() if p.prefill_layout else "-", str(p.min_devices or "-"),
            _fmt(p.cost_per_mtok, 2), p.limiter,
        ])
    out.write(_table(["chip", "decode layout", "decode chips", "batch/chip", "TPOT ms", "decode tok/s/chip",
                      "tok/s/user", "prefill tok/s/chip", "prefill layout", "min chips (fit)", "$/Mtok out", "limiter"],
                     rows) + "\n")
    for p in plans:
        for n in p.notes:
            out.write(f"note ({p.chip.id}): {n}\n")
        if p.cost_per_mtok is None:
            out.write(f"note ({p.chip.id}): no rent in the catalog: pass --price {p.chip.id}=USD_PER_HOUR for $/Mtok\n")
    return 0


def cmd_validate(ns: argparse.Namespace, out=None) -> int:
    out = out or sys.stdout
    from .validate import FIT_ROWS, cross_validate_by_source, fit_globals, load_measurements, validate

    cat = _catalog(ns)
    rows = load_measurements(ns.data)
    fitted = None
    if ns.refit:
        fitted = fit_globals([r for r in rows if r["id"] in FIT_ROWS], cat)
        if ns.save_efficiency:
            eff = json.loads(Path(ns.efficiency or EFFICIENCY_FILE).read_text())
            eff["global"].update(fitted)
            eff["global"]["fitted_on"] = list(FIT_ROWS)
            eff["global"]["src"] = ("fitted by `shoal plan validate --refit` (coordinate descent on mean |log error|) "
                                    "on the FIT rows; all other rows held out")
            Path(ns.save_efficiency).write_text(json.dumps(eff, indent=1) + "\n")
    rep = validate(rows, cat)
    cv = cross_validate_by_source(rows, lambda: _catalog(ns)) if ns.cv else None
    if ns.json:
        d = rep.as_dict()
        if fitted:
            d["refitted"] = fitted
        if cv:
            d["cross_validation"] = cv
        json.dump(d, out, indent=1)
        out.write("\n")
        return 0
    trs = []
    for r in rep.rows:
        trs.append([r.id, r.src, r.engine[:16], r.chip, r.metric, _fmt(r.published, 1 if (r.published or 0) < 1000 else 0),
                    _fmt(r.predicted, 1 if (r.predicted or 1e9) < 1000 else 0),
                    "n/a" if r.error is None else f"{r.error:+.0%}", r.limiter or "-",
                    r.status if len(r.status) <= 110 else r.status[:107] + "..."])
    out.write(_table(["id", "src", "engine", "chip", "metric", "published", "predicted", "error", "limiter", "status"], trs) + "\n\n")
    for name, g in rep.groups.items():
        m = "n/a" if g["mape"] is None else f"{g['mape']:.1%}"
        out.write(f"MAPE {name:<18} {m:>7}  over {g['predicted']} predicted of {g['rows']} rows\n")
    if fitted:
        out.write(f"refitted globals: {fitted}\n")
    if cv:
        out.write(f"leave-one-source-out MAPE (GPU rows): {cv['mape']:.1%}\n")
        for s, v in cv["by_source"].items():
            out.write(f"  {s}: {v['mape'] if v['mape'] is None else round(v['mape'], 3)} on {','.join(v['rows'])}\n")
    out.write("errors are on tokens/s (time metrics inverted); headline MAPE = 'gpu' group (decode/prefill rates)\n")
    return 0


def cmd_calibrate(ns: argparse.Namespace, path: str, out=None) -> int:
    out = out or sys.stdout
    from .calibrate import calibrate, load_records

    cat = _catalog(ns)
    overlay = calibrate(load_records(path), cat)
    report = overlay.pop("report")
    Path(ns.out).write_text(json.dumps(overlay, indent=1) + "\n")
    if ns.json:
        json.dump({"overlay": ns.out, "report": report}, out, indent=1)
        out.write("\n")
    else:
        for chip, r in report.items():
            out.write(f"{chip}: {r['points']} points, mean |log err| {r['mean_abs_log_error_before']:.3f} -> "
                      f"{r['mean_abs_log_error_after']:.3f} (compute x{r['compute_scale']}, memory x{r['memory_scale']})\n")
        out.write(f"wrote {ns.out}; use it with --chips {ns.out}\n")
    return 0


def run(ns: argparse.Namespace) -> int:
    verb = ns.args[0] if ns.args else "plan"
    if verb == "validate":
        return cmd_validate(ns)
    if verb == "calibrate":
        if len(ns.args) < 2:
            print("usage: shoal plan calibrate RESULTS.json [-o overlay.json]", file=sys.stderr)
            return 2
        return cmd_calibrate(ns, ns.args[1])
    if verb == "plan":
        return cmd_plan(ns)
    print(f"unknown plan verb {verb!r} (use validate or calibrate)", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return run(ns)
