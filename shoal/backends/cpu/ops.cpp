// Registers shoal's C kernels (kernels.c, qgemv.c) as torch operators implemented in C++, so a compiled
// graph's C++ wrapper calls them through the dispatcher (about a microsecond) instead of calling back
// into Python (tens of microseconds). Built by kernels.py together with the C sources when a C++
// compiler and torch's headers are present; without them the ctypes path (Python ops) is used.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

extern "C" {
int quant_gemv(int kind, const void *x, int64_t ldx, const void *w0, const void *w1, const void *w2, void *y,
               int64_t ldy, int M, int64_t N, int K, int is_bf16, int nthreads);
int quant_gemm_amx(int kind, const uint16_t *x, int64_t ldx, const uint8_t *codes, const uint16_t *scales, const uint16_t *offs,
                   uint16_t *y, int64_t ldy, int M, int64_t N, int K, int nthreads);
int quant_panels(int kind, const uint8_t *codes, const uint16_t *scales, const uint16_t *offs, uint32_t *panels,
                 int64_t N, int K, int nthreads);
int panel_gemm(const uint16_t *x, int64_t ldx, const uint32_t *panels, const float *oscale, uint16_t *y,
               int64_t ldy, int M, int64_t N, int K, int nthreads);
int paged_decode_attention(const void *q, const void *k_cache, const void *v_cache, const int64_t *tables,
                           const int64_t *seq_lens, void *out, int B, int HQ, int HKV, int D, int DV, int BS, int W,
                           float scale, int is_bf16, int nthreads);
}

namespace {

void check_float(const at::Tensor &t, const char *what) {
    TORCH_CHECK(t.device().is_cpu(), what, " must be a CPU tensor");
    TORCH_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat, what, " must be bf16 or fp32");
}

// an [n, k] weight from kernels.repack_int4/8 (kind 4/8)
void check_packed_weight(const at::Tensor &w0, const at::Tensor &w1, const at::Tensor &w2, int64_t kind, int64_t n,
                         int64_t k, const char *op) {
    TORCH_CHECK(kind == 4 || kind == 8, op, ": kind must be 4 or 8");
    TORCH_CHECK(w0.is_contiguous() && w1.is_contiguous() && w2.is_contiguous(), op, ": packed weight not contiguous");
    const int64_t kp = (k + 63) / 64 * 64;
    TORCH_CHECK(w0.size(0) == n && w0.numel() == n * (kind == 4 ? kp / 2 : kp), op, ": packed weight shape");
}

// x [M, K] with contiguous rows against such a weight (n output rows)
void check_packed(const at::Tensor &x, const at::Tensor &w0, const at::Tensor &w1, const at::Tensor &w2, int64_t kind,
                  int64_t n, const char *op) {
    TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, op, ": x must be [M, K] with contiguous rows");
    check_packed_weight(w0, w1, w2, kind, n, x.size(1), op);
}

// x [M, K] (rows may be strided, elements contiguous); weight tensors from kernels.repack_int4/8
at::Tensor quant_gemv_op(const at::Tensor &x, const at::Tensor &w0, const at::Tensor &w1, const at::Tensor &w2,
                         int64_t kind, int64_t n) {
    check_float(x, "quant_gemv: x");
    check_packed(x, w0, w1, w2, kind, n, "quant_gemv");
    const int64_t m = x.size(0), k = x.size(1);
    auto y = at::empty({m, n}, x.options());
    if (m == 0 || n == 0) return y;
    const int rc = quant_gemv(static_cast<int>(kind), x.data_ptr(), x.stride(0), w0.data_ptr(), w1.data_ptr(),
                              w2.data_ptr(), y.data_ptr(), n, static_cast<int>(m), n, static_cast<int>(k),
                              x.scalar_type() == at::kBFloat16, at::get_num_threads());
    TORCH_CHECK(rc == 0, "quant_gemv: scratch allocation failed");
    return y;
}

// x [M, K] bf16 (9..64 rows, contiguous rows); a weight from kernels.repack_int4/8; AMX tiles
at::Tensor quant_gemm_op(const at::Tensor &x, const at::Tensor &w0, const at::Tensor &w1, const at::Tensor &w2,
                         int64_t kind, int64_t n) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16, "quant_gemm: x must be a bf16 CPU tensor");
    check_packed(x, w0, w1, w2, kind, n, "quant_gemm");
    const int64_t m = x.size(0), k = x.size(1);
    auto y = at::empty({m, n}, x.options());
    if (m == 0 || n == 0) return y;
    const int rc = quant_gemm_amx(static_cast<int>(kind), reinterpret_cast<const uint16_t *>(x.data_ptr()), x.stride(0),
                                  w0.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t *>(w1.data_ptr()),
                                  reinterpret_cast<const uint16_t *>(w2.data_ptr()),
                                  reinterpret_cast<uint16_t *>(y.data_ptr()), n, static_cast<int>(m), n,
                                  static_cast<int>(k), at::get_num_threads());
    TORCH_CHECK(rc != -1, "quant_gemm: scratch allocation failed");
    TORCH_CHECK(rc == 0, "quant_gemm: not available for this shape or CPU (check kernels.quant_gemm_supported)");
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(shoal, m) {
    m.def("quant_gemv(Tensor x, Tensor w0, Tensor w1, Tensor w2, int kind, int n) -> Tensor");
    m.def("quant_gemm(Tensor x, Tensor w0, Tensor w1, Tensor w2, int kind, int n) -> Tensor");
    m.def("quant_panels(Tensor w0, Tensor w1, Tensor w2, int kind, int n, int k) -> Tensor");
    m.def("panel_gemm(Tensor x, Tensor panels, Tensor? oscale, int n) -> Tensor");
    m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
          "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(shoal, CPU, m) {
    m.impl("quant_gemv", &quant_gemv_op);
    m.impl("quant_gemm", &quant_gemm_op);
    m.impl("quant_panels", &quant_panels_op);
    m.impl("panel_gemm", &panel_gemm_op);
    m.impl("decode_attention", &decode_attention_op);
}
