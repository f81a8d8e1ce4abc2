"""The CPU platform: plain torch with oneDNN underneath; memory from /proc/meminfo.

Every op uses its native form here except `quant_linear` (for bf16 decode rows shoal's VNNI GEMV,
qgemv.c, and on CPUs without AMX its VNNI tiles for prompt rows too; else torch's packed int8/int4
CPU kernels, or a dense oneDNN matmul for many rows), `quant_linear_silu_mul` (the tiles with
SwiGLU in their epilogue), `paged_attention`, `dense_decoder_layer` (a decode step's Llama-family
layer as one C++ call of the kernels below), `dense_decoder_stack` (all of a step's layers in one
such call: decode steps, and prompt steps where the CPU has no AMX) and, in eager steps, `rms_norm`, `rotary` and
`silu_and_mul` (shoal's C kernels, kernels.c, when a C compiler is present); the CPU run of
`shoal conformance` checks the native ops themselves (against the independent slow references in
the suite).
"""

from __future__ import annotations

import os
import platform as _pyplatform

import torch
import torch.nn.functional as F

from shoal.backends import native
from shoal.backends.base import Platform
from shoal.backends.cpu import isa, kernels, routing
from shoal.backends.specs import DenseLayerSpec, DenseStackSpec
from shoal.forward_batch import AttentionMetadata


def _weight_class(qweight) -> str:  # noqa: ANN001 — a layers.quant.QuantizedWeight
    """The weight's kind as routing.packed_form names it (the fp16 check once per weight)."""
    if hasattr(qweight, "qweight"):
        return "int8"
    if not hasattr(qweight, "codes"):
        return "other"
    if qweight.group_size != 32:
        return "int4-other"
    wide = qweight.kernel_cache.get("cpu-int4-wide")
    if wide is None:
        wide = qweight.kernel_cache["cpu-int4-wide"] = not kernels.int4_fits_fp16(qweight.scales, qweight.zeros)
    return "int4-wide" if wide else "int4"


# dtype → routing's name for it (a dict lookup: `str(dtype)` breaks a compiled graph, and a graph broken
# after a matmul left inductor's C++ wrapper an undeclared size symbol)
# asked once (dynamo will not trace the call: a compiled graph would break at each matmul)
_MKLDNN = torch.backends.mkldnn.is_available()
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _caps() -> routing.Caps:
    return routing.Caps(amx=kernels.amx_gemm(), simd=kernels.gemv_fast(), ops=kernels.torch_ops(),
                        int8_prompts=_int8_prompts, onednn_bf16=_onednn_bf16(),
                        compiling=torch.compiler.is_compiling())


def _onednn_bf16() -> bool:
    """oneDNN's bf16 matmul and weight prepacking run here: torch refuses them below AVX-512 (BW, VL,
    DQ) or AVX-NE-CONVERT, so they follow the tier in use (SHOAL_CPU_ISA=avx2 on an AVX-512 CPU takes
    the AVX2 CPU's paths)."""
    t = kernels.tier() or isa.best_tier()
    return _MKLDNN and isa.at_least(t, "avx512")


def _gemv_packed(qweight):  # noqa: ANN001, ANN202
    """qgemv.c's layout: the row layout where the CPU has AMX (the GEMV for few rows, the AMX kernels
    for more), else the column layout (kernels.to_columns; quant_gemm_vnni for every row count,
    measured faster than the GEMV from one row: the default model's 30 layers at 1 row 2.10 vs
    2.81 ms, at 8 rows 3.0 vs 7.5, AVX-512 EPYC) where the output width is a multiple of 16."""
    if hasattr(qweight, "qweight"):
        kind, rp = 8, kernels.repack_int8(qweight.qweight, qweight.scales)
    else:
        kind, rp = 4, kernels.repack_int4(qweight.codes, qweight.scales, qweight.zeros)
        if rp is None:
            return None
    if not kernels.amx_gemm() and qweight.out_features % 16 == 0:
        rp, kind = kernels.to_columns(rp, kind)
    return ("gemv", kind, rp)


def _packed(qweight, dtype: torch.dtype):  # noqa: ANN001, ANN202 — a layers.quant.QuantizedWeight
    """The weight in a packed CPU kernel's layout (routing.packed_form), built once per activation
    dtype (during warm-up) and kept on the weight:
    - ("gemv", kind, tensors): shoal's kernels (qgemv.c, int8 activations per group of 32), for bf16
      where its SIMD tiles are built for this CPU as torch operators;
    - ("int8", q, scales) / ("int4", packed, scales_and_zeros, group): torch's packed kernels;
    - None when no kernel takes this shape."""
    key = ("cpu", dtype)
    hit = qweight.kernel_cache.get(key)
    if hit is not None or key in qweight.kernel_cache:
        return hit
    form = routing.packed_form(_DTYPE_NAMES.get(dtype, "other"), _caps(), _weight_class(qweight),
                               qweight.out_features)
    out = _gemv_packed(qweight) if form == "gemv" else _torch_packed(qweight, dtype) if form else None
    qweight.kernel_cache[key] = out
    return out


def _torch_packed(qweight, dtype: torch.dtype):  # noqa: ANN001, ANN202
    if hasattr(qweight, "qweight"):  # int8 per channel: the canonical form is the kernel's form
        return ("int8", qweight.qweight, qweight.scales.to(dtype))
    if hasattr(qweight, "codes") and qweight.out_features % 16 == 0:
        codes = torch.stack((qweight.codes & 15, qweight.codes >> 4), dim=-1).flatten(-2).to(torch.int32)
        try:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        except RuntimeError:
            return None
        sz = torch.stack((qweight.scales, qweight.zeros), dim=-1).transpose(0, 1).contiguous().to(dtype)
        return ("int4", packed, sz, qweight.group_size)
    return None


PACKED_MAX_ROWS = routing.PACKED_MAX_ROWS


def _dense(qweight, dtype: torch.dtype) -> torch.Tensor:  # noqa: ANN001
    """The dequantized weight, kept for prefill-sized matmuls (2 bytes per weight in bf16)."""
    key = ("cpu-dense", dtype)
    w = qweight.kernel_cache.get(key)
    if w is None:
        w = qweight.kernel_cache[key] = qweight.dequantize(dtype)
    return w


def _panels(qweight, k: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:  # noqa: ANN001
    """The weight as bf16 VNNI tiles for prompt rows (qgemv.c quant_panels, from the packed layout the
    decode kernels use; the int8 row scales stay separate), built on first use; None where
    panel_gemm does not run or the weight has no packed layout."""
    key = ("cpu-panels", k)
    if key in qweight.kernel_cache:
        return qweight.kernel_cache[key]
    out = None
    kern = _packed(qweight, torch.bfloat16) if kernels.panel_gemm_supported(qweight.out_features, k) else None
    if kern is not None and kern[0] == "gemv":
        w0, w1, w2 = kern[2]
        panels = torch.ops.shoal.quant_panels(w0, w1, w2, kern[1], qweight.out_features, k)
        out = (panels, w1 if kern[1] == 8 else None)
    qweight.kernel_cache[key] = out
    return out


def _dense_linear(x: torch.Tensor, qweight, bias: torch.Tensor | None) -> torch.Tensor:  # noqa: ANN001
    """x @ W^T on the dequantized weight. Eagerly, bf16 goes through a oneDNN-prepacked copy of the
    weight (AMX layout; a plain weight is reordered on every call: 1.6x slower at 32 rows)."""
    if x.dtype == torch.bfloat16 and not torch.compiler.is_compiling() and _onednn_bf16():
        key = ("cpu-mkldnn", x.dtype)
        pw = qweight.kernel_cache.get(key)
        if pw is None:
            # from a transient dequantized copy: the prepacked one is all this path keeps (a weight
            # already holds its packed form and, for prompts, its panel_gemm tiles)
            dense = qweight.kernel_cache.get(("cpu-dense", x.dtype))
            dense = qweight.dequantize(x.dtype) if dense is None else dense
            pw = qweight.kernel_cache[key] = torch.ops.mkldnn._reorder_linear_weight(dense, 32)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), pw, bias, "none", [], "")
        return y.reshape(*x.shape[:-1], y.shape[-1])
    return F.linear(x, _dense(qweight, x.dtype), bias)


def int8_prompts() -> bool:
    """Prompt rows of bf16 models go through quant_gemm_vnni too (int8 activations per group of 32, as
    decode rows and llama.cpp do) instead of oneDNN's bf16 matmul on a dequantized copy: on CPUs with
    VNNI but no AMX, where a vpdpbusd does twice the multiply-adds of a vdpbf16ps. Off with
    SHOAL_CPU_PROMPT_ACTIVATIONS=bf16."""
    return _int8_prompts and not kernels.amx_gemm() and kernels.gemv_fast()


def _prompt_activations_setting() -> bool:
    value = os.environ.get("SHOAL_CPU_PROMPT_ACTIVATIONS", "int8").strip().lower()
    if value not in ("int8", "bf16"):
        raise ValueError(f"SHOAL_CPU_PROMPT_ACTIVATIONS must be int8 or bf16, not {value!r}")
    return value == "int8"


_int8_prompts = _prompt_activations_setting()


def quant_linear(x: torch.Tensor, qweight, bias: torch.Tensor | None) -> torch.Tensor:  # noqa: ANN001
    """Weight-only quantized matmul, by rows of x:
    - up to PACKED_MAX_ROWS (decode): shoal's VNNI GEMV (qgemv.c) where it is built, except bf16 rows
      above kernels.GEMV_MAX_ROWS, which take the AMX kernel below where it runs (`kernels.packed_matmul`,
      one operator); else torch's packed kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`);
    - up to kernels.QUANT_GEMM_MAX_ROWS, bf16, in qgemv.c's layouts (batched decode): shoal's AMX
      kernel (qgemv.c `quant_gemm_amx`: the weight decoded to bf16 tile by tile, reading 4.5 or 8
      bits a weight instead of 16; a 32-row decode step 33.9 → 28.9 ms), where the CPU has AMX-BF16;
    - up to kernels.PANEL_GEMM_MAX_ROWS (prompts), bf16, K % 32 == 0: qgemv.c `panel_gemm` on AMX
      tiles against a bf16 VNNI copy of the weight built on first use (`_panels`; 512-token prefill
      ~1.3x faster in its matmuls than oneDNN);
    - without AMX, bf16 rows of any count in the column layout (`int8_prompts`): quant_gemm_vnni's
      tiles (int8 activations; the default model's 30 layers at 2048 rows 383-430 vs 454-497 ms for
      oneDNN's bf16 matmul, and no dense copy of the weight is kept);
    - otherwise a dense matmul on the dequantized weight (oneDNN, prepacked)."""
    x2 = x.reshape(-1, x.shape[-1])
    rows, n, k = x2.shape[0], qweight.out_features, x2.shape[1]
    route = routing.linear_kernel(rows, _DTYPE_NAMES.get(x.dtype, "other"), n, k, _caps(), _weight_class(qweight))
    if route == "native":
        return native.quant_linear(x, qweight, bias)
    if route == "panel_gemm":
        panels = _panels(qweight, k)
        if panels is not None:
            y = torch.ops.shoal.panel_gemm(x2.contiguous(), panels[0], panels[1], n).reshape(*x.shape[:-1], n)
            return y if bias is None else y + bias
        route = "dense_onednn"
    kern = None if route.startswith("dense") else _packed(qweight, x.dtype)
    if kern is None:  # also torch's int4 packing refusing the weight
        return _dense_linear(x, qweight, bias)
    x2 = x2.contiguous()
    if route == "quant_gemm":
        y = torch.ops.shoal.quant_gemm(x2, *kern[2], kern[1], n)
    elif route == "packed_matmul":
        y = kernels.packed_matmul(x2, kern[2], kern[1], n)
    elif route == "torch_int8":
        y = torch.ops.aten._weight_int8pack_mm(x2, kern[1], kern[2])
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, kern[1], kern[3], kern[2])
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y if bias is None else y + bias


def quant_linear_silu_mul(x: torch.Tensor, qweight, bias: torch.Tensor | None) -> torch.Tensor:  # noqa: ANN001
    """SwiGLU's first half on a merged gate_up weight: where quant_linear would run quant_gemm_vnni
    (bf16 rows past the GEMV's, no AMX, the column layout), one pass of its tiles with the activation
    in the epilogue (`shoal::quant_gemm_glu`: each tile pairs a gate block with its up block; the
    [rows, 2I] projection is never written); otherwise quant_linear, then silu_and_mul."""
    x2 = x.reshape(-1, x.shape[-1])
    rows, n = x2.shape[0], qweight.out_features
    if (bias is None and x.dtype == torch.bfloat16 and rows > PACKED_MAX_ROWS and n % 32 == 0
            and not kernels.amx_gemm() and kernels.torch_ops()
            and (rows <= kernels.QUANT_GEMM_MAX_ROWS or int8_prompts())):
        kern = _packed(qweight, x.dtype)
        if kern is not None and kern[0] == "gemv" and kern[1] & kernels.COLS:
            y = torch.ops.shoal.quant_gemm_glu(x2.contiguous(), *kern[2], kern[1], n)
            return y.reshape(*x.shape[:-1], n // 2)
    return silu_and_mul(quant_linear(x, qweight, bias))


def _prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                       scale: float) -> torch.Tensor:
    """Prefill and mixed batches. Requests decoding one token in a mixed batch: all together through
    the decode kernel, not one masked SDPA each (~100 us a request and layer). Requests with new
    tokens: all together through the AMX-BF16 tile kernel where the CPU has it (kernels.c
    `prefill_attention_amx`: 15 prompts of ~140 tokens 3.3 → 0.93 ms a layer, one of 512 tokens
    1.15 → 0.48 ms), else one SDPA each, 4-d (3-d inputs take its math path, ~10x slower) with
    `enable_gqa` (no repeated KV heads: 173 → 146 us for a 128-token prompt)."""
    hq, hkv = q.shape[1], k_cache.shape[2]
    out = q.new_empty(q.shape[0], hq, v_cache.shape[-1])
    singles, rest, done = _split_requests(meta, kernels.decode_attention_supported(q, k_cache, v_cache))
    if singles is not None:
        tokens, tables, seq_lens = singles
        out.index_copy_(0, tokens, _decode_kernel(q.index_select(0, tokens), k_cache, v_cache, tables, seq_lens,
                                                  scale))
    if rest is None:
        return out
    if kernels.prefill_attention(q, k_cache, v_cache, *rest, scale, out):
        return out
    start = 0
    for i, (n, length) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        if i not in done:
            nblocks = -(-length // meta.block_size)
            blocks = meta.block_tables[i, :nblocks]
            k = k_cache.index_select(0, blocks).flatten(0, 1)[:length].transpose(0, 1)  # [Hkv, L, D]
            v = v_cache.index_select(0, blocks).flatten(0, 1)[:length].transpose(0, 1)
            qi = q[start : start + n].transpose(0, 1)  # [Hq, n, D]
            mask = None if n == length else torch.ones(n, length, dtype=torch.bool, device=q.device).tril(length - n)
            o = F.scaled_dot_product_attention(qi[None], k[None], v[None], attn_mask=mask, is_causal=mask is None,
                                               scale=scale, enable_gqa=hq != hkv)
            out[start : start + n] = o[0].transpose(0, 1)
        start += n
    return out


def _split_requests(meta: AttentionMetadata,
                    decode_kernel: bool) -> tuple[tuple | None, tuple | None, set[int]]:
    """A prefill or mixed batch's requests for `_prefill_attention`, worked out once a step and kept in
    `meta.derived` for the other layers (~0.3 ms a layer from Python lists and small tensors):
    - the one-token requests, when there are several and the decode kernel runs: their token rows,
      block tables and lengths; else None;
    - the others, as `kernels.prefill_attention` takes them: block tables, first token rows,
      new-token counts and lengths; None when there are none;
    - the indices of the requests the first part covers.
    Not kept while compiling (a traced step derives them in its graph)."""
    key = ("cpu-split", decode_kernel)
    compiling = torch.compiler.is_compiling()
    split = None if compiling else meta.derived.get(key)
    if split is None:
        singles = [i for i, n in enumerate(meta.query_lens_cpu) if n == 1]
        if not (len(singles) > 1 and decode_kernel):
            singles = []
        first = second = None
        if singles:
            rows = torch.tensor(singles, dtype=torch.long)
            first = (meta.query_start_loc.index_select(0, rows), meta.block_tables.index_select(0, rows),
                     meta.seq_lens.index_select(0, rows))
        done = set(singles)
        rest = [i for i in range(len(meta.query_lens_cpu)) if i not in done]
        if rest:
            rows = torch.tensor(rest, dtype=torch.long)
            second = (meta.block_tables.index_select(0, rows), meta.query_start_loc.index_select(0, rows),
                      torch.tensor([meta.query_lens_cpu[i] for i in rest], dtype=torch.long),
                      meta.seq_lens.index_select(0, rows))
        split = (first, second, done)
        if not compiling:
            meta.derived[key] = split
    return split


def _decode_kernel(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                   seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """The C decode kernel: the C++-registered operator (cheap from a compiled graph's C++ wrapper)
    when it was built, else the Python-registered one."""
    if kernels.torch_ops():
        return torch.ops.shoal.decode_attention(q, k_cache, v_cache, tables, seq_lens, scale)
    return torch.ops.shoal.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, scale)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    """Decode: shoal's C kernel (kernels.c: reads each sequence's blocks in place, 4-5x faster than
    SDPA over a gathered copy at batch 32), else gather each request's blocks with one
    `index_select` (a row copy; the native form's advanced indexing is ~2x slower here) over the
    whole block table, mask by `seq_lens`, and run SDPA. Neither reads host-side lengths, so a
    compiled decode step does not specialise on them.
    Prefill and mixed batches: `_prefill_attention`."""
    if not meta.decode_only:
        return _prefill_attention(q, k_cache, v_cache, meta, scale)
    # without the C++-registered operator the Python-registered one runs, but not in a compiled
    # batch-1 step, whose C++ wrapper calls a Python op slowly (~60 us a layer)
    if kernels.decode_attention_supported(q, k_cache, v_cache) and (
            kernels.torch_ops() or not (q.shape[0] == 1 and torch.compiler.is_compiling())):
        return _decode_kernel(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale)
    b, hq, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    tables = meta.block_tables
    length = tables.shape[1] * bs
    flat = tables.reshape(-1)
    k = k_cache.index_select(0, flat).view(b, length, hkv, d).transpose(1, 2)  # [B, Hkv, L, D]
    v = v_cache.index_select(0, flat).view(b, length, hkv, v_cache.shape[-1]).transpose(1, 2)
    valid = torch.arange(length, device=q.device).unsqueeze(0) < meta.seq_lens.unsqueeze(1)  # [B, L]
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=valid[:, None, None, :], scale=scale,
                                         enable_gqa=hq != hkv)
    return out.squeeze(2)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Eagerly the C kernel (one pass over x); compiled, the torch form (inductor fuses it)."""
    out = kernels.rms_norm(x, weight, eps)
    return native.rms_norm(x, weight, eps) if out is None else out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eagerly the C kernel (one pass over both inputs: a 2,048-token prefill chunk 340 -> 327 ms, the
    same logits); otherwise the add, then `rms_norm` (compiled: the torch forms, which inductor fuses)."""
    out = kernels.add_rms_norm(x, residual, weight, eps)
    return native.add_then_norm(rms_norm, x, residual, weight, eps) if out is None else out


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Eagerly the C kernel (same bf16 rounding as the torch form); compiled, the torch form."""
    out = kernels.rotary(x, cos, sin, interleaved)
    return native.rotary(x, cos, sin, interleaved) if out is None else out


def store_kv(cache: torch.Tensor, slot_mapping: torch.Tensor, values: torch.Tensor) -> None:
    """Eager prompt chunks: the C row copy (kernels.c store_rows; index_copy_ moved ~5 GB/s); else
    the torch form."""
    if not kernels.store_kv(cache, slot_mapping, values):
        native.store_kv(cache, slot_mapping, values)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """The C kernel (one pass on both threads: [32, 49152] bf16 0.61 → 0.13 ms); else the torch form."""
    out = kernels.argmax(logits)
    return native.argmax(logits) if out is None else out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Eagerly the C kernel (one pass instead of three); compiled, the torch form."""
    out = kernels.silu_and_mul(x)
    return native.silu_and_mul(x) if out is None else out


def _fused_static(spec: DenseLayerSpec) -> tuple | None:
    """The arguments of `dense_decode_layer` that stay the same from step to step (norm weights and
    eps, the packed weights and their kinds, the shapes, the q/k/v bias, the rotary tables, the
    caches, the scale) and whether the batched kernels take every projection; None where the fused
    layer does not apply to this layer at all (see _fused_decode_layer)."""
    lins = (spec.qkv, spec.o, spec.gate_up, spec.down)
    if spec.tp_size > 1 or any(q is None for q in lins) or spec.other_bias:
        return None
    weights, kinds, batched = [], [], True
    for q in lins:
        kern = _packed(q, torch.bfloat16)
        if kern is None or kern[0] != "gemv":
            return None
        batched = batched and kernels.quant_gemm_supported(q.out_features, q.in_features)
        weights.extend(kern[2])
        kinds.append(kern[1])
    kc, vc = spec.k_cache, spec.v_cache
    if (spec.interleaved or spec.rot_dim != spec.head_dim or spec.cos.dtype != torch.float32
            or spec.sin.dtype != torch.float32 or not (spec.cos.is_contiguous() and spec.sin.is_contiguous())
            or kc is None or vc is None or kc.dtype != torch.bfloat16 or vc.dtype != torch.bfloat16
            or not (kc.is_contiguous() and vc.is_contiguous())
            or spec.eps != spec.post_eps or spec.in_norm.dtype != spec.post_norm.dtype):
        return None
    bias = spec.qkv_bias
    args = (spec.in_norm, spec.post_norm, spec.eps, weights, kinds,
            [spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.intermediate],
            None if bias is None else bias.to(torch.bfloat16), spec.cos, spec.sin)
    return args, kc, vc, spec.scale, batched


def _derived(spec: DenseLayerSpec | DenseStackSpec, key: str, make) -> tuple | None:  # noqa: ANN001
    """What `make(spec)` works out, kept in the spec (which the model rebuilds when its caches are
    rebound); recomputed, not kept, while compiling (a traced step derives it in its graph)."""
    if torch.compiler.is_compiling():
        return make(spec)
    if key not in spec.derived:
        spec.derived[key] = make(spec)
    return spec.derived[key]


def _fused_decode_layer(spec: DenseLayerSpec, x: torch.Tensor, residual: torch.Tensor | None,
                        fb) -> tuple[torch.Tensor, torch.Tensor] | None:  # noqa: ANN001
    """A decode step's Llama-family layer in one C++ call (ops.cpp `dense_decode_layer`: the eager
    step's kernels in the eager step's order), or None where it does not apply: not a decode-only
    bf16 batch of at most kernels.QUANT_GEMM_MAX_ROWS rows, the C++ operators not built, a projection
    not in qgemv.c's packed layouts (or too wide for the batched kernels), tensor parallelism, biases
    other than q/k/v's, partial or interleaved rotary or rotary tables not in fp32 (which the eager
    step's C kernel does not take either), or a cache that is not contiguous bf16. The arguments
    that do not change are worked out once per spec (eager batched steps run this per layer and
    step: ~70 µs a call of lookups and checks before, under cProfile)."""
    meta = fb.attn
    rows = x.shape[0]
    if not (meta.decode_only and x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() == 2
            and 0 < rows <= kernels.QUANT_GEMM_MAX_ROWS and kernels.torch_ops()):
        return None
    st = _derived(spec, "cpu-fused", _fused_static)
    if st is None or (rows > PACKED_MAX_ROWS and not st[4]):
        return None
    args, kc, vc, scale, _ = st
    return torch.ops.shoal.dense_decode_layer(
        x.contiguous(), None if residual is None else residual.contiguous(), *args, fb.positions, kc, vc,
        meta.slot_mapping, meta.block_tables, meta.seq_lens, scale)


def dense_decoder_layer(spec: DenseLayerSpec, x: torch.Tensor, residual: torch.Tensor | None,
                        fb) -> tuple[torch.Tensor, torch.Tensor] | None:  # noqa: ANN001
    """Decode steps: the whole layer in one C++ call where `_fused_decode_layer` applies (a compiled
    step then makes one dispatcher call a layer instead of nine, with no graph kernels between
    them); otherwise None, and the model runs the layer op by op."""
    return _fused_decode_layer(spec, x, residual, fb)


def _fused_decode_stack(stack: DenseStackSpec, x: torch.Tensor, fb) -> tuple[torch.Tensor, torch.Tensor] | None:  # noqa: ANN001
    """A step's decoder layers in one C++ call (ops.cpp `dense_decode_stack`: each layer as
    `dense_decode_layer`, one after another), or None where that does not apply: where any layer
    would not take `_fused_decode_layer`, or the layers differ in their norms' eps, attention scale,
    rotary tables or in having a q/k/v bias. Decode steps of up to kernels.QUANT_GEMM_MAX_ROWS rows;
    eager prompt and mixed steps where the platform's ops would run every projection on
    quant_gemm_vnni (`int8_prompts`: no AMX) and the attention on the prompt kernel (head size a
    multiple of 32, blocks of a multiple of 16), with the one-token sequences of a mixed step on the
    decode kernel as `_prefill_attention` does: the same kernels in the same order, so the same
    results. One call a step instead of ~10 op calls a layer from Python: the default model's 30
    layers at 32 decode rows spent ~0.5 ms a step around the calls; the `ci` recipe, both kinds of
    steps fused against decode steps only, alternating in one process: 1,163 → 1,181 out tok/s."""
    meta = fb.attn
    rows = x.shape[0]
    decode, compiling = meta.decode_only, torch.compiler.is_compiling()
    if not (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() == 2 and rows > 0
            and kernels.torch_ops()) or len(stack.layers) == 0:
        return None
    # prompt and mixed steps (eager): where every projection of any row count takes quant_gemm_vnni
    # (int8_prompts: no AMX) and the prompt attention kernel is built; the block size and head size
    # it needs are checked below
    if not (rows <= kernels.QUANT_GEMM_MAX_ROWS if decode
            else not compiling and int8_prompts() and kernels.prefill_attention_builtin()):
        return None
    st = _derived(stack, "cpu-stack", _stack_static)
    if st is None or (rows > PACKED_MAX_ROWS and not st[1]):
        return None
    args, _ = st
    norms, eps, weights, kinds, dims, biases, cos, sin, kcs, vcs, scale = args
    split = []
    if not decode:
        if any(d % 32 for d in dims[2::4]) or kcs[0].shape[1] % 16:
            return None
        split = _stack_split(meta)
    return torch.ops.shoal.dense_decode_stack(x.contiguous(), norms, eps, weights, kinds, dims, biases, cos, sin,
                                              fb.positions, kcs, vcs, meta.slot_mapping, meta.block_tables,
                                              meta.seq_lens, scale, split)


def _stack_split(meta: AttentionMetadata) -> list[torch.Tensor]:
    """A prompt or mixed step's attention groups as `dense_decode_stack` takes them: those of
    `_split_requests` (which `_prefill_attention` uses too), absent groups as empty tensors."""
    first, second, _ = _split_requests(meta, True)
    none = torch.zeros(0, dtype=torch.long)
    first = first or (none, torch.zeros(0, 1, dtype=torch.long), none)
    second = second or (torch.zeros(0, 1, dtype=torch.long), none, none, none)
    return [*first, *second]


def _stack_static(stack: DenseStackSpec) -> tuple | None:
    """`dense_decode_stack`'s arguments that stay the same from step to step, and whether the batched
    kernels take every projection of every layer; None where the layers cannot go in one call."""
    sts = [_derived(spec, "cpu-fused", _fused_static) for spec in stack.layers]
    if not sts or any(st is None for st in sts):
        return None
    first = sts[0][0]
    if any(st[0][2] != first[2] or st[3] != sts[0][3] or st[0][7] is not first[7] or st[0][8] is not first[8]
           or (st[0][6] is None) != (first[6] is None) for st in sts):
        return None
    norms = [t for st in sts for t in st[0][:2]]
    weights = [w for st in sts for w in st[0][3]]
    kinds = [k for st in sts for k in st[0][4]]
    dims = [d for st in sts for d in st[0][5]]
    biases = [] if first[6] is None else [st[0][6] for st in sts]
    args = (norms, first[2], weights, kinds, dims, biases, first[7], first[8], [st[1] for st in sts],
            [st[2] for st in sts], sts[0][3])
    return args, all(st[4] for st in sts)


def dense_decoder_stack(stack: DenseStackSpec, x: torch.Tensor,
                        fb) -> tuple[torch.Tensor, torch.Tensor] | None:  # noqa: ANN001
    """Every layer in one C++ call where `_fused_decode_stack` applies (decode steps; prompt and mixed
    steps on CPUs without AMX); otherwise None, and the model calls its layers in turn (a decode
    step's layers each still one call where `_fused_decode_layer` applies)."""
    return _fused_decode_stack(stack, x, fb)


def _meminfo() -> tuple[int, int]:
    vals = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                k, v = line.split(":", 1)
                vals[k] = int(v.strip().split()[0]) * 1024
        return vals.get("MemAvailable", 0), vals.get("MemTotal", 0)
    except (OSError, ValueError, IndexError):
        pass
    try:  # other POSIX systems: total only; report it as free too rather than nothing
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total, total
    except (ValueError, OSError, AttributeError):
        return 0, 0


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"
    kv_block_size = 16
    decode_small_batch_max = PACKED_MAX_ROWS  # the packed quantized GEMV's range
    # RAM is shared with the OS and every other process: a quarter of what is available, ≤ 4 GiB
    kv_cache_fraction = 0.25
    kv_cache_max_bytes = 2 * 2**30  # zero-filling more costs seconds at start-up
    op_overrides = {"quant_linear": quant_linear, "quant_linear_silu_mul": quant_linear_silu_mul,
                    "paged_attention": paged_attention, "rms_norm": rms_norm,
                    "rotary": rotary, "silu_and_mul": silu_and_mul, "store_kv": store_kv, "argmax": argmax,
                    "add_rms_norm": add_rms_norm, "dense_decoder_layer": dense_decoder_layer,
                    "dense_decoder_stack": dense_decoder_stack}

    def device_count(self) -> int:
        return 1

    def decode_fused(self, model, max_rows: int) -> bool:  # noqa: ANN001
        """Models that describe their layers as a backends.specs.DenseStackSpec (`model.model.stack_spec()`:
        Llama, Qwen2) whose layers all go into `dense_decode_stack` (see `_fused_decode_stack`) for
        every decode batch up to max_rows. At 32 rows the compiled step (dynamo's guards and wrappers,
        the graph's call) took ~1.5 ms a step more than the eager one, 15.1 vs 13.5 ms; at 1 row 4.06
        vs 3.68 ms."""
        stack_spec = getattr(getattr(model, "model", None), "stack_spec", None)
        if not (callable(stack_spec) and 0 < max_rows <= kernels.QUANT_GEMM_MAX_ROWS and kernels.torch_ops()):
            return False
        st = _derived(stack_spec(), "cpu-stack", _stack_static)
        return st is not None and (max_rows <= PACKED_MAX_ROWS or st[1])

    def warm_up_prompt_tokens(self, chunk: int) -> int:
        """96 tokens where bf16 prompt rows take the int8-activation tiles (`int8_prompts`: a SIMD tier
        without AMX), whose layout the 96-token warm-up step already builds (float32 prompts' dense
        copies too); elsewhere the whole chunk, since prompt rows build forms of their own on first
        use (AMX: panel tiles for 97-1,536 rows, oneDNN's prepacked copies above; the dense bf16
        copies of the generic tier or of SHOAL_CPU_PROMPT_ACTIVATIONS=bf16)."""
        return min(chunk, 96) if int8_prompts() else chunk

    def op_kernels(self) -> dict[str, str]:
        """The kernel each op runs here, with the ISA tier it was built for (isa.py)."""
        t = kernels.tier()
        if t is None:
            return dict.fromkeys(("quant_linear", "paged_attention", "rms_norm"), "plain torch (shoal's C kernels are off)")
        caps = _caps()
        mm = ("AMX tiles (batched, prompts) + int8-activation GEMV" if caps.amx
              else f"int8-activation tiles ({'AVX-512 VNNI' if t == 'avx512' else 'AVX2 vpmaddubsw'}), every row count"
              if caps.simd else "torch's packed int4/int8 kernels (decode), dense matmul (prompts)")
        dense = "oneDNN bf16, prepacked" if caps.onednn_bf16 else "torch matmul (no oneDNN bf16 below AVX-512)"
        fused = kernels.torch_ops() and caps.simd
        return {
            "tier": f"{t} (this CPU runs {', '.join(isa.cpu_tiers())}; SHOAL_CPU_ISA caps it)",
            "quant_linear, quant_linear_silu_mul": f"{mm}; else {dense} [{t}]",
            "paged_attention": f"decode: shoal's kernel [{t}]; prompts: "
                               + (f"shoal's kernel [{t}]" if kernels.prefill_attention_builtin() else "torch SDPA"),
            "rms_norm, add_rms_norm, rotary, silu_and_mul, store_kv, argmax": f"shoal's C kernels in eager steps [{t}]",
            "dense_decoder_layer, dense_decoder_stack": (f"one C++ call per step [{t}]" if fused
                                                         else "declined: op by op"),
        }

    def device_name(self, index: int | None = None) -> str:
        return isa.cpuinfo_field("model name") or _pyplatform.processor() or "cpu"

    def memory_info(self, index: int | None = None) -> tuple[int, int]:
        return _meminfo()

    def has_fast_bf16(self) -> bool:
        """bf16 is the fast dtype here (what dtype `auto` picks): shoal's kernels are built for a SIMD
        tier (avx2 and up) with their torch operators. bf16 is then the storage between kernels (the
        activations, the KV cache); the arithmetic is each tier's own: AMX and AVX512-BF16 tiles, or
        fp32 FMAs on widened bf16 and int8 dot products (VNNI, or AVX2's vpmaddubsw) against the
        quantized weights. Without them (the generic tier, no compiler) float32: torch's own fp32
        kernels beat bf16 emulated in scalar code."""
        t = kernels.tier()
        return t is not None and isa.at_least(t, "avx2") and kernels.torch_ops()

    def default_dtype(self) -> torch.dtype:
        return torch.float32

    def library_versions(self) -> dict[str, str]:
        out = super().library_versions()
        out["threads"] = str(torch.get_num_threads())
        out["onednn"] = "yes" if torch.backends.mkldnn.is_available() else "no"
        out["cpu tiers"] = ", ".join(isa.cpu_tiers())
        out["kernel tier"] = kernels.tier() or "none (plain torch)"
        out["bf16 fast (dtype auto)"] = "yes" if self.has_fast_bf16() else "no"
        return out
