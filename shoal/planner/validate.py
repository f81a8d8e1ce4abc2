"""Predict published measurements and report the error per row (no row is dropped).

Measurement file format (CSV with a header, or JSON: a list of objects with the same keys; see
docs/planner.md): id, src, conf, engine, model, chip, n_dev, tp, ep, precision, attn_precision,
kv_dtype, tbo, mtp, mtp_accept, mtp_tokens_per_step, eplb, pd, mode, isl, osl, ctx, conc,
tokens_per_dev, metric, value, published, predict, reason, notes.

Errors are computed on rates: for time metrics (tpot_ms, ttft_ms) the error is that of the implied
tokens/s, i.e. published/predicted - 1; for rate metrics predicted/published - 1.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .chips import Catalog, UnknownValue
from .cost import Layout, Predictor, Unpredictable
from .model import ModelSpec

DEFAULT_MEASUREMENTS = Path(__file__).resolve().parent / "data" / "measurements.csv"
TIME_METRICS = {"tpot_ms", "ttft_ms"}
RATE_METRICS = {
    "prefill_tok_s_per_dev", "decode_tok_s_per_dev", "tok_s_per_user", "total_tok_s_per_dev", "output_tok_s_per_dev",
}

# Rows whose error is minimised when the global knobs are (re)fitted, chosen by rule: every other
# predictable GPU decode/prefill-rate row in id order (1st, 3rd, ...). Everything else is held out,
# including all system-total rows (total tok/s of "N requests at once" harness runs).
FIT_ROWS = ("A02", "A07", "A10", "A12", "A14", "A30", "A32", "A34", "A63")
SYSTEM_METRICS = {"total_tok_s_per_dev"}

# global knobs the fit may move, with their search grids
FIT_GRID: dict[str, list[float]] = {
    "e2e": [0.40, 0.45, 0.50, 0.55, 0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90, 0.95, 1.0],
    "e2e_mem": [0.50, 0.55, 0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90, 0.95, 1.0],
    "tbo_overlap": [0.0, 0.25, 0.5, 0.75, 1.0],
    "kernel_us": [2, 4, 6, 8, 10, 12, 15, 20, 25, 30],
    "coll_us": [5, 10, 15, 20, 30, 40, 60, 80],
    "gemm_m_half": [0, 8, 16, 32, 64],
}


def load_measurements(path: str | Path | None = None) -> list[dict[str, str]]:
    p = Path(path) if path else DEFAULT_MEASUREMENTS
    text = p.read_text()
    if p.suffix.lower() == ".json" or text.lstrip().startswith(("[", "{")):
        data = json.loads(text)
        if isinstance(data, dict):
            data = data.get("rows") or data.get("measurements") or []
        return [{k: ("" if v is None else str(v)) for k, v in r.items()} for r in data]
    return list(csv.DictReader(text.splitlines()))


def _f(row: dict[str, str], key: str, default: float | None = None) -> float | None:
    v = (row.get(key) or "").strip()
    return float(v) if v else default


def _i(row: dict[str, str], key: str, default: int | None = None) -> int | None:
    v = _f(row, key)
    return default if v is None else int(round(v))


def layout_of(row: dict[str, str]) -> Layout:
    n = _i(row, "n_dev", 1) or 1
    return Layout(
        n_dev=n,
        tp=_i(row, "tp", 1) or 1,
        ep=_i(row, "ep", 1) or 1,
        precision=(row.get("precision") or "bf16").strip(),
        attn_precision=(row.get("attn_precision") or "").strip() or None,
        kv_dtype=(row.get("kv_dtype") or "bf16").strip(),
        tbo=(row.get("tbo") or "0").strip() in ("1", "Y", "y", "true", "True"),
        mtp=_i(row, "mtp", 0) or 0,
        mtp_accept=_f(row, "mtp_accept", 0.0) or 0.0,
        mtp_tokens_per_step=_f(row, "mtp_tokens_per_step"),
        eplb=(row.get("eplb") or "default").strip(),
    )


_SPEC_CACHE: dict[str, ModelSpec] = {}


def _spec(name: str) -> ModelSpec:
    if name not in _SPEC_CACHE:
        _SPEC_CACHE[name] = ModelSpec.load(name)
    return _SPEC_CACHE[name]


def best_at_slo(pred: Predictor, lay: Layout, ctx: float, tpot_ms: float) -> Any:
    """Largest concurrency (per device granularity) whose TPOT meets the target; returns DecodeResult."""
    best = None
    lo, hi = 1, 4096
    while lo <= hi:  # TPOT grows with batch: bisect on the per-device batch
        mid = (lo + hi) // 2
        r = pred.decode(lay, mid * lay.n_dev, ctx)
        if r.tpot_ms <= tpot_ms and r.fits:
            best, lo = r, mid + 1
        else:
            hi = mid - 1
    return best


def predict_row(row: dict[str, str], cat: Catalog) -> tuple[float, str]:
    """Predicted value of the row's metric, and the limiting resource. Raises Unpredictable."""
    if (row.get("predict") or "Y").strip().upper() != "Y":
        raise Unpredictable(row.get("reason") or "marked not predictable")
    try:
        chip = cat.get(row["chip"])
    except KeyError as e:
        raise Unpredictable(f"chip {row['chip']!r} not in the catalog") from e
    spec = _spec(row["model"])
    lay = layout_of(row)
    metric = row["metric"].strip()
    mode = (row.get("mode") or "").strip()
    try:
        pred = Predictor(spec, chip, cat.efficiency_for(chip))
        isl = _i(row, "isl")
        osl = _i(row, "osl", 0) or 0
        ctx = _f(row, "ctx")
        conc = _f(row, "conc")
        if mode == "prefill":
            if isl is None:
                raise Unpredictable("prompt length not stated")
            tpd = _f(row, "tokens_per_dev")
            r = pred.prefill_tokens(lay, tpd, isl) if tpd else pred.prefill(lay, conc or 1, isl)
            val = {"prefill_tok_s_per_dev": r.tok_s_per_dev, "ttft_ms": r.time_s * 1e3}.get(metric)
            lim = r.limiter
        elif mode in ("decode", "decode_slo"):
            if ctx is None:
                if isl is None:
                    raise Unpredictable("context length not stated")
                ctx = isl + osl / 2
            if mode == "decode_slo":
                per_user = _f(row, "slo_tok_s_per_user", 21.0) or 21.0
                r = best_at_slo(pred, lay, ctx, 1e3 / per_user)
                if r is None:
                    raise Unpredictable("no batch meets the SLO")
            else:
                r = pred.decode(lay, conc or 1, ctx)
            val = {"decode_tok_s_per_dev": r.tok_s_per_dev, "tok_s_per_user": r.tok_s_per_user,
                   "tpot_ms": r.tpot_ms, "output_tok_s_per_dev": r.tok_s_per_dev}.get(metric)
            lim = r.limiter
        elif mode == "colocated":
            if isl is None or not osl or conc is None:
                raise Unpredictable("colocated rows need isl, osl and conc")
            c = pred.colocated(lay, int(conc), isl, osl)
            val = {"total_tok_s_per_dev": c["total_tok_s"] / lay.n_dev, "output_tok_s_per_dev": c["output_tok_s"] / lay.n_dev,
                   "tpot_ms": c["tpot_ms"], "ttft_ms": c["ttft_s"] * 1e3}.get(metric)
            lim = c["limiter"]
        else:
            raise Unpredictable(f"unknown mode {mode!r}")
    except UnknownValue as e:
        raise Unpredictable(str(e)) from e
    if val is None:
        raise Unpredictable(f"metric {metric!r} not predicted for mode {mode!r}")
    return float(val), lim


def row_error(metric: str, pred: float, pub: float) -> float:
    """Signed relative error of the implied rate."""
    if metric in TIME_METRICS:
        return pub / pred - 1.0
    return pred / pub - 1.0


@dataclass
class RowResult:
    id: str
    src: str
    engine: str
    model: str
    chip: str
    kind: str
    metric: str
    published: float | None
    predicted: float | None
    error: float | None
    limiter: str
    status: str  # "fit", "held-out" or "not predicted: <reason>"
    notes: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Report:
    rows: list[RowResult]
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def mape(self) -> float | None:
        return self.groups.get("gpu", {}).get("mape")

    def as_dict(self) -> dict[str, Any]:
        return {"mape": self.mape,
                "mape_definition": "mean |error| of tokens/s over the predicted GPU rows whose metric is a decode or "
                                   "prefill rate (per device or per user); system-total rows are reported separately",
                "groups": self.groups, "rows": [r.as_dict() for r in self.rows]}


def _kind(row: dict[str, str], cat: Catalog) -> str:
    try:
        return cat.get(row["chip"]).kind
    except KeyError:
        return "hybrid" if "+" in row["chip"] else "unknown"


def _mape(errs: Iterable[float]) -> float | None:
    e = [abs(x) for x in errs]
    return sum(e) / len(e) if e else None


def validate(rows: list[dict[str, str]], cat: Catalog, fit_rows: Iterable[str] = FIT_ROWS) -> Report:
    fit = set(fit_rows)
    out: list[RowResult] = []
    for row in rows:
        pub = _f(row, "value")
        kind = _kind(row, cat)
        try:
            pred, lim = predict_row(row, cat)
            err = row_error(row["metric"].strip(), pred, pub) if pub else None
            status = "fit" if row["id"] in fit else "held-out"
        except Unpredictable as e:
            pred, lim, err, status = None, "", None, f"not predicted: {e}"
        out.append(RowResult(row["id"], row.get("src", ""), row.get("engine", ""), row["model"], row["chip"], kind,
                             row["metric"], pub, pred, err, lim, status, row.get("notes", "")))
    rep = Report(out)

    def group(name: str, pred: Callable[[RowResult], bool]) -> None:
        sel = [r for r in out if pred(r)]
        done = [r for r in sel if r.error is not None]
        rep.groups[name] = {"rows": len(sel), "predicted": len(done), "mape": _mape(r.error for r in done),
                            "ids": [r.id for r in done]}

    rate = lambda r: r.metric not in SYSTEM_METRICS  # noqa: E731
    group("gpu", lambda r: r.kind == "gpu" and rate(r))
    group("gpu_rate_held_out", lambda r: r.kind == "gpu" and rate(r) and r.status == "held-out")
    group("gpu_incl_system", lambda r: r.kind == "gpu")
    group("gpu_rate_fit", lambda r: r.kind == "gpu" and r.status == "fit")
    group("gpu_incl_system_held_out", lambda r: r.kind == "gpu" and r.status == "held-out")
    group("npu", lambda r: r.kind == "npu")
    group("cpu", lambda r: r.kind == "cpu")
    group("all", lambda r: True)
    group("all_held_out", lambda r: r.status == "held-out")
    return rep


# ---------------------------------------------------------------------- fitting the global knobs
def log_loss(rows: list[dict[str, str]], cat: Catalog) -> tuple[float, int]:
    """Mean |log(predicted/published)| over the predictable rows, and how many there were."""
    tot, n = 0.0, 0
    for row in rows:
        try:
            pred, _ = predict_row(row, cat)
        except Unpredictable:
            continue
        pub = _f(row, "value")
        r = 1.0 + row_error(row["metric"].strip(), pred, pub)
        tot += abs(math.log(max(r, 1e-6)))
        n += 1
    return (tot / n if n else float("inf")), n


def _loss(rows: list[dict[str, str]], cat: Catalog) -> float:
    return log_loss(rows, cat)[0]


def fit_globals(rows: list[dict[str, str]], cat: Catalog, rounds: int = 3,
                grid: dict[str, list[float]] | None = None) -> dict[str, float]:
    """Coordinate descent over a small grid of global knobs, minimising mean |log(pred/pub)|."""
    grid = grid or FIT_GRID
    g = cat.efficiency["global"]
    for _ in range(rounds):
        changed = False
        for key, values in grid.items():
            best_v, best_l = g[key], _loss(rows, cat)
            for v in values:
                g[key] = v
                lv = _loss(rows, cat)
                if lv < best_l - 1e-9:
                    best_v, best_l, changed = v, lv, True
            g[key] = best_v
        if not changed:
            break
    return {k: g[k] for k in grid}


def cross_validate_by_source(rows: list[dict[str, str]], cat_factory: Callable[[], Catalog]) -> dict[str, Any]:
    """Leave-one-source-out: refit the globals without a source's GPU rows, predict them."""
    gpu_rows = []
    base = cat_factory()
    for r in rows:
        if _kind(r, base) == "gpu" and (r.get("predict") or "Y").upper() == "Y":
            gpu_rows.append(r)
    srcs = sorted({r["src"].split(",")[0] for r in gpu_rows})
    errs: list[float] = []
    per: dict[str, Any] = {}
    for s in srcs:
        train = [r for r in gpu_rows if r["src"].split(",")[0] != s]
        test = [r for r in gpu_rows if r["src"].split(",")[0] == s]
        cat = cat_factory()
        fit_globals(train, cat)
        e = []
        for r in test:
            try:
                pred, _ = predict_row(r, cat)
            except Unpredictable:
                continue
            e.append(row_error(r["metric"].strip(), pred, float(r["value"])))
        per[s] = {"rows": [r["id"] for r in test], "mape": _mape(e)}
        errs += e
    return {"mape": _mape(errs), "by_source": per}
