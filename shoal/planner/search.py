"""Search over device count, TP/EP/DP layout, batch and precision for one model on one chip.

Decode and prefill are sized separately (prefill/decode disaggregation): the decode pool must meet
the TPOT target, the prefill pool the TTFT target, and the cost per million tokens charges both
pools for their share of each request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from .chips import Chip, UnknownValue
from .cost import DecodeResult, Layout, Predictor, Unpredictable
from .model import ModelSpec

BATCHES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
DEV_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TPS = (1, 2, 4, 8)


@dataclass
class Point:
    layout: Layout
    batch_per_dev: float
    tok_s_per_dev: float
    tok_s_per_user: float
    tpot_ms: float
    limiter: str
    fits: bool

    def as_dict(self) -> dict[str, Any]:
        lay = self.layout
        return {"n_dev": lay.n_dev, "tp": lay.tp, "ep": lay.ep, "dp": lay.dp, "precision": lay.precision,
                "tbo": lay.tbo, "mtp": lay.mtp, "batch_per_dev": round(self.batch_per_dev, 2),
                "tok_s_per_dev": self.tok_s_per_dev, "tok_s_per_user": self.tok_s_per_user,
                "tpot_ms": self.tpot_ms, "limiter": self.limiter, "layout": lay.describe()}


@dataclass
class ChipPlan:
    chip: Chip
    decode: Point | None
    prefill_tok_s_per_dev: float | None
    prefill_layout: Layout | None
    ttft_ms: float | None
    cost_per_mtok: float | None  # USD per million output tokens (prefill and decode chips both charged)
    rent_usd_hr: float | None
    min_devices: int | None
    pareto: list[Point] = field(default_factory=list)
    evaluated: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def limiter(self) -> str:
        return self.decode.limiter if self.decode else "memory capacity"

    def as_dict(self) -> dict[str, Any]:
        return {
            "chip": self.chip.id, "name": self.chip.name,
            "decode": self.decode.as_dict() if self.decode else None,
            "prefill_tok_s_per_dev": self.prefill_tok_s_per_dev,
            "prefill_layout": self.prefill_layout.describe() if self.prefill_layout else None,
            "ttft_ms": self.ttft_ms, "cost_per_mtok_usd": self.cost_per_mtok, "rent_usd_hr": self.rent_usd_hr,
            "min_devices": self.min_devices, "limiter": self.limiter, "evaluated": self.evaluated,
            "pareto": [p.as_dict() for p in self.pareto], "notes": self.notes,
        }


def supported_precisions(chip: Chip, wanted: Iterable[str]) -> list[str]:
    out = []
    for p in wanted:
        key = {"fp8": "fp8_tflops", "int8": "int8_tops", "fp4": "fp4_tflops"}.get(p, "bf16_tflops")
        if chip.v(key) is not None or p in ("int4",):
            out.append(p)
    return out or ["bf16"]


def layouts(spec: ModelSpec, node: int, precisions: Iterable[str], dev_counts: Iterable[int] = DEV_COUNTS,
            tps: Iterable[int] = TPS, mtp: int = 0, mtp_accept: float = 0.0) -> Iterable[Layout]:
    for n in dev_counts:
        for tp in tps:
            if tp > n or n % tp or tp > node:
                continue
            if not spec.is_moe:
                eps = {1}  # dense: TP inside the domain, data-parallel replicas across
            else:
                # MoE: ep=1 shards every expert over all n devices (must stay in one scale-up domain);
                # ep>1 keeps each expert's moe_tp = n/ep shards inside the attention TP group
                eps = {1} if n <= node else set()
                eps |= {e for e in (2, 4, 8, 16, 32, 64, 128, 256, n)
                        if 1 < e <= min(n, spec.n_experts) and n % e == 0 and n // e <= tp}
            if not eps:
                continue
            for ep in sorted(eps):
                for prec in precisions:
                    yield Layout(n_dev=n, tp=tp, ep=ep, precision=prec, tbo=ep > node,
                                 mtp=mtp if spec.n_mtp_layers else 0, mtp_accept=mtp_accept)


def pareto_front(points: list[Point]) -> list[Point]:
    """Non-dominated points of (tok/s per user, tok/s per device), sorted by per-user speed."""
    pts = sorted(points, key=lambda p: (-p.tok_s_per_user, -p.tok_s_per_dev))
    front: list[Point] = []
    best = -1.0
    for p in pts:
        if p.tok_s_per_dev > best:
            front.append(p)
            best = p.tok_s_per_dev
    return sorted(front, key=lambda p: p.tok_s_per_user)


def plan_chip(spec: ModelSpec, chip: Chip, eff: dict[str, Any], *, isl: int, osl: int, tpot_ms: float,
              ttft_ms: float | None = None, precisions: Iterable[str] = ("fp8", "int8", "bf16"),
              dev_counts: Iterable[int] = DEV_COUNTS, batches: Iterable[int] = BATCHES, rent: float | None = None,
              mtp: int = 0, mtp_accept: float = 0.0, node_size: int | None = None,
              objective: str = "throughput") -> ChipPlan:
    pred = Predictor(spec, chip, eff)
    dom = chip.v("scaleup_domain")
    node = node_size or (int(dom) if dom else 8)
    precs = supported_precisions(chip, precisions)
    ctx = isl + osl / 2
    feasible: list[Point] = []
    all_pts: list[Point] = []
    n_eval = 0
    skipped: set[str] = set()
    min_dev: int | None = None
    batches = tuple(batches)
    for lay in layouts(spec, node, precs, dev_counts, mtp=mtp, mtp_accept=mtp_accept):
        if node_size:
            lay = Layout(**{**lay.__dict__, "node_size": node_size})
        try:
            cap = pred.max_seqs_per_group(lay, isl + osl)
        except UnknownValue:
            cap = None
        if cap is not None and cap < 1:
            continue
        if min_dev is None or lay.n_dev < min_dev:
            min_dev = lay.n_dev
        for b in batches:  # sequences per DP group (per device when tp = 1)
            conc = b * lay.dp
            if cap is not None and b > cap:
                break
            try:
                r: DecodeResult = pred.decode(lay, conc, ctx)
            except (Unpredictable, UnknownValue) as e:
                skipped.add(str(e))
                break
            n_eval += 1
            p = Point(lay, conc / lay.n_dev, r.tok_s_per_dev, r.tok_s_per_user, r.tpot_ms, r.limiter, r.fits)
            all_pts.append(p)
            if r.tpot_ms <= tpot_ms:
                feasible.append(p)
            else:
                break  # TPOT only grows with batch
    plan = ChipPlan(chip, None, None, None, None, None, rent, min_dev, pareto_front(all_pts), n_eval,
                    list(pred.notes) + [f"layouts skipped: {e}" for e in sorted(skipped)])
    if not feasible:
        if not all_pts:
            plan.notes.append("no layout both fits in memory and can be predicted (up to %d devices)" % max(dev_counts))
        else:
            plan.notes.append(f"no configuration meets TPOT {tpot_ms} ms")
        return plan
    # objective: max tokens/s per chip (ties: fewer chips); "cost" is the same ranking at a fixed rent
    best = max(feasible, key=lambda p: (round(p.tok_s_per_dev, 6), -p.layout.n_dev))
    plan.decode = best
    # prefill pool: best tokens/s per device meeting TTFT for one request wave
    best_pf: tuple[float, Layout, float] | None = None
    for lay in layouts(spec, node, precs, dev_counts):
        try:
            cap = pred.max_seqs_per_group(lay, isl, act_tokens=16384)
        except UnknownValue:
            cap = None
        if cap is not None and cap < 1:
            continue
        for tokens_per_dev in (isl, 4096, 8192, 16384):
            if tokens_per_dev < isl and tokens_per_dev != isl:
                continue
            try:
                r = pred.prefill_tokens(lay, tokens_per_dev, isl)
            except (Unpredictable, UnknownValue) as e:
                plan.notes.append(f"prefill: {e}")
                break
            if not r.fits:
                break
            if ttft_ms is not None and r.time_s * 1e3 > ttft_ms:
                break
            if best_pf is None or r.tok_s_per_dev > best_pf[0]:
                best_pf = (r.tok_s_per_dev, lay, r.time_s * 1e3)
    if best_pf:
        plan.prefill_tok_s_per_dev, plan.prefill_layout, plan.ttft_ms = best_pf
    if rent is not None and plan.prefill_tok_s_per_dev:
        # chip-seconds per request: prefill isl tokens + decode osl tokens
        chip_s = isl / plan.prefill_tok_s_per_dev + osl / best.tok_s_per_dev
        plan.cost_per_mtok = rent / 3600.0 * chip_s / osl * 1e6
    plan.notes = sorted(set(plan.notes))
    return plan
