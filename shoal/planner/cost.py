"""Roofline cost model: time of a prefill batch or a decode step of one model on one chip layout.

Per operator group (attention projections, attention core, dense FFN, shared experts, routed
experts, LM head) the time is max(FLOPs / (peak x efficiency), bytes / (bandwidth x efficiency)).
Communication (TP all-reduce, EP dispatch/combine) is added, or overlapped with compute when
two-batch overlap (TBO) is on. A fixed per-kernel latency and per-collective latency model the
launch/synchronisation floor that dominates at batch 1. MoE routing uses the expected number of
distinct experts touched per rank, and a load-imbalance factor (EPLB) on the routed experts.
MTP (speculative next-token modules) multiplies the tokens per step by the expected accepted length
and adds the draft passes and the verification tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from .chips import Chip, UnknownValue
from .model import WEIGHT_BYTES, ModelSpec

KV_BYTES = {"bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0}


class Unpredictable(ValueError):
    """The prediction needs a number the catalog does not have, or the layout is invalid."""


@dataclass(frozen=True)
class Layout:
    n_dev: int
    tp: int = 1  # attention (and dense FFN / shared expert) tensor parallel size; dp = n_dev / tp
    ep: int = 1  # routed-expert parallel size; each expert is split moe_tp = n_dev / ep ways
    precision: str = "fp8"  # linear layers (FFN / experts)
    attn_precision: str | None = None  # attention projections (default: precision, fp4/int4 -> bf16)
    kv_dtype: str = "bf16"
    tbo: bool = False  # two-batch overlap of communication with compute
    mtp: int = 0  # draft tokens per step from MTP modules
    mtp_accept: float = 0.0  # acceptance rate per draft token
    mtp_tokens_per_step: float | None = None  # measured mean accepted length (overrides mtp_accept)
    eplb: str = "default"  # none | default | perfect
    node_size: int | None = None  # devices per scale-up domain (None: chip catalog, else 8)

    @property
    def dp(self) -> int:
        return self.n_dev // self.tp

    @property
    def moe_tp(self) -> int:
        return self.n_dev // self.ep

    @property
    def attn_prec(self) -> str:
        if self.attn_precision:
            return self.attn_precision
        return "bf16" if self.precision in ("fp4", "int4") else self.precision

    @property
    def tokens_per_step(self) -> float:
        if self.mtp <= 0:
            return 1.0
        if self.mtp_tokens_per_step is not None:
            return float(self.mtp_tokens_per_step)
        a = self.mtp_accept
        return 1.0 + sum(a**i for i in range(1, self.mtp + 1))

    def describe(self) -> str:
        s = f"{self.n_dev}x TP{self.tp}"
        if self.ep > 1:
            s += f" EP{self.ep}"
        if self.dp > 1:
            s += f" DP{self.dp}"
        s += f" {self.precision}"
        if self.tbo:
            s += " TBO"
        if self.mtp:
            s += f" MTP{self.mtp}"
        return s

    def check(self, spec: ModelSpec) -> None:
        if self.n_dev < 1 or self.tp < 1 or self.ep < 1:
            raise Unpredictable("n_dev, tp and ep must be >= 1")
        if self.n_dev % self.tp or self.n_dev % self.ep:
            raise Unpredictable(f"tp={self.tp} and ep={self.ep} must divide n_dev={self.n_dev}")
        if self.precision not in WEIGHT_BYTES or self.attn_prec not in WEIGHT_BYTES:
            raise Unpredictable(f"unknown precision {self.precision!r}")
        if self.kv_dtype not in KV_BYTES:
            raise Unpredictable(f"unknown kv dtype {self.kv_dtype!r}")
        if spec.is_moe and self.ep > spec.n_experts:
            raise Unpredictable(f"ep={self.ep} exceeds the {spec.n_experts} routed experts")


@dataclass
class PhaseResult:
    time_s: float
    breakdown: dict[str, float]  # seconds by limiter category: compute, memory bandwidth, interconnect, overhead
    notes: list[str] = field(default_factory=list)

    @property
    def limiter(self) -> str:
        return max(self.breakdown.items(), key=lambda kv: kv[1])[0]


@dataclass
class DecodeResult:
    concurrency: int  # sequences decoding at once over the whole layout
    context: float
    step_s: float
    tokens_per_step: float
    tok_s_per_dev: float
    tok_s_per_user: float
    tpot_ms: float
    limiter: str
    fits: bool
    max_concurrency: int | None
    breakdown: dict[str, float]
    notes: list[str]


@dataclass
class PrefillResult:
    seqs: int
    isl: int
    time_s: float
    tok_s_per_dev: float
    limiter: str
    fits: bool
    breakdown: dict[str, float]
    notes: list[str]


class Predictor:
    """Cost model of one model on one chip with a fixed set of efficiency factors."""

    def __init__(self, spec: ModelSpec, chip: Chip, eff: dict[str, Any]):
        self.spec = spec
        self.chip = chip
        self.eff = eff
        self.notes: list[str] = []
        bw = chip.need("mem_bw_tbs") * 1e12
        # e2e / e2e_mem: global end-to-end deratings of the kernel-level compute / memory efficiencies
        # (non-GEMM kernels, scheduling, host overhead); fitted on the FIT rows, see docs/planner.md
        self.e2e = float(eff.get("e2e", 1.0))
        self.overlap = float(eff.get("tbo_overlap", 1.0))
        self.bw = bw * eff["mem"] * float(eff.get("e2e_mem", 1.0))
        self.kernel_s = eff["kernel_us"] * 1e-6
        self.coll_s = eff["coll_us"] * 1e-6
        self.m_half = float(eff["gemm_m_half"])

    # ------------------------------------------------------------------ peaks
    def _peak(self, precision: str, kind: str = "gemm") -> float | None:
        pk, note = self.chip.peak_tflops(precision)
        if pk is None:
            return None
        if note and note not in self.notes:
            self.notes.append(note)
        e = self.eff["gemm"].get(precision, 0.68) if kind == "gemm" else self.eff["attn"]
        return pk * 1e12 * e * self.e2e

    def _node_size(self, lay: Layout) -> int:
        if lay.node_size:
            return lay.node_size
        d = self.chip.v("scaleup_domain")
        return int(d) if d else 8

    def _up_bw(self) -> float:
        """Scale-up bandwidth per direction (catalog figures are both directions), derated."""
        x = self.chip.v("scaleup_gbs")
        if x is None:
            raise UnknownValue(f"{self.chip.id}: scale-up bandwidth unknown")
        return x * 1e9 / 2 * self.eff["comm"]

    def _rdma_bw(self) -> float:
        x = self.chip.v("ep_rdma_gbs")
        if x is not None:
            return x * 1e9  # already an effective (measured) figure
        x = self.chip.v("scaleout_gbs")
        if x is None:
            raise UnknownValue(f"{self.chip.id}: scale-out bandwidth unknown (needed for EP across nodes)")
        return x * 1e9 * self.eff["comm"]

    # ------------------------------------------------------------------ memory
    def weight_bytes_per_dev(self, lay: Layout) -> float:
        s = self.spec
        wb = WEIGHT_BYTES[lay.precision]
        ab = WEIGHT_BYTES[lay.attn_prec]
        tp = lay.tp
        b = s.n_layers * s.attn_params * ab / tp
        b += s.n_dense_layers * s.dense_ffn_params * wb / tp
        b += s.n_moe_layers * (s.shared_params * wb / tp + s.gate_params * 2.0 + s.n_experts * s.expert_params * wb / lay.n_dev)
        b += (s.embed_params + s.head_params) * 2.0 / tp
        if lay.mtp and s.n_mtp_layers:
            b += s.mtp_layer_params * wb / tp if not s.is_moe else (
                (s.attn_params + s.shared_params) * wb / tp + s.n_experts * s.expert_params * wb / lay.n_dev)
        return b

    def kv_bytes_per_seq_token_dev(self, lay: Layout) -> float:
        """Per device: MLA's latent cache is replicated across TP ranks; GQA shards over KV heads."""
        s = self.spec
        shard = 1 if s.cfg.is_mla else min(lay.tp, s.cfg.num_key_value_heads)
        return s.kv_bytes_per_token(KV_BYTES[lay.kv_dtype]) / shard

    def max_seqs_per_group(self, lay: Layout, ctx: float, act_tokens: float = 0.0) -> int | None:
        mem = self.chip.v("mem_gb")
        if mem is None:
            return None
        usable = mem * 1e9 * self.eff["mem_usable_frac"] - self.weight_bytes_per_dev(lay)
        usable -= act_tokens * self.spec.hidden * 2 * 16  # activation workspace of a forward
        if usable <= 0:
            return 0
        return int(usable // max(1.0, ctx * self.kv_bytes_per_seq_token_dev(lay)))

    # ------------------------------------------------------------------ one forward pass
    def _gemm(self, params: float, m: float, wbytes: float, peak: float | None, acc: dict[str, float]) -> float:
        if m <= 0 or params <= 0:
            return 0.0
        t_m = params * wbytes / self.bw
        if peak is None:
            t_c = 0.0
        else:
            t_c = 2.0 * params * (m + self.m_half) / peak  # = 2pm / (peak * m/(m+m_half))
        if t_c >= t_m:
            acc["compute"] += t_c
            return t_c
        acc["memory bandwidth"] += t_m
        return t_m

    def forward(self, lay: Layout, seqs: float, q: float, ctx: float, prefill: bool = False) -> PhaseResult:
        """Time of one forward over the whole model for `seqs` sequences per DP group, each adding
        `q` new tokens after `ctx` cached tokens (prefill: ctx = 0, q = isl)."""
        s = self.spec
        lay.check(s)
        acc = {"compute": 0.0, "memory bandwidth": 0.0, "interconnect": 0.0, "overhead": 0.0}
        micro = 2 if lay.tbo else 1
        S = seqs / micro
        Tg = S * q  # tokens per DP group (per micro-batch)
        T = Tg * lay.dp  # tokens over the whole layout
        tp = lay.tp
        wb = WEIGHT_BYTES[lay.precision]
        ab = WEIGHT_BYTES[lay.attn_prec]
        p_lin = self._peak(lay.precision)
        p_attn_lin = self._peak(lay.attn_prec)
        core_prec = "fp8" if lay.kv_dtype == "fp8" else "bf16"
        p_core = self._peak(core_prec, kind="attn")
        if p_core is None and core_prec == "fp8":
            p_core = self._peak("bf16", kind="attn")
        if prefill and (p_lin is None or p_core is None):
            raise UnknownValue(f"{self.chip.id}: matrix peak unknown, prefill time cannot be predicted")
        if p_lin is None or p_attn_lin is None:
            msg = "matrix peak unknown: decode time is a memory-bound lower bound"
            if msg not in self.notes:
                self.notes.append(msg)
        kvb = KV_BYTES[lay.kv_dtype]
        kv_shard = 1 if s.cfg.is_mla else min(tp, s.cfg.num_key_value_heads)

        def layer(moe: bool, mtp_layer: bool = False) -> tuple[float, float]:
            """(compute+memory seconds, communication seconds) of one layer for one micro-batch."""
            a = dict.fromkeys(acc, 0.0)
            t = self._gemm(s.attn_params / tp, Tg, ab, p_attn_lin, a)
            # attention core
            if prefill:
                pairs = q * (q + 1) / 2
                fl = s.attn_core_flops_prefill_per_ctx * S * pairs / tp
                by = S * q * s.kv_entries_per_layer * kvb / kv_shard
            else:
                fl = s.attn_core_flops_decode_per_ctx * S * q * (ctx + (q + 1) / 2) / tp
                by = S * (ctx + q) * s.kv_entries_per_layer * kvb / kv_shard
            t_c = fl / p_core if p_core else 0.0
            t_m = by / self.bw
            if t_c >= t_m:
                a["compute"] += t_c
            else:
                a["memory bandwidth"] += t_m
            t += max(t_c, t_m)
            comm = 0.0
            n_kern = 2
            if moe:
                t += self._gemm((s.shared_params + s.gate_params) / tp, Tg, wb, p_lin, a)
                E, k = s.n_experts, s.top_k
                ep, mtp_ = lay.ep, lay.moe_tp
                assign = T * k / ep  # token-expert pairs per EP rank
                if ep > 1:
                    assign *= self.eff["moe_imbalance"].get(lay.eplb, 1.0)
                touched = (E / ep) * (1.0 - (1.0 - k / E) ** T)
                m_e = assign / max(touched, 1e-9)
                p = s.expert_params / mtp_
                t_m = touched * p * wb / self.bw
                t_c = 2.0 * p * assign * (1.0 + self.m_half / max(m_e, 1e-9)) / p_lin if p_lin else 0.0
                if t_c >= t_m:
                    a["compute"] += t_c
                else:
                    a["memory bandwidth"] += t_m
                t += max(t_c, t_m)
                n_kern += 3
                # EP dispatch (fp8) + combine (bf16)
                if ep > 1:
                    node = self._node_size(lay)
                    td = T / lay.n_dev
                    if lay.n_dev <= node:
                        by = td * k * s.hidden * 3.0 * (ep - 1) / ep
                        comm += by / self._up_bw() + 2 * self.coll_s
                    elif not prefill:
                        # decode uses low-latency all-to-all: one copy per routed expert, all over RDMA
                        by = td * k * s.hidden * 3.0 * (ep - 1) / ep
                        comm += by / self._rdma_bw() + 2 * self.coll_s
                    else:
                        # prefill (normal kernels): one copy per target node over RDMA, NVLink fan-out
                        frac_inter = 1.0 - node / lay.n_dev
                        fan = min(k, max(1, s.cfg.topk_group if s.cfg.n_group > 1 else k))
                        inter = td * fan * s.hidden * 3.0 * frac_inter
                        intra = td * k * s.hidden * 3.0 * (1 - frac_inter)
                        comm += max(inter / self._rdma_bw(), intra / self._up_bw()) + 2 * self.coll_s
                elif mtp_ > 1 and tp < mtp_:
                    by = 2 * T / lay.n_dev * s.hidden * 2.0 * (mtp_ - 1)
                    comm += by / self._up_bw() + 2 * self.coll_s
            else:
                t += self._gemm(s.dense_ffn_params / tp, Tg, wb, p_lin, a)
                n_kern += 1
            if mtp_layer:
                t += self._gemm(2 * s.hidden * s.hidden / tp, Tg, wb, p_lin, a)
            if tp > 1:
                by = 2 * (tp - 1) / tp * Tg * s.hidden * 2.0
                comm += 2 * (by / self._up_bw() + self.coll_s)
            layer.parts = a  # type: ignore[attr-defined]
            layer.kern = n_kern  # type: ignore[attr-defined]
            return t, comm

        total = 0.0
        for moe, count in ((False, s.n_dense_layers), (True, s.n_moe_layers)):
            if count == 0:
                continue
            t, comm = layer(moe)
            parts, kern = layer.parts, layer.kern  # type: ignore[attr-defined]
            ov = kern * self.kernel_s
            if lay.tbo:
                lt = micro * (max(t, comm) + (1.0 - self.overlap) * min(t, comm)) + micro * ov
                exposed = (lt - micro * ov) - micro * t if comm > t else micro * (1.0 - self.overlap) * comm
            else:
                lt = t + comm + ov
                exposed = comm
            for key, v in parts.items():
                acc[key] += v * micro * count
            acc["interconnect"] += exposed * count
            acc["overhead"] += micro * ov * count
            total += lt * count
        # LM head on the tokens that need logits
        logit_tokens = S if prefill else Tg
        a = dict.fromkeys(acc, 0.0)
        th = self._gemm((s.head_params or s.embed_params) / tp, logit_tokens, 2.0, self._peak("bf16"), a) * micro
        for key, v in a.items():
            acc[key] += v * micro
        total += th + self.kernel_s * micro
        acc["overhead"] += self.kernel_s * micro
        # MTP draft passes (decode only): each runs one MTP layer + head on q=1 per sequence
        if not prefill and lay.mtp and s.n_mtp_layers:
            for _ in range(lay.mtp):
                t, comm = layer(s.is_moe, mtp_layer=True)
                parts, kern = layer.parts, layer.kern  # type: ignore[attr-defined]
                ov = kern * self.kernel_s
                if lay.tbo:
                    body = micro * (max(t, comm) + (1.0 - self.overlap) * min(t, comm))
                else:
                    body = t + comm
                lt = body + micro * ov + th
                for key, v in parts.items():
                    acc[key] += v * micro
                acc["interconnect"] += max(0.0, body - micro * t)
                acc["overhead"] += micro * ov
                total += lt
        return PhaseResult(total, acc, list(self.notes))

    # ------------------------------------------------------------------ phases
    def decode(self, lay: Layout, concurrency: float, ctx: float) -> DecodeResult:
        """Steady decode with `concurrency` sequences over the layout at mean context `ctx`."""
        seqs = max(concurrency / lay.dp, 1e-9)
        q = 1 + (lay.mtp if lay.mtp and self.spec.n_mtp_layers else 0)
        if lay.mtp and not self.spec.n_mtp_layers:
            lay = replace(lay, mtp=0)
        r = self.forward(lay, seqs, q, ctx)
        tps = lay.tokens_per_step
        max_seqs = self.max_seqs_per_group(lay, ctx + q, act_tokens=seqs * q)
        fits = max_seqs is None or seqs <= max_seqs
        return DecodeResult(
            concurrency=int(round(concurrency)), context=ctx, step_s=r.time_s, tokens_per_step=tps,
            tok_s_per_dev=concurrency * tps / (r.time_s * lay.n_dev), tok_s_per_user=tps / r.time_s,
            tpot_ms=1e3 * r.time_s / tps, limiter=r.limiter if fits else "memory capacity", fits=fits,
            max_concurrency=None if max_seqs is None else max_seqs * lay.dp, breakdown=r.breakdown, notes=r.notes,
        )

    def prefill(self, lay: Layout, seqs_total: float, isl: int) -> PrefillResult:
        """Prefill `seqs_total` prompts of `isl` tokens spread over the DP groups (one batch)."""
        seqs = max(seqs_total / lay.dp, 1e-9)
        lay = replace(lay, mtp=0)
        r = self.forward(lay, seqs, isl, 0, prefill=True)
        max_seqs = self.max_seqs_per_group(lay, isl, act_tokens=seqs * isl / lay.tp)
        fits = max_seqs is None or seqs <= max_seqs
        return PrefillResult(
            seqs=int(round(seqs_total)), isl=isl, time_s=r.time_s,
            tok_s_per_dev=seqs_total * isl / (r.time_s * lay.n_dev), limiter=r.limiter if fits else "memory capacity",
            fits=fits, breakdown=r.breakdown, notes=r.notes,
        )

    def prefill_tokens(self, lay: Layout, tokens_per_dev: float, isl: int) -> PrefillResult:
        """Prefill with a fixed number of prompt tokens per device in the batch (DeepSeek/SGLang style)."""
        seqs_total = tokens_per_dev * lay.n_dev / isl
        return self.prefill(lay, seqs_total, isl)

    def colocated(self, lay: Layout, concurrency: int, isl: int, osl: int,
                  prefill_chunk_tokens: int = 16384) -> dict[str, Any]:
        """Non-disaggregated serving of a closed batch of `concurrency` requests (benchmark "N at once"):
        prefill all prompts (in chunks), then decode them together; memory capacity caps the
        running batch and the rest waits for a later wave."""
        ctx_mean = isl + osl / 2
        max_seqs = self.max_seqs_per_group(replace(lay, mtp=0), isl + osl)
        cap = concurrency if max_seqs is None else max(0, min(concurrency, max_seqs * lay.dp))
        if cap <= 0:
            raise Unpredictable("the model does not fit in device memory with this layout")
        waves = math.ceil(concurrency / cap)
        per_wave = concurrency / waves
        chunk_seqs = max(1.0, min(per_wave, prefill_chunk_tokens * lay.dp / isl))
        p = self.prefill(lay, chunk_seqs, isl)
        t_prefill = p.time_s * per_wave / chunk_seqs
        d = self.decode(lay, per_wave, ctx_mean)
        t_decode = osl / d.tokens_per_step * d.step_s
        t_wave = t_prefill + t_decode
        total = waves * t_wave
        return {
            "total_tok_s": concurrency * (isl + osl) / total,
            "output_tok_s": concurrency * osl / total,
            "ttft_s": t_prefill,
            "tpot_ms": d.tpot_ms,
            "waves": waves,
            "running_batch": per_wave,
            "limiter": d.limiter if t_decode >= t_prefill else p.limiter,
            "notes": d.notes,
        }
