"""One check per op of the table: fresh random inputs in the shapes the supported models use, the
platform's op on its device in the tested dtype, the native op in float64 on the CPU as the
reference, and an independent slow oracle that the reference itself must agree with.

Shapes: SmolLM2-135M (9 heads / 3 KV heads / head dim 64, hidden 576), Qwen2-0.5B and
R1-Distill-Qwen-1.5B (14/2/64 and 12/2/128, q/k/v biases), a DeepSeek-V3-like tiny config (MLA
kv_lora 32 + rope 8, 8 heads; MoE 16 experts top-4) and DeepSeek-V2-Lite's MLA (16 heads,
512 + 64) and a mid-size MoE (64 experts top-6). Paged batches mix prefill chunks and decode
rows, with random block tables whose padding points at real (wrong) blocks and caches whose
unused slots hold random values, so a kernel that reads past a context or ignores a mask fails.

A new op's check is a generator registered in CHECKS: it yields (case name, thunk → CaseResult).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from shoal.backends.base import Platform
from shoal.backends.conformance.compare import (
    QUANT_GLU_TOLERANCES,
    QUANT_LINEAR_TOLERANCES,
    TOLERANCES,
    CaseResult,
    dtype_name,
    judge,
    scaled_error,
)
from shoal.backends.native import NATIVE_OPS
from shoal.forward_batch import AttentionMetadata

F64 = torch.float64
Thunk = Callable[[], CaseResult]


class OpContext:
    """What a check needs: the platform and its device, the tested dtype, a seeded CPU generator."""

    def __init__(self, platform: Platform, dtype: torch.dtype, gen: torch.Generator, block_size: int) -> None:
        self.platform = platform
        self.device = platform.device()
        self.dtype = dtype
        self.dname = dtype_name(dtype)
        self.tol = TOLERANCES[self.dname]
        self.gen = gen
        self.block_size = block_size
        self.sources = platform.op_sources()

    def randn(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, dtype=F64) * scale

    def rounded(self, t: torch.Tensor) -> torch.Tensor:
        """t (float64, CPU) rounded through the tested dtype: the values both sides see."""
        return t.to(self.dtype).to(F64)

    def dev(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        if t.is_floating_point():
            return t.to(dtype or self.dtype).to(self.device)
        return t.to(self.device)

    def op(self, name: str) -> Callable:
        return self.platform.op(name)

    def judge(self, op: str, case: str, got: torch.Tensor, ref: torch.Tensor, oracle_err: float | None = None,
              expect_dtype: torch.dtype | None = None, tol: float | None = None) -> CaseResult:
        self.platform.synchronize()
        return judge(op, case, self.dname, self.sources.get(op, "?"), got.cpu(), ref, tol or self.tol, oracle_err,
                     expect_dtype or self.dtype)


# ---------------------------------------------------------------------------- paged batches
def make_meta(layout: list[tuple[int, int]], block_size: int, gen: torch.Generator) -> AttentionMetadata:
    """Metadata (on the CPU) for requests given as (new tokens, context length after the step)."""
    bs = block_size
    need = [math.ceil(length / bs) for _, length in layout]
    width = max(need) + 1  # one padding column at least
    num_blocks = sum(need) + 3  # a few blocks nobody owns
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.randint(0, num_blocks, (len(layout), width), generator=gen)  # padding: real blocks
    used = 0
    for i, k in enumerate(need):
        tables[i, :k] = perm[used : used + k]
        used += k
    slots = []
    for i, (n, length) in enumerate(layout):
        slots += [int(tables[i, p // bs]) * bs + p % bs for p in range(length - n, length)]
    qlens = [n for n, _ in layout]
    slens = [length for _, length in layout]
    qsl = [0]
    for n in qlens:
        qsl.append(qsl[-1] + n)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long),
        query_start_loc=torch.tensor(qsl, dtype=torch.long),
        seq_lens=torch.tensor(slens, dtype=torch.long),
        block_tables=tables,
        query_lens_cpu=qlens,
        seq_lens_cpu=slens,
        block_size=bs,
        max_query_len=max(qlens),
        max_seq_len=max(slens),
    )


def num_blocks_of(meta: AttentionMetadata) -> int:
    return int(meta.block_tables.max()) + 1


def meta_to(meta: AttentionMetadata, device: torch.device) -> AttentionMetadata:
    return dataclasses.replace(
        meta, slot_mapping=meta.slot_mapping.to(device), query_start_loc=meta.query_start_loc.to(device),
        seq_lens=meta.seq_lens.to(device), block_tables=meta.block_tables.to(device),
    )


def mixed_layout(bs: int) -> list[tuple[int, int]]:
    """Prefill from scratch, prefill chunks continuing a context, and decode rows in one batch."""
    return [(7, 7), (5, bs + 5), (1, 2 * bs + 1), (16, 16), (1, 1), (9, 2 * bs + 3), (1, bs)]


def decode_layout(bs: int) -> list[tuple[int, int]]:
    return [(1, 1), (1, bs + 1), (1, 2 * bs + 7), (1, 3 * bs), (1, 5)]


def _context_slots(meta: AttentionMetadata, i: int, upto: int) -> torch.Tensor:
    """Flat cache slots of positions 0 .. upto-1 of request i."""
    pos = torch.arange(upto)
    return meta.block_tables[i][pos // meta.block_size] * meta.block_size + pos % meta.block_size


def _query_positions(meta: AttentionMetadata) -> Iterator[tuple[int, int, int]]:
    """(flat token index, request, position) of every new token."""
    t = 0
    for i, (n, length) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        for j in range(n):
            yield t, i, length - n + j
            t += 1


# ---------------------------------------------------------------------------- oracles (float64, slow)
def oracle_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * w / torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1] + eps)


def oracle_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    rot = torch.complex(cos, sin).unsqueeze(1)  # [T, 1, R/2]
    if interleaved:
        z = torch.complex(x[..., 0::2], x[..., 1::2]) * rot
        return torch.stack((z.real, z.imag), dim=-1).flatten(-2)
    h = x.shape[-1] // 2
    z = torch.complex(x[..., :h], x[..., h:]) * rot
    return torch.cat((z.real, z.imag), dim=-1)


def oracle_paged_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, meta: AttentionMetadata,
                           scale: float) -> torch.Tensor:
    kf, vf = kc.flatten(0, 1), vc.flatten(0, 1)  # [slots, Hkv, D]
    group = q.shape[1] // kc.shape[2]
    out = torch.empty(q.shape[0], q.shape[1], vc.shape[-1], dtype=q.dtype)
    for t, i, p in _query_positions(meta):
        slots = _context_slots(meta, i, p + 1)
        k = kf[slots].repeat_interleave(group, dim=1)  # [p+1, Hq, D]: query head h reads kv head h // group
        v = vf[slots].repeat_interleave(group, dim=1)
        probs = (torch.einsum("hd,lhd->hl", q[t], k) * scale).softmax(-1)
        out[t] = torch.einsum("hl,lhd->hd", probs, v)
    return out


def oracle_mla_naive(q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, w_uk: torch.Tensor,
                     w_uv: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """MLA as the paper writes it: expand the latent into per-head keys and values, then attend."""
    c = w_uk.shape[-1]
    flat = cache.flatten(0, 1)  # [slots, C+R]
    out = torch.empty(q_nope.shape[0], q_nope.shape[1], w_uv.shape[1], dtype=q_nope.dtype)
    for t, i, p in _query_positions(meta):
        ctx = flat[_context_slots(meta, i, p + 1)]
        c_kv, k_pe = ctx[:, :c], ctx[:, c:]
        k_nope = torch.einsum("lc,hnc->lhn", c_kv, w_uk)  # [L, H, Dn]
        v = torch.einsum("lc,hvc->lhv", c_kv, w_uv)  # [L, H, Dv]
        scores = torch.einsum("hn,lhn->hl", q_nope[t], k_nope) + torch.einsum("hr,lr->hl", q_pe[t], k_pe)
        out[t] = torch.einsum("hl,lhv->hv", (scores * scale).softmax(-1), v)
    return out


def oracle_moe(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
               w2: torch.Tensor) -> torch.Tensor:
    inter = w2.shape[-1]
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            gate, up = w13[e, :inter] @ x[t], w13[e, inter:] @ x[t]
            y[t] += weights[t, k] * (w2[e] @ (F.silu(gate) * up))
    return y


# ---------------------------------------------------------------------------- checks
def check_rms_norm(c: OpContext) -> Iterator[tuple[str, Thunk]]:
    cases = [("smollm2 hidden", 576, 1e-5), ("qwen2 hidden", 896, 1e-6),
             ("deepseek kv_a_layernorm", 32, 1e-6), ("deepseek-v2-lite q/kv norm", 512, 1e-6)]
    for name, dim, eps in cases:
        for t in (1, 37):
            def run(dim: int = dim, eps: float = eps, t: int = t, name: str = name) -> CaseResult:
                x = c.rounded(c.randn(t, dim, scale=3.0))
                w = c.rounded(1 + 0.5 * c.randn(dim))
                ref = NATIVE_OPS["rms_norm"](x, w, eps)
                got = c.op("rms_norm")(c.dev(x), c.dev(w), eps)
                return c.judge("rms_norm", f"{name} [T={t}, {dim}]", got, ref,
                               scaled_error(ref, oracle_rms_norm(x, w, eps)))
            yield f"{name} T={t}", run


def check_add_rms_norm(c: OpContext) -> Iterator[tuple[str, Thunk]]:
    """The sum must be the separate add's, exactly; the norm is held to rms_norm's tolerance."""
    for name, dim, eps in [("smollm2 hidden", 576, 1e-5), ("qwen2 hidden", 896, 1e-6)]:
        for t in (1, 37):
            def run(dim: int = dim, eps: float = eps, t: int = t, name: str = name) -> CaseResult:
                x, r = c.rounded(c.randn(t, dim, scale=3.0)), c.rounded(c.randn(t, dim, scale=3.0))
                w = c.rounded(1 + 0.5 * c.randn(dim))
                ref, ref_sum = NATIVE_OPS["add_rms_norm"](x, r, w, eps)
                got, got_sum = c.op("add_rms_norm")(c.dev(x), c.dev(r), c.dev(w), eps)
                res = c.judge("add_rms_norm", f"{name} [T={t}, {dim}]", got, ref,
                              scaled_error(ref, oracle_rms_norm(x + r, w, eps)))
                expect_sum = (c.dev(x) + c.dev(r)).cpu()
                if not torch.equal(got_sum.cpu(), expect_sum):
                    res.status, res.detail = "fail", "the sum differs from the separate add"
                return res
            yield f"{name} T={t}", run


def _cos_sin(c: OpContext, t: int, rot: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos/sin [T, rot/2] at random positions, as the rotary layer passes them."""
    pos = torch.randint(0, 4096, (t,), generator=c.gen).to(F64)
    inv = 1.0 / base ** (torch.arange(0, rot, 2, dtype=F64) / rot)
    ang = torch.outer(pos, inv)
    return ang.cos().float(), ang.sin().float()


def check_rotary(c: OpContext) -> Iterator[tuple[str, Thunk]]:
    cases = [("smollm2 q", 9, 64, False, 10000.0), ("qwen2 k", 2, 64, False, 1e6),
             ("deepseek-v3-tiny q_pe", 8, 8, True, 10000.0), ("deepseek-v3-tiny k_pe", 1, 8, True, 10000.0),
             ("deepseek-v2-lite q_pe", 16, 64, True, 10000.0)]
    for name, heads, rot, inter, base in cases:
        def run(heads: int = heads, rot: int = rot, inter: bool = inter, base: float = base,
                name: str = name) -> CaseResult:
            t = 23
            x = c.rounded(c.randn(t, heads, rot))
            cos, sin = _cos_sin(c, t, rot, base)
            ref = NATIVE_OPS["rotary"](x, cos.to(F64), sin.to(F64), inter)
            got = c.op("rotary")(c.dev(x), cos.to(c.device), sin.to(c.device), inter)
            oracle = oracle_rotary(x, cos.to(F64), sin.to(F64), inter)
            kind = "interleaved" if inter else "neox"
            return c.judge("rotary", f"{name} [T={t}, {heads}, {rot}] {kind}", got, ref, scaled_error(ref, oracle))
        yield name, run


def check_silu_and_mul(c: OpContext) -> Iterator[tuple[str, Thunk]]:
    cases = [("smollm2 mlp", 1536), ("deepseek-v3-tiny expert", 64), ("odd width", 37)]
    for name, inter in cases:
        for t in (1, 29):
            def run(inter: int = inter, t: int = t, name: str = name) -> CaseResult:
                x = c.rounded(c.randn(t, 2 * inter, scale=3.0))
                ref = NATIVE_OPS["silu_and_mul"](x)
                got = c.op("silu_and_mul")(c.dev(x))
                g, u = x[:, :inter], x[:, inter:]
                oracle = g / (1 + torch.exp(-g)) * u
                return c.judge("silu_and_mul", f"{name} [T={t}, 2x{inter}]", got, ref, scaled_error(ref, oracle))
            yield f"{name} T={t}", run


def check_store_kv(c: OpContext) -> Iterator[tuple[str, Thunk]]:
    """19 slots (a decode batch) and 80 (a prompt chunk: backends may copy rows in bulk)."""
    for (name, per_token), t in [(case, t) for case in [("smollm2 k cache", (3, 64)),
                                                         ("deepseek-v3-tiny latent cache", (40,))] for t in (19, 80)]:
        def run(per_token: tuple[int, ...] = per_token, name: str = name, t: int = t) -> CaseResult:
            bs = c.block_size
            nb = max(6, -(-t // bs) + 1)  # room for t distinct slots at any block size
            cache = c.rounded(c.randn(nb, bs, *per_token))
            slots = torch.randperm(nb * bs, generator=c.gen)[:t]
            values = c.rounded(c.randn(t, *per_token))
            expect = cache.clone()
            for s, v in zip(slots.tolist(), values):
                expect[s // bs, s % bs] = v
            dev_cache = c.dev(cache)
            c.op("store_kv")(dev_cache, slots.to(c.device), c.dev(values))
            res = c.judge("store_kv", f"{name} [{nb}×{bs}, {', '.join(map(str, per_token))}], {t} slots",
                          dev_cache, expect)
            res.tol = 0.0
            if res.error is not None and res.error > 0:
                res.status = "fail"
                res.detail = "a store must copy exactly and touch no other slot"
            return res
        yield f"{name} {t} slots", run


def check_argmax(c: OpContext) -> Iterator[tuple[str, Thunk]]:
    """Greedy picks must be exact: the first index of each row's largest value, ties included."""
    cases = [("smollm2 vocab", 32, 49152), ("deepseek-v3-tiny vocab", 3, 1000), ("short rows", 5, 7)]
    for name, b, v in cases:
        def run(b: int = b, v: int = v, name: str = name) -> CaseResult:
            x = c.rounded(c.randn(b, v, scale=4.0))
            x[0, v // 2], x[0, v - 1] = 50.0, 50.0  # a tie: the first one wins
            if b > 2:
                x[1] = float("-inf")  # every token masked: index 0
                x[2, : v - 1] = float("-inf")  # one token left: the last
            got = c.op("argmax")(c.dev(x)).cpu()
            expect = torch.stack([torch.nonzero(row == row.max())[0, 0] for row in x.to(c.dtype).float()])
            ok = got.dtype == torch.long and torch.equal(got, expect)
            wrong = (got != expect).nonzero().flatten().tolist() if got.shape == expect.shape else "shape"
            return CaseResult("argmax", f"{name} [{b}, {v}]", dtype_name(c.dtype), c.sources.get("argmax", "?"),
                              "pass" if ok else "fail", None, None,
                              "" if ok else f"rows {wrong} differ from the first index of the row maximum")
        yield f"{name} [{b}, {v}]", run


def check_paged_attention(c: OpContext) -> Iterator[tuple[str, Thunk]]:
    bs = c.block_size
    cases = [("smollm2", 9, 3, 64, "mixed"), ("smollm2", 9, 3, 64, "decode"),
             ("qwen2-0.5b", 14, 2, 64, "mixed"), ("r1-distill-qwen-1.5b", 12, 2, 128, "decode")]
    for model, hq, hkv, d, kind in cases:
        def run(hq: int = hq, hkv: int = hkv, d: int = d, kind: str = kind, model: str = model) -> CaseResult:
            layout = mixed_layout(bs) if kind == "mixed" else decode_layout(bs)
            meta = make_meta(layout, bs, c.gen)
            nb = num_blocks_of(meta)
            tokens = sum(n for n, _ in layout)
            q = c.rounded(c.randn(tokens, hq, d))
            kc = c.rounded(c.randn(nb, bs, hkv, d))
            vc = c.rounded(c.randn(nb, bs, hkv, d))
            scale = d**-0.5
            ref = NATIVE_OPS["paged_attention"](q, kc, vc, meta, scale)
            got = c.op("paged_attention")(c.dev(q), c.dev(kc), c.dev(vc), meta_to(meta, c.device), scale)
            oracle = oracle_paged_attention(q, kc, vc, meta, scale)
            return c.judge("paged_attention", f"{model} {hq}/{hkv}×{d}, {kind} {layout}", got, ref,
                           scaled_error(ref, oracle))
        yield f"{model} {kind}", run


def check_mla_attention(c: OpContext) -> Iterator[tuple[str, Thunk]]:
    bs = c.block_size
    # (model, heads, kv_lora_rank C, rope R, nope Dn, v Dv, layout)
    cases = [("deepseek-v3-tiny", 8, 32, 8, 16, 16, "mixed"), ("deepseek-v3-tiny", 8, 32, 8, 16, 16, "decode"),
             ("deepseek-v2-lite", 16, 512, 64, 128, 128, "decode")]
    for model, h, cl, r, dn, dv, kind in cases:
        def run(h: int = h, cl: int = cl, r: int = r, dn: int = dn, dv: int = dv, kind: str = kind,
                model: str = model) -> CaseResult:
            layout = mixed_layout(bs) if kind == "mixed" else decode_layout(bs)
            meta = make_meta(layout, bs, c.gen)
            nb = num_blocks_of(meta)
            tokens = sum(n for n, _ in layout)
            w_uk = c.randn(h, dn, cl, scale=cl**-0.5)  # kv_b_proj's key half, per head
            w_uv = c.randn(h, dv, cl, scale=cl**-0.5)  # kv_b_proj's value half, per head
            q_nope = c.randn(tokens, h, dn)
            q_pe = c.rounded(c.randn(tokens, h, r))
            cache = c.rounded(c.randn(nb, bs, cl + r))
            scale = (dn + r) ** -0.5
            q_lat = torch.einsum("thn,hnc->thc", q_nope, w_uk)  # W_UK absorbed into the query
            # the reference vs the naive expanded form (exact inputs)
            lat64 = NATIVE_OPS["mla_attention"](q_lat, q_pe, cache, meta, scale)
            naive = oracle_mla_naive(q_nope, q_pe, cache, w_uk, w_uv, meta, scale)
            oracle_err = scaled_error(torch.einsum("thc,hvc->thv", lat64, w_uv), naive)
            # the candidate vs the reference (inputs rounded through the tested dtype)
            q_lat_r = c.rounded(q_lat)
            ref = NATIVE_OPS["mla_attention"](q_lat_r, q_pe, cache, meta, scale)
            got = c.op("mla_attention")(c.dev(q_lat_r), c.dev(q_pe), c.dev(cache), meta_to(meta, c.device), scale)
            return c.judge("mla_attention", f"{model} H={h} C={cl}+R={r}, absorbed, {kind} {layout}", got, ref,
                           oracle_err)
        yield f"{model} {kind}", run


def check_moe_experts(c: OpContext) -> Iterator[tuple[str, Thunk]]:
    cases = [("deepseek-v3-tiny", 16, 4, 64, 32, 1), ("deepseek-v3-tiny", 16, 4, 64, 32, 3),
             ("deepseek-v3-tiny", 16, 4, 64, 32, 64), ("64 experts top-6", 64, 6, 128, 96, 33)]
    for model, e, k, d, inter, t in cases:
        def run(e: int = e, k: int = k, d: int = d, inter: int = inter, t: int = t, model: str = model) -> CaseResult:
            x = c.rounded(c.randn(t, d))
            logits = c.randn(t, e)
            weights64, ids = logits.softmax(-1).topk(k, dim=-1)  # distinct experts per token
            weights = weights64.float()
            w13 = c.rounded(c.randn(e, 2 * inter, d, scale=d**-0.5))
            w2 = c.rounded(c.randn(e, d, inter, scale=inter**-0.5))
            ref = NATIVE_OPS["moe_experts"](x, ids, weights.to(F64), w13, w2)
            got = c.op("moe_experts")(c.dev(x), ids.to(c.device), weights.to(c.device), c.dev(w13), c.dev(w2))
            oracle = oracle_moe(x, ids, weights.to(F64), w13, w2)
            active = len(set(ids.flatten().tolist()))
            return c.judge("moe_experts", f"{model} E={e} top-{k} D={d} I={inter}, T={t} ({active} experts used)",
                           got, ref, scaled_error(ref, oracle))
        yield f"{model} T={t}", run


def check_linear(c: OpContext) -> Iterator[tuple[str, Thunk]]:
    cases = [("smollm2 qkv", 576, 960, False), ("smollm2 down", 1536, 576, False),
             ("qwen2 qkv (bias)", 896, 1152, True), ("deepseek kv_a_proj", 64, 40, False),
             ("lm head slice", 576, 4096, False)]
    for name, fin, fout, bias in cases:
        for t in (1, 13):
            def run(fin: int = fin, fout: int = fout, bias: bool = bias, t: int = t, name: str = name) -> CaseResult:
                x = c.rounded(c.randn(t, fin))
                w = c.rounded(c.randn(fout, fin, scale=fin**-0.5))
                b = c.rounded(c.randn(fout)) if bias else None
                ref = NATIVE_OPS["linear"](x, w, b)
                got = c.op("linear")(c.dev(x), c.dev(w), c.dev(b) if b is not None else None)
                oracle = torch.einsum("ti,oi->to", x, w) + (b if b is not None else 0)
                return c.judge("linear", f"{name} [T={t}, {fin}→{fout}]", got, ref, scaled_error(ref, oracle))
            yield f"{name} T={t}", run


def check_quant_linear(c: OpContext) -> Iterator[tuple[str, Thunk]]:
    """Weight-only int8 (per channel) and int4 (groups of 32) weights in the canonical
    `layers.quant` formats; the reference dequantizes in float64. Shapes include one the CPU's
    packed int4 kernel cannot take (N % 16 ≠ 0), so a fallback path is checked too; rows T = 1
    (decode), 13 (a decode batch) and 80 (a prompt chunk), which backends may route differently. In
    bf16 the activations may be rounded to int8 (QUANT_LINEAR_TOLERANCES)."""
    from shoal.layers.quant import Int4Weight, Int8Weight  # the formats the op consumes

    cases = [("smollm2 qkv", 576, 960, False, "int8"), ("qwen2 qkv (bias)", 896, 1152, True, "int8"),
             ("smollm2 down", 1536, 576, False, "int4"), ("qwen2 qkv (bias)", 896, 1152, True, "int4"),
             ("deepseek kv_a_proj", 64, 40, False, "int4")]
    for name, fin, fout, bias, fmt in cases:
        for t in (1, 13, 80):
            def run(fin: int = fin, fout: int = fout, bias: bool = bias, fmt: str = fmt, t: int = t,
                    name: str = name) -> CaseResult:
                w = c.randn(fout, fin, scale=fin**-0.5).float()
                qw = Int8Weight.quantize(w) if fmt == "int8" else Int4Weight.quantize(w)
                x = c.rounded(c.randn(t, fin))
                b = c.rounded(c.randn(fout)) if bias else None
                ref = NATIVE_OPS["quant_linear"](x, qw, b)
                oracle = torch.einsum("ti,oi->to", x, qw.dequantize(F64)) + (b if b is not None else 0)
                got = c.op("quant_linear")(c.dev(x), qw.to(c.device), c.dev(b) if b is not None else None)
                return c.judge("quant_linear", f"{name} {fmt} [T={t}, {fin}→{fout}]", got, ref,
                               scaled_error(ref, oracle), tol=QUANT_LINEAR_TOLERANCES.get(c.dname))
            yield f"{name} {fmt} T={t}", run


def check_quant_linear_silu_mul(c: OpContext) -> Iterator[tuple[str, Thunk]]:
    """SwiGLU's first half on a merged gate_up weight (the first half of the outputs the gate, the
    second the up projection), int8 and int4 weights, rows T = 1, 13 and 80 as for quant_linear; a
    width whose halves are not multiples of 16 checks a fallback path. In bf16 the activations may be
    rounded to int8 (QUANT_GLU_TOLERANCES)."""
    from shoal.layers.quant import Int4Weight, Int8Weight

    cases = [("smollm2 gate_up", 576, 1536, "int4"), ("smollm2 gate_up", 576, 1536, "int8"),
             ("deepseek-v3-tiny expert", 64, 40, "int4")]
    for name, fin, inter, fmt in cases:
        for t in (1, 13, 80):
            def run(fin: int = fin, inter: int = inter, fmt: str = fmt, t: int = t, name: str = name) -> CaseResult:
                w = c.randn(2 * inter, fin, scale=fin**-0.5).float()
                qw = Int8Weight.quantize(w) if fmt == "int8" else Int4Weight.quantize(w)
                x = c.rounded(c.randn(t, fin))
                ref = NATIVE_OPS["quant_linear_silu_mul"](x, qw, None)
                gu = torch.einsum("ti,oi->to", x, qw.dequantize(F64))
                g, u = gu[:, :inter], gu[:, inter:]
                oracle = g / (1 + torch.exp(-g)) * u
                got = c.op("quant_linear_silu_mul")(c.dev(x), qw.to(c.device), None)
                return c.judge("quant_linear_silu_mul", f"{name} {fmt} [T={t}, {fin}→2x{inter}]", got, ref,
                               scaled_error(ref, oracle), tol=QUANT_GLU_TOLERANCES.get(c.dname))
            yield f"{name} {fmt} T={t}", run


def _sample_result(c: OpContext, case: str, ok: bool, detail: str) -> CaseResult:
    return CaseResult("sample", case, "float32", c.sources.get("sample", "?"), "pass" if ok else "fail",
                      None, None, detail)


def check_sample(c: OpContext) -> Iterator[tuple[str, Thunk]]:
    """Sampling is checked by distribution, once per device (the sampler always passes float32)."""
    if c.dtype != torch.float32:
        return
    dev = c.device
    sample = c.op("sample")

    def gen(seed: int) -> torch.Generator:
        g = torch.Generator(device=dev)
        g.manual_seed(seed)
        return g

    def one_hot() -> CaseResult:
        b, v = 16, 1000
        target = torch.randint(0, v, (b,), generator=c.gen)
        probs = torch.zeros(b, v)
        probs[torch.arange(b), target] = 1.0
        gens = [gen(i) if i % 2 else None for i in range(b)]
        got = sample(probs.to(dev), gens).cpu()
        bad = (got != target).nonzero().flatten().tolist()
        return _sample_result(c, f"one-hot probs [B={b}, V={v}] = greedy", not bad,
                              f"rows drawing another token: {bad}" if bad else "every row drew its only token")

    def support() -> CaseResult:
        b, v = 2000, 512
        keep = torch.randperm(v, generator=c.gen)[:5]
        probs = torch.zeros(b, v)
        probs[:, keep] = torch.rand(5, generator=c.gen) + 0.05
        probs /= probs.sum(-1, keepdim=True)
        got = sample(probs.to(dev), [None] * b).cpu()
        outside = int((~torch.isin(got, keep)).sum())
        return _sample_result(c, f"zero-probability tokens never drawn [B={b}, V={v}]", outside == 0,
                              f"{outside} draws outside the support")

    def frequency() -> CaseResult:
        n, v = 20000, 64
        p = torch.zeros(v)
        perm = torch.randperm(v, generator=c.gen)
        p[perm[:6]] = torch.tensor([0.35, 0.25, 0.2, 0.1, 0.07, 0.03])
        c.platform.seed_everything(int(torch.randint(0, 2**31, (1,), generator=c.gen)))
        got = sample(p.expand(n, v).contiguous().to(dev), [None] * n).cpu()
        freq = torch.bincount(got, minlength=v).double() / n
        sigma = (p.double() * (1 - p.double()) / n).sqrt()
        z = ((freq - p.double()).abs() / (sigma + 1e-12)).where(p > 0, (freq > 0).double() * 1e9)
        worst = int(z.argmax())
        ok = float(z.max()) <= 5.0
        return _sample_result(c, f"frequencies over {n} draws [V={v}]", ok,
                              f"worst token: p={float(p[worst]):.3f} drawn {float(freq[worst]):.4f} "
                              f"({float(z.max()):.1f} σ; limit 5 σ)")

    def seeded() -> CaseResult:
        v = 256
        probs = torch.rand(8, v, generator=c.gen).pow(4)
        probs /= probs.sum(-1, keepdim=True)
        probs = probs.to(dev)
        a = sample(probs, [gen(7 + i) for i in range(8)]).cpu()
        b = sample(probs, [gen(7 + i) for i in range(8)]).cpu()
        alone = sample(probs[3:4], [gen(10)]).cpu()
        draws = [int(sample(probs[3:4], [gen(s)]).cpu()) for s in range(50)]
        ok = torch.equal(a, b) and int(alone) == int(a[3]) and len(set(draws)) > 1
        return _sample_result(c, "seeded rows repeat, and ignore the rest of the batch", ok,
                              "same seed → same token, alone or batched; different seeds vary" if ok else
                              f"batched {a.tolist()} vs again {b.tolist()}, row 3 alone {int(alone)}, "
                              f"{len(set(draws))} distinct tokens over 50 seeds")

    yield "one-hot", one_hot
    yield "support", support
    yield "frequency", frequency
    yield "seeded", seeded


def _dense_layer_cases(c: OpContext, name: str, num_layers: int,
                       run_ops: Callable[..., Any], run_op: Callable[..., Any]) -> Iterator[tuple[str, Thunk]]:
    """Cases shared by the dense-layer compositions: `num_layers` random int4 Llama/Qwen2 decoder
    layers, run op by op (`run_ops(layers, x, res, fb)`) and by the platform's op (`run_op`), each
    side on fresh copies of the caches; the outputs compared (a later layer's reads the K/V rows the
    ones before it wrote)."""
    from shoal.config import ModelConfig
    from shoal.forward_batch import ForwardBatch
    from shoal.layers.quant import quantize_model
    from shoal.models.llama import LlamaDecoderLayer

    bs = c.block_size
    decode12 = [(1, 3 * i + 2) for i in range(11)] + [(1, 2 * bs + 5)]
    cases = [("smollm2", 576, 9, 3, 1536, False, "decode", decode_layout(bs)),
             ("smollm2", 576, 9, 3, 1536, False, "decode", decode12),
             ("qwen2-0.5b", 896, 14, 2, 4864, True, "decode", decode12),
             ("smollm2", 576, 9, 3, 1536, False, "mixed", mixed_layout(bs))]
    for model, hid, hq, hkv, inter, bias, kind, layout in cases:
        def run(hid: int = hid, hq: int = hq, hkv: int = hkv, inter: int = inter, bias: bool = bias,
                kind: str = kind, layout: list[tuple[int, int]] = layout, model: str = model) -> CaseResult:
            d = 64
            cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=hid, intermediate_size=inter,
                              num_hidden_layers=num_layers, num_attention_heads=hq, num_key_value_heads=hkv)
            prev = torch.get_default_dtype()
            torch.set_default_dtype(c.dtype)  # as the model runner builds a model (rotary tables stay fp32)
            try:
                layers = torch.nn.ModuleList(LlamaDecoderLayer(cfg, bias) for _ in range(num_layers))
            finally:
                torch.set_default_dtype(prev)
            with torch.no_grad():
                for pname, p in layers.named_parameters():
                    p.copy_(c.randn(*p.shape, scale=p.shape[-1] ** -0.5 if p.dim() == 2 else 0.1)
                            + (1.0 if "norm" in pname else 0.0))
            layers = quantize_model(layers, "int4").to(c.device)
            meta = make_meta(layout, bs, c.gen)
            nb = num_blocks_of(meta)
            tokens = sum(n for n, _ in layout)
            positions = torch.cat([torch.arange(length - n, length) for n, length in layout])
            fb = ForwardBatch(torch.zeros(tokens, dtype=torch.long, device=c.device), positions.to(c.device),
                              meta_to(meta, c.device), torch.zeros(0, dtype=torch.long, device=c.device))
            x, res = c.dev(c.randn(tokens, hid)), c.dev(c.randn(tokens, hid))
            caches = [(c.dev(c.randn(nb, bs, hkv, d)), c.dev(c.randn(nb, bs, hkv, d))) for _ in range(num_layers)]
            outs = []
            for fn in (run_ops, run_op):
                for layer, (kc, vc) in zip(layers, caches):
                    layer.self_attn.attn.bind_kv_cache({"k": kc.clone(), "v": vc.clone()})
                with torch.no_grad():
                    out = fn(layers, x, res, fb)
                outs.append(torch.cat(out, dim=-1))
            return c.judge(name, f"{model} {hq}/{hkv}×{d}, hidden {hid}, {num_layers} layer(s), int4, {kind} {layout}",
                           outs[1], outs[0].cpu().to(F64))
        yield f"{model} {kind} {len(layout)} rows", run


def check_dense_decoder_layer(c: OpContext) -> Iterator[tuple[str, Thunk]]:
    """A composition, so its reference is the same layer run op by op on the platform (`forward_ops`,
    each op of which has its own float64 check above) rather than a float64 run: what the platform
    fuses must agree with what it runs unfused. Int4 weights (as the default model's), fresh caches
    for each side; decode batches in both the small-batch (5 rows) and the batched (12 rows) kernel
    range, and a mixed batch (which every platform runs op by op)."""
    def fused_or_ops(layers: Any, x: torch.Tensor, res: torch.Tensor, fb: Any) -> tuple[torch.Tensor, ...]:
        out = c.op("dense_decoder_layer")(layers[0].spec(), x, res, fb)  # None: the platform declines
        return layers[0].forward_ops(x, res, fb) if out is None else out

    yield from _dense_layer_cases(
        c, "dense_decoder_layer", 1,
        lambda layers, x, res, fb: layers[0].forward_ops(x, res, fb), fused_or_ops)


def check_dense_decoder_stack(c: OpContext) -> Iterator[tuple[str, Thunk]]:
    """All of a step's layers (three here) from the embedded tokens, against the same layers run op
    by op one after another (`forward_ops`), as `dense_decoder_layer`'s check: same cases."""
    def ops_one_by_one(layers: Any, x: torch.Tensor, res: torch.Tensor, fb: Any) -> tuple[torch.Tensor, ...]:
        residual = None
        for layer in layers:
            x, residual = layer.forward_ops(x, residual, fb)
        return x, residual

    def fused_or_layers(layers: Any, x: torch.Tensor, res: torch.Tensor, fb: Any) -> tuple[torch.Tensor, ...]:
        from shoal.backends.specs import DenseStackSpec

        stack = DenseStackSpec(tuple(layer.spec() for layer in layers))
        out = c.op("dense_decoder_stack")(stack, x, fb)  # None: the platform declines
        if out is not None:
            return out
        residual = None
        for layer, spec in zip(layers, stack.layers):
            out = c.op("dense_decoder_layer")(spec, x, residual, fb)
            x, residual = layer.forward_ops(x, residual, fb) if out is None else out
        return x, residual

    yield from _dense_layer_cases(c, "dense_decoder_stack", 3, ops_one_by_one, fused_or_layers)


CHECKS: dict[str, Callable[[OpContext], Iterator[tuple[str, Thunk]]]] = {
    "rms_norm": check_rms_norm,
    "add_rms_norm": check_add_rms_norm,
    "rotary": check_rotary,
    "silu_and_mul": check_silu_and_mul,
    "store_kv": check_store_kv,
    "paged_attention": check_paged_attention,
    "mla_attention": check_mla_attention,
    "moe_experts": check_moe_experts,
    "linear": check_linear,
    "quant_linear": check_quant_linear,
    "quant_linear_silu_mul": check_quant_linear_silu_mul,
    "argmax": check_argmax,
    "sample": check_sample,
    "dense_decoder_layer": check_dense_decoder_layer,
    "dense_decoder_stack": check_dense_decoder_stack,
}
