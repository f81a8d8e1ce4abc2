"""shoal's own CPU kernels (kernels.c, qgemv.c), one library per ISA tier (isa.py, built by build.py at
install or on first use), called through the entry library (dispatch.c: the kernels' symbols,
forwarding to the tier loaded). When a C++ compiler and torch's headers are present the entry library
also holds ops.cpp, which registers `shoal::quant_gemv`, `shoal::quant_gemm`, `shoal::decode_attention`
and the fused layer ops as C++ torch operators, which a compiled graph's C++ wrapper calls without a
trip through Python; the rest is called through ctypes.
Everything here has a plain-torch twin; when no compiler is found (or `SHOAL_CPU_KERNELS=0`) the
twin runs instead, after one log line saying why.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from shoal.backends.cpu import build, isa
from shoal.backends.cpu.routing import (GEMV_MAX_ROWS, PANEL_GEMM_MAX_ROWS, QUANT_GEMM_MAX_ROWS,  # noqa: F401
                                        STORE_KV_MIN_ROWS)

log = logging.getLogger("shoal")

_DIR = Path(__file__).parent
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_cxx_ops = False  # ops.cpp built and loaded: torch.ops.shoal.quant_gemv / quant_gemm / decode_attention exist
_amx_gemm = False  # quant_gemm_amx compiled in and AMX granted to this process (asked once a tier, at load)
_gemv_fast = False  # qgemv.c's SIMD paths (AVX-512 VNNI or AVX2) compiled in (asked once a tier, at load)
_tier: str | None = None  # the tier whose library the entry library forwards to


def cache_dir() -> Path:
    return build.cache_dir()


def _declare(lib: ctypes.CDLL) -> None:
    vp, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    sig = {
        "paged_decode_attention": (i32, [vp] * 6 + [i32] * 7 + [f32, i32, i32]),
        "rms_norm": (None, [vp, i64, vp, vp, i64, i32, f32, i32, i32, i32]),
        "add_rms_norm": (None, [vp, i64, vp, i64, vp, vp, vp, i64, i32, f32, i32, i32, i32]),
        "rotary": (None, [vp, i64, i64, vp, vp, vp, i64, i32, i32, i32, i32, i32]),
        "silu_and_mul": (None, [vp, i64, vp, i64, i32, i32, i32]),
        "argmax_rows": (None, [vp, i64, i64, i64, i32, vp, i32]),
        "store_rows": (None, [vp, i64, vp, vp, i64, i64, i32]),
        "quant_gemv": (i32, [i32, vp, i64, vp, vp, vp, vp, i64, i32, i64, i32, i32, i32]),
        "qgemv_fast": (i32, []),
        "qgemv_set_prefetch": (i32, [i32]),
        "quant_gemm_amx": (i32, [i32, vp, i64, vp, vp, vp, vp, i64, i32, i64, i32, i32]),
        "quant_gemm_amx_available": (i32, []),
        "prefill_attention_bf16": (i32, [vp] * 8 + [i32] * 7 + [f32, i32]),
        "shoal_load_tier": (i32, [ctypes.c_char_p]),
        "shoal_tier_error": (ctypes.c_char_p, []),
    }
    for name, (res, args) in sig.items():
        f = getattr(lib, name)
        f.restype, f.argtypes = res, args


def _compile() -> ctypes.CDLL | None:
    """Load the entry library and the best tier this CPU runs (building what is not cached)."""
    global _cxx_ops
    if os.environ.get("SHOAL_CPU_KERNELS", "1") == "0":
        log.info("shoal CPU kernels disabled (SHOAL_CPU_KERNELS=0): plain-torch ops run instead")
        return None
    tier = isa.best_tier()  # a bad SHOAL_CPU_ISA is an error before anything is built
    cc = build.c_compiler()
    if cc is None:
        log.warning("no C compiler found (set CC): shoal's CPU kernels are off, plain-torch ops run instead")
        return None
    cxx = build.cxx_compiler()
    entry = build.build_entry(cc, cxx)
    if isinstance(entry, str):
        log.warning("building shoal's CPU kernels failed: plain-torch ops run instead\n%s", entry)
        return None
    path, has_ops = entry
    if has_ops:
        try:
            torch.ops.load_library(str(path))  # registers the shoal:: operators
            _register_fakes()
            _cxx_ops = True
        except (OSError, RuntimeError) as exc:
            log.warning("loading shoal's torch operator bindings failed (%s)", exc)
    lib = ctypes.CDLL(str(path))
    _declare(lib)
    if not _load_tier(lib, tier, cc):
        return None
    return lib


def _load_tier(lib: ctypes.CDLL, tier: str, cc: tuple[str, str] | None = None) -> bool:
    """Point the entry library at `tier`'s library (building it when it is not cached) and read what
    that tier's kernels can do."""
    global _tier, _amx_gemm, _gemv_fast
    cc = cc or build.c_compiler()
    built = build.build_tier(tier, cc) if cc else "no C compiler"
    if isinstance(built, str):
        log.warning("building shoal's %s CPU kernels failed: plain-torch ops run instead\n%s", tier, built)
        return False
    rc = lib.shoal_load_tier(str(built).encode())
    if rc != 0:
        log.warning("loading shoal's %s CPU kernels failed (%s): plain-torch ops run instead", tier,
                    lib.shoal_tier_error().decode(errors="replace"))
        return False
    _tier = tier
    _amx_gemm = bool(lib.quant_gemm_amx_available())
    _gemv_fast = bool(lib.qgemv_fast())
    prefill_attention_builtin.cache_clear()
    return True


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None when they cannot be built here (compiled at most once)."""
    global _lib, _tried
    if not _tried:
        with _lock:
            if not _tried:
                try:
                    _lib = _compile()
                finally:
                    _tried = True
    return _lib


def tier() -> str | None:
    """The ISA tier whose kernels run (isa.TIERS), or None when the kernels are off."""
    return _tier if library() is not None else None


def set_tier(name: str) -> None:
    """Run `name`'s kernels from now on in this process (one of the CPU's tiers: isa.cpu_tiers).
    For tests and benchmarks that compare tiers; weights already repacked for another tier's
    layouts keep them, so use fresh weights after a switch."""
    lib = library()
    if lib is None:
        raise RuntimeError("shoal's CPU kernels are not built here")
    isa.best_tier(cap=name)  # a tier this CPU lacks is a ValueError naming the ones it has
    if not _load_tier(lib, name):
        raise RuntimeError(f"shoal's {name} CPU kernels did not build or load (see the log)")


@contextlib.contextmanager
def use_tier(name: str) -> Iterator[None]:
    """`set_tier(name)` for the duration of a block, then back to the tier before."""
    before = tier()
    set_tier(name)
    try:
        yield
    finally:
        if before is not None:
            set_tier(before)


def decode_attention_supported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    return (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float32)
            and k_cache.dtype == q.dtype and v_cache.dtype == q.dtype
            and k_cache.is_contiguous() and v_cache.is_contiguous()
            and q.shape[1] % k_cache.shape[2] == 0 and library() is not None)


@torch.library.custom_op("shoal::paged_decode_attention", mutates_args=())
def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Hq, D] (one token per sequence) against k_cache [NB, BS, Hkv, D] / v_cache
    [NB, BS, Hkv, Dv] through block_tables [B, W]; seq_lens [B] tokens each (≥ 1). → [B, Hq, Dv]."""
    lib = library()
    assert lib is not None, "shoal CPU kernels unavailable: check decode_attention_supported first"
    q = q.contiguous()
    tables = block_tables.to(torch.int64).contiguous()
    lens = seq_lens.to(torch.int64).contiguous()
    b, hq, d = q.shape
    _, bs, hkv, dv = v_cache.shape
    out = torch.empty((b, hq, dv), dtype=q.dtype)
    rc = lib.paged_decode_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), lens.data_ptr(), out.data_ptr(),
        b, hq, hkv, d, dv, bs, tables.shape[1], scale, _flag(q), torch.get_num_threads())
    if rc != 0:
        raise MemoryError("paged_decode_attention: scratch allocation failed")
    return out


@paged_decode_attention.register_fake
def _(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
      seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    return q.new_empty((q.shape[0], q.shape[1], v_cache.shape[-1]))


@functools.cache
def prefill_attention_builtin() -> bool:
    """The prompt attention kernel (kernels.c `prefill_attention_bf16`) runs in place of torch's SDPA:
    compiled into the tier in use (asked with no sequences, it answers 0, else -2), and a SIMD tier
    (the generic tier's portable C body is 4x slower than SDPA: 22 vs 5.5 ms for a 512-token prompt,
    9/3 heads × 64, AMD EPYC Zen 4)."""
    lib = library()
    if lib is None or _tier == "generic":
        return False
    z = torch.zeros(1, dtype=torch.int64)
    return lib.prefill_attention_bf16(*(z.data_ptr() for _ in range(8)), 0, 1, 1, 32, 16, 16, 1, 1.0, 1) == 0


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      q_start: torch.Tensor, q_len: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                      out: torch.Tensor, any_tier: bool = False) -> bool:
    """Causal prompt attention in bf16 (kernels.c `prefill_attention_bf16`: AMX tiles where the CPU has
    them, AVX512-BF16 vdpbf16ps on the same layouts, fp32 FMAs on widened bf16 in the avx2 and generic
    tiers): for each sequence s,
    query rows q_start[s] .. + q_len[s] of q [T, Hq, D] against its seq_lens[s] cached tokens (the
    last q_len[s] of them are the queries' own); writes those rows of out [T, Hq, Dv]. False (out
    untouched) when it does not apply here: not bf16, unsupported head sizes, or the generic tier
    (where SDPA is faster; `any_tier` runs it there too, for tests)."""
    lib = library()
    if (lib is None or (_tier == "generic" and not any_tier) or q.dtype != torch.bfloat16 or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype
            or not (k_cache.is_contiguous() and v_cache.is_contiguous() and out.is_contiguous())
            or torch.compiler.is_compiling()):
        return False
    q = q.contiguous()
    i64 = [t.to(torch.int64).contiguous() for t in (block_tables, q_start, q_len, seq_lens)]
    _, bs, hkv, dv = v_cache.shape
    rc = lib.prefill_attention_bf16(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), *(t.data_ptr() for t in i64),
                                    out.data_ptr(), len(i64[3]), q.shape[1], hkv, q.shape[2], dv, bs,
                                    i64[0].shape[1], scale, torch.get_num_threads())
    if rc == -1:
        raise MemoryError("prefill_attention: scratch allocation failed")
    return rc == 0


_FLOATS = (torch.bfloat16, torch.float32)


def _eager_cpu(x: torch.Tensor) -> bool:
    """An elementwise kernel applies: an eager step (compiled graphs use the torch forms, which
    inductor fuses), a non-empty bf16/fp32 CPU tensor, and the library built."""
    return (not torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype in _FLOATS
            and x.numel() > 0 and library() is not None)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [N, last] with evenly spaced, contiguous rows (copies only when they are not)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return x.reshape(-1, x.shape[-1])


def _flag(x: torch.Tensor) -> int:
    return int(x.dtype == torch.bfloat16)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """The C RMSNorm for an eager step (one pass instead of torch's five); None when it does not
    apply (see _eager_cpu) and the caller runs the torch form."""
    if not _eager_cpu(x) or weight.dtype not in _FLOATS:
        return None
    x2, w = _rows(x), weight.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype)
    library().rms_norm(x2.data_ptr(), x2.stride(0), w.data_ptr(), out.data_ptr(), x2.shape[0], x2.shape[1], eps,
                       _flag(x), _flag(w), torch.get_num_threads())
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The C residual add + RMSNorm for an eager step: (rms_norm(x + residual), x + residual); None
    when it does not apply."""
    if (not _eager_cpu(x) or residual.dtype != x.dtype or residual.shape != x.shape or weight.dtype not in _FLOATS
            or residual.device.type != "cpu"):
        return None
    x2, r2, w = _rows(x), _rows(residual), weight.contiguous()
    out, total = torch.empty(x.shape, dtype=x.dtype), torch.empty(x.shape, dtype=x.dtype)
    library().add_rms_norm(x2.data_ptr(), x2.stride(0), r2.data_ptr(), r2.stride(0), w.data_ptr(), out.data_ptr(),
                           total.data_ptr(), x2.shape[0], x2.shape[1], eps, _flag(x), _flag(w), torch.get_num_threads())
    return out, total


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor | None:
    """The C rotary embedding for an eager step; None when it does not apply."""
    if (not _eager_cpu(x) or x.dim() != 3 or x.stride(-1) != 1 or x.shape[-1] % 2
            or cos.dtype != torch.float32 or sin.dtype != torch.float32):
        return None
    t, nh, r = x.shape
    cos, sin = cos.contiguous(), sin.contiguous()
    if cos.shape != (t, r // 2) or sin.shape != (t, r // 2):
        return None
    out = torch.empty((t, nh, r), dtype=x.dtype)
    library().rotary(x.data_ptr(), x.stride(0), x.stride(1), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), t, nh, r,
                     int(interleaved), _flag(x), torch.get_num_threads())
    return out


def argmax(x: torch.Tensor) -> torch.Tensor | None:
    """The C greedy pick over the last dim of a 2-D bf16/fp32 CPU tensor (first on ties, the first
    NaN when there is one, as `max(dim=-1)`); None when it does not apply."""
    if not _eager_cpu(x) or x.dim() != 2 or x.stride(-1) != 1:
        return None
    out = torch.empty(x.shape[0], dtype=torch.long)
    library().argmax_rows(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], _flag(x), out.data_ptr(),
                          torch.get_num_threads())
    return out


def store_kv(cache: torch.Tensor, slot_mapping: torch.Tensor, values: torch.Tensor) -> bool:
    """The C row copy into the paged cache for an eager step of STORE_KV_MIN_ROWS rows or more (a
    prompt chunk); False when it does not apply (the caller runs the torch form): fewer rows (the
    checks here cost more than index_copy_ saves), compiling, not CPU, dtypes differ, a
    non-contiguous cache or values whose rows are not contiguous, or slots out of range (the torch
    form raises the error)."""
    if (torch.compiler.is_compiling() or library() is None or cache.device.type != "cpu"
            or values.dtype != cache.dtype or not cache.is_contiguous() or values.shape[0] < STORE_KV_MIN_ROWS):
        return False
    row = cache[0, 0].numel()
    v = values.reshape(values.shape[0], -1) if values.dim() > 1 else values.reshape(-1, 1)
    if v.shape[1] != row or v.stride(1) != 1:
        return False
    slots = slot_mapping.to(torch.long).contiguous()
    if slots.numel() != v.shape[0] or int(slots.min()) < 0 or int(slots.max()) >= cache.shape[0] * cache.shape[1]:
        return False
    elem = cache.element_size()
    library().store_rows(v.data_ptr(), v.stride(0) * elem, cache.data_ptr(), slots.data_ptr(), v.shape[0], row * elem,
                         torch.get_num_threads())
    return True


def silu_and_mul(x: torch.Tensor) -> torch.Tensor | None:
    """The C SwiGLU for an eager step; None when it does not apply, or for a few rows, where
    torch's two ops cost less than the call."""
    if not _eager_cpu(x) or x.shape[-1] % 2 or x.numel() <= 8 * x.shape[-1]:
        return None
    x2 = _rows(x)
    half = x2.shape[1] // 2
    out = torch.empty((*x.shape[:-1], half), dtype=x.dtype)
    library().silu_and_mul(x2.data_ptr(), x2.stride(0), out.data_ptr(), x2.shape[0], half, _flag(x),
                           torch.get_num_threads())
    return out


# ------------------------------------------------------------------------------------------------
# Quantized matrix × few-rows products (qgemv.c): int8 activations per group of 32, AVX512-VNNI.

def _register_fakes() -> None:
    """Shape functions for the C++-registered operators (so torch.compile can trace them)."""
    @torch.library.register_fake("shoal::quant_gemv")
    def _(x: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, kind: int, n: int) -> torch.Tensor:
        return x.new_empty((x.shape[0], n))

    @torch.library.register_fake("shoal::quant_matmul")
    def _(x: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, kind: int, n: int) -> torch.Tensor:
        return x.new_empty((x.shape[0], n))

    @torch.library.register_fake("shoal::quant_gemm")
    def _(x: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, kind: int, n: int) -> torch.Tensor:
        return x.new_empty((x.shape[0], n))

    @torch.library.register_fake("shoal::quant_gemm_glu")
    def _(x: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, kind: int, n: int) -> torch.Tensor:
        return x.new_empty((x.shape[0], n // 2))

    @torch.library.register_fake("shoal::panel_gemm")
    def _(x: torch.Tensor, panels: torch.Tensor, oscale: torch.Tensor | None, n: int) -> torch.Tensor:
        return x.new_empty((x.shape[0], n))

    @torch.library.register_fake("shoal::dense_decode_layer")
    def _(x: torch.Tensor, residual: torch.Tensor | None, in_norm: torch.Tensor, post_norm: torch.Tensor, eps: float,
          weights: list[torch.Tensor], kinds: list[int], dims: list[int], qkv_bias: torch.Tensor | None,
          cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
          slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return x.new_empty(x.shape), x.new_empty(x.shape)

    @torch.library.register_fake("shoal::dense_decode_stack")
    def _(x: torch.Tensor, norms: list[torch.Tensor], eps: float, weights: list[torch.Tensor], kinds: list[int],
          dims: list[int], qkv_biases: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
          positions: torch.Tensor, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
          slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
          scale: float, split: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return x.new_empty(x.shape), x.new_empty(x.shape)

    @torch.library.register_fake("shoal::decode_attention")
    def _(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
          seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
        return q.new_empty((q.shape[0], q.shape[1], v_cache.shape[-1]))


def torch_ops() -> bool:
    """True when the kernels are also torch operators implemented in C++ (ops.cpp)."""
    return library() is not None and _cxx_ops


def quant_gemm_supported(n: int, k: int) -> bool:
    """The batched kernel for int4/int8 weights × bf16 rows (`shoal::quant_gemm`) runs here for an
    [n, k] weight: built as a torch operator, n a multiple of 16, and either AMX-BF16 granted to this
    process (qgemv.c quant_gemm_amx, k even) or quant_gemm_vnni's SIMD tiles compiled into the tier in
    use (int8 activations: AVX-512 VNNI or AVX2, the CPUs without AMX)."""
    return (library() is not None and _cxx_ops and n % 16 == 0 and k > 0
            and (k % 2 == 0 if _amx_gemm else gemv_fast()))


def amx_gemm() -> bool:
    """The batched and prompt matmuls run on AMX tiles here (else quant_gemm_vnni and oneDNN)."""
    return library() is not None and _amx_gemm


def panel_gemm_supported(n: int, k: int) -> bool:
    """qgemv.c panel_gemm (prompt rows on AMX tiles against a bf16 VNNI copy of the weight) runs here
    for an [n, k] weight: built as a torch operator, AMX granted, n % 16 == 0 and k % 32 == 0."""
    return library() is not None and _cxx_ops and _amx_gemm and n % 16 == 0 and k % 32 == 0 and k > 0


def gemv_fast() -> bool:
    """The VNNI quantized GEMV was compiled for this CPU (else its scalar reference path only). Asked
    of the library once, at load: a compiled graph that calls this traces no ctypes call."""
    return library() is not None and _gemv_fast


_LANE = torch.arange(64)
# lane order: position p of a pair of groups holds group (p >> 2) & 1, element ((p >> 3) << 2) | (p & 3)
LANE_SOURCE = ((_LANE >> 2) & 1) * 32 + (((_LANE >> 3) << 2) | (_LANE & 3))


def _lane_order(t: torch.Tensor, fill: int) -> torch.Tensor:
    """[N, K] → [N, Kp] (K padded to a multiple of 64 with `fill`), each 64 in qgemv.c's lane order."""
    n, k = t.shape
    kp = -(-k // 64) * 64
    if kp > k:
        t = torch.cat([t, t.new_full((n, kp - k), fill)], dim=1)
    return t.view(n, kp // 64, 64)[:, :, LANE_SOURCE].reshape(n, kp)


def _groups_padded(t: torch.Tensor, kp: int) -> torch.Tensor:
    out = t.new_zeros((t.shape[0], kp // 32))
    out[:, : t.shape[1]] = t
    return out


_F16_MAX = 65504.0


def int4_fits_fp16(scales: torch.Tensor, zeros: torch.Tensor) -> bool:
    """qgemv.c's int4 layout stores s and m = z − 8s in fp16: whether both fit."""
    offs = zeros.float() - 8 * scales.float()
    return max(scales.abs().max().item(), offs.abs().max().item()) < _F16_MAX


def repack_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """A group-32 int4 weight (layers.quant.Int4Weight: w = (q − 8)·s + z) → qgemv.c's layout:
    (codes [N, Kp/2] uint8, s [N, Kp/32] fp16, m = z − 8s [N, Kp/32] fp16); None when s or m do not fit
    fp16 (the caller keeps torch's kernel)."""
    n = codes.shape[0]
    q = torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2)  # [N, K] in 0..15
    if not int4_fits_fp16(scales, zeros):
        return None
    offs = zeros.float() - 8 * scales.float()
    lanes = _lane_order(q, 0)
    kp = lanes.shape[1]
    pairs = kp // 64
    lanes = lanes.view(n, pairs, 64)
    even = pairs - pairs % 2  # blocks of two pairs: the first in the low nibbles, the second in the high
    blocks = lanes[:, 0:even:2] | (lanes[:, 1:even:2] << 4)  # [N, pairs/2, 64]
    tail = lanes[:, even:] if pairs % 2 else lanes[:, :0]  # a last pair: values j and j + 32 share byte j
    tail = tail[..., :32] | (tail[..., 32:] << 4)
    packed = torch.cat([blocks.reshape(n, -1), tail.reshape(n, -1)], dim=1).contiguous()
    return (packed, _groups_padded(scales.float(), kp).half().contiguous(),
            _groups_padded(offs, kp).half().contiguous())


def repack_int8(qweight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A per-channel int8 weight (w = q · s) → qgemv.c's layout: (bytes q + 128 [N, Kp] in lane order,
    s [N] fp32, an unused placeholder)."""
    biased = (qweight.to(torch.int16) + 128).to(torch.uint8)
    return _lane_order(biased, 128).contiguous(), scales.float().contiguous(), torch.empty(0, dtype=torch.uint8)


# kind flag of the column layout (qgemv.c QG_COLS): kinds 4 | COLS and 8 | COLS
COLS = 16


def to_columns(packed: tuple[torch.Tensor, ...], kind: int) -> tuple[tuple[torch.Tensor, ...], int]:
    """A repack_int4/8 weight ([N, ...] rows in lane order, N % 16 == 0) → the column layout of qgemv.c's
    quant_gemm_vnni (kind | COLS), the same bytes regrouped by blocks of 16 output rows so that one
    vector holds the same 4 bytes of each of the 16 rows: int4 codes [N/16, Kp·8] (each 64-byte
    block of a row, then an odd last pair's 32 bytes, as 16 or 8 dwords × 16 rows), scales and
    offsets [N/16, Kp/32, 16]; int8 bytes [N/16, Kp·16] (each pair: 16 dwords × 16 rows), scales as
    they were."""
    w0, w1, w2 = packed
    n = w0.shape[0]
    assert n % 16 == 0 and kind in (4, 8), "the column layout takes 16-row blocks of a repacked weight"
    rows = w0.view(n // 16, 16, w0.shape[1])
    if kind == 8:
        cols = rows.view(n // 16, 16, -1, 16, 4).permute(0, 2, 3, 1, 4).reshape(n // 16, -1).contiguous()
        return (cols, w1, w2), kind | COLS
    kp = w1.shape[1] * 32
    main = kp // 128 * 64  # bytes of full 64-byte blocks per row
    parts = [rows[:, :, :main].reshape(n // 16, 16, -1, 16, 4).permute(0, 2, 3, 1, 4).reshape(n // 16, -1)]
    if w0.shape[1] > main:  # an odd last pair: 32 bytes a row
        parts.append(rows[:, :, main:].reshape(n // 16, 16, 8, 4).permute(0, 2, 1, 3).reshape(n // 16, -1))
    cols = torch.cat(parts, dim=1).contiguous()

    def by_group(t: torch.Tensor) -> torch.Tensor:
        return t.view(n // 16, 16, -1).transpose(1, 2).contiguous()

    return (cols, by_group(w1), by_group(w2)), kind | COLS




def packed_matmul(x: torch.Tensor, packed: tuple[torch.Tensor, ...], kind: int, n: int) -> torch.Tensor:
    """Decode rows (up to the platform's PACKED_MAX_ROWS) · Wᵀ by the platform's rule: the C++ operator
    `quant_matmul` (the VNNI GEMV for fp32 and up to GEMV_MAX_ROWS bf16 rows, the AMX kernel for more
    where it runs: one operator, so a compiled graph with a symbolic batch size does not branch), else
    the GEMV through ctypes."""
    if _cxx_ops:
        return torch.ops.shoal.quant_matmul(x, packed[0], packed[1], packed[2], kind, n)
    return quant_gemv(x, packed, kind, n)


def quant_gemv(x: torch.Tensor, packed: tuple[torch.Tensor, ...], kind: int, n: int) -> torch.Tensor:
    """x [M, K] (bf16/fp32, contiguous rows) · Wᵀ for a repacked weight → [M, n] in x's dtype. The
    C++ operator when it is built (the only form a compiled graph should call), else ctypes."""
    if _cxx_ops:
        return torch.ops.shoal.quant_gemv(x, packed[0], packed[1], packed[2], kind, n)
    lib = library()
    assert lib is not None, "shoal CPU kernels unavailable"
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    y = torch.empty((m, n), dtype=x.dtype)
    if m and n:
        rc = lib.quant_gemv(kind, x.data_ptr(), x.stride(0), packed[0].data_ptr(), packed[1].data_ptr(),
                            packed[2].data_ptr(), y.data_ptr(), n, m, n, k, _flag(x), torch.get_num_threads())
        if rc != 0:
            raise MemoryError("quant_gemv: scratch allocation failed")
    return y


def quant_gemv_reference(x: torch.Tensor, dequantized_scaled: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
    """The kernel's arithmetic in plain torch (the twin tests compare against): x rounded to int8 per
    group of 32 (scale amax/127, nearest even), times the weight: its scaled part and its offsets
    (both on the rounded x, so that the offsets' part cancels the rounding error the scaled part
    carries, as llama.cpp's Q4_1 × Q8_1 does). `dequantized_scaled` [N, K] is s·q (int4) or q·s
    (int8); `offsets` [N, K] is m expanded (int4) or None."""
    m, k = x.shape
    kp = -(-k // 32) * 32
    xf = F.pad(x.float(), (0, kp - k)).view(m, kp // 32, 32)
    amax = xf.abs().amax(-1, keepdim=True)
    # a true division (127.0 / t is reciprocal-then-multiply in torch: a second rounding, which moves
    # exact ties, common with bf16 inputs)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0).div(amax), torch.zeros_like(amax))
    xq = (torch.round(xf * inv) * (amax / 127.0)).view(m, kp)[:, :k]
    y = xq @ dequantized_scaled.float().T
    return y if offsets is None else y + xq @ offsets.float().T
