"""Plain-torch (`native`) form of every op in the platform op table.

These run on any device torch supports and are the reference that every override is tested
against (`shoal conformance`). They favour clarity over speed, but avoid per-token Python loops.
Shapes use T = tokens in the flat batch, B = requests, H = heads, D = head dim.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from shoal.forward_batch import AttentionMetadata


def _acc(x: torch.Tensor) -> torch.Tensor:
    """x in the accumulation dtype: float32, or float64 when x is float64 (the conformance
    reference runs every op in float64 on the CPU)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / rms(x) * weight, computed in float32 and cast back."""
    dtype = x.dtype
    xf = _acc(x)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.to(xf.dtype)).to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A residual add and the RMSNorm after it: (rms_norm(x + residual), x + residual), the sum in x's
    dtype as the separate add gives it."""
    return add_then_norm(rms_norm, x, residual, weight, eps)


def add_then_norm(norm: Any, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_rms_norm` from a given RMSNorm (a platform's own, when it has no fused form)."""
    total = x + residual
    return norm(total, weight, eps), total


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the last dim of x [T, H, R] by angles whose cos/sin are [T, R/2].

    interleaved=False (GPT-NeoX / HF Llama): pairs are (i, i + R/2).
    interleaved=True (original DeepSeek / GPT-J): pairs are (2i, 2i+1).
    """
    cos = cos.unsqueeze(1).to(x.dtype)
    sin = sin.unsqueeze(1).to(x.dtype)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        o1 = x1 * cos - x2 * sin
        o2 = x2 * cos + x1 * sin
        return torch.stack((o1, o2), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a fused [..., 2I] gate+up projection: silu(gate) * up → [..., I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def store_kv(cache: torch.Tensor, slot_mapping: torch.Tensor, values: torch.Tensor) -> None:
    """Write values [T, ...] into cache [num_blocks, block_size, ...] at flat slots [T]."""
    flat = cache.view(-1, *cache.shape[2:])
    flat.index_copy_(0, slot_mapping, values.to(cache.dtype))


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """The first `length` cached entries of one request: [length, ...]."""
    nblocks = (length + block_size - 1) // block_size
    blocks = cache.index_select(0, block_table[:nblocks])  # [nb, bs, ...]
    return blocks.flatten(0, 1)[:length]


def _gather_batch(cache: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """All requests' contexts padded to the longest: ([B, L, ...], valid mask [B, L])."""
    bs = meta.block_size
    nblocks = (meta.max_seq_len + bs - 1) // bs
    tables = meta.block_tables[:, :nblocks]
    ctx = cache[tables]  # [B, nb, bs, ...]
    ctx = ctx.flatten(1, 2)[:, : meta.max_seq_len]
    pos = torch.arange(ctx.shape[1], device=cache.device)
    valid = pos.unsqueeze(0) < meta.seq_lens.unsqueeze(1)
    return ctx, valid


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [NB, BS, Hkv, D]
    v_cache: torch.Tensor,  # [NB, BS, Hkv, Dv]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, Hq, Dv]
    """Causal attention of each request's new tokens over its whole cached context (GQA).

    The new tokens' K/V must already be in the cache. Query j of a request with n new tokens and
    context length L sits at position L - n + j and sees cache positions 0 .. L - n + j.
    """
    hq, hkv = q.shape[1], k_cache.shape[2]
    if meta.decode_only:
        k, valid = _gather_batch(k_cache, meta)  # [B, L, Hkv, D]
        v, _ = _gather_batch(v_cache, meta)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2),  # [B, Hq, 1, D]
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=valid[:, None, None, :],
            scale=scale,
            enable_gqa=hq != hkv,
        )
        return out.squeeze(2)
    outs = []
    start = 0
    for i, (n, length) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        qi = q[start : start + n].transpose(0, 1)  # [Hq, n, D]
        k = gather_context(k_cache, meta.block_tables[i], length, meta.block_size).transpose(0, 1)
        v = gather_context(v_cache, meta.block_tables[i], length, meta.block_size).transpose(0, 1)
        if n == length:
            o = F.scaled_dot_product_attention(qi, k, v, is_causal=True, scale=scale, enable_gqa=hq != hkv)
        else:
            mask = torch.ones(n, length, dtype=torch.bool, device=q.device).tril(length - n)
            o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale, enable_gqa=hq != hkv)
        outs.append(o.transpose(0, 1))
        start += n
    return torch.cat(outs, dim=0)


def mla_attention(
    q_latent: torch.Tensor,  # [T, H, C]  query with W_UK absorbed (C = kv_lora_rank)
    q_pe: torch.Tensor,  # [T, H, R]  rotated rope part of the query
    kv_cache: torch.Tensor,  # [NB, BS, C + R]  latent c_kv followed by rotated k_pe
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, H, C]  attention-weighted latent (W_UV is applied by the caller)
    """Absorbed MLA: scores = q_latent·c_kv + q_pe·k_pe over the cached latent, values = c_kv.

    This is multi-query attention with one shared "head" of width C + R for keys and C for values.
    """
    c = q_latent.shape[-1]
    q = torch.cat((q_latent, q_pe), dim=-1)  # [T, H, C+R]
    if meta.decode_only:
        ctx, valid = _gather_batch(kv_cache, meta)  # [B, L, C+R]
        scores = torch.einsum("bhc,blc->bhl", _acc(q), _acc(ctx)) * scale
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        probs = scores.softmax(-1)
        return torch.einsum("bhl,blc->bhc", probs, _acc(ctx[..., :c])).to(q_latent.dtype)
    outs = []
    start = 0
    for i, (n, length) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        ctx = gather_context(kv_cache, meta.block_tables[i], length, meta.block_size)  # [L, C+R]
        qi = q[start : start + n]  # [n, H, C+R]
        scores = torch.einsum("nhc,lc->hnl", _acc(qi), _acc(ctx)) * scale
        mask = torch.ones(n, length, dtype=torch.bool, device=q.device).tril(length - n)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(-1)
        outs.append(torch.einsum("hnl,lc->nhc", probs, _acc(ctx[:, :c])).to(q_latent.dtype))
        start += n
    return torch.cat(outs, dim=0)


def moe_experts(
    x: torch.Tensor,  # [T, D]
    topk_ids: torch.Tensor,  # [T, K] long
    topk_weights: torch.Tensor,  # [T, K] float
    w13: torch.Tensor,  # [E, 2I, D]  gate and up projections stacked
    w2: torch.Tensor,  # [E, D, I]  down projection
) -> torch.Tensor:  # [T, D]
    """SwiGLU experts computed by grouping tokens per expert (sort by expert id, one matmul per
    active expert, scatter-add back), never a loop over tokens."""
    t, k = topk_ids.shape
    flat_ids = topk_ids.reshape(-1)
    order = flat_ids.argsort(stable=True)
    token_of = order // k  # token each sorted assignment came from
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    xs = x.index_select(0, token_of)  # [T*K, D] grouped by expert
    out = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        h = xs[start : start + n] @ w13[e].t()  # [n, 2I]
        gate, up = h.chunk(2, dim=-1)
        out[start : start + n] = (F.silu(gate) * up) @ w2[e].t()
        start += n
    # weight and sum the top-k outputs in the accumulation dtype (as fused kernels do), then cast
    out = _acc(out) * topk_weights.reshape(-1)[order].unsqueeze(-1).to(_acc(out).dtype)
    y = torch.zeros(x.shape, dtype=out.dtype, device=x.device)
    y.index_add_(0, token_of, out)
    return y.to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def quant_linear(x: torch.Tensor, qweight: Any, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T (+ bias) for a weight-only quantized W (a `layers.quant.QuantizedWeight`): dequantize
    to x's dtype, then a plain matmul. The slow twin of every packed-kernel override."""
    return F.linear(x, qweight.dequantize(x.dtype), bias)


def quant_linear_silu_mul(x: torch.Tensor, qweight: Any, bias: torch.Tensor | None) -> torch.Tensor:
    """silu_and_mul(quant_linear(x, W, bias)) for a merged gate_up weight (W's first half of outputs the
    gate projection, its second half the up projection): SwiGLU's first half as one op, so that a
    platform can apply the activation in its matmul's epilogue (the CPU platform's quant_gemm_glu)."""
    return silu_and_mul(quant_linear(x, qweight, bias))


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Greedy pick per row of logits [B, V]: the index of the largest value, the first on ties (and
    of the first NaN in a row that has one)."""
    return logits.max(dim=-1).indices


def sample(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Draw one token per row of probs [B, V]; row i uses generators[i] when given, so a seeded
    request gets the same tokens whatever else is in the batch. Exponential race: argmax p / E."""
    q = torch.empty_like(probs, dtype=torch.float32)  # exponential noise, one row per request
    for i, g in enumerate(generators):
        if g is None:
            q[i].exponential_()
        else:
            q[i].exponential_(generator=g)
    return (_acc(probs) / q).argmax(dim=-1)


def dense_decoder_layer(spec: Any, x: torch.Tensor, residual: torch.Tensor | None,
                        fb: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One pre-norm decoder layer of a dense model (`spec`: a backends.specs.DenseLayerSpec) in one
    fused call → (its MLP output, the residual stream before it), or None where the platform has no
    such call for it; the model then runs the layer op by op. The native form has none."""
    return None


def dense_decoder_stack(spec: Any, x: torch.Tensor, fb: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A decode or prompt step through all the decoder layers of a dense model (`spec`: a
    backends.specs.DenseStackSpec) in one call, from the embedded tokens x → (the last layer's MLP
    output, the residual stream before it), or None where the platform has no such call (the model
    then calls its layers in turn, each through `dense_decoder_layer`). The native form has none."""
    return None


# Ops the engine knows of. An op listed here but missing from NATIVE_OPS has not been added yet;
# `shoal doctor` and `shoal conformance` show it as "not in table", never as passing.
KNOWN_OPS = (
    "rms_norm", "add_rms_norm", "rotary", "silu_and_mul", "store_kv", "paged_attention", "mla_attention", "moe_experts",
    "linear", "quant_linear", "quant_linear_silu_mul", "argmax", "sample", "dense_decoder_layer",
    "dense_decoder_stack",
)

NATIVE_OPS = {
    "rms_norm": rms_norm,
    "add_rms_norm": add_rms_norm,
    "rotary": rotary,
    "silu_and_mul": silu_and_mul,
    "store_kv": store_kv,
    "paged_attention": paged_attention,
    "mla_attention": mla_attention,
    "moe_experts": moe_experts,
    "linear": linear,
    "quant_linear": quant_linear,
    "quant_linear_silu_mul": quant_linear_silu_mul,
    "argmax": argmax,
    "sample": sample,
    "dense_decoder_layer": dense_decoder_layer,
    "dense_decoder_stack": dense_decoder_stack,
}
