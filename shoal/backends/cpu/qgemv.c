/* Weight-only quantized matrix products (shoal/backends/cpu/kernels.py, the `quant_gemv` /
 * `quant_gemm` / `quant_gemm_glu` ops): decode rows everywhere, and prompt rows on CPUs with VNNI but
 * no AMX; built into the same library as kernels.c.
 *
 * The activations are quantized on the fly to int8 per group of 32 along K (scale = amax / 127,
 * round to nearest even; llama.cpp does the same for its Q8 activations) so the inner loop is
 * AVX512-VNNI `vpdpbusd` (64 unsigned-by-signed byte products per instruction) and reads each
 * weight byte once from memory. Accumulation is int32 within a group and fp32 across groups.
 *
 * Weight layouts (built once per weight by kernels.py: repack_int4 / repack_int8):
 * - pairs of groups of 32 along K (K padded to a multiple of 64); within a pair (A, B) the 64 values
 *   are stored in "lane order": byte p holds group (p >> 2) & 1, element ((p >> 3) << 2) | (p & 3),
 *   so the sixteen 32-bit lanes of a vpdpbusd alternate A, B, A, B, … and one broadcast of the
 *   pair's two scales lines up with them;
 * - int4: codes q ∈ 0..15, two per byte, in blocks of two pairs: byte j of a 64-byte block holds
 *   lane-order value j of the first pair in its low nibble and of the second in its high nibble (one
 *   load and three ops unpack 128 weights); a last, unpaired pair takes 32 bytes, value j in the low
 *   nibble of byte j and value j + 32 in the high one; fp16 scales s and offsets m per group,
 *   w = s · q + m;
 * - int8: bytes w + 128 (so they are the unsigned operand; the 128·Σx term is subtracted once per
 *   activation row), 64 per pair; one fp32 scale per output row.
 * The activation row is quantized into the same lane order.
 *
 * Three bodies, by the tier the file is compiled for: the VNNI one here (QG_FAST: x86-64-v4 with
 * AVX512-VNNI), the AVX2 one in qgemv_avx2.h (QG_AVX2: x86-64-v3, vpmaddubsw in place of vpdpbusd),
 * and the scalar reference (any CPU, e.g. aarch64). All three compute the same int8 activations and
 * int32 group sums; fp32 summation order differs.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && \
    defined(__F16C__)
#define QG_FAST 1
#include <immintrin.h>
#else
#define QG_FAST 0
#endif
/* the AVX2 body (qgemv_avx2.h: x86-64-v3, e.g. AMD Zen 2/3) where the VNNI one is not compiled in;
 * neither: the scalar reference (any CPU) */
#if !QG_FAST && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define QG_AVX2 1
#include <immintrin.h>

#include "simd_avx2.h" /* exp256, shared with kernels.c's AVX2 bodies */
#else
#define QG_AVX2 0
#endif

#include "kernels.h" /* every exported kernel's signature, checked against the definitions here */
#include "scalar.h"
#include "worksplit.h"

#define QG_MAXR 4   /* activation rows per pass over the weights */
#define QG_CHUNK 64 /* output rows per work item */
#define QG_STACK 16384 /* bytes of quantized activations kept on the stack */
#define QG_COLS 16 /* kind flag: the column layout (kernels.to_columns) */
/* GEMV: weight rows prefetched ahead of the one being read (0: none); a variable so that a
 * benchmark can compare settings in one process (qgemv_set_prefetch) */
static int qg_pf_rows = 8;
int qgemv_set_prefetch(int rows) {
    const int old = qg_pf_rows;
    qg_pf_rows = rows < 0 ? 0 : rows;
    return old;
}
#if defined(__x86_64__) || defined(__i386__)
static inline void qg_prefetch(const void *p) { __asm__ volatile("prefetcht0 %0" : : "m"(*(const char *)p)); }
#else
static inline void qg_prefetch(const void *p) { __builtin_prefetch(p, 0, 3); }
#endif

/* 1 when the VNNI body was compiled, 2 the AVX2 one, 0 neither (the scalar path is a correct but
 * slow reference) */
int qgemv_fast(void) { return QG_FAST ? 1 : QG_AVX2 ? 2 : 0; }

static inline float qg_half(uint16_t h) { /* IEEE fp16 → fp32 */
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 31, man = h & 1023;
    uint32_t u;
    if (exp == 0) {
        float f = ldexpf((float)man, -24);
        memcpy(&u, &f, 4);
        u |= sign;
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline int lane_group(int p) { return (p >> 2) & 1; }
static inline int lane_elem(int p) { return ((p >> 3) << 2) | (p & 3); }

/* One activation row x[0..K) → xq [Kp] int8 in lane order, dx [Kp/32] group scales, xs [Kp/32] the
 * quantized rows' group sums dx_g · Σ xq_g (for int4's offsets: with the sums of x itself the offset
 * term would not cancel the rounding error the scaled term carries — w = s·q + m has s·q ≈ w − m far
 * from zero where m is — the default model's o_proj read 9.5% from the exact product, against 0.5%);
 * returns Σ_g xs_g (for the int8 weights' +128 offset). */
static float quantize_row(const void *x, int K, int Kp, int is_bf16, int8_t *xq, float *dx, float *xs) {
    float tmp[64];
    int8_t q[64];
    float offset = 0.f;
    for (int p0 = 0; p0 < Kp; p0 += 64) {
        for (int i = 0; i < 64; i++) {
            const int k = p0 + i;
            tmp[i] = k >= K ? 0.f : ld(x, k, is_bf16);
        }
        for (int g = 0; g < 2; g++) {
            const float *t = tmp + 32 * g;
            float amax = 0.f;
            for (int i = 0; i < 32; i++) amax = fabsf(t[i]) > amax ? fabsf(t[i]) : amax;
            const float inv = amax > 0.f ? 127.f / amax : 0.f;
            int qsum = 0;
            for (int i = 0; i < 32; i++) {
                const int v = (int)nearbyintf(t[i] * inv);
                q[32 * g + i] = (int8_t)v;
                qsum += v;
            }
            const int gi = p0 / 32 + g;
            dx[gi] = amax / 127.f;
            xs[gi] = dx[gi] * (float)qsum;
            offset += xs[gi];
        }
        for (int p = 0; p < 64; p++) xq[p0 + p] = q[32 * lane_group(p) + lane_elem(p)];
    }
    return offset;
}

#if QG_FAST
static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

/* [a, b] → [a, b, a, b, …] (16 lanes) */
static inline __m512 pair_bcast(const float *ab) {
    double d;
    memcpy(&d, ab, 8);
    return _mm512_castpd_ps(_mm512_set1_pd(d));
}

/* rows n of an int4 weight against R quantized activation rows */
static inline __attribute__((always_inline)) void int4_rows(const uint8_t *codes, const uint16_t *scales,
                                                           const uint16_t *offs, int64_t n0, int64_t n1, int P,
                                                           int G, const int8_t *xq, const float *dx,
                                                           const float *xs, int Kp, int R, void *y, int64_t ldy,
                                                           int is_bf16) {
    const __m256i low = _mm256_set1_epi8(0x0f);
    const __m512i low512 = _mm512_set1_epi8(0x0f);
    const int Gp = 2 * P;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *c = codes + n * (int64_t)P * 32;
        const uint16_t *s = scales + n * Gp;
        if (qg_pf_rows) { /* a later row's codes, scales and offsets (the hardware prefetcher alone leaves
                      * the loads waiting on DRAM); prefetches never fault, so no bound check */
            for (int o = 0; o < P * 32; o += 64) qg_prefetch(c + (int64_t)qg_pf_rows * P * 32 + o);
            qg_prefetch(s + (int64_t)qg_pf_rows * Gp), qg_prefetch(offs + (n + qg_pf_rows) * Gp);
        }
        __m512 acc[QG_MAXR], acc2[QG_MAXR]; /* two chains: even and odd pairs */
        for (int r = 0; r < R; r++) acc[r] = acc2[r] = _mm512_setzero_ps();
        int p = 0;
        /* blocks of two pairs: 64 bytes, pair p in the low nibbles and pair p + 1 in the high ones */
        for (; p + 2 <= P; p += 2) {
            const __m512i v = _mm512_loadu_si512((const void *)(c + 32 * p));
            const __m512i w0 = _mm512_and_si512(v, low512), w1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), low512);
            int32_t sp0, sp1;
            memcpy(&sp0, s + 2 * p, 4);
            memcpy(&sp1, s + 2 * p + 2, 4);
            const __m512 sv0 = _mm512_cvtph_ps(_mm256_set1_epi32(sp0)), sv1 = _mm512_cvtph_ps(_mm256_set1_epi32(sp1));
            for (int r = 0; r < R; r++) {
                const int8_t *xr = xq + (int64_t)r * Kp + 64 * p;
                const float *dr = dx + (int64_t)r * Gp + 2 * p;
                const __m512i i0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w0, _mm512_loadu_si512((const void *)xr));
                const __m512i i1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w1, _mm512_loadu_si512((const void *)(xr + 64)));
                acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(i0), pair_bcast(dr)), sv0, acc[r]);
                acc2[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(i1), pair_bcast(dr + 2)), sv1, acc2[r]);
            }
        }
        if (p < P) { /* a last, unpaired pair: 32 bytes, values j and j + 32 in the nibbles of byte j */
            const __m256i v = _mm256_loadu_si256((const __m256i *)(c + 32 * p));
            const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
            int32_t sp;
            memcpy(&sp, s + 2 * p, 4);
            const __m512 sv = _mm512_cvtph_ps(_mm256_set1_epi32(sp));
            for (int r = 0; r < R; r++) {
                const __m512i xv = _mm512_loadu_si512((const void *)(xq + (int64_t)r * Kp + 64 * p));
                const __m512i isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xv);
                const __m512 d = pair_bcast(dx + (int64_t)r * Gp + 2 * p);
                acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(isum), d), sv, acc[r]);
            }
        }
        for (int r = 0; r < R; r++) acc[r] = _mm512_add_ps(acc[r], acc2[r]);
        /* + Σ_g m_g · Σ x_g */
        const uint16_t *m = offs + n * Gp;
        for (int r = 0; r < R; r++) {
            __m512 mt = _mm512_setzero_ps();
            int g = 0;
            for (; g + 16 <= G; g += 16)
                mt = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(m + g))),
                                     _mm512_loadu_ps(xs + (int64_t)r * Gp + g), mt);
            if (g < G) {
                const __mmask16 k = (__mmask16)((1u << (G - g)) - 1);
                mt = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, m + g)),
                                     _mm512_maskz_loadu_ps(k, xs + (int64_t)r * Gp + g), mt);
            }
            st(y, (int64_t)r * ldy + n, hsum(acc[r]) + hsum(mt), is_bf16);
        }
    }
}

static inline __attribute__((always_inline)) void int8_rows(const uint8_t *wq, const float *scales, int64_t n0,
                                                           int64_t n1, int P, const int8_t *xq, const float *dx,
                                                           const float *off, int Kp, int R, void *y, int64_t ldy,
                                                           int is_bf16) {
    const int Gp = 2 * P;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *c = wq + n * (int64_t)Kp;
        if (qg_pf_rows)
            for (int o = 0; o < Kp; o += 64) qg_prefetch(c + (int64_t)qg_pf_rows * Kp + o);
        __m512 acc[QG_MAXR];
        for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
        for (int p = 0; p < P; p++) {
            const __m512i w = _mm512_loadu_si512((const void *)(c + 64 * p));
            for (int r = 0; r < R; r++) {
                const __m512i xv = _mm512_loadu_si512((const void *)(xq + (int64_t)r * Kp + 64 * p));
                const __m512i isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xv);
                const __m512 d = pair_bcast(dx + (int64_t)r * Gp + 2 * p);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), d, acc[r]);
            }
        }
        for (int r = 0; r < R; r++)
            st(y, (int64_t)r * ldy + n, scales[n] * (hsum(acc[r]) - 128.f * off[r]), is_bf16);
    }
}
#endif

/* scalar reference of the same arithmetic (any CPU) */
static void int4_rows_scalar(const uint8_t *codes, const uint16_t *scales, const uint16_t *offs, int64_t n0,
                             int64_t n1, int P, int G, const int8_t *xq, const float *dx, const float *xs, int Kp,
                             int R, void *y, int64_t ldy, int is_bf16) {
    const int Gp = 2 * P;
    for (int64_t n = n0; n < n1; n++)
        for (int r = 0; r < R; r++) {
            float acc = 0.f;
            for (int p = 0; p < P; p++) {
                const uint8_t *c = codes + n * (int64_t)P * 32;
                const int8_t *x = xq + (int64_t)r * Kp + 64 * p;
                int32_t isum[2] = {0, 0};
                for (int j = 0; j < 64; j++) {
                    int q;
                    if (p + 1 < P || P % 2 == 0) /* in a block of two pairs */
                        q = (c[32 * (p & ~1) + j] >> (4 * (p & 1))) & 15;
                    else /* the last, unpaired pair */
                        q = j < 32 ? c[32 * p + j] & 15 : c[32 * p + j - 32] >> 4;
                    isum[lane_group(j)] += q * x[j];
                }
                for (int g = 0; g < 2; g++)
                    acc += (float)isum[g] * dx[(int64_t)r * Gp + 2 * p + g] * qg_half(scales[n * Gp + 2 * p + g]);
            }
            for (int g = 0; g < G; g++) acc += qg_half(offs[n * Gp + g]) * xs[(int64_t)r * Gp + g];
            st(y, (int64_t)r * ldy + n, acc, is_bf16);
        }
}

static void int8_rows_scalar(const uint8_t *wq, const float *scales, int64_t n0, int64_t n1, int P,
                             const int8_t *xq, const float *dx, const float *off, int Kp, int R, void *y,
                             int64_t ldy, int is_bf16) {
    const int Gp = 2 * P;
    for (int64_t n = n0; n < n1; n++)
        for (int r = 0; r < R; r++) {
            float acc = 0.f;
            for (int p = 0; p < P; p++) {
                int32_t isum[2] = {0, 0};
                for (int j = 0; j < 64; j++)
                    isum[lane_group(j)] += (int)wq[n * (int64_t)Kp + 64 * p + j] * xq[(int64_t)r * Kp + 64 * p + j];
                for (int g = 0; g < 2; g++) acc += (float)isum[g] * dx[(int64_t)r * Gp + 2 * p + g];
            }
            st(y, (int64_t)r * ldy + n, scales[n] * (acc - 128.f * off[r]), is_bf16);
        }
}

/* Scratch that outlives the call: a grow-only buffer per calling thread. Allocating a prompt's few
 * MB per call went to fresh mmap pages each time (glibc's threshold), and their page faults cost as
 * much as the products (a 30-layer pass at 2048 rows 422 -> 640-760 ms). Returns NULL when the
 * allocation failed. */
static __thread void *qg_arena;
static __thread size_t qg_arena_bytes;
static void *qg_arena_get(size_t bytes) {
    if (bytes > qg_arena_bytes) {
        const size_t want = (bytes + (1u << 21) - 1) & ~(size_t)((1u << 21) - 1);
        void *p = aligned_alloc(64, want);
        if (!p) return NULL;
        free(qg_arena);
        qg_arena = p, qg_arena_bytes = want;
    }
    return qg_arena;
}

/* scratch for M quantized activation rows (Kp int8 each; group scales, group sums, and a row
 * offset): in the struct's own arrays (on the caller's stack) for decode sizes, else the thread's
 * arena. Returns 0, or -1 when allocation failed. */
typedef struct {
    _Alignas(64) int8_t xq_stack[QG_STACK];
    float f_stack[QG_STACK / 8];
    int8_t *xq;
    float *dx, *xs, *off;
} qg_scratch;

static int qg_scratch_get(int M, int Kp, qg_scratch *sc) {
    const size_t nxq = ((size_t)M * Kp + 63) / 64 * 64, Gp = (size_t)Kp / 32, nf = (size_t)M * 2 * Gp + (size_t)M;
    const size_t nfb = (sizeof(float) * nf + 63) / 64 * 64;
    if (nxq <= QG_STACK && nf <= QG_STACK / 8) {
        sc->xq = sc->xq_stack;
        sc->dx = sc->f_stack;
    } else {
        char *a = qg_arena_get(nxq + nfb);
        if (!a) return -1;
        sc->xq = (int8_t *)a;
        sc->dx = (float *)(a + nxq);
    }
    sc->xs = sc->dx + (size_t)M * Gp, sc->off = sc->dx + (size_t)M * 2 * Gp;
    return 0;
}

#if QG_AVX2
#include "qgemv_avx2.h"
#endif

int quant_gemm_vnni(int kind, const void *x, int64_t ldx, const void *w0, const void *w1, const void *w2, void *y,
                    int64_t ldy, int M, int64_t N, int K, int is_bf16, int nthreads);

/* y[M, N] = x[M, K] · Wᵀ for a repacked int4 (kind 4) or int8 (kind 8) weight; x rows `ldx` elements
 * apart, y rows `ldy` apart, both bf16 when is_bf16 else fp32. int4: w0 = codes [N, Kp/2],
 * w1 = fp16 scales [N, Kp/32], w2 = fp16 offsets [N, Kp/32]; int8: w0 = bytes [N, Kp], w1 = fp32
 * scales [N], w2 unused; kinds 4 | 16 and 8 | 16 (the column layout) go to quant_gemm_vnni below. Returns
 * 0, or -1 when scratch memory could not be allocated. */
int quant_gemv(int kind, const void *x, int64_t ldx, const void *w0, const void *w1, const void *w2, void *y,
               int64_t ldy, int M, int64_t N, int K, int is_bf16, int nthreads) {
    if (kind & 16) /* the column layout (kernels.to_columns): its own kernel, any number of rows */
        return quant_gemm_vnni(kind, x, ldx, w0, w1, w2, y, ldy, M, N, K, is_bf16, nthreads);
    const int Kp = (K + 63) / 64 * 64, P = Kp / 64, Gp = Kp / 32, G = (K + 31) / 32;
    qg_scratch sc;
    if (qg_scratch_get(M, Kp, &sc)) return -1;
    int8_t *xq = sc.xq;
    float *dx = sc.dx, *xs = sc.xs, *off = sc.off;
    for (int r = 0; r < M; r++)
        off[r] = quantize_row((const char *)x + (size_t)r * ldx * (is_bf16 ? 2 : 4), K, Kp, is_bf16,
                              xq + (size_t)r * Kp, dx + (size_t)r * Gp, xs + (size_t)r * Gp);
    /* chunks of QG_CHUNK output rows (contiguous weight reads), handed out dynamically: the threads
     * share a core's vector units with whatever else runs, so static halves finish unevenly */
    const int64_t nchunks = (N + QG_CHUNK - 1) / QG_CHUNK;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t ch = 0; ch < nchunks; ch++) {
        const int64_t n0 = ch * QG_CHUNK, n1 = n0 + QG_CHUNK < N ? n0 + QG_CHUNK : N;
        for (int r0 = 0; r0 < M; r0 += QG_MAXR) {
            const int R = M - r0 < QG_MAXR ? M - r0 : QG_MAXR;
            const int8_t *xr = xq + (size_t)r0 * Kp;
            const float *dr = dx + (size_t)r0 * Gp, *sr = xs + (size_t)r0 * Gp;
            void *yr = (char *)y + (size_t)r0 * ldy * (is_bf16 ? 2 : 4);
#if QG_FAST
#define QG_CASE(RR)                                                                                           \
    case RR:                                                                                                  \
        if (kind == 4)                                                                                        \
            int4_rows(w0, w1, w2, n0, n1, P, G, xr, dr, sr, Kp, RR, yr, ldy, is_bf16);                        \
        else                                                                                                  \
            int8_rows(w0, w1, n0, n1, P, xr, dr, off + r0, Kp, RR, yr, ldy, is_bf16);                         \
        break;
            switch (R) { QG_CASE(1) QG_CASE(2) QG_CASE(3) QG_CASE(4) }
#undef QG_CASE
#elif QG_AVX2
#define QG_CASE(RR)                                                                                           \
    case RR:                                                                                                  \
        if (kind == 4)                                                                                        \
            q2_int4_rows(w0, w1, w2, n0, n1, P, G, xr, dr, sr, Kp, RR, yr, ldy, is_bf16);                     \
        else                                                                                                  \
            q2_int8_rows(w0, w1, n0, n1, P, xr, dr, Kp, RR, yr, ldy, is_bf16);                                \
        break;
            switch (R) { QG_CASE(1) QG_CASE(2) QG_CASE(3) QG_CASE(4) }
#undef QG_CASE
#else
            if (kind == 4)
                int4_rows_scalar(w0, w1, w2, n0, n1, P, G, xr, dr, sr, Kp, R, yr, ldy, is_bf16);
            else
                int8_rows_scalar(w0, w1, n0, n1, P, xr, dr, off + r0, Kp, R, yr, ldy, is_bf16);
#endif
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------
 * quant_gemm_vnni: many activation rows against an int4 or int8 weight in the column layout, for CPUs
 * with AVX512-VNNI but no AMX (AMD Zen 4/5, Intel Ice Lake and Cascade Lake): batched decode and,
 * there, prompts too (a vpdpbusd does 64 multiply-adds, a vdpbf16ps 32, at the same rate: two a
 * cycle on Zen 5). The GEMV above re-reads the weight for every QG_MAXR rows and pays a conversion, a
 * multiply and an FMA per vpdpbusd; here a vector holds 4 consecutive K positions of 16 outputs (a
 * vpdpbusd lane per output) and runs against activation rows whose 4 int8 values are one broadcast.
 * Products of a group of 32 accumulate in int32 (8 vpdpbusd) before the group's scales are applied,
 * and no horizontal sums are needed: lane j is output column j. Below QV_MIN_TILED rows, qv_rows
 * (one 16-column block × up to 12 rows); from it, the 6-row × 2-block tiles (qv_tiled, assembly).
 * The activations are quantized as in quant_gemv (int8 per group of 32, scale amax / 127, round to
 * nearest even, quantized group sums for int4's offsets): the same numbers, summed in another order.
 * Returns 0; -1 when scratch allocation failed; -2 when it does not apply (N % 16, another kind).
 * Builds without VNNI run the same layout and arithmetic on the AVX2 body (q2_gemm, qgemv_avx2.h) or
 * the scalar one (qs_gemm, below).
 * ------------------------------------------------------------------------------------------------ */
#if QG_FAST
/* activation rows per register block: 12 int32 and 12 fp32 accumulators. The default model's 30
 * layers at 32 / 64 rows on a 2-core AMD EPYC: 8 rows 9.3 / 16.9 ms, 12 rows 9.0 / 16.2, 16 rows
 * (spills) 10.4 / 19.7 */
#define QV_MR 12

/* 16 fp32 → bf16, round to nearest even (as f32_to_bf16; NaN not kept quiet without AVX512-BF16) */
static inline __m256i qv_bf16(__m512 v) {
#ifdef __AVX512BF16__
    return bf16x16(v);
#else
    const __m512i u = _mm512_castps_si512(v);
    const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                            _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
#endif
}

/* group x[k0, k0 + 32) (zeros past K) → its 32 int8 values (q, as 8 dwords in natural order); returns
 * the scale amax / 127 */
static inline float qv_quantize_group(const void *x, int K, int k0, int is_bf16, int32_t *q) {
    __m512 a[2];
    for (int h = 0; h < 2; h++) {
        const int k = k0 + 16 * h, n = K - k < 0 ? 0 : (K - k > 16 ? 16 : K - k);
        const __mmask16 mk = (__mmask16)((1u << n) - 1u);
        if (is_bf16)
            a[h] = _mm512_castsi512_ps(
                _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, (const uint16_t *)x + k)), 16));
        else
            a[h] = _mm512_maskz_loadu_ps(mk, (const float *)x + k);
    }
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a[0]), _mm512_abs_ps(a[1])));
    const __m512 vi = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    const __m128i q0 = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(a[0], vi)));
    const __m128i q1 = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(a[1], vi)));
    _mm256_store_si256((__m256i *)q, _mm256_inserti128_si256(_mm256_castsi128_si256(q0), q1, 1));
    return amax / 127.f;
}

/* Σ of the 32 int8 values of a group */
static inline int q_sum(const int32_t *q) {
    const __m256i v = _mm256_load_si256((const __m256i *)q);
    const __m256i s = _mm256_sad_epu8(_mm256_xor_si256(v, _mm256_set1_epi8((char)0x80)), _mm256_setzero_si256());
    const __m128i t = _mm_add_epi64(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    return (int)(_mm_cvtsi128_si64(t) + _mm_extract_epi64(t, 1)) - 32 * 128;
}

/* one row x[0..K) → xq [Kp] int8 in natural order, dx [Kp/32] scales, xs [Kp/32] the quantized
 * group sums dx_g · Σ xq_g (as quantize_row); returns Σ_g xs_g (for int8 weights' +128 offset) */
static float qv_quantize_row(const void *x, int K, int Kp, int is_bf16, int8_t *xq, float *dx, float *xs) {
    float offset = 0.f;
    for (int g = 0; g < Kp / 32; g++) {
        _Alignas(32) int32_t q[8];
        dx[g] = qv_quantize_group(x, K, 32 * g, is_bf16, q);
        memcpy(xq + 32 * g, q, 32);
        xs[g] = dx[g] * (float)q_sum(q);
        offset += xs[g];
    }
    return offset;
}

/* MR activation rows against the 16 output columns of block nb (a column-layout weight: kinds
 * QG_COLS | 4, QG_COLS | 8, see kernels.to_columns): y[r][j] for output nb·16 + j.
 * int4 block nb: for each 64-byte block b of the row layout (pairs 2b, 2b + 1), 16 vectors: vector d
 * holds dword d of that block for the 16 rows (so the low nibbles are K positions 128b + 32·(d & 1) +
 * 4·(d >> 1) + 0..3, the high ones the same + 64); an odd last pair p: 8 vectors, vector d's low
 * nibbles at K positions 64p + 32·(d & 1) + 4·(d >> 1) + 0..3, its high ones the same + 16. Scales and
 * offsets: [Gp][16] fp16 per block.
 * int8 block nb: for each pair p, 16 vectors of 16 rows × 4 bytes (K positions 64p + 32·(d & 1) +
 * 4·(d >> 1) + 0..3, stored + 128); the row scales as in the row layout. */
static inline __attribute__((always_inline)) void qv_rows(int kind, int MR, const uint8_t *wb, const uint16_t *sb,
                                                          const uint16_t *mb, __m512 osc, const int8_t *xq,
                                                          const float *dx, const float *xs, const float *off, int K,
                                                          int Kp, int Gp, void *y, int64_t ldy, int is_bf16,
                                                          const uint8_t *pf, int pf_per_group) {
    const __m512i low = _mm512_set1_epi8(0x0f);
    const int P = Kp / 64, odd = (kind & 15) == 4 && (P & 1);
    __m512 acc[QV_MR];
    for (int r = 0; r < MR; r++) acc[r] = _mm512_setzero_ps();
    for (int g = 0; g < Gp; g++) {
        if (32 * g >= K) break; /* padding groups: zero activations, nothing to add */
        for (int i = 0; i < pf_per_group; i++) qg_prefetch(pf + (int64_t)(g * pf_per_group + i) * 64);
        const int p = g >> 1, par = g & 1;
        /* elements 4j..4j + 3 of the group are lane dword 2j + par of pair p: int8 and full int4
         * blocks hold it in vector 2j + par (int4: the low nibbles for even p, the high for odd); the
         * int4 tail, in vector (2j + par) mod 8, low nibbles for dwords 0–7, high for 8–15 */
        const __m512i *w = (const __m512i *)(wb + (int64_t)((kind & 15) == 8 ? p : p >> 1) * 1024);
        const int8_t *xg = xq + 32 * g;
        __m512i ia[QV_MR];
        for (int r = 0; r < MR; r++) ia[r] = _mm512_setzero_si512();
        /* from 4 rows, two bodies (the tail, the rest) unrolled by two: with the tail's index and shift
         * chosen per j at run time the compiler kept one rolled loop and copied the accumulators every
         * iteration (30 layers at 32 rows 8.57 -> 8.08 ms; unrolled by 4 or 8: spills, 9.3 and 13.6) */
#define QV_DOT(V, J)                                                                \
    for (int r = 0; r < MR; r++) {                                                  \
        int32_t xv;                                                                 \
        memcpy(&xv, xg + (size_t)r * Kp + 4 * (J), 4);                              \
        ia[r] = _mm512_dpbusd_epi32(ia[r], (V), _mm512_set1_epi32(xv));             \
    }
        const int tail = odd && p == P - 1;
        if (MR < 4) { /* few rows (batch-1 decode): the rolled loop measured faster */
            for (int j = 0; j < 8; j++) {
                __m512i v = _mm512_load_si512(w + (tail ? (2 * j + par) & 7 : 2 * j + par));
                if ((kind & 15) == 4)
                    v = _mm512_and_si512((tail ? j >= 4 : p & 1) ? _mm512_srli_epi16(v, 4) : v, low);
                QV_DOT(v, j)
            }
        } else if (tail) {
#pragma GCC unroll 2
            for (int j = 0; j < 8; j++) {
                const __m512i v = _mm512_load_si512(w + ((2 * j + par) & 7));
                const __m512i q = _mm512_and_si512(j >= 4 ? _mm512_srli_epi16(v, 4) : v, low);
                QV_DOT(q, j)
            }
        } else {
            const __m128i sh = _mm_cvtsi32_si128(4 * (p & 1)); /* int4: the high nibbles for odd p */
#pragma GCC unroll 2
            for (int j = 0; j < 8; j++) {
                __m512i v = _mm512_load_si512(w + 2 * j + par);
                if ((kind & 15) == 4) v = _mm512_and_si512(_mm512_srl_epi16(v, sh), low);
                QV_DOT(v, j)
            }
        }
#undef QV_DOT
        if ((kind & 15) == 4) {
            const __m512 s = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(sb + g * 16)));
            const __m512 mo = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(mb + g * 16)));
            for (int r = 0; r < MR; r++) {
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[r]), _mm512_mul_ps(s, _mm512_set1_ps(dx[(size_t)r * Gp + g])), acc[r]);
                acc[r] = _mm512_fmadd_ps(mo, _mm512_set1_ps(xs[(size_t)r * Gp + g]), acc[r]);
            }
        } else {
            for (int r = 0; r < MR; r++)
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[r]), _mm512_set1_ps(dx[(size_t)r * Gp + g]), acc[r]);
        }
    }
    for (int r = 0; r < MR; r++) {
        __m512 v = acc[r];
        if ((kind & 15) == 8) v = _mm512_mul_ps(osc, _mm512_sub_ps(v, _mm512_set1_ps(128.f * off[r])));
        if (is_bf16) _mm256_storeu_si256((__m256i *)((uint16_t *)y + (size_t)r * ldy), qv_bf16(v));
        else _mm512_storeu_ps((float *)y + (size_t)r * ldy, v);
    }
}

/* Register tiles for many rows: TR activation rows × TV column blocks (16 outputs each) share every
 * weight vector and activation broadcast (TR·TV vpdpbusd per TV weight loads and TR broadcasts). The
 * activations come pre-arranged per row block (qv_arrange: [group][j][row] dwords, [group][row]
 * scales and sums), so one pointer and constant offsets address them all. */
#define QV_TR 6
#define QV_TV 2

/* The 6-row × 2-block tile over all full weight blocks in inline assembly. GCC's allocation of the
 * intrinsic form hoisted the activation broadcasts and spilled them, and a vpdpbusd with a broadcast
 * memory operand spends a load slot per instruction (two 512-bit loads a cycle on Zen 5: the loads,
 * not the multiplies, bound the loop). Here every register is assigned:
 *   zmm0–11  fp32 accumulators (row r, block v in 2r + v)     zmm12–23  int32 group sums (12 + 2r + v)
 *   zmm24/25 the two blocks' weight vectors, then their scales  zmm26     an activation broadcast, then xs
 *   zmm27/28 the blocks' offsets   zmm29 a product   zmm30 an activation scale   zmm31 the 0x0f mask
 * per step j of a group: 2 weight loads, 6 broadcasts, 12 vpdpbusd; per group: 12 cvt, 12 mul and 24
 * FMA (int4) or 12 cvt and 12 FMA (int8). A unit is one 1024-byte weight block per column block: int4,
 * 4 groups (pairs 2b, 2b + 1: low nibbles, then high ones read as 16·q with the scale divided by 16);
 * int8, 2 groups. Activations: qv_arrange's layout (8 steps × 6 rows of dwords a group). */
#define QS(x) #x
#define QT_R(XOFF, J, R, A, B)                                                              \
    "vpbroadcastd " XOFF "+24*" QS(J) "+4*" QS(R) "(%[xg]), %%zmm26\n\t"                   \
    "vpdpbusd %%zmm26, %%zmm24, %%zmm" QS(A) "\n\t"                                         \
    "vpdpbusd %%zmm26, %%zmm25, %%zmm" QS(B) "\n\t"
#define QT_J(J, WOFF, XOFF, AND)                                                            \
    "vmovdqa64 " WOFF "+128*" QS(J) "(%[w]), %%zmm24\n\t"                                   \
    "vmovdqa64 " WOFF "+128*" QS(J) "(%[w],%[bb]), %%zmm25\n\t" AND                         \
    QT_R(XOFF, J, 0, 12, 13) QT_R(XOFF, J, 1, 14, 15) QT_R(XOFF, J, 2, 16, 17)              \
    QT_R(XOFF, J, 3, 18, 19) QT_R(XOFF, J, 4, 20, 21) QT_R(XOFF, J, 5, 22, 23)
/* step j of an odd last pair's group (int4's 32-byte tail): vector (2j + PAR) mod 8, low nibbles for
 * j < 4, high ones (shifted down) after */
#define QT_JT(J, PAR, XOFF, SHIFT)                                                          \
    "vmovdqa64 128*(" QS(J) "&3)+64*" QS(PAR) "(%[w]), %%zmm24\n\t"                        \
    "vmovdqa64 128*(" QS(J) "&3)+64*" QS(PAR) "(%[w],%[bb]), %%zmm25\n\t" SHIFT QT_LOW      \
    QT_R(XOFF, J, 0, 12, 13) QT_R(XOFF, J, 1, 14, 15) QT_R(XOFF, J, 2, 16, 17)              \
    QT_R(XOFF, J, 3, 18, 19) QT_R(XOFF, J, 4, 20, 21) QT_R(XOFF, J, 5, 22, 23)
#define QT_SHR "vpsrlw $4, %%zmm24, %%zmm24\n\tvpsrlw $4, %%zmm25, %%zmm25\n\t"
#define QT_TAIL(PAR, XOFF)                                                                  \
    QT_Z(12, 13) QT_Z(14, 15) QT_Z(16, 17) QT_Z(18, 19) QT_Z(20, 21) QT_Z(22, 23)            \
    QT_JT(0, PAR, XOFF, "") QT_JT(1, PAR, XOFF, "") QT_JT(2, PAR, XOFF, "") QT_JT(3, PAR, XOFF, "") \
    QT_JT(4, PAR, XOFF, QT_SHR) QT_JT(5, PAR, XOFF, QT_SHR) QT_JT(6, PAR, XOFF, QT_SHR)      \
    QT_JT(7, PAR, XOFF, QT_SHR)
#define QT_LOW "vpandd %%zmm31, %%zmm24, %%zmm24\n\tvpandd %%zmm31, %%zmm25, %%zmm25\n\t"
#define QT_HIGH "vpandnd %%zmm24, %%zmm31, %%zmm24\n\tvpandnd %%zmm25, %%zmm31, %%zmm25\n\t"
#define QT_Z(A, B) "vpxord %%zmm" QS(A) ", %%zmm" QS(A) ", %%zmm" QS(A) "\n\tvpxord %%zmm" QS(B) ", %%zmm" QS(B) ", %%zmm" QS(B) "\n\t"
#define QT_DOTS(WOFF, XOFF, AND)                                                            \
    QT_Z(12, 13) QT_Z(14, 15) QT_Z(16, 17) QT_Z(18, 19) QT_Z(20, 21) QT_Z(22, 23)            \
    QT_J(0, WOFF, XOFF, AND) QT_J(1, WOFF, XOFF, AND) QT_J(2, WOFF, XOFF, AND)              \
    QT_J(3, WOFF, XOFF, AND) QT_J(4, WOFF, XOFF, AND) QT_J(5, WOFF, XOFF, AND)              \
    QT_J(6, WOFF, XOFF, AND) QT_J(7, WOFF, XOFF, AND)
#define QT_E4R(DOFF, R, I0, I1, A0, A1)                                                     \
    "vbroadcastss " DOFF "+4*" QS(R) "(%[dg]), %%zmm30\n\t"                                 \
    "vbroadcastss " DOFF "+4*" QS(R) "(%[sg]), %%zmm26\n\t"                                 \
    "vmulps %%zmm30, %%zmm24, %%zmm29\n\t"                                                  \
    "vcvtdq2ps %%zmm" QS(I0) ", %%zmm" QS(I0) "\n\t"                                         \
    "vfmadd231ps %%zmm29, %%zmm" QS(I0) ", %%zmm" QS(A0) "\n\t"                              \
    "vfmadd231ps %%zmm26, %%zmm27, %%zmm" QS(A0) "\n\t"                                      \
    "vmulps %%zmm30, %%zmm25, %%zmm29\n\t"                                                  \
    "vcvtdq2ps %%zmm" QS(I1) ", %%zmm" QS(I1) "\n\t"                                         \
    "vfmadd231ps %%zmm29, %%zmm" QS(I1) ", %%zmm" QS(A1) "\n\t"                              \
    "vfmadd231ps %%zmm26, %%zmm28, %%zmm" QS(A1) "\n\t"
#define QT_HS "vmulps %[sixteenth]%{1to16%}, %%zmm24, %%zmm24\n\tvmulps %[sixteenth]%{1to16%}, %%zmm25, %%zmm25\n\t"
#define QT_E4(SOFF, DOFF, HS)                                                               \
    "vcvtph2ps " SOFF "(%[sb]), %%zmm24\n\t"                                                \
    "vcvtph2ps " SOFF "(%[sb],%[ss]), %%zmm25\n\t"                                          \
    "vcvtph2ps " SOFF "(%[mb]), %%zmm27\n\t"                                                \
    "vcvtph2ps " SOFF "(%[mb],%[ss]), %%zmm28\n\t" HS                                       \
    QT_E4R(DOFF, 0, 12, 13, 0, 1) QT_E4R(DOFF, 1, 14, 15, 2, 3) QT_E4R(DOFF, 2, 16, 17, 4, 5) \
    QT_E4R(DOFF, 3, 18, 19, 6, 7) QT_E4R(DOFF, 4, 20, 21, 8, 9) QT_E4R(DOFF, 5, 22, 23, 10, 11)
#define QT_E8R(DOFF, R, I0, I1, A0, A1)                                                     \
    "vbroadcastss " DOFF "+4*" QS(R) "(%[dg]), %%zmm30\n\t"                                 \
    "vcvtdq2ps %%zmm" QS(I0) ", %%zmm" QS(I0) "\n\t"                                         \
    "vfmadd231ps %%zmm30, %%zmm" QS(I0) ", %%zmm" QS(A0) "\n\t"                              \
    "vcvtdq2ps %%zmm" QS(I1) ", %%zmm" QS(I1) "\n\t"                                         \
    "vfmadd231ps %%zmm30, %%zmm" QS(I1) ", %%zmm" QS(A1) "\n\t"
#define QT_E8(DOFF)                                                                         \
    QT_E8R(DOFF, 0, 12, 13, 0, 1) QT_E8R(DOFF, 1, 14, 15, 2, 3) QT_E8R(DOFF, 2, 16, 17, 4, 5) \
    QT_E8R(DOFF, 3, 18, 19, 6, 7) QT_E8R(DOFF, 4, 20, 21, 8, 9) QT_E8R(DOFF, 5, 22, 23, 10, 11)
#define QT_PF4(OFF)                                                                         \
    "prefetcht0 " OFF "(%[pf])\n\tprefetcht0 " OFF "+64(%[pf])\n\tprefetcht0 " OFF "+128(%[pf])\n\t"  \
    "prefetcht0 " OFF "+192(%[pf])\n\t"
#define QT_ACC_ZERO                                                                         \
    QT_Z(0, 1) QT_Z(2, 3) QT_Z(4, 5) QT_Z(6, 7) QT_Z(8, 9) QT_Z(10, 11)                      \
    "vpbroadcastd %[lowmask], %%zmm31\n\t"
#define QT_ST(A) "vmovups %%zmm" QS(A) ", 64*" QS(A) "(%[acc])\n\t"
#define QT_ACC_STORE                                                                        \
    QT_ST(0) QT_ST(1) QT_ST(2) QT_ST(3) QT_ST(4) QT_ST(5) QT_ST(6) QT_ST(7) QT_ST(8) QT_ST(9) QT_ST(10) QT_ST(11)
#define QT_CLOBBERS                                                                         \
    "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",  \
    "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", \
    "xmm23", "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31"

/* `units` full weight blocks of a 6 × 2 tile, then (tail) an odd last pair, into accm [6][2][16]
 * (overwritten); the units·512 bytes from pf are prefetched on the way (a part of the next tile's
 * weight, or this one's again). A burst of the whole next tile in one call filled the miss buffers
 * and then left the rest of the tile's work without memory traffic: spread over the row blocks, the
 * LM head at 32 rows runs 1.53 → 1.21 ms and a batched decode step ~15 → ~13.6 ms */
static void qt_int4(const uint8_t *w, int64_t bb, const int32_t *xg, const float *dg, const float *sg,
                    const uint16_t *sb, const uint16_t *mb, int64_t ss, int64_t units, int64_t tail, float *accm,
                    const uint8_t *pf) {
    static const int32_t lowmask = 0x0f0f0f0f;
    static const float sixteenth = 1.f / 16;
    __asm__ volatile(QT_ACC_ZERO
                     "test %[n], %[n]\n\t"
                     "jz 2f\n\t"
                     "1:\n\t"
                     QT_PF4("0") QT_DOTS("0", "0", QT_LOW) QT_E4("0", "0", "")
                     QT_DOTS("64", "192", QT_LOW) QT_E4("32", "24", "")
                     QT_PF4("256") QT_DOTS("0", "384", QT_HIGH) QT_E4("64", "48", QT_HS)
                     QT_DOTS("64", "576", QT_HIGH) QT_E4("96", "72", QT_HS)
                     "add $512, %[pf]\n\t"
                     "add $1024, %[w]\n\t"
                     "add $768, %[xg]\n\t"
                     "add $96, %[dg]\n\t"
                     "add $96, %[sg]\n\t"
                     "add $128, %[sb]\n\t"
                     "add $128, %[mb]\n\t"
                     "dec %[n]\n\t"
                     "jnz 1b\n\t"
                     "2:\n\t"
                     "test %[tail], %[tail]\n\t"
                     "jz 3f\n\t"
                     QT_TAIL(0, "0") QT_E4("0", "0", "")
                     QT_TAIL(1, "192") QT_E4("32", "24", "")
                     "3:\n\t"
                     QT_ACC_STORE
                     : [w] "+r"(w), [xg] "+r"(xg), [dg] "+r"(dg), [sg] "+r"(sg), [sb] "+r"(sb), [mb] "+r"(mb),
                       [n] "+r"(units), [pf] "+r"(pf)
                     : [bb] "r"(bb), [ss] "r"(ss), [acc] "r"(accm), [lowmask] "m"(lowmask), [sixteenth] "m"(sixteenth),
                       [tail] "r"(tail)
                     : QT_CLOBBERS);
}

static void qt_int8(const uint8_t *w, int64_t bb, const int32_t *xg, const float *dg, int64_t units, float *accm,
                    const uint8_t *pf) {
    static const int32_t lowmask = 0x0f0f0f0f;
    if (units <= 0) {
        memset(accm, 0, sizeof(float) * 6 * 2 * 16);
        return;
    }
    __asm__ volatile(QT_ACC_ZERO
                     "1:\n\t"
                     QT_PF4("0") QT_DOTS("0", "0", "") QT_E8("0")
                     QT_PF4("256") QT_DOTS("64", "192", "") QT_E8("24")
                     "add $512, %[pf]\n\t"
                     "add $1024, %[w]\n\t"
                     "add $384, %[xg]\n\t"
                     "add $48, %[dg]\n\t"
                     "dec %[n]\n\t"
                     "jnz 1b\n\t"
                     QT_ACC_STORE
                     : [w] "+r"(w), [xg] "+r"(xg), [dg] "+r"(dg), [n] "+r"(units), [pf] "+r"(pf)
                     : [bb] "r"(bb), [acc] "r"(accm), [lowmask] "m"(lowmask)
                     : QT_CLOBBERS);
}

/* TR rows (of a QV_TR-row arranged block) × TV column blocks: block v's weight at wb + v·vbytes, its scales and offsets at sb / mb +
 * v·sstride, its int8 row scales at osc + v·ostride. glu (TV = 2: a gate block and its up block):
 * y gets silu(gate)·up, 16 columns. */
static inline __attribute__((always_inline)) void qv_tile(int kind, int TR, int TV, int glu, const uint8_t *wb,
                                                          int64_t vbytes, const uint16_t *sb, const uint16_t *mb,
                                                          int64_t sstride, const float *osc, int64_t ostride,
                                                          const int32_t *xa, const float *da, const float *sa,
                                                          const float *off, int rows, int K, int Kp, int Gp, void *y,
                                                          int64_t ldy, int is_bf16, const uint8_t *pf) {
    const __m512i low = _mm512_set1_epi8(0x0f);
    const int P = Kp / 64, odd = (kind & 15) == 4 && (P & 1);
    __m512 acc[QV_TR][QV_TV];
    for (int r = 0; r < TR; r++)
        for (int v = 0; v < TV; v++) acc[r][v] = _mm512_setzero_ps();
    int g0 = 0;
    if (TR == 6 && TV == 2) { /* the full weight blocks in assembly, the rest (an odd tail pair) below */
        _Alignas(64) float accm[6 * 2 * 16];
        const int64_t units = (kind & 15) == 4 ? P / 2 : P;
        if ((kind & 15) == 4)
            qt_int4(wb, vbytes, xa, da, sa, sb, mb, 2 * sstride, units, odd, accm, pf);
        else
            qt_int8(wb, vbytes, xa, da, units, accm, pf);
        for (int r = 0; r < TR; r++)
            for (int v = 0; v < TV; v++) acc[r][v] = _mm512_load_ps(accm + 16 * (2 * r + v));
        g0 = (int)units * ((kind & 15) == 4 ? 4 : 2) + 2 * odd;
    }
    for (int g = g0; g < Gp; g++) {
        if (32 * g >= K) break;
        const int p = g >> 1, par = g & 1, tail = odd && p == P - 1;
        const uint8_t *w = wb + (int64_t)((kind & 15) == 8 ? p : p >> 1) * 1024;
        const int32_t *xg = xa + (size_t)g * 8 * QV_TR;
        __m512i ia[QV_TR][QV_TV];
        for (int r = 0; r < TR; r++)
            for (int v = 0; v < TV; v++) ia[r][v] = _mm512_setzero_si512();
        /* int4 outside an odd tail: the group's nibbles are masked in place, the high ones read as
         * 16·q (the 1/16 goes into the scale below), so no shift competes with vpdpbusd */
        const int high = (kind & 15) == 4 && !tail && (p & 1);
        if (!tail) {
            const __m512i mask = high ? _mm512_set1_epi8((char)0xf0) : low;
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++) {
                __m512i wv[QV_TV];
                for (int v = 0; v < TV; v++) {
                    wv[v] = _mm512_load_si512((const __m512i *)(w + v * vbytes) + 2 * j + par);
                    if ((kind & 15) == 4) wv[v] = _mm512_and_si512(wv[v], mask);
                }
                for (int r = 0; r < TR; r++) {
                    const __m512i b = _mm512_set1_epi32(xg[j * QV_TR + r]);
                    for (int v = 0; v < TV; v++) ia[r][v] = _mm512_dpbusd_epi32(ia[r][v], wv[v], b);
                }
            }
        } else {
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++) {
                __m512i wv[QV_TV];
                for (int v = 0; v < TV; v++) {
                    wv[v] = _mm512_load_si512((const __m512i *)(w + v * vbytes) + ((2 * j + par) & 7));
                    wv[v] = _mm512_and_si512(j >= 4 ? _mm512_srli_epi16(wv[v], 4) : wv[v], low);
                }
                for (int r = 0; r < TR; r++) {
                    const __m512i b = _mm512_set1_epi32(xg[j * QV_TR + r]);
                    for (int v = 0; v < TV; v++) ia[r][v] = _mm512_dpbusd_epi32(ia[r][v], wv[v], b);
                }
            }
        }
        if ((kind & 15) == 4) {
            __m512 s[QV_TV], m[QV_TV];
            for (int v = 0; v < TV; v++) {
                s[v] = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(sb + v * sstride + g * 16)));
                if (high) s[v] = _mm512_mul_ps(s[v], _mm512_set1_ps(1.f / 16));
                m[v] = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(mb + v * sstride + g * 16)));
            }
            for (int r = 0; r < TR; r++) {
                const __m512 d = _mm512_set1_ps(da[g * QV_TR + r]), xs = _mm512_set1_ps(sa[g * QV_TR + r]);
                for (int v = 0; v < TV; v++) {
                    acc[r][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[r][v]), _mm512_mul_ps(s[v], d), acc[r][v]);
                    acc[r][v] = _mm512_fmadd_ps(m[v], xs, acc[r][v]);
                }
            }
        } else {
            for (int r = 0; r < TR; r++) {
                const __m512 d = _mm512_set1_ps(da[g * QV_TR + r]);
                for (int v = 0; v < TV; v++) acc[r][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[r][v]), d, acc[r][v]);
            }
        }
    }
    for (int r = 0; r < TR && r < rows; r++) {
        __m512 o[QV_TV];
        for (int v = 0; v < TV; v++) {
            o[v] = acc[r][v];
            if ((kind & 15) == 8)
                o[v] = _mm512_mul_ps(_mm512_loadu_ps(osc + v * ostride), _mm512_sub_ps(o[v], _mm512_set1_ps(128.f * off[r])));
        }
        if (glu) o[0] = silu_mul512(o[0], o[1]);
        for (int v = 0; v < (glu ? 1 : TV); v++) {
            if (is_bf16) _mm256_storeu_si256((__m256i *)((uint16_t *)y + (size_t)r * ldy + 16 * v), qv_bf16(o[v]));
            else _mm512_storeu_ps((float *)y + (size_t)r * ldy + 16 * v, o[v]);
        }
    }
}

/* Six rows' 16-lane vectors reduced at once (a tree: 23 shuffles and ops instead of 6 × 8): lane r
 * of the result (r < 6) is the max / the sum of v[r]'s lanes. Max and integer sums are exact in any
 * order, so the results are those of six separate reductions. */
static const int32_t qv_red_idx[16] = {0, 4, 8, 12, 16, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
static inline __m256 qv_max6(const __m512 v[6]) {
    __m512 t[3];
    for (int p = 0; p < 3; p++) /* chunks 0–1: row 2p's 8 partial maxima, 2–3: row 2p + 1's */
        t[p] = _mm512_max_ps(_mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], 0xee));
    /* chunk k: row k's 4 partials (rows 0–3), then rows 4, 5, 4, 5 */
    __m512 u = _mm512_max_ps(_mm512_shuffle_f32x4(t[0], t[1], 0x88), _mm512_shuffle_f32x4(t[0], t[1], 0xdd));
    __m512 w = _mm512_max_ps(_mm512_shuffle_f32x4(t[2], t[2], 0x88), _mm512_shuffle_f32x4(t[2], t[2], 0xdd));
    u = _mm512_max_ps(u, _mm512_permute_ps(u, 0x4e));
    u = _mm512_max_ps(u, _mm512_permute_ps(u, 0xb1));
    w = _mm512_max_ps(w, _mm512_permute_ps(w, 0x4e));
    w = _mm512_max_ps(w, _mm512_permute_ps(w, 0xb1));
    return _mm512_castps512_ps256(_mm512_permutex2var_ps(u, _mm512_loadu_si512(qv_red_idx), w));
}
static inline __m256i qv_sum6(const __m512i v[6]) {
    __m512i t[3];
    for (int p = 0; p < 3; p++)
        t[p] = _mm512_add_epi32(_mm512_shuffle_i32x4(v[2 * p], v[2 * p + 1], 0x44),
                                _mm512_shuffle_i32x4(v[2 * p], v[2 * p + 1], 0xee));
    __m512i u = _mm512_add_epi32(_mm512_shuffle_i32x4(t[0], t[1], 0x88), _mm512_shuffle_i32x4(t[0], t[1], 0xdd));
    __m512i w = _mm512_add_epi32(_mm512_shuffle_i32x4(t[2], t[2], 0x88), _mm512_shuffle_i32x4(t[2], t[2], 0xdd));
    u = _mm512_add_epi32(u, _mm512_shuffle_epi32(u, (_MM_PERM_ENUM)0x4e));
    u = _mm512_add_epi32(u, _mm512_shuffle_epi32(u, (_MM_PERM_ENUM)0xb1));
    w = _mm512_add_epi32(w, _mm512_shuffle_epi32(w, (_MM_PERM_ENUM)0x4e));
    w = _mm512_add_epi32(w, _mm512_shuffle_epi32(w, (_MM_PERM_ENUM)0xb1));
    return _mm512_castsi512_si256(_mm512_permutex2var_epi32(u, _mm512_loadu_si512(qv_red_idx), w));
}

/* rows [b·6, b·6 + 6) of x → block b's arranged activations (xa: per group, 8 steps × 6 rows of the
 * row's 4 int8 values; da / sa: per group, 6 scales / quantized sums) and off [b·6 ...], exactly as
 * qv_quantize_row rounds them (the same divisions and products, a vector per group: the 6 rows' amax
 * divided at once, the 6 × 8 dwords rearranged by two permutes per output vector instead of 48 scalar
 * stores); rows past M are zeros */
static void qv_quantize_block(int b, int M, const void *x, int64_t ldx, int K, int Kp, int is_bf16, int32_t *xa,
                              float *da, float *sa, float *off) {
    enum { TR = 6 };
    /* output dword o = 6j + r (step j, row r) comes from row pair r/2 lane 8·(r & 1) + j */
    static const int32_t pidx[3][16] = {
        {0, 8, 16, 24, 0, 0, 1, 9, 17, 25, 0, 0, 2, 10, 18, 26},
        {0, 0, 3, 11, 19, 27, 0, 0, 4, 12, 20, 28, 0, 0, 5, 13},
        {21, 29, 0, 0, 6, 14, 22, 30, 0, 0, 7, 15, 23, 31, 0, 0}};
    static const int32_t cidx[3][16] = {
        {0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 1, 9, 0, 0, 0, 0},
        {2, 10, 0, 0, 0, 0, 3, 11, 0, 0, 0, 0, 4, 12, 0, 0},
        {0, 0, 5, 13, 0, 0, 0, 0, 6, 14, 0, 0, 0, 0, 7, 15}};
    static const __mmask16 cmask[3] = {0x0c30, 0x30c3, 0xc30c};
    const int Gp = Kp / 32, esz = is_bf16 ? 2 : 4;
    const int nr = M - b * TR < TR ? M - b * TR : TR;
    const char *xr = (const char *)x + (size_t)b * TR * ldx * esz;
    const __m512i rsel[TR] = {_mm512_set1_epi32(0), _mm512_set1_epi32(1), _mm512_set1_epi32(2),
                              _mm512_set1_epi32(3), _mm512_set1_epi32(4), _mm512_set1_epi32(5)};
    __m256 offv = _mm256_setzero_ps();
    for (int g = 0; g < Gp; g++) {
        const int k = 32 * g, n = K - k <= 0 ? 0 : (K - k >= 32 ? 32 : K - k);
        __m512 a[TR][2], mx[TR];
#pragma GCC unroll 6
        for (int r = 0; r < TR; r++) {
            if (r >= nr || n == 0) {
                a[r][0] = a[r][1] = mx[r] = _mm512_setzero_ps();
                continue;
            }
            const char *xp = xr + (size_t)r * ldx * esz;
            if (is_bf16) {
                const __m512i v = n == 32 ? _mm512_loadu_si512((const void *)((const uint16_t *)xp + k))
                                          : _mm512_maskz_loadu_epi16((__mmask32)((1ull << n) - 1), (const uint16_t *)xp + k);
                a[r][0] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16));
                a[r][1] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16));
            } else {
                const __mmask16 m0 = (__mmask16)(n >= 16 ? 0xffff : (1u << n) - 1u);
                const __mmask16 m1 = (__mmask16)(n >= 32 ? 0xffff : n <= 16 ? 0 : (1u << (n - 16)) - 1u);
                a[r][0] = _mm512_maskz_loadu_ps(m0, (const float *)xp + k);
                a[r][1] = _mm512_maskz_loadu_ps(m1, (const float *)xp + k + 16);
            }
            mx[r] = _mm512_max_ps(_mm512_abs_ps(a[r][0]), _mm512_abs_ps(a[r][1]));
        }
        const __m256 m6 = qv_max6(mx);
        /* lane r: row r's 127 / amax (0 for an all-zero group) and amax / 127 */
        const __m256 c127 = _mm256_set1_ps(127.f);
        const __m256 vi6 = _mm256_maskz_div_ps(_mm256_cmp_ps_mask(m6, _mm256_setzero_ps(), _CMP_GT_OQ), c127, m6);
        const __m256 d6 = _mm256_div_ps(m6, c127);
        __m512i rows[3];
        __m512i qs[TR];
        __m256i q8[TR];
#pragma GCC unroll 6
        for (int r = 0; r < TR; r++) {
            const __m512 vi = _mm512_permutexvar_ps(rsel[r], _mm512_castps256_ps512(vi6));
            const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(a[r][0], vi));
            const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(a[r][1], vi));
            qs[r] = _mm512_add_epi32(q0, q1);
            q8[r] = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm512_cvtepi32_epi8(q0)), _mm512_cvtepi32_epi8(q1), 1);
        }
#pragma GCC unroll 3
        for (int p = 0; p < 3; p++)
            rows[p] = _mm512_inserti64x4(_mm512_castsi256_si512(q8[2 * p]), q8[2 * p + 1], 1);
        int32_t *xo = xa + (size_t)g * 8 * TR;
        for (int o = 0; o < 3; o++) {
            const __m512i ab = _mm512_permutex2var_epi32(rows[0], _mm512_loadu_si512(pidx[o]), rows[1]);
            _mm512_storeu_si512(xo + 16 * o, _mm512_mask_permutexvar_epi32(ab, cmask[o], _mm512_loadu_si512(cidx[o]), rows[2]));
        }
        const __m256 sv = _mm256_mul_ps(d6, _mm256_cvtepi32_ps(qv_sum6(qs)));
        _mm256_mask_storeu_ps(da + g * TR, 0x3f, d6);
        _mm256_mask_storeu_ps(sa + g * TR, 0x3f, sv);
        offv = _mm256_add_ps(offv, sv);
    }
    _mm256_mask_storeu_ps(off + b * TR, (__mmask8)((1u << nr) - 1u), offv);
}

/* arranged activations per cache chunk (rows a thread runs every tile of the weight over): 64 KB to
 * 4 MB measured within noise at 512 rows; row blocks per thread from which threads split rows (and
 * the fewest row blocks in a prompt's work item) */
#define QV_CHUNK_BYTES (256 * 1024)
#define QV_ROWSPLIT_BLOCKS 4
/* glu: N = 2I outputs, the first I a gate and the last I its up projection; y [M, I] = silu(gate)·up */
static int qv_tiled(int kind, const void *x, int64_t ldx, const void *w0, const void *w1, const void *w2, void *y,
                    int64_t ldy, int M, int64_t N, int K, int is_bf16, int nthreads, int glu) {
    const int Kp = (K + 63) / 64 * 64, Gp = Kp / 32, TR = QV_TR, TV = QV_TV;
    const int64_t NB = N / 16, bbytes = (kind & 15) == 4 ? 16 * (int64_t)Kp / 2 : 16 * (int64_t)Kp;
    const int MB = (M + TR - 1) / TR;
    /* the arranged activations, their scales and sums, and the rows' offsets, in the thread's arena */
    const size_t xab = ((size_t)MB * TR * Kp + 63) / 64 * 64, fab = sizeof(float) * (size_t)MB * TR * Gp * 2;
    char *arena = qg_arena_get(xab + fab + sizeof(float) * (size_t)MB * TR);
    if (!arena) return -1;
    int32_t *xa = (int32_t *)arena;
    float *fa = (float *)(arena + xab), *off = (float *)(arena + xab + fab);
    const int esz = is_bf16 ? 2 : 4;
    /* rows per cache chunk: about 256 KB of arranged activations */
    int MC = (QV_CHUNK_BYTES / Kp) / TR * TR;
    if (MC < TR) MC = TR;
    /* tiles: pairs of neighbouring blocks, or (glu) gate block t with up block t + NB/2 */
    const int64_t NT = glu ? NB / 2 : (NB + TV - 1) / TV, vbytes = glu ? NB / 2 * bbytes : bbytes;
    const int64_t sstride = glu ? NB / 2 * 16 * Gp : 16 * Gp, ostride = glu ? NB / 2 * 16 : 16;
    /* prompts: threads split the rows (each quantizes, arranges and multiplies the row blocks it
     * takes: no barrier, its activations stay in its own cache; every thread reads the whole weight,
     * which is small next to the work); decode batches: threads split the columns, so each streams
     * its part of the weight */
    const int by_rows = MB >= QV_ROWSPLIT_BLOCKS * nthreads;
    /* bytes of the next tile's weight one full-tile call prefetches (512 per unit): the row blocks of
     * a chunk take the next tile in turns, so its lines arrive spread over this tile's work */
    const int64_t pfcall = 512 * (int64_t)((kind & 15) == 4 ? Kp / 128 : Kp / 64);
    /* work items (worksplit.h: each thread its own run of them first, then the others' leftovers):
     * prompts, runs of CB row blocks (quantized by the thread that takes them, then multiplied by the
     * whole weight); decode batches, runs of TC tiles (all rows) after the rows are quantized */
    const int nthr = nthreads < WS_MAX_THREADS ? nthreads : WS_MAX_THREADS;
    int CB = MB / (8 * nthr);
    CB = CB < QV_ROWSPLIT_BLOCKS ? QV_ROWSPLIT_BLOCKS : CB > MC / TR ? MC / TR : CB;
    const int64_t TC = NT / (8 * nthr) > 1 ? NT / (8 * nthr) : 1;
    const int64_t nitems = by_rows ? (MB + CB - 1) / CB : (NT + TC - 1) / TC;
    ws_split ws;
    ws_init(&ws, nitems, nthr);
#pragma omp parallel num_threads(nthr)
    {
        const int tid = omp_get_thread_num();
        if (!by_rows) {
#pragma omp for schedule(static)
            for (int b = 0; b < MB; b++)
                qv_quantize_block(b, M, x, ldx, K, Kp, is_bf16, xa + (size_t)b * TR * Kp / 4,
                                  fa + (size_t)b * TR * Gp * 2, fa + (size_t)b * TR * Gp * 2 + (size_t)TR * Gp, off);
        }
        for (int64_t it; (it = ws_next(&ws, tid)) >= 0;) {
            const int bA = by_rows ? (int)(it * CB) : 0, bB = by_rows ? (bA + CB < MB ? bA + CB : MB) : MB;
            const int64_t tA = by_rows ? 0 : it * TC, tB = by_rows ? NT : (tA + TC < NT ? tA + TC : NT);
            if (by_rows)
                for (int b = bA; b < bB; b++)
                    qv_quantize_block(b, M, x, ldx, K, Kp, is_bf16, xa + (size_t)b * TR * Kp / 4,
                                      fa + (size_t)b * TR * Gp * 2, fa + (size_t)b * TR * Gp * 2 + (size_t)TR * Gp, off);
            for (int c0 = bA; c0 < bB; c0 += MC / TR) {
                const int nrb = (bB < c0 + MC / TR ? bB : c0 + MC / TR) - c0; /* row blocks of the chunk */
                for (int64_t t = tA; t < tB; t++) {
                    const int64_t nb = glu ? t : t * TV, ycol = glu ? 16 * t : 16 * nb;
                    const uint8_t *wb = (const uint8_t *)w0 + nb * bbytes;
                    const uint16_t *sb = (kind & 15) == 4 ? (const uint16_t *)w1 + nb * 16 * Gp : NULL;
                    const uint16_t *mb = (kind & 15) == 4 ? (const uint16_t *)w2 + nb * 16 * Gp : NULL;
                    const float *osc = (kind & 15) == 8 ? (const float *)w1 + nb * 16 : NULL;
                    for (int b = c0; b < bB && b < c0 + MC / TR; b++) {
                        const int32_t *xb = xa + (size_t)b * TR * Kp / 4;
                        const float *db = fa + (size_t)b * TR * Gp * 2, *sbk = db + (size_t)TR * Gp;
                        void *yr = (char *)y + ((size_t)b * TR * ldy + ycol) * esz;
                        const int rows = M - b * TR;
                        /* the next tile's weight: row block c0 + i prefetches its bytes [i·pfcall, (i + 1)·pfcall) */
                        const uint8_t *pf = wb;
                        if ((kind & 15) == 4 && t + 1 < NT) {
                            /* and its scales and offsets (int4), slice b - c0 of the chunk's nrb: the
                             * weight's own lines alone left these to demand misses, one line of a
                             * group's sixteen columns at a time (30 layers' products at 32 rows, from
                             * DRAM, alternating in one process: 7.55 → 7.15 ms; a decode step of the
                             * `ci` batch 13.49 → 13.13 ms; prompts the same) */
                            const int64_t nn = glu ? nb + 1 : nb + TV, per = 16 * (int64_t)Gp * 2;
                            const int64_t lo = per * (b - c0) / nrb / 64 * 64, hi = per * (b - c0 + 1) / nrb;
                            for (int v = 0; v < TV && lo < hi; v++) {
                                const int64_t cb = glu ? nn + v * (NB / 2) : nn + v;
                                const char *s0 = (const char *)((const uint16_t *)w1 + cb * 16 * Gp);
                                const char *m0 = (const char *)((const uint16_t *)w2 + cb * 16 * Gp);
                                for (int64_t o = lo; o < hi; o += 64) qg_prefetch(s0 + o), qg_prefetch(m0 + o);
                            }
                        }
                        if (t + 1 < NT) {
                            const int64_t at = (int64_t)(b - c0) * pfcall;
                            if (at < TV * bbytes)
                                pf = (const uint8_t *)w0 + (glu ? (nb + 1 + (at >= bbytes ? NB / 2 : 0)) * bbytes + at % bbytes
                                                                : (nb + TV) * bbytes + at);
                        }
#define QV_TILE(KIND, TR_, TV_, GLU) \
    qv_tile(KIND, TR_, TV_, GLU, wb, vbytes, sb, mb, sstride, osc, ostride, xb, db, sbk, off + b * TR, rows, K, Kp, Gp, yr, ldy, is_bf16, pf)
#define QV_PART(KIND) do { \
    switch (rows) { \
    case 1: if (tv == 2) QV_TILE(KIND, 1, 2, glu); else QV_TILE(KIND, 1, 1, 0); break; \
    case 2: if (tv == 2) QV_TILE(KIND, 2, 2, glu); else QV_TILE(KIND, 2, 1, 0); break; \
    case 3: if (tv == 2) QV_TILE(KIND, 3, 2, glu); else QV_TILE(KIND, 3, 1, 0); break; \
    case 4: if (tv == 2) QV_TILE(KIND, 4, 2, glu); else QV_TILE(KIND, 4, 1, 0); break; \
    default: if (tv == 2) QV_TILE(KIND, 5, 2, glu); else QV_TILE(KIND, 5, 1, 0); break; \
    } } while (0)
                        const int tv = glu || nb + TV <= NB ? 2 : 1;
                        if (rows < TR) { /* a last partial block: its rows only, in C (few registers) */
                            if (kind == (QG_COLS | 4)) QV_PART(QG_COLS | 4);
                            else QV_PART(QG_COLS | 8);
                        } else if (glu) {
                            if (kind == (QG_COLS | 4)) QV_TILE(QG_COLS | 4, TR, 2, 1);
                            else QV_TILE(QG_COLS | 8, TR, 2, 1);
                        } else if (tv == 2) {
                            if (kind == (QG_COLS | 4)) QV_TILE(QG_COLS | 4, TR, 2, 0);
                            else QV_TILE(QG_COLS | 8, TR, 2, 0);
                        } else {
                            if (kind == (QG_COLS | 4)) QV_TILE(QG_COLS | 4, TR, 1, 0);
                            else QV_TILE(QG_COLS | 8, TR, 1, 0);
                        }
#undef QV_PART
#undef QV_TILE
                    }
                }
            }
        }
    }
    return 0;
}
/* rows from which quant_gemm_vnni runs the tiles: 30 layers' linears at 12 rows 3.4 vs 4.1 ms, at 32
 * rows 6.9 vs 8.3; below, the one-block kernel streams a weight from DRAM better (batch-1 decode
 * 214 vs 182 tokens/s with the tiles) */
#define QV_MIN_TILED 12
#endif

#if !QG_FAST && !QG_AVX2
/* The column layout's scalar body (any CPU, e.g. aarch64; slow, but shoal's fused paths run): the
 * arithmetic of int4_rows_scalar / int8_rows_scalar on quantize_row's activations, each code read
 * where to_columns put it (the block layouts above qv_rows). Row r of xq against the 16 outputs of
 * column block wb → o[0..16); int8 bytes are taken as q (byte − 128), so no offset term. */
static void qs_cols(int kind, const uint8_t *wb, const uint16_t *sb, const uint16_t *mb, const float *osc,
                    const int8_t *xq, const float *dx, const float *xs, int K, int Kp, float *o) {
    const int P = Kp / 64, G = (K + 31) / 32;
    for (int i = 0; i < 16; i++) {
        float acc = 0.f;
        for (int g = 0; g < G; g++) {
            const int p = g >> 1, par = g & 1, tail = (kind & 15) == 4 && (P & 1) && p == P - 1;
            int32_t isum = 0;
            for (int e = 0; e < 32; e++) {
                const int lp = ((e >> 2) << 3) | (par << 2) | (e & 3); /* lane position in pair p */
                int w;
                if ((kind & 15) == 8) {
                    w = (int)wb[(int64_t)p * 1024 + (lp >> 2) * 64 + 4 * i + (lp & 3)] - 128;
                } else if (tail) { /* 32 bytes: value j low, j + 32 high */
                    const uint8_t c = wb[(int64_t)(p >> 1) * 1024 + ((lp & 31) >> 2) * 64 + 4 * i + (lp & 3)];
                    w = lp < 32 ? c & 15 : c >> 4;
                } else { /* a 64-byte block: pair p's values in the low (even p) or high (odd p) nibbles */
                    const uint8_t c = wb[(int64_t)(p >> 1) * 1024 + (lp >> 2) * 64 + 4 * i + (lp & 3)];
                    w = (c >> (4 * (p & 1))) & 15;
                }
                isum += w * xq[64 * p + lp];
            }
            if ((kind & 15) == 4)
                acc += (float)isum * dx[g] * qg_half(sb[g * 16 + i]) + qg_half(mb[g * 16 + i]) * xs[g];
            else
                acc += (float)isum * dx[g];
        }
        o[i] = (kind & 15) == 8 ? osc[i] * acc : acc;
    }
}

/* quant_gemm_vnni / _glu on the scalar body: rows quantized once, column blocks (glu: gate block t
 * with up block t + N/32) split across threads */
static int qs_gemm(int kind, const void *x, int64_t ldx, const void *w0, const void *w1, const void *w2, void *y,
                   int64_t ldy, int M, int64_t N, int K, int is_bf16, int nthreads, int glu) {
    const int Kp = (K + 63) / 64 * 64, Gp = Kp / 32;
    const int64_t NB = N / 16, bbytes = (kind & 15) == 4 ? 16 * (int64_t)Kp / 2 : 16 * (int64_t)Kp;
    const int64_t NT = glu ? NB / 2 : NB;
    qg_scratch sc;
    if (qg_scratch_get(M, Kp, &sc)) return -1;
    for (int r = 0; r < M; r++)
        quantize_row((const char *)x + (size_t)r * ldx * (is_bf16 ? 2 : 4), K, Kp, is_bf16, sc.xq + (size_t)r * Kp,
                     sc.dx + (size_t)r * Gp, sc.xs + (size_t)r * Gp);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t t = 0; t < NT; t++)
        for (int r = 0; r < M; r++) {
            float o[2][16];
            for (int v = 0; v < (glu ? 2 : 1); v++) {
                const int64_t nb = t + (glu ? v * (NB / 2) : 0);
                qs_cols(kind, (const uint8_t *)w0 + nb * bbytes, (const uint16_t *)w1 + nb * 16 * Gp,
                        (const uint16_t *)w2 + nb * 16 * Gp, (const float *)w1 + nb * 16, sc.xq + (size_t)r * Kp,
                        sc.dx + (size_t)r * Gp, sc.xs + (size_t)r * Gp, K, Kp, o[v]);
            }
            for (int i = 0; i < 16; i++) {
                const float g = o[0][i];
                st(y, (int64_t)r * ldy + 16 * t + i, glu ? g / (1.f + expf(fminf(-g, 88.f))) * o[1][i] : g, is_bf16);
            }
        }
    return 0;
}
#endif

int quant_gemm_vnni(int kind, const void *x, int64_t ldx, const void *w0, const void *w1, const void *w2, void *y,
                    int64_t ldy, int M, int64_t N, int K, int is_bf16, int nthreads) {
    if ((kind != (QG_COLS | 4) && kind != (QG_COLS | 8)) || M < 1 || N % 16 || K < 1) return -2;
#if QG_AVX2
    return q2_gemm(kind, x, ldx, w0, w1, w2, y, ldy, M, N, K, is_bf16, nthreads, 0);
#elif !QG_FAST
    return qs_gemm(kind, x, ldx, w0, w1, w2, y, ldy, M, N, K, is_bf16, nthreads, 0);
#else
    if (M >= QV_MIN_TILED) return qv_tiled(kind, x, ldx, w0, w1, w2, y, ldy, M, N, K, is_bf16, nthreads, 0);
    const int Kp = (K + 63) / 64 * 64, Gp = Kp / 32;
    const int64_t NB = N / 16, bbytes = (kind & 15) == 4 ? 16 * (int64_t)Kp / 2 : 16 * (int64_t)Kp;
    qg_scratch sc;
    if (qg_scratch_get(M, Kp, &sc)) return -1;
    int8_t *xq = sc.xq;
    float *dx = sc.dx, *xs = sc.xs, *off = sc.off;
    const int esz = is_bf16 ? 2 : 4;
    /* the next block's lines, a few per group, prefetched while this one computes (its first row block) */
    const int pf_per_group = (int)((bbytes / 64 + Gp - 1) / Gp);
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int r = 0; r < M; r++)
            off[r] = qv_quantize_row((const char *)x + (size_t)r * ldx * esz, K, Kp, is_bf16, xq + (size_t)r * Kp,
                                     dx + (size_t)r * Gp, xs + (size_t)r * Gp);
        /* contiguous ranges of column blocks, so that a thread's next block is the one after */
#pragma omp for schedule(static)
        for (int64_t nb = 0; nb < NB; nb++) {
            const uint8_t *wb = (const uint8_t *)w0 + nb * bbytes;
            const uint16_t *sb = (kind & 15) == 4 ? (const uint16_t *)w1 + nb * 16 * Gp : NULL;
            const uint16_t *mb = (kind & 15) == 4 ? (const uint16_t *)w2 + nb * 16 * Gp : NULL;
            const __m512 osc = (kind & 15) == 8 ? _mm512_loadu_ps((const float *)w1 + nb * 16) : _mm512_set1_ps(1.f);
            if (sb) qg_prefetch(sb + 16 * Gp), qg_prefetch(mb + 16 * Gp);
            for (int m0 = 0; m0 < M; m0 += QV_MR) {
                const int8_t *xr = xq + (size_t)m0 * Kp;
                const float *dr = dx + (size_t)m0 * Gp, *sr = xs + (size_t)m0 * Gp;
                void *yr = (char *)y + ((size_t)m0 * ldy + nb * 16) * esz;
                const int npf = m0 == 0 && nb + 1 < NB ? pf_per_group : 0;
                /* literal kinds and row counts: the compiler drops the kind tests and unrolls the rows */
#define QV_CASE(KIND, R) \
    case R: qv_rows(KIND, R, wb, sb, mb, osc, xr, dr, sr, off + m0, K, Kp, Gp, yr, ldy, is_bf16, wb + bbytes, npf); break;
#define QV_CASES(KIND)                                                                                          \
    switch (M - m0 < QV_MR ? M - m0 : QV_MR) {                                                                  \
        QV_CASE(KIND, 1) QV_CASE(KIND, 2) QV_CASE(KIND, 3) QV_CASE(KIND, 4) QV_CASE(KIND, 5) QV_CASE(KIND, 6)   \
        QV_CASE(KIND, 7) QV_CASE(KIND, 8) QV_CASE(KIND, 9) QV_CASE(KIND, 10) QV_CASE(KIND, 11) QV_CASE(KIND, 12) \
    }
                if (kind == (QG_COLS | 4)) QV_CASES(QG_COLS | 4) else QV_CASES(QG_COLS | 8)
#undef QV_CASES
#undef QV_CASE
            }
        }
    }
    return 0;
#endif
}

/* SwiGLU's first half in one pass: y[M, N/2] = silu(x · Wgᵀ) · (x · Wuᵀ) for a column-layout weight whose
 * first N/2 outputs are the gate projection and the last N/2 the up projection (a merged gate_up
 * weight); the products exactly as quant_gemm_vnni's tiles, silu and the product in fp32, y rounded
 * once. Returns 0; -1 when scratch allocation failed; -2 when it does not apply (N % 32, another
 * kind). */
int quant_gemm_vnni_glu(int kind, const void *x, int64_t ldx, const void *w0, const void *w1, const void *w2, void *y,
                        int64_t ldy, int M, int64_t N, int K, int is_bf16, int nthreads) {
    if ((kind != (QG_COLS | 4) && kind != (QG_COLS | 8)) || M < 1 || N % 32 || K < 1) return -2;
#if QG_AVX2
    return q2_gemm(kind, x, ldx, w0, w1, w2, y, ldy, M, N, K, is_bf16, nthreads, 1);
#elif !QG_FAST
    return qs_gemm(kind, x, ldx, w0, w1, w2, y, ldy, M, N, K, is_bf16, nthreads, 1);
#else
    return qv_tiled(kind, x, ldx, w0, w1, w2, y, ldy, M, N, K, is_bf16, nthreads, 1);
#endif
}

/* ------------------------------------------------------------------------------------------------
 * quant_gemm_amx: an int4 or int8 weight in the layouts above against 4–96 bf16 activation rows (batched
 * decode), on AMX-BF16 tiles. Unlike quant_gemv the activations stay bf16: each weight block is
 * decoded to bf16 (w = s·q + m rounded once, through a 32-entry table per pair of groups and one
 * vpermw per 32 weights) into an A tile of 16 output rows × 32 lane-order positions, and the
 * activations are laid out once per call as the matching B tiles (pairs of K positions × rows).
 * Products accumulate in fp32 tiles over the whole of K; y is rounded to bf16 once.
 * Returns 0; -1 when scratch allocation failed; -2 when it does not apply (no AMX, N % 16, K odd,
 * M > 96): the caller runs another kernel (prompts: panel_gemm below).
 * ------------------------------------------------------------------------------------------------ */
#include "amx.h"
#if QG_FAST && defined(AMX_TILES)
#define QG_AMX 1

/* the table for one pair of groups: words 0–15 are s_A·q + m_A for q = 0..15, words 16–31 group B's
 * (s, m: the pair's two scales and offsets, already fp32) */
static inline __m512i qg_table(const float *s, const float *m) {
    const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512 a = _mm512_fmadd_ps(iota, _mm512_set1_ps(s[0]), _mm512_set1_ps(m[0]));
    const __m512 b = _mm512_fmadd_ps(iota, _mm512_set1_ps(s[1]), _mm512_set1_ps(m[1]));
    return (__m512i)_mm512_cvtne2ps_pbh(b, a);
}

/* 64 lane-order codes (one byte each, 0..15) of one pair → two A-tile rows of 32 bf16 */
static inline void qg_decode_pair(__m512i codes, __m512i table, uint16_t *row0, uint16_t *row1) {
    /* word w of a row is lane position w (or 32 + w), which belongs to group (w >> 2) & 1 */
    const long long B = 0x0010001000100010LL; /* words 4–7 of every 8 */
    const __m512i group = _mm512_set_epi64(B, 0, B, 0, B, 0, B, 0);
    const __m512i i0 = _mm512_or_si512(_mm512_cvtepu8_epi16(_mm512_castsi512_si256(codes)), group);
    const __m512i i1 = _mm512_or_si512(_mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(codes, 1)), group);
    _mm512_store_si512(row0, _mm512_permutexvar_epi16(i0, table));
    _mm512_store_si512(row1, _mm512_permutexvar_epi16(i1, table));
}

/* a 16-row block's fp16 scales and offsets (Gp groups a row) → fp32 sf, mf */
static inline __attribute__((always_inline)) void qg_block_scales(const uint16_t *scales, const uint16_t *offs,
                                                                  int64_t nb, int Gp, float *sf, float *mf) {
    const uint16_t *bs = scales + nb * 16 * Gp, *bm = offs + nb * 16 * Gp;
    int64_t o = 0;
    for (; o + 16 <= 16 * (int64_t)Gp; o += 16) {
        _mm512_store_ps(sf + o, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(bs + o))));
        _mm512_store_ps(mf + o, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(bm + o))));
    }
    for (; o < 16 * (int64_t)Gp; o++) sf[o] = _cvtsh_ss(bs[o]), mf[o] = _cvtsh_ss(bm[o]);
}

/* int8: one row's 64 bytes (q + 128) of a pair → row i of A chunks 0 and 1, exactly (2^23 + u −
 * (2^23 + 128) in fp32, then bf16); the row's scale is applied to the output */
static inline __attribute__((always_inline)) void qg_decode_int8_row(const uint8_t *c, uint16_t *ab, int i) {
    const __m512i bias = _mm512_set1_epi32(0x4B000000);
    const __m512 off = _mm512_set1_ps(8388608.f + 128.f);
    for (int h = 0; h < 2; h++) {
        const __m512 lo = _mm512_sub_ps(_mm512_castsi512_ps(_mm512_or_si512(
                              _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c + 32 * h))), bias)), off);
        const __m512 hi = _mm512_sub_ps(_mm512_castsi512_ps(_mm512_or_si512(
                              _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c + 32 * h + 16))), bias)), off);
        _mm512_store_si512(ab + h * 512 + i * 32, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
}

/* int4: one row's 64-byte block of two pairs (two) → row i of A chunks 0..3, or its 32-byte last
 * pair (byte j: value j low, value j + 32 high) → chunks 0 and 1; s, m: the row's fp32 scales and
 * offsets from the block's first group */
static inline __attribute__((always_inline)) void qg_decode_int4_row(const uint8_t *c, const float *s, const float *m,
                                                                     int two, uint16_t *ab, int i) {
    const __m512i low = _mm512_set1_epi8(0x0f);
    if (two) {
        const __m512i v = _mm512_loadu_si512((const void *)c);
        qg_decode_pair(_mm512_and_si512(v, low), qg_table(s, m), ab + i * 32, ab + 512 + i * 32);
        qg_decode_pair(_mm512_and_si512(_mm512_srli_epi16(v, 4), low), qg_table(s + 2, m + 2), ab + 1024 + i * 32,
                       ab + 1536 + i * 32);
    } else {
        const __m256i v = _mm256_loadu_si256((const void *)c);
        const __m256i l = _mm256_and_si256(v, _mm256_set1_epi8(0x0f));
        const __m256i h = _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0f));
        qg_decode_pair(_mm512_inserti64x4(_mm512_castsi256_si512(l), h, 1), qg_table(s, m), ab + i * 32,
                       ab + 512 + i * 32);
    }
}

/* int4, the batched-decode kernel's order for a full 64-byte block (two pairs): word w of the block
 * (bytes 2w, 2w + 1) holds lane values 2w, 2w + 1 of the first pair in nibbles 0 and 2 and of the
 * second in nibbles 1 and 3, so each of A chunks 0..3 is one shift, one masking (which also sets the
 * group bit: lane 2w or 2w + 1 is in group (w >> 1) & 1) and one vpermw per row, with no widening of
 * bytes: chunk 0 = the first pair's even lanes, 1 its odd lanes, 2 and 3 the second pair's. The B
 * tiles take the activations in the matching order (quant_gemm_amx). The default model's four
 * projections, 30 layers at 32 rows: 3–9% faster than through qg_decode_int4_row (a C harness 9%,
 * through the operator 3–5%, within this machine's drift). */
static inline __attribute__((always_inline)) void qg_decode_int4_block(const uint8_t *c, const float *s, const float *m,
                                                                       uint16_t *ab, int i) {
    const __m512i low = _mm512_set1_epi16(0x000f);
    const __m512i group = _mm512_set1_epi64(0x0010001000000000LL); /* words 2, 3 of every 4 */
    const __m512i v = _mm512_loadu_si512((const void *)c);
    const __m512i t0 = qg_table(s, m), t1 = qg_table(s + 2, m + 2);
    /* (a & low) | group: ternary-logic table 0xEA */
    _mm512_store_si512(ab + i * 32, _mm512_permutexvar_epi16(_mm512_ternarylogic_epi32(v, low, group, 0xEA), t0));
    _mm512_store_si512(ab + 512 + i * 32,
                       _mm512_permutexvar_epi16(_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 8), low, group, 0xEA), t0));
    _mm512_store_si512(ab + 1024 + i * 32,
                       _mm512_permutexvar_epi16(_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), low, group, 0xEA), t1));
    _mm512_store_si512(ab + 1536 + i * 32,
                       _mm512_permutexvar_epi16(_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 12), low, group, 0xEA), t1));
}

#endif

/* ------------------------------------------------------------------------------------------------
 * Prompt-sized products (more than 96 rows) on AMX tiles, from a bf16 copy of the weight laid out
 * once as VNNI B tiles ("panels"): for each block of 16 output columns, K / 32 tiles of 16 pairs of
 * K positions (natural order) × 16 columns. quant_panels builds them from the packed int4/int8
 * weight (the lane-order decode of quant_gemm_amx, the same bf16 values, transposed in registers);
 * panel_gemm multiplies: activation rows straight from x as A tiles, 32 rows × 32 columns at a time
 * through 2 × 2 accumulator tiles (C[m][n] lands in y's layout), rows in chunks of ~1 MB of x so
 * that a chunk stays in L2 while every column block streams past it. Needs K % 32 == 0 and N % 16 == 0.
 * ------------------------------------------------------------------------------------------------ */

#ifdef QG_AMX
/* 16 × 16 dwords transposed in registers: on return v[j] holds element j of every input row */
static inline void qg_transpose16(__m512i v[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        v[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        v[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        v[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        v[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++) {
            t[8 * i + j] = _mm512_shuffle_i32x4(v[8 * i + j], v[8 * i + j + 4], 0x88);
            t[8 * i + j + 4] = _mm512_shuffle_i32x4(v[8 * i + j], v[8 * i + j + 4], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        v[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
        v[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
    }
}
#endif

/* panels [N/16][K/32][16 pairs][16 columns] bf16 pairs (uint32) from a packed int4 (kind 4) or
 * int8 (kind 8) weight; int8's row scale is not folded in (panel_gemm applies it). Returns 0, -1
 * when scratch allocation failed, -2 when it does not apply. */
int quant_panels(int kind, const uint8_t *codes, const uint16_t *scales, const uint16_t *offs, uint32_t *panels,
                 int64_t N, int K, int nthreads) {
#ifndef QG_AMX
    (void)kind, (void)codes, (void)scales, (void)offs, (void)panels, (void)N, (void)K, (void)nthreads;
    return -2;
#else
    if ((kind != 4 && kind != 8) || N % 16 || K % 32 || K < 32) return -2;
    const int Kp = (K + 63) / 64 * 64, P = Kp / 64, Gp = Kp / 32, KN = K / 32;
    const size_t sfp = ((size_t)16 * Gp + 15) / 16 * 16;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        /* per thread: the lane-order decode of one 64-byte block (4 chunks × 16 rows × 32 bf16) and
         * the block's scales and offsets in fp32 */
        uint16_t *ab = aligned_alloc(64, 4096 + 2 * sfp * 4);
        if (!ab) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
            float *sf = (float *)(ab + 2048), *mf = sf + sfp;
#pragma omp for schedule(static)
            for (int64_t nb = 0; nb < N / 16; nb++) {
                uint32_t *dst = panels + (size_t)nb * KN * 256;
                if (kind == 4) qg_block_scales(scales, offs, nb, Gp, sf, mf);
                for (int p = 0; p < P; p += (kind == 4 ? 2 : 1)) {
                    const int two = kind == 4 && p + 2 <= P;
                    for (int i = 0; i < 16; i++) {
                        const int64_t n = nb * 16 + i;
                        if (kind == 8)
                            qg_decode_int8_row(codes + n * (int64_t)Kp + 64 * p, ab, i);
                        else
                            qg_decode_int4_row(codes + n * (int64_t)P * 32 + 32 * p, sf + i * Gp + 2 * p,
                                               mf + i * Gp + 2 * p, two, ab, i);
                    }
                    /* each decoded chunk (16 rows × 16 lane dwords) transposed: vector j is lane
                     * dword d = 16·(q & 1) + j of pair p + q / 2 for the 16 rows, i.e. natural dword
                     * e = 16·((d >> 1) & 1) + 2·(d >> 2) + (d & 1): row e & 15 of tile 2·(p + q/2) + e/16 */
                    const int nch = two ? 4 : 2;
                    for (int q = 0; q < nch; q++) {
                        __m512i v[16];
                        for (int i = 0; i < 16; i++) v[i] = _mm512_load_si512(ab + q * 512 + i * 32);
                        qg_transpose16(v);
                        for (int j = 0; j < 16; j++) {
                            const int d = 16 * (q & 1) + j, e = 16 * ((d >> 1) & 1) + 2 * (d >> 2) + (d & 1);
                            const int c = 2 * (p + q / 2) + e / 16;
                            if (c < KN) _mm512_store_si512(dst + (size_t)c * 256 + (e & 15) * 16, v[j]);
                        }
                    }
                }
            }
        }
        free(ab);
    }
    return failed ? -1 : 0;
#endif
}

#define PG_CHUNK_BYTES (1 << 20) /* activation rows per chunk: about 1 MB of x (half of L2) */

/* y [M, N] bf16 = x [M, K] bf16 · panels (quant_panels)ᵀ, times oscale[n] when oscale is given (the
 * int8 row scales). Returns 0, -1 when scratch allocation failed, -2 when it does not apply. */
int panel_gemm(const uint16_t *x, int64_t ldx, const uint32_t *panels, const float *oscale, uint16_t *y,
               int64_t ldy, int M, int64_t N, int K, int nthreads) {
#ifndef QG_AMX
    (void)x, (void)ldx, (void)panels, (void)oscale, (void)y, (void)ldy, (void)M, (void)N, (void)K, (void)nthreads;
    return -2;
#else
    if (M < 1 || N % 16 || K % 32 || K < 32 || !amx_permitted()) return -2;
    const int KN = K / 32;
    const int64_t NB = N / 16, NB2 = (NB + 1) / 2;
    static const uint32_t zero_tile[256] __attribute__((aligned(64))) = {0};
    /* rows per chunk: a multiple of 32 with the chunk's x near PG_CHUNK_BYTES, at least 64 */
    const int MC = (int)(PG_CHUNK_BYTES / (2 * K) / 32 * 32) < 64 ? 64 : (int)(PG_CHUNK_BYTES / (2 * K) / 32 * 32);
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        /* per thread: C staging and two zero-padded A tiles for a chunk's last rows */
        const size_t tail = ((size_t)16 * K * 2 + 63) / 64 * 64;
        char *buf = aligned_alloc(64, 1024 + 2 * tail);
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
            float *cs = (float *)buf;
            uint16_t *tl[2] = {(uint16_t *)(buf + 1024), (uint16_t *)(buf + 1024 + tail)};
            amx_configure();
            for (int mc = 0; mc < M; mc += MC) {
                const int mend = mc + MC < M ? mc + MC : M;
#pragma omp for schedule(static)
                for (int64_t jb = 0; jb < NB2; jb++) {
                    const uint32_t *b0 = panels + (size_t)(2 * jb) * KN * 256;
                    const uint32_t *b1 = 2 * jb + 1 < NB ? b0 + (size_t)KN * 256 : NULL; /* NULL: zero columns */
                    for (int m0 = mc; m0 < mend; m0 += 32) {
                        const uint16_t *a[2];
                        int64_t lda[2];
                        for (int mi = 0; mi < 2; mi++) {
                            const int r0 = m0 + 16 * mi, valid = mend - r0 < 16 ? (mend - r0 < 0 ? 0 : mend - r0) : 16;
                            if (valid == 16) {
                                a[mi] = x + (int64_t)r0 * ldx, lda[mi] = ldx * 2;
                            } else if (valid > 0) {
                                for (int i = 0; i < 16; i++) {
                                    if (i < valid) memcpy(tl[mi] + (size_t)i * K, x + (int64_t)(r0 + i) * ldx, (size_t)K * 2);
                                    else memset(tl[mi] + (size_t)i * K, 0, (size_t)K * 2);
                                }
                                a[mi] = tl[mi], lda[mi] = (int64_t)K * 2;
                            } else {
                                a[mi] = NULL, lda[mi] = 0;
                            }
                        }
                        _tile_zero(0);
                        _tile_zero(1);
                        _tile_zero(2);
                        _tile_zero(3);
                        for (int c = 0; c < KN; c++) {
                            _tile_loadd(4, a[0] + c * 32, lda[0]);
                            _tile_loadd(6, b0 + (size_t)c * 256, 64);
                            _tile_dpbf16ps(0, 4, 6);
                            _tile_loadd(7, b1 ? b1 + (size_t)c * 256 : zero_tile, 64);
                            _tile_dpbf16ps(1, 4, 7);
                            if (a[1]) {
                                _tile_loadd(5, a[1] + c * 32, lda[1]);
                                _tile_dpbf16ps(2, 5, 6);
                                _tile_dpbf16ps(3, 5, 7);
                            }
                        }
                        for (int t = 0; t < 4; t++) {
                            const int mi = t >> 1, ni = t & 1;
                            const int64_t nb = 2 * jb + ni, r0 = m0 + 16 * mi;
                            if (nb >= NB || r0 >= mend) continue;
                            switch (t) {
                                case 0: _tile_stored(0, cs, 64); break;
                                case 1: _tile_stored(1, cs, 64); break;
                                case 2: _tile_stored(2, cs, 64); break;
                                default: _tile_stored(3, cs, 64);
                            }
                            const __m512 sc = oscale ? _mm512_loadu_ps(oscale + nb * 16) : _mm512_set1_ps(1.f);
                            const int valid = mend - r0 < 16 ? (int)(mend - r0) : 16;
                            for (int i = 0; i < valid; i++) {
                                __m512 v = _mm512_load_ps(cs + 16 * i);
                                if (oscale) v = _mm512_mul_ps(v, sc);
                                _mm256_storeu_si256((__m256i *)(y + (r0 + i) * ldy + nb * 16), bf16x16(v));
                            }
                        }
                    }
                }
            }
            _tile_release();
        }
        free(buf);
    }
    return failed ? -1 : 0;
#endif
}

int quant_gemm_amx_available(void) {
#ifdef QG_AMX
    return amx_permitted();
#else
    return 0;
#endif
}

int quant_gemm_amx(int kind, const uint16_t *x, int64_t ldx, const uint8_t *codes, const uint16_t *scales,
                   const uint16_t *offs, uint16_t *y, int64_t ldy, int M, int64_t N, int K, int nthreads) {
#ifndef QG_AMX
    (void)kind, (void)x, (void)ldx, (void)codes, (void)scales, (void)offs, (void)y, (void)ldy, (void)M, (void)N, (void)K;
    (void)nthreads;
    return -2;
#else
    if ((kind != 4 && kind != 8) || M < 1 || M > 96 || N % 16 || K % 2 || !amx_permitted()) return -2;
    const int Kp = (K + 63) / 64 * 64, P = Kp / 64, KC = Kp / 32, MB = (M + 15) / 16, Gp = Kp / 32;
    /* B tiles: xb[kc][mb] = 16 rows (a pair of K positions each) × 16 activation rows, 1 KB each.
     * int4 pairs in full 64-byte blocks (qg_decode_int4_block): chunk kc holds lanes of parity kc & 1
     * of pair kc >> 1, its row r K positions 64·(kc >> 1) + 32·(r & 1) + 4·(r >> 1) + (kc & 1) and 2
     * further (the low or the high halves of two x dwords). Otherwise (int8, int4's 32-byte last
     * pair) chunk kc is half kc & 1 of pair kc >> 1, lane dword d holding x dword
     * 16·((d>>1)&1) + 2·(d>>2) + (d&1). */
    uint32_t *xb = aligned_alloc(64, (size_t)KC * MB * 1024);
    if (!xb) return -1;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                _mm512_set1_epi32((int)(ldx / 2)));
#pragma omp for schedule(static)
        for (int kc = 0; kc < KC; kc++) {
            for (int mb = 0; mb < MB; mb++) {
                const int valid = M - 16 * mb < 16 ? M - 16 * mb : 16;
                const __mmask16 mk = (__mmask16)((1u << valid) - 1);
                const uint32_t *base = (const uint32_t *)(x + (int64_t)16 * mb * ldx);
                uint32_t *dst = xb + ((int64_t)kc * MB + mb) * 256;
                if (kind == 4 && (kc >> 1) < P - (P & 1)) {
                    const int sub = kc & 1;
                    const __m512i half = _mm512_set1_epi32(0xffff);
                    for (int r = 0; r < 16; r++) {
                        const int k0 = 64 * (kc >> 1) + 32 * (r & 1) + 4 * (r >> 1) + sub, k1 = k0 + 2;
                        const __m512i a = k0 < K ? _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mk, rows, base + k0 / 2, 4)
                                                 : _mm512_setzero_si512();
                        const __m512i b = k1 < K ? _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mk, rows, base + k1 / 2, 4)
                                                 : _mm512_setzero_si512();
                        /* x[k0] | x[k1] << 16: the low halves (k even) or the high ones */
                        const __m512i v = sub ? _mm512_or_si512(_mm512_srli_epi32(a, 16), _mm512_andnot_si512(half, b))
                                              : _mm512_or_si512(_mm512_and_si512(a, half), _mm512_slli_epi32(b, 16));
                        _mm512_store_si512(dst + r * 16, v);
                    }
                    continue;
                }
                for (int r = 0; r < 16; r++) {
                    const int d = (kc & 1) * 16 + r;
                    const int src = (kc >> 1) * 32 + 16 * ((d >> 1) & 1) + 2 * (d >> 2) + (d & 1);
                    const __m512i v = src < K / 2 ? _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mk, rows, base + src, 4)
                                                  : _mm512_setzero_si512();
                    _mm512_store_si512(dst + r * 16, v);
                }
            }
        }
        /* A tiles for one 64-byte block: 4 chunks × 16 rows × 32 bf16; C staging 16 × 16 fp32; the
         * block's scales and offsets in fp32 (16 rows × Gp each, converted 16 at a time) */
        const size_t sfp = ((size_t)16 * Gp + 15) / 16 * 16;
        uint16_t *ab = aligned_alloc(64, 4 * 1024 + 1024 + 2 * sfp * 4);
        if (!ab) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
            float *cs = (float *)(ab + 4 * 512), *sf = cs + 256, *mf = sf + sfp;
            amx_configure();
#pragma omp for schedule(static)
            for (int64_t nb = 0; nb < N / 16; nb++) {
                if (kind == 4) qg_block_scales(scales, offs, nb, Gp, sf, mf);
                for (int mb = 0; mb < MB; mb++) amx_zero(2 + mb);
                /* int8: the row's scale multiplies the output */
                for (int p = 0; kind == 8 && p < P; p++) {
                    for (int i = 0; i < 16; i++) {
                        const uint8_t *c = codes + (nb * 16 + i) * (int64_t)Kp + 64 * p;
                        if (nb + 1 < N / 16) qg_prefetch(c + 16 * (int64_t)Kp);
                        qg_decode_int8_row(c, ab, i);
                    }
                    for (int q = 0; q < 2; q++) {
                        _tile_loadd(0, ab + q * 512, 64);
                        for (int mb = 0; mb < MB; mb++) amx_dp(2 + mb, xb + ((int64_t)(2 * p + q) * MB + mb) * 256);
                    }
                }
                for (int p = 0; kind == 4 && p < P; p += 2) {
                    const int two = p + 2 <= P; /* a full 64-byte block of two pairs, else the 32-byte tail */
                    for (int i = 0; i < 16; i++) {
                        const int64_t n = nb * 16 + i;
                        const uint8_t *c = codes + n * (int64_t)P * 32 + 32 * p;
                        const float *s = sf + i * Gp + 2 * p, *m = mf + i * Gp + 2 * p;
                        /* this row's line of the next block (16 rows on), one prefetch per load so
                         * they spread over the block's work (a burst per block waits on the line
                         * fill buffers): eager 32-row decode 2.23 -> 1.98 s, vs 2.09 with a burst */
                        if (nb + 1 < N / 16) {
                            qg_prefetch(c + 16 * (int64_t)P * 32);
                            if (p == 0) qg_prefetch(scales + (n + 16) * Gp), qg_prefetch(offs + (n + 16) * Gp);
                        }
                        if (two)
                            qg_decode_int4_block(c, s, m, ab, i);
                        else
                            qg_decode_int4_row(c, s, m, 0, ab, i);
                    }
                    for (int q = 0; q < (two ? 4 : 2); q++) {
                        const int kc = 2 * p + q;
                        _tile_loadd(0, ab + q * 512, 64);
                        for (int mb = 0; mb < MB; mb++) amx_dp(2 + mb, xb + ((int64_t)kc * MB + mb) * 256);
                    }
                }
                /* C[i][j] = output row nb·16 + i of activation row mb·16 + j → y[row][n] */
                for (int mb = 0; mb < MB; mb++) {
                    amx_store(2 + mb, cs, 64);
                    if (kind == 8) { /* row i of the tile is output row nb·16 + i: its scale */
                        const float *sc = (const float *)scales + nb * 16;
                        for (int i = 0; i < 16; i++)
                            _mm512_store_ps(cs + 16 * i, _mm512_mul_ps(_mm512_load_ps(cs + 16 * i), _mm512_set1_ps(sc[i])));
                    }
                    const int valid = M - 16 * mb < 16 ? M - 16 * mb : 16;
                    const __m512i col = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                           _mm512_set1_epi32(16));
                    for (int j = 0; j < valid; j++) {
                        const __m512 v = _mm512_i32gather_ps(col, cs + j, 4);
                        _mm256_storeu_si256((__m256i *)(y + (int64_t)(16 * mb + j) * ldy + nb * 16),
                                            bf16x16(v));
                    }
                }
            }
            _tile_release();
        }
        free(ab);
    }
    free(xb);
    return failed ? -1 : 0;
#endif
}
