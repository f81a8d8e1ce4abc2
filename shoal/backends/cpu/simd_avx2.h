/* AVX2 helpers for shoal's CPU kernels (kernels.c): the 8-lane twins of scalar.h's AVX-512 ones, for
 * the avx2 tier (-march=x86-64-v3: AVX2, FMA, F16C, no AVX-512; e.g. AMD Zen 3, Intel Haswell to
 * Alder Lake). SHOAL_AVX2 is defined exactly when the compiler targets AVX2 and FMA but not
 * AVX-512F, so the avx512 and amx tiers keep their own bodies. AVX2 has no bf16 arithmetic: bf16
 * is widened to fp32 (shifted left 16), computed in fp32 and rounded back to nearest even as
 * scalar.h's f32_to_bf16. */
#ifndef SHOAL_CPU_SIMD_AVX2_H
#define SHOAL_CPU_SIMD_AVX2_H
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#include <immintrin.h>
#include <stdint.h>

#include "scalar.h"
#define SHOAL_AVX2 1

/* 8 bf16 widened to fp32 */
static inline __m256 bf16x8_load(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* 8 elements from idx on, bf16 (widened) or fp32 */
static inline __m256 load8(const void *src, int64_t idx, int is_bf16) {
    return is_bf16 ? bf16x8_load((const uint16_t *)src + idx) : _mm256_loadu_ps((const float *)src + idx);
}

/* 8 fp32 rounded to bf16 exactly as f32_to_bf16: nearest even, a NaN stays a (quiet) NaN. (Unlike
 * vcvtneps2bf16, fp32 denormals are rounded, not flushed to zero; activations never hold any.) */
static inline __m128i bf16x8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
    /* every lane ≤ 0xffff: the unsigned saturation of the pack never applies */
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

/* 8 elements from idx on, rounded to bf16 when is_bf16 */
static inline void store8(void *dst, int64_t idx, __m256 v, int is_bf16) {
    if (is_bf16) _mm_storeu_si128((__m128i *)((uint16_t *)dst + idx), bf16x8(v));
    else _mm256_storeu_ps((float *)dst + idx, v);
}

/* x rounded to bf16 and back (round_bf16's twin: finite inputs) */
static inline __m256 round_bf16_256(__m256 x) {
    __m256i u = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
    return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xffff0000u)));
}

/* The sum of the 16 lanes [lo | hi] in exactly the order of GCC's _mm512_reduce_add_ps (halves,
 * then quarters, then lanes {0,1}+{2,3}, then lane 0 + lane 1), so a 16-lane accumulation kept in
 * two ymm halves reduces to the AVX-512 body's bits. */
static inline float reduce16_add(__m256 lo, __m256 hi) {
    const __m256 t3 = _mm256_add_ps(hi, lo);
    const __m128 t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
    const __m128 t8 = _mm_add_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtss_f32(t8) + _mm_cvtss_f32(_mm_shuffle_ps(t8, t8, _MM_SHUFFLE(1, 1, 1, 1)));
}

static inline float reduce8_add(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float reduce8_max(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

/* lanes l < n all ones (n ≤ 0: none, n ≥ 8: all) */
static inline __m256i first_lanes8(int64_t n) {
    const int k = n < 0 ? 0 : n > 8 ? 8 : (int)n;
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* 2^n for integer lanes -126 ≤ n ≤ 127 */
static inline __m256 pow2i8(__m256i n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23));
}

/* 2^t for -149 ≤ t ≤ 127.5: exp512's polynomial on the fraction, then p · 2^n as two exact powers
 * of two (n split in halves, each a normal number) so that the one rounding, also into the
 * denormals, is vscalefps's: exp256 gives exp512's bits */
static inline __m256 exp2_256(__m256 t) {
    const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(t, n);
    __m256 p = _mm256_set1_ps(1.5353362e-4f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3398874e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6180369e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5503406e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022652e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
    const __m256i ni = _mm256_cvtps_epi32(n), n1 = _mm256_srai_epi32(ni, 1);
    return _mm256_mul_ps(_mm256_mul_ps(p, pow2i8(n1)), pow2i8(_mm256_sub_epi32(ni, n1)));
}

/* e^x for x ≤ 88 (softmax arguments, silu's e^-g): exp512's twin, the same bits */
static inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-103.f));
    return exp2_256(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)));
}
#endif
#endif
