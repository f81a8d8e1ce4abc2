/* Every C kernel's signature, written once. The tier libraries (kernels.c + qgemv.c, built once per
 * ISA tier: isa.py) define these functions; dispatch.c defines them again as one-jump forwarders to
 * the tier loaded at run time, so ops.cpp and kernels.py's ctypes calls name one symbol whatever the
 * tier. SHOAL_KERNELS_INT lists the functions that return int, SHOAL_KERNELS_VOID those that return
 * nothing: X(name, (parameters), (arguments)). */
#ifndef SHOAL_CPU_KERNELS_H
#define SHOAL_CPU_KERNELS_H
#include <stdint.h>

#define SHOAL_KERNELS_INT(X)                                                                                        \
    X(quant_gemv, (int kind, const void *x, int64_t ldx, const void *w0, const void *w1, const void *w2, void *y,     \
                   int64_t ldy, int M, int64_t N, int K, int is_bf16, int nthreads),                                \
      (kind, x, ldx, w0, w1, w2, y, ldy, M, N, K, is_bf16, nthreads))                                               \
    X(quant_gemm_vnni, (int kind, const void *x, int64_t ldx, const void *w0, const void *w1, const void *w2,       \
                        void *y, int64_t ldy, int M, int64_t N, int K, int is_bf16, int nthreads),                  \
      (kind, x, ldx, w0, w1, w2, y, ldy, M, N, K, is_bf16, nthreads))                                               \
    X(quant_gemm_vnni_glu, (int kind, const void *x, int64_t ldx, const void *w0, const void *w1, const void *w2,   \
                            void *y, int64_t ldy, int M, int64_t N, int K, int is_bf16, int nthreads),              \
      (kind, x, ldx, w0, w1, w2, y, ldy, M, N, K, is_bf16, nthreads))                                               \
    X(quant_gemm_amx, (int kind, const uint16_t *x, int64_t ldx, const uint8_t *codes, const uint16_t *scales,      \
                       const uint16_t *offs, uint16_t *y, int64_t ldy, int M, int64_t N, int K, int nthreads),      \
      (kind, x, ldx, codes, scales, offs, y, ldy, M, N, K, nthreads))                                               \
    X(quant_panels, (int kind, const uint8_t *codes, const uint16_t *scales, const uint16_t *offs,                  \
                     uint32_t *panels, int64_t N, int K, int nthreads),                                             \
      (kind, codes, scales, offs, panels, N, K, nthreads))                                                          \
    X(panel_gemm, (const uint16_t *x, int64_t ldx, const uint32_t *panels, const float *oscale, uint16_t *y,        \
                   int64_t ldy, int M, int64_t N, int K, int nthreads),                                             \
      (x, ldx, panels, oscale, y, ldy, M, N, K, nthreads))                                                          \
    X(quant_gemm_amx_available, (void), ())                                                                         \
    X(qgemv_fast, (void), ())                                                                                       \
    X(qgemv_set_prefetch, (int rows), (rows))                                                                       \
    X(paged_decode_attention, (const void *q, const void *k_cache, const void *v_cache, const int64_t *tables,      \
                               const int64_t *seq_lens, void *out, int B, int HQ, int HKV, int D, int DV, int BS,   \
                               int W, float scale, int is_bf16, int nthreads),                                      \
      (q, k_cache, v_cache, tables, seq_lens, out, B, HQ, HKV, D, DV, BS, W, scale, is_bf16, nthreads))             \
    X(prefill_attention_bf16, (const void *q, const void *k_cache, const void *v_cache, const int64_t *tables,      \
                               const int64_t *q_start, const int64_t *q_len, const int64_t *seq_lens, void *out,    \
                               int S, int HQ, int HKV, int D, int DV, int BS, int W, float scale, int nthreads),     \
      (q, k_cache, v_cache, tables, q_start, q_len, seq_lens, out, S, HQ, HKV, D, DV, BS, W, scale, nthreads))      \
    X(set_decode_attention_amx, (int on), (on))

#define SHOAL_KERNELS_VOID(X)                                                                                       \
    X(rms_norm, (const void *x, int64_t ldx, const void *w, void *out, int64_t N, int H, float eps, int is_bf16,    \
                 int w_bf16, int nthreads),                                                                         \
      (x, ldx, w, out, N, H, eps, is_bf16, w_bf16, nthreads))                                                       \
    X(add_rms_norm, (const void *x, int64_t ldx, const void *r, int64_t ldr, const void *w, void *out, void *sum,   \
                     int64_t N, int H, float eps, int is_bf16, int w_bf16, int nthreads),                           \
      (x, ldx, r, ldr, w, out, sum, N, H, eps, is_bf16, w_bf16, nthreads))                                          \
    X(rotary, (const void *x, int64_t sT, int64_t sH, const float *cosv, const float *sinv, void *out, int64_t T,   \
               int NH, int R, int interleaved, int is_bf16, int nthreads),                                          \
      (x, sT, sH, cosv, sinv, out, T, NH, R, interleaved, is_bf16, nthreads))                                       \
    X(silu_and_mul, (const void *x, int64_t ldx, void *out, int64_t N, int I, int is_bf16, int nthreads),           \
      (x, ldx, out, N, I, is_bf16, nthreads))                                                                       \
    X(argmax_rows, (const void *x, int64_t ldx, int64_t S, int64_t V, int is_bf16, int64_t *out, int nthreads),     \
      (x, ldx, S, V, is_bf16, out, nthreads))                                                                       \
    X(store_rows, (const void *src, int64_t src_stride, void *dst, const int64_t *slots, int64_t T,                 \
                   int64_t row_bytes, int nthreads),                                                                \
      (src, src_stride, dst, slots, T, row_bytes, nthreads))

#ifdef __cplusplus
extern "C" {
#endif
#define SHOAL_DECLARE_INT(name, params, args) int name params;
#define SHOAL_DECLARE_VOID(name, params, args) void name params;
SHOAL_KERNELS_INT(SHOAL_DECLARE_INT)
SHOAL_KERNELS_VOID(SHOAL_DECLARE_VOID)
#undef SHOAL_DECLARE_INT
#undef SHOAL_DECLARE_VOID
/* dispatch.c: make the tier library at `path` the one every kernel above runs; 0, else -1 (it does
 * not load: the message is shoal_tier_error()) or -2 (a kernel is missing from it) */
int shoal_load_tier(const char *path);
const char *shoal_tier_error(void);
#ifdef __cplusplus
}
#endif
#endif
