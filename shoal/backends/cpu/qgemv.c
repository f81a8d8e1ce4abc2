/* Weight-only quantized matrix × few-rows products for decode (shoal/backends/cpu/kernels.py, the
 * `quant_gemv` ops), built into the same library as kernels.c.
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
 */
#include <math.h>
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

#include "scalar.h"

#define QG_MAXR 4   /* activation rows per pass over the weights */
#define QG_CHUNK 64 /* output rows per work item */
#define QG_STACK 16384 /* bytes of quantized activations kept on the stack */

/* 1 when the VNNI path was compiled (the scalar path is a correct but slow reference) */
int qgemv_fast(void) { return QG_FAST; }

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

/* One activation row x[0..K) → xq [Kp] int8 in lane order, dx [Kp/32] group scales, xs [Kp/32]
 * exact group sums; returns Σ_g dx_g · Σ xq_g (for the int8 weights' +128 offset). */
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
            float amax = 0.f, sum = 0.f;
            for (int i = 0; i < 32; i++) {
                amax = fabsf(t[i]) > amax ? fabsf(t[i]) : amax;
                sum += t[i];
            }
            const float inv = amax > 0.f ? 127.f / amax : 0.f;
            int qsum = 0;
            for (int i = 0; i < 32; i++) {
                const int v = (int)nearbyintf(t[i] * inv);
                q[32 * g + i] = (int8_t)v;
                qsum += v;
            }
            const int gi = p0 / 32 + g;
            dx[gi] = amax / 127.f;
            xs[gi] = sum;
            offset += dx[gi] * (float)qsum;
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

/* y[M, N] = x[M, K] · Wᵀ for a repacked int4 (kind 4) or int8 (kind 8) weight; x rows `ldx` elements
 * apart, y rows `ldy` apart, both bf16 when is_bf16 else fp32. int4: w0 = codes [N, Kp/2],
 * w1 = fp16 scales [N, Kp/32], w2 = fp16 offsets [N, Kp/32]; int8: w0 = bytes [N, Kp], w1 = fp32
 * scales [N], w2 unused. Returns 0, or -1 when scratch memory could not be allocated. */
int quant_gemv(int kind, const void *x, int64_t ldx, const void *w0, const void *w1, const void *w2, void *y,
               int64_t ldy, int M, int64_t N, int K, int is_bf16, int nthreads) {
    const int Kp = (K + 63) / 64 * 64, P = Kp / 64, Gp = Kp / 32, G = (K + 31) / 32;
    /* scratch for the quantized activations: on the stack for decode sizes, else the heap */
    _Alignas(64) int8_t xq_stack[QG_STACK];
    float f_stack[QG_STACK / 8];
    const size_t nxq = (size_t)M * Kp, nf = (size_t)M * 2 * Gp + (size_t)M;
    const int heap = nxq > sizeof(xq_stack) || nf > sizeof(f_stack) / sizeof(float);
    int8_t *xq = heap ? aligned_alloc(64, (nxq + 63) / 64 * 64) : xq_stack;
    float *f = heap ? malloc(sizeof(float) * nf) : f_stack;
    if (!xq || !f) {
        if (heap) {
            free(xq);
            free(f);
        }
        return -1;
    }
    float *dx = f, *xs = f + (size_t)M * Gp, *off = f + (size_t)M * 2 * Gp;
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
#else
            if (kind == 4)
                int4_rows_scalar(w0, w1, w2, n0, n1, P, G, xr, dr, sr, Kp, R, yr, ldy, is_bf16);
            else
                int8_rows_scalar(w0, w1, n0, n1, P, xr, dr, off + r0, Kp, R, yr, ldy, is_bf16);
#endif
        }
    }
    if (heap) {
        free(xq);
        free(f);
    }
    return 0;
}
