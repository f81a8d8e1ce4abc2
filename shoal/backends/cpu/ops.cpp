// Registers shoal's C kernels (kernels.c, qgemv.c) as torch operators implemented in C++, so a compiled
// graph's C++ wrapper calls them through the dispatcher (about a microsecond) instead of calling back
// into Python (tens of microseconds). Built by kernels.py together with the C sources when a C++
// compiler and torch's headers are present; without them the ctypes path (Python ops) is used.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/silu.h>
#include <c10/util/Exception.h>
#include <cstring>
#include <tuple>
#include <torch/library.h>

#include "routing.h"  // the row-count thresholds Python reads too
#include "kernels.h"  // every kernel's C signature (the tier forwarders of dispatch.c)

namespace {

void check_float(const at::Tensor &t, const char *what) {
    TORCH_CHECK(t.device().is_cpu(), what, " must be a CPU tensor");
    TORCH_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat, what, " must be bf16 or fp32");
}

// an [n, k] weight from kernels.repack_int4/8 (kind 4/8), or those in kernels.to_columns's layout
// (kind 4/8 | 16: blocks of 16 output rows)
void check_packed_weight(const at::Tensor &w0, const at::Tensor &w1, const at::Tensor &w2, int64_t kind, int64_t n,
                         int64_t k, const char *op) {
    const int64_t bits = kind & 15, cols = kind & 16;
    TORCH_CHECK((bits == 4 || bits == 8) && (kind & ~31) == 0, op, ": kind must be 4 or 8, optionally | 16");
    TORCH_CHECK(w0.is_contiguous() && w1.is_contiguous() && w2.is_contiguous(), op, ": packed weight not contiguous");
    const int64_t kp = (k + 63) / 64 * 64;
    TORCH_CHECK(!cols || n % 16 == 0, op, ": the column layout needs n % 16 == 0");
    TORCH_CHECK(w0.size(0) == (cols ? n / 16 : n) && w0.numel() == n * (bits == 4 ? kp / 2 : kp), op,
                ": packed weight shape");
    TORCH_CHECK(bits == 8 ? w1.numel() == n : w1.numel() == n * (kp / 32) && w2.numel() == n * (kp / 32), op,
                ": packed weight scales shape");
}

// x [M, K] with contiguous rows against such a weight (n output rows)
void check_packed(const at::Tensor &x, const at::Tensor &w0, const at::Tensor &w1, const at::Tensor &w2, int64_t kind,
                  int64_t n, const char *op) {
    TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, op, ": x must be [M, K] with contiguous rows");
    check_packed_weight(w0, w1, w2, kind, n, x.size(1), op);
}

// The two packed-weight kernels on x [M, K] (rows x.stride(0) apart) and w (the three tensors of
// kernels.repack_int4/8) into y [M, n]; the kernel's return code
int call_quant_gemv(const at::Tensor &x, const at::Tensor *w, int64_t kind, at::Tensor &y, int nthreads) {
    const int64_t n = y.size(1);
    return quant_gemv(static_cast<int>(kind), x.data_ptr(), x.stride(0), w[0].data_ptr(), w[1].data_ptr(),
                      w[2].data_ptr(), y.data_ptr(), n, static_cast<int>(x.size(0)), n, static_cast<int>(x.size(1)),
                      x.scalar_type() == at::kBFloat16, nthreads);
}

// The batched kernel: AMX where the CPU has it, else the VNNI one (int8 activations, qgemv.c
// quant_gemm_vnni); -2 when neither applies
int call_quant_gemm(const at::Tensor &x, const at::Tensor *w, int64_t kind, at::Tensor &y, int nthreads) {
    const int64_t n = y.size(1);
    const int rc = quant_gemm_amx(static_cast<int>(kind), reinterpret_cast<const uint16_t *>(x.data_ptr()),
                                  x.stride(0), w[0].data_ptr<uint8_t>(), reinterpret_cast<const uint16_t *>(w[1].data_ptr()),
                                  reinterpret_cast<const uint16_t *>(w[2].data_ptr()),
                                  reinterpret_cast<uint16_t *>(y.data_ptr()), n, static_cast<int>(x.size(0)), n,
                                  static_cast<int>(x.size(1)), nthreads);
    if (rc != -2) return rc;
    return quant_gemm_vnni(static_cast<int>(kind), x.data_ptr(), x.stride(0), w[0].data_ptr(), w[1].data_ptr(),
                           w[2].data_ptr(), y.data_ptr(), n, static_cast<int>(x.size(0)), n, static_cast<int>(x.size(1)),
                           x.scalar_type() == at::kBFloat16, nthreads);
}

// x [M, K] (rows may be strided, elements contiguous); weight tensors from kernels.repack_int4/8
at::Tensor quant_gemv_op(const at::Tensor &x, const at::Tensor &w0, const at::Tensor &w1, const at::Tensor &w2,
                         int64_t kind, int64_t n) {
    check_float(x, "quant_gemv: x");
    check_packed(x, w0, w1, w2, kind, n, "quant_gemv");
    const int64_t m = x.size(0), k = x.size(1);
    auto y = at::empty({m, n}, x.options());
    if (m == 0 || n == 0) return y;
    const at::Tensor w[3] = {w0, w1, w2};
    const int rc = call_quant_gemv(x, w, kind, y, at::get_num_threads());
    TORCH_CHECK(rc == 0, "quant_gemv: scratch allocation failed");
    return y;
}

// x [M, K] bf16 (4..96 rows, contiguous rows); a weight from kernels.repack_int4/8; AMX tiles
at::Tensor quant_gemm_op(const at::Tensor &x, const at::Tensor &w0, const at::Tensor &w1, const at::Tensor &w2,
                         int64_t kind, int64_t n) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16, "quant_gemm: x must be a bf16 CPU tensor");
    check_packed(x, w0, w1, w2, kind, n, "quant_gemm");
    const int64_t m = x.size(0), k = x.size(1);
    auto y = at::empty({m, n}, x.options());
    if (m == 0 || n == 0) return y;
    const at::Tensor w[3] = {w0, w1, w2};
    const int rc = call_quant_gemm(x, w, kind, y, at::get_num_threads());
    TORCH_CHECK(rc != -1, "quant_gemm: scratch allocation failed");
    TORCH_CHECK(rc == 0, "quant_gemm: not available for this shape or CPU (check kernels.quant_gemm_supported)");
    return y;
}

// silu(x · Wgᵀ) · (x · Wuᵀ) for a merged gate_up weight (n outputs: the gate's n/2, then the up's) in the
// column layout: y [M, n/2] (qgemv.c quant_gemm_vnni_glu); x bf16, contiguous rows
at::Tensor quant_gemm_glu_op(const at::Tensor &x, const at::Tensor &w0, const at::Tensor &w1, const at::Tensor &w2,
                             int64_t kind, int64_t n) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16, "quant_gemm_glu: x must be a bf16 CPU tensor");
    check_packed(x, w0, w1, w2, kind, n, "quant_gemm_glu");
    TORCH_CHECK(n % 32 == 0, "quant_gemm_glu: n must be a multiple of 32");
    const int64_t m = x.size(0);
    auto y = at::empty({m, n / 2}, x.options());
    if (m == 0 || n == 0) return y;
    const int rc = quant_gemm_vnni_glu(static_cast<int>(kind), x.data_ptr(), x.stride(0), w0.data_ptr(), w1.data_ptr(),
                                       w2.data_ptr(), y.data_ptr(), n / 2, static_cast<int>(m), n,
                                       static_cast<int>(x.size(1)), 1, at::get_num_threads());
    TORCH_CHECK(rc != -1, "quant_gemm_glu: scratch allocation failed");
    TORCH_CHECK(rc == 0, "quant_gemm_glu: not available for this weight or CPU (a column-layout weight and VNNI)");
    return y;
}

// the weight from kernels.repack_int4/8 ([n, k]) as bf16 VNNI tiles for panel_gemm: int32 [n/16, k/32, 256]
at::Tensor quant_panels_op(const at::Tensor &w0, const at::Tensor &w1, const at::Tensor &w2, int64_t kind, int64_t n,
                           int64_t k) {
    check_packed_weight(w0, w1, w2, kind, n, k, "quant_panels");
    TORCH_CHECK(n % 16 == 0 && k % 32 == 0 && k > 0, "quant_panels: needs n % 16 == 0 and k % 32 == 0");
    auto panels = at::empty({n / 16, k / 32, 256}, w0.options().dtype(at::kInt));
    const int rc = quant_panels(static_cast<int>(kind), w0.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t *>(w1.data_ptr()),
                                reinterpret_cast<const uint16_t *>(w2.data_ptr()),
                                reinterpret_cast<uint32_t *>(panels.data_ptr()), n, static_cast<int>(k), at::get_num_threads());
    TORCH_CHECK(rc != -1, "quant_panels: scratch allocation failed");
    TORCH_CHECK(rc == 0, "quant_panels: not available on this build");
    return panels;
}

// x [M, K] bf16 (contiguous rows) · panels ([n/16, K/32, 256] from quant_panels)ᵀ, times oscale [n] when given
at::Tensor panel_gemm_op(const at::Tensor &x, const at::Tensor &panels, const c10::optional<at::Tensor> &oscale,
                         int64_t n) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16, "panel_gemm: x must be a bf16 CPU tensor");
    TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "panel_gemm: x must be [M, K] with contiguous rows");
    const int64_t m = x.size(0), k = x.size(1);
    TORCH_CHECK(panels.is_contiguous() && panels.dim() == 3 && panels.size(0) * 16 == n && panels.size(1) * 32 == k &&
                    panels.size(2) == 256, "panel_gemm: panels do not match x and n");
    const float *os = nullptr;
    if (oscale.has_value() && oscale->defined()) {
        TORCH_CHECK(oscale->scalar_type() == at::kFloat && oscale->is_contiguous() && oscale->numel() == n,
                    "panel_gemm: oscale must be fp32 [n]");
        os = oscale->data_ptr<float>();
    }
    auto y = at::empty({m, n}, x.options());
    if (m == 0 || n == 0) return y;
    const int rc = panel_gemm(reinterpret_cast<const uint16_t *>(x.data_ptr()), x.stride(0),
                              reinterpret_cast<const uint32_t *>(panels.data_ptr()), os,
                              reinterpret_cast<uint16_t *>(y.data_ptr()), n, static_cast<int>(m), n, static_cast<int>(k),
                              at::get_num_threads());
    TORCH_CHECK(rc != -1, "panel_gemm: scratch allocation failed");
    TORCH_CHECK(rc == 0, "panel_gemm: not available for this shape or CPU (check kernels.panel_gemm_supported)");
    return y;
}

at::Tensor decode_attention_op(const at::Tensor &q, const at::Tensor &k_cache, const at::Tensor &v_cache,
                               const at::Tensor &block_tables, const at::Tensor &seq_lens, double scale) {
    check_float(q, "decode_attention: q");
    TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
                "decode_attention: q and the caches must share a dtype");
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "decode_attention: caches must be contiguous");
    TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4, "decode_attention: bad ranks");
    auto qc = q.contiguous();
    auto tables = block_tables.to(at::kLong).contiguous();
    auto lens = seq_lens.to(at::kLong).contiguous();
    const int64_t b = q.size(0), hq = q.size(1), d = q.size(2);
    const int64_t bs = v_cache.size(1), hkv = v_cache.size(2), dv = v_cache.size(3);
    TORCH_CHECK(hq % hkv == 0, "decode_attention: query heads must be a multiple of KV heads");
    auto out = at::empty({b, hq, dv}, q.options());
    if (b == 0) return out;
    const int rc = paged_decode_attention(qc.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                          tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr(),
                                          b, hq, hkv, d, dv, bs, tables.size(1), static_cast<float>(scale),
                                          q.scalar_type() == at::kBFloat16, at::get_num_threads());
    TORCH_CHECK(rc == 0, "decode_attention: scratch allocation failed");
    return out;
}

// Decode rows the CPU platform's quant_linear sends to the packed kernels (routing.h); silu_and_mul
// leaves as few rows to torch's ops.
constexpr int64_t kSmallRows = SHOAL_PACKED_MAX_ROWS;
// ... of which bf16 rows go to the AMX kernel from this many up, where it runs: the GEMV re-reads the
// weight for every 4 rows, the AMX kernel decodes it once (routing.h)
constexpr int64_t kAmxMinRows = SHOAL_GEMV_MAX_ROWS + 1;

// y [M, n] = x [M, K] · Wᵀ for a weight from kernels.repack_int4/8 and up to 96 rows, by quant_linear's
// rule: the AMX kernel for bf16 rows from kAmxMinRows where it applies, else the GEMV (which takes
// any number of rows, bf16 or fp32). Returns the kernel's code (0, or -1: scratch allocation failed).
int call_packed_matmul(const at::Tensor &x, const at::Tensor *w, int64_t kind, at::Tensor &y, int nthreads) {
    if (x.size(0) >= kAmxMinRows && x.scalar_type() == at::kBFloat16) {
        const int rc = call_quant_gemm(x, w, kind, y, nthreads);
        if (rc != -2) return rc;  // -2: not for this shape or CPU
    }
    return call_quant_gemv(x, w, kind, y, nthreads);
}

void packed_matmul(const at::Tensor &x, const at::Tensor *w, int64_t kind, at::Tensor &y, int nthreads) {
    TORCH_CHECK(call_packed_matmul(x, w, kind, y, nthreads) == 0, "dense_decode_layer: scratch allocation failed");
}

// One pre-norm decoder layer of a dense model (Llama, Qwen2: grouped-query attention with rotary
// positions, SwiGLU MLP) for a decode batch (one new token per row, bf16), in one call: the same C
// kernels, in the same order and with the same roundings, as the layer's eager ops
//   h, res = add_rms_norm(x, residual) (rms_norm(x), x on the first layer)
//   q, k, v = qkv(h) [+ bias]; q, k = rotary(q, k); k, v → the paged cache at slot_mapping
//   o = o_proj(decode_attention(q)); h, res = add_rms_norm(o, res)
//   out = down(silu(gate(h)) · up(h))
// so that a compiled decode step makes one dispatcher call a layer instead of nine, with no graph
// kernels between them (dense_decode_stack: one call for all the layers). weights: 12 tensors (qkv,
// o, gate_up, down; each the three of repack_int4/8); kinds: their 4 kinds; dims: [num_heads,
// num_kv_heads, head_dim, intermediate]; cos/sin: the rotary tables [max_position, head_dim / 2]
// (fp32), gathered by positions.

// What a step's layers share, checked and converted once: the rows' positions and cache slots, and
// for a decode step (one row a sequence) the block tables and lengths, as int64; the rotary rows of
// the positions ([2, b, head_dim / 2]). A prompt or mixed step (`split`, see dense_decode_stack)
// instead gives its sequences' attention in two groups: the one-token ones (their rows, tables and
// lengths: the decode kernel) and the rest (tables, first rows, row counts and lengths: the prompt
// kernel).
struct DecodeRows {
    at::Tensor pos, slots, tables, lens, cs;
    int64_t b = 0;
    bool prefill = false;
    at::Tensor s_rows, s_tables, s_lens, r_tables, r_start, r_len, r_lens;
    int64_t ns = 0, nr = 0;
};

DecodeRows decode_rows(const at::Tensor &x, int64_t d, const at::Tensor &cos, const at::Tensor &sin,
                       const at::Tensor &positions, const at::Tensor &slot_mapping, const at::Tensor &block_tables,
                       const at::Tensor &seq_lens, const char *op, at::TensorList split = {}) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous(), op,
                ": x must be a contiguous bf16 CPU tensor [B, hidden]");
    TORCH_CHECK(split.empty() || split.size() == 7, op, ": split needs 7 tensors (or none for a decode step)");
    TORCH_CHECK(!split.empty() || x.size(0) <= SHOAL_QUANT_GEMM_MAX_ROWS, op, ": a decode step of at most ", SHOAL_QUANT_GEMM_MAX_ROWS, " rows");
    TORCH_CHECK(d % 2 == 0, op, ": head_dim must be even");
    TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                    sin.is_contiguous() && cos.dim() == 2 && cos.size(1) == d / 2 && sin.sizes() == cos.sizes(),
                op, ": cos/sin must be contiguous fp32 [positions, head_dim / 2]");
    DecodeRows r;
    r.b = x.size(0);
    r.pos = positions.to(at::kLong).contiguous();
    r.slots = slot_mapping.to(at::kLong).contiguous();
    const int64_t b = r.b;
    TORCH_CHECK(r.pos.numel() == b && r.slots.numel() == b, op, ": positions and slot_mapping need one entry a row");
    if (split.empty()) {
        r.tables = block_tables.to(at::kLong).contiguous();
        r.lens = seq_lens.to(at::kLong).contiguous();
        TORCH_CHECK(r.lens.numel() == b && r.tables.dim() == 2 && r.tables.size(0) == b, op,
                    ": a decode step's seq_lens and block_tables need one entry (row) per token");
    } else {
        r.prefill = true;
        at::Tensor *dst[7] = {&r.s_rows, &r.s_tables, &r.s_lens, &r.r_tables, &r.r_start, &r.r_len, &r.r_lens};
        for (int i = 0; i < 7; i++) *dst[i] = split[i].to(at::kLong).contiguous();
        r.ns = r.s_rows.numel(), r.nr = r.r_start.numel();
        TORCH_CHECK(r.s_lens.numel() == r.ns && (r.ns == 0 || (r.s_tables.dim() == 2 && r.s_tables.size(0) == r.ns)) &&
                        r.r_len.numel() == r.nr && r.r_lens.numel() == r.nr &&
                        (r.nr == 0 || (r.r_tables.dim() == 2 && r.r_tables.size(0) == r.nr)),
                    op, ": split: one row, table and length a one-token sequence; one table, first row, row count "
                    "and length each other sequence");
        const int64_t *sr = r.s_rows.data_ptr<int64_t>(), *sl = r.s_lens.data_ptr<int64_t>();
        for (int64_t i = 0; i < r.ns; i++)
            TORCH_CHECK(sr[i] >= 0 && sr[i] < b && sl[i] >= 1, op, ": split: one-token row ", sr[i], " out of range");
        const int64_t *q0 = r.r_start.data_ptr<int64_t>(), *qn = r.r_len.data_ptr<int64_t>(),
                      *rl = r.r_lens.data_ptr<int64_t>();
        for (int64_t i = 0; i < r.nr; i++)
            TORCH_CHECK(q0[i] >= 0 && qn[i] >= 1 && q0[i] + qn[i] <= b && rl[i] >= qn[i], op,
                        ": split: rows ", q0[i], " + ", qn[i], " of a sequence out of range");
    }
    const int64_t npos = cos.size(0), *pp = r.pos.data_ptr<int64_t>();
    for (int64_t i = 0; i < b; i++) TORCH_CHECK(pp[i] >= 0 && pp[i] < npos, op, ": position ", pp[i], " out of range");
    r.cs = at::empty({2, b, d / 2}, cos.options());
    float *cb = r.cs.data_ptr<float>(), *sb = cb + b * (d / 2);
    for (int64_t i = 0; i < b; i++) {
        std::memcpy(cb + i * (d / 2), cos.data_ptr<float>() + pp[i] * (d / 2), sizeof(float) * (d / 2));
        std::memcpy(sb + i * (d / 2), sin.data_ptr<float>() + pp[i] * (d / 2), sizeof(float) * (d / 2));
    }
    return r;
}

// one layer's weights, norms and caches against the rows' shapes and slots
void check_decode_layer(const DecodeRows &r, int64_t hid, const at::Tensor &in_norm, const at::Tensor &post_norm,
                        const at::Tensor *weights, const int64_t *kinds, const int64_t *dims, const at::Tensor &k_cache,
                        const at::Tensor &v_cache, const char *op) {
    const int64_t hq = dims[0], hkv = dims[1], d = dims[2], inter = dims[3];
    const int64_t qd = hq * d, kvd = hkv * d, qkv_n = qd + 2 * kvd;
    TORCH_CHECK(hkv > 0 && hq % hkv == 0, op, ": query heads must be a multiple of KV heads");
    TORCH_CHECK(r.cs.size(2) * 2 == d, op, ": head_dim must match the rotary tables");
    TORCH_CHECK(k_cache.scalar_type() == at::kBFloat16 && v_cache.scalar_type() == at::kBFloat16 &&
                    k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4 && v_cache.dim() == 4 &&
                    k_cache.size(2) == hkv && k_cache.size(3) == d && v_cache.size(2) == hkv && v_cache.size(3) == d &&
                    v_cache.size(0) == k_cache.size(0) && v_cache.size(1) == k_cache.size(1),
                op, ": caches must be contiguous bf16 [blocks, block_size, kv_heads, head_dim]");
    TORCH_CHECK(in_norm.is_contiguous() && post_norm.is_contiguous() && in_norm.numel() == hid &&
                    post_norm.numel() == hid && in_norm.scalar_type() == post_norm.scalar_type() &&
                    (in_norm.scalar_type() == at::kBFloat16 || in_norm.scalar_type() == at::kFloat),
                op, ": norm weights must be contiguous bf16/fp32 [hidden]");
    const int64_t ns[4] = {qkv_n, hid, 2 * inter, hid}, ks[4] = {hid, qd, hid, inter};
    for (int i = 0; i < 4; i++) check_packed_weight(weights[3 * i], weights[3 * i + 1], weights[3 * i + 2], kinds[i], ns[i], ks[i], op);
    const int64_t nslots = k_cache.size(0) * k_cache.size(1), *sp = r.slots.data_ptr<int64_t>();
    for (int64_t i = 0; i < r.b; i++) TORCH_CHECK(sp[i] >= 0 && sp[i] < nslots, op, ": cache slot ", sp[i], " out of range");
}

// the layer itself (arguments checked, residual included): → (its MLP output, the residual stream before it)
std::tuple<at::Tensor, at::Tensor> decode_layer(const at::Tensor &x, const at::Tensor *residual,
                                                const at::Tensor &in_norm, const at::Tensor &post_norm, float eps,
                                                const at::Tensor *weights, const int64_t *kinds, const int64_t *dims,
                                                const at::Tensor *qkv_bias, at::Tensor &k_cache, at::Tensor &v_cache,
                                                const DecodeRows &r, double scale, const char *op) {
    const int64_t b = r.b, hid = x.size(1), hq = dims[0], hkv = dims[1], d = dims[2], inter = dims[3];
    const int64_t qd = hq * d, kvd = hkv * d, qkv_n = qd + 2 * kvd;
    const int nt = at::get_num_threads(), wb = in_norm.scalar_type() == at::kBFloat16;
    auto opts = x.options();
    auto h = at::empty({b, hid}, opts), res = at::empty({b, hid}, opts);
    if (b == 0) return {h, res};
    if (residual) {
        add_rms_norm(x.data_ptr(), hid, residual->data_ptr(), hid, in_norm.data_ptr(), h.data_ptr(), res.data_ptr(), b,
                     static_cast<int>(hid), eps, 1, wb, nt);
    } else {
        rms_norm(x.data_ptr(), hid, in_norm.data_ptr(), h.data_ptr(), b, static_cast<int>(hid), eps, 1, wb, nt);
        res.copy_(x);
    }
    auto qkv = at::empty({b, qkv_n}, opts);
    packed_matmul(h, &weights[0], kinds[0], qkv, nt);
    if (qkv_bias) qkv.add_(*qkv_bias);
    const float *cb = r.cs.data_ptr<float>(), *sb = cb + b * (d / 2);
    const int64_t *sp = r.slots.data_ptr<int64_t>();
    auto q = at::empty({b, hq, d}, opts), k = at::empty({b, hkv, d}, opts);
    auto *qkv_p = reinterpret_cast<uint16_t *>(qkv.data_ptr());
    rotary(qkv_p, qkv_n, d, cb, sb, q.data_ptr(), b, static_cast<int>(hq), static_cast<int>(d), 0, 1, nt);
    rotary(qkv_p + qd, qkv_n, d, cb, sb, k.data_ptr(), b, static_cast<int>(hkv), static_cast<int>(d), 0, 1, nt);
    store_rows(k.data_ptr(), kvd * 2, k_cache.data_ptr(), sp, b, kvd * 2, nt);
    store_rows(qkv_p + qd + kvd, qkv_n * 2, v_cache.data_ptr(), sp, b, kvd * 2, nt);
    auto attn = at::empty({b, hq * d}, opts);
    const int bs = static_cast<int>(k_cache.size(1));
    if (!r.prefill) {
        const int rc = paged_decode_attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                              r.tables.data_ptr<int64_t>(), r.lens.data_ptr<int64_t>(), attn.data_ptr(),
                                              static_cast<int>(b), static_cast<int>(hq), static_cast<int>(hkv),
                                              static_cast<int>(d), static_cast<int>(d), bs,
                                              static_cast<int>(r.tables.size(1)), static_cast<float>(scale), 1, nt);
        TORCH_CHECK(rc == 0, op, ": scratch allocation failed");
    } else {
        // as the platform's paged_attention for prompt and mixed steps: the one-token sequences
        // together through the decode kernel, the others through the prompt kernel
        if (r.ns) {
            auto qs = q.index_select(0, r.s_rows);
            auto os = at::empty({r.ns, hq, d}, opts);
            const int rc = paged_decode_attention(qs.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                                  r.s_tables.data_ptr<int64_t>(), r.s_lens.data_ptr<int64_t>(),
                                                  os.data_ptr(), static_cast<int>(r.ns), static_cast<int>(hq),
                                                  static_cast<int>(hkv), static_cast<int>(d), static_cast<int>(d), bs,
                                                  static_cast<int>(r.s_tables.size(1)), static_cast<float>(scale), 1, nt);
            TORCH_CHECK(rc == 0, op, ": scratch allocation failed");
            attn.view({b, hq, d}).index_copy_(0, r.s_rows, os);
        }
        if (r.nr) {
            const int rc = prefill_attention_bf16(
                q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), r.r_tables.data_ptr<int64_t>(),
                r.r_start.data_ptr<int64_t>(), r.r_len.data_ptr<int64_t>(), r.r_lens.data_ptr<int64_t>(), attn.data_ptr(),
                static_cast<int>(r.nr), static_cast<int>(hq), static_cast<int>(hkv), static_cast<int>(d),
                static_cast<int>(d), bs, static_cast<int>(r.r_tables.size(1)), static_cast<float>(scale), nt);
            TORCH_CHECK(rc != -1, op, ": scratch allocation failed");
            TORCH_CHECK(rc == 0, op, ": the prompt attention kernel does not run here (kernels.prefill_attention_builtin)");
        }
    }
    auto o = at::empty({b, hid}, opts);
    packed_matmul(attn, &weights[3], kinds[1], o, nt);
    auto h2 = at::empty({b, hid}, opts), res2 = at::empty({b, hid}, opts);
    add_rms_norm(o.data_ptr(), hid, res.data_ptr(), hid, post_norm.data_ptr(), h2.data_ptr(), res2.data_ptr(), b,
                 static_cast<int>(hid), eps, 1, wb, nt);
    auto act = at::empty({b, inter}, opts);
    // as the platform's quant_linear_silu_mul: past the GEMV's rows, a column-layout weight (no AMX)
    // takes the VNNI tiles with the activation in their epilogue
    const int glu = b > kSmallRows && (kinds[2] & 16) && (2 * inter) % 32 == 0
                        ? quant_gemm_vnni_glu(static_cast<int>(kinds[2]), h2.data_ptr(), hid, weights[6].data_ptr(),
                                              weights[7].data_ptr(), weights[8].data_ptr(), act.data_ptr(), inter,
                                              static_cast<int>(b), 2 * inter, static_cast<int>(hid), 1, nt)
                        : -2;
    TORCH_CHECK(glu != -1, op, ": scratch allocation failed");
    if (glu != 0) {
        auto gu = at::empty({b, 2 * inter}, opts);
        packed_matmul(h2, &weights[6], kinds[2], gu, nt);
        if (b > kSmallRows)
            silu_and_mul(gu.data_ptr(), 2 * inter, act.data_ptr(), b, static_cast<int>(inter), 1, nt);
        else  // as the eager step: torch's two ops for a few rows
            at::mul_out(act, at::silu(gu.narrow(1, 0, inter)), gu.narrow(1, inter, inter));
    }
    auto out = at::empty({b, hid}, opts);
    packed_matmul(act, &weights[9], kinds[3], out, nt);
    return {out, res2};
}

std::tuple<at::Tensor, at::Tensor> dense_decode_layer_op(
    const at::Tensor &x, const c10::optional<at::Tensor> &residual, const at::Tensor &in_norm,
    const at::Tensor &post_norm, double eps, at::TensorList weights, at::IntArrayRef kinds, at::IntArrayRef dims,
    const c10::optional<at::Tensor> &qkv_bias, const at::Tensor &cos, const at::Tensor &sin,
    const at::Tensor &positions, at::Tensor &k_cache, at::Tensor &v_cache, const at::Tensor &slot_mapping,
    const at::Tensor &block_tables, const at::Tensor &seq_lens, double scale) {
    const char *op = "dense_decode_layer";
    TORCH_CHECK(weights.size() == 12 && kinds.size() == 4 && dims.size() == 4, op, ": 12 weights, 4 kinds, 4 dims");
    const DecodeRows r = decode_rows(x, dims[2], cos, sin, positions, slot_mapping, block_tables, seq_lens, op);
    check_decode_layer(r, x.size(1), in_norm, post_norm, weights.data(), kinds.data(), dims.data(), k_cache, v_cache, op);
    const bool has_res = residual.has_value() && residual->defined(), has_bias = qkv_bias.has_value() && qkv_bias->defined();
    // (the stack's layers take the residual the layer before made)
    TORCH_CHECK(!has_res || (residual->scalar_type() == at::kBFloat16 && residual->sizes() == x.sizes() &&
                             residual->is_contiguous()),
                op, ": residual must match x");
    return decode_layer(x, has_res ? &*residual : nullptr, in_norm, post_norm, static_cast<float>(eps), weights.data(),
                        kinds.data(), dims.data(), has_bias ? &*qkv_bias : nullptr, k_cache, v_cache, r, scale, op);
}

// All the decoder layers of a decode step in one call, layer after layer as dense_decode_layer (the
// same kernels, so the same results): a step makes one dispatcher call instead of one a layer, and
// the rows' inputs are converted and checked once. Per layer L: norms[2L], norms[2L + 1] (input and
// post-attention), weights[12L .. 12L + 12), kinds[4L .. 4L + 4), dims[4L .. 4L + 4), qkv_biases[L]
// (an empty list when no layer has one), k_caches[L], v_caches[L]; cos/sin and the rows' inputs are
// the step's. x: the embedded tokens; → (the last layer's MLP output, the residual stream before it).
// A prompt or mixed step (any row count; only where every projection takes quant_gemm_vnni, as the
// platform's quant_linear runs prompt rows on CPUs without AMX) gives `split`, the attention's two
// groups (DecodeRows): [one-token rows, their tables, their lengths, the other sequences' tables,
// first rows, row counts, lengths]; block_tables and seq_lens are then not read.
std::tuple<at::Tensor, at::Tensor> dense_decode_stack_op(
    const at::Tensor &x, at::TensorList norms, double eps, at::TensorList weights, at::IntArrayRef kinds,
    at::IntArrayRef dims, at::TensorList qkv_biases, const at::Tensor &cos, const at::Tensor &sin,
    const at::Tensor &positions, at::TensorList k_caches, at::TensorList v_caches, const at::Tensor &slot_mapping,
    const at::Tensor &block_tables, const at::Tensor &seq_lens, double scale, at::TensorList split) {
    const char *op = "dense_decode_stack";
    const int64_t nl = static_cast<int64_t>(k_caches.size());
    TORCH_CHECK(nl > 0, op, ": no layers");
    TORCH_CHECK(static_cast<int64_t>(norms.size()) == 2 * nl && static_cast<int64_t>(weights.size()) == 12 * nl &&
                    static_cast<int64_t>(kinds.size()) == 4 * nl && static_cast<int64_t>(dims.size()) == 4 * nl &&
                    static_cast<int64_t>(v_caches.size()) == nl &&
                    (qkv_biases.empty() || static_cast<int64_t>(qkv_biases.size()) == nl),
                op, ": per layer 2 norms, 12 weights, 4 kinds, 4 dims, a K and a V cache (and a q/k/v bias or none)");
    const DecodeRows r = decode_rows(x, dims[2], cos, sin, positions, slot_mapping, block_tables, seq_lens, op, split);
    for (int64_t l = 0; l < nl; l++)
        check_decode_layer(r, x.size(1), norms[2 * l], norms[2 * l + 1], &weights[12 * l], &kinds[4 * l], &dims[4 * l],
                           k_caches[l], v_caches[l], op);
    at::Tensor h = x, res;
    for (int64_t l = 0; l < nl; l++) {
        // the caches are written in place (the schema marks them mutable); TensorList is read-only
        at::Tensor kc = k_caches[l], vc = v_caches[l];
        std::tie(h, res) = decode_layer(h, l ? &res : nullptr, norms[2 * l], norms[2 * l + 1], static_cast<float>(eps),
                                        &weights[12 * l], &kinds[4 * l], &dims[4 * l],
                                        qkv_biases.empty() ? nullptr : &qkv_biases[l], kc, vc, r, scale, op);
    }
    return {h, res};
}

// decode rows (x [M, K], contiguous rows, bf16 or fp32) through whichever of quant_gemv's and
// quant_gemm's kernels quant_linear's rule picks for M: one operator, so that a compiled graph whose
// batch size is symbolic does not branch on it
at::Tensor quant_matmul_op(const at::Tensor &x, const at::Tensor &w0, const at::Tensor &w1, const at::Tensor &w2,
                           int64_t kind, int64_t n) {
    check_float(x, "quant_matmul: x");
    check_packed(x, w0, w1, w2, kind, n, "quant_matmul");
    auto y = at::empty({x.size(0), n}, x.options());
    if (x.size(0) == 0 || n == 0) return y;
    const at::Tensor w[3] = {w0, w1, w2};
    TORCH_CHECK(call_packed_matmul(x, w, kind, y, at::get_num_threads()) == 0, "quant_matmul: scratch allocation failed");
    return y;
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(shoal, m) {
    m.def("quant_matmul(Tensor x, Tensor w0, Tensor w1, Tensor w2, int kind, int n) -> Tensor");
    m.def("quant_gemv(Tensor x, Tensor w0, Tensor w1, Tensor w2, int kind, int n) -> Tensor");
    m.def("quant_gemm(Tensor x, Tensor w0, Tensor w1, Tensor w2, int kind, int n) -> Tensor");
    m.def("quant_gemm_glu(Tensor x, Tensor w0, Tensor w1, Tensor w2, int kind, int n) -> Tensor");
    m.def("quant_panels(Tensor w0, Tensor w1, Tensor w2, int kind, int n, int k) -> Tensor");
    m.def("panel_gemm(Tensor x, Tensor panels, Tensor? oscale, int n) -> Tensor");
    m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
          "float scale) -> Tensor");
    m.def("dense_decode_layer(Tensor x, Tensor? residual, Tensor in_norm, Tensor post_norm, float eps, "
          "Tensor[] weights, int[] kinds, int[] dims, Tensor? qkv_bias, Tensor cos, Tensor sin, Tensor positions, "
          "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, Tensor block_tables, Tensor seq_lens, "
          "float scale) -> (Tensor, Tensor)");
    m.def("dense_decode_stack(Tensor x, Tensor[] norms, float eps, Tensor[] weights, int[] kinds, int[] dims, "
          "Tensor[] qkv_biases, Tensor cos, Tensor sin, Tensor positions, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, "
          "Tensor slot_mapping, Tensor block_tables, Tensor seq_lens, float scale, Tensor[] split) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(shoal, CPU, m) {
    m.impl("quant_gemv", &quant_gemv_op);
    m.impl("quant_gemm", &quant_gemm_op);
    m.impl("quant_gemm_glu", &quant_gemm_glu_op);
    m.impl("quant_matmul", &quant_matmul_op);
    m.impl("quant_panels", &quant_panels_op);
    m.impl("panel_gemm", &panel_gemm_op);
    m.impl("decode_attention", &decode_attention_op);
    m.impl("dense_decode_layer", &dense_decode_layer_op);
    m.impl("dense_decode_stack", &dense_decode_stack_op);
}
