/* shoal's CPU kernels, compiled once per ISA tier (isa.py: generic, avx2, avx512, amx; never
 * -march=native) and called through ctypes with raw pointers; see shoal/backends/cpu/kernels.py.
 * Plain C with AVX-512 bodies where the compiler targets AVX-512, AVX2 bodies (simd_avx2.h: fp32 FMA
 * on widened bf16) where it targets AVX2 + FMA but not AVX-512, and a scalar path otherwise. The
 * OpenMP runtime is the one torch already loaded (same soname), so the threads are torch's.
 *
 * paged_decode_attention: one new query token per sequence against its paged K/V cache, read in
 * place through the block table (no gathered copy). Work item = (sequence, KV head): the G query
 * heads sharing that KV head are scored together, so each K/V row is read once. Two passes per
 * item: scores for every cached token (fp32, softmax with the max subtracted), then the weighted
 * sum of V rows. Accumulation in fp32, bf16 rounded to nearest even on output.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "amx.h"
#include "kernels.h" /* every exported kernel's signature, checked against the definitions here */
#include "scalar.h"
#include "simd_avx2.h"
#include "worksplit.h"

#ifdef __AVX512F__
static inline __m512 load16(const void *src, int64_t idx, int is_bf16) {
    if (is_bf16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)src + idx));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)src + idx);
}

#endif

/* s[t] = exp(s[t] - max) over s[0..n); returns 1 / Σ s (the normalisation is applied to the output) */
static float softmax_unnormalised(float *s, int64_t n) {
    float m = -INFINITY, sum = 0.f;
    int64_t t = 0;
#ifdef __AVX512F__
    __m512 vm = _mm512_set1_ps(-INFINITY);
    for (; t + 16 <= n; t += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(s + t));
    /* the last n % 16 in one masked vector, as the exponentials below (scalar expf for them cost
     * ~0.7 ms of a 32-row decode step's attention over 30 layers) */
    const __mmask16 tail = (__mmask16)((1u << (n - t)) - 1u);
    if (tail) vm = _mm512_max_ps(vm, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail, s + t));
    m = _mm512_reduce_max_ps(vm);
    t = 0;
    vm = _mm512_set1_ps(m);
    __m512 vs = _mm512_setzero_ps();
    for (; t + 16 <= n; t += 16) {
        __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + t), vm));
        _mm512_storeu_ps(s + t, e);
        vs = _mm512_add_ps(vs, e);
    }
    if (tail) {
        const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + t), vm));
        _mm512_mask_storeu_ps(s + t, tail, e);
        vs = _mm512_mask_add_ps(vs, tail, vs, e);
        t = n;
    }
    sum = _mm512_reduce_add_ps(vs);
#elif defined(SHOAL_AVX2)
    /* the same with 8 lanes; the last n % 8 through a lane mask (-inf in, 0 out) */
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    __m256 vm = ninf;
    for (; t + 8 <= n; t += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(s + t));
    const __m256i tail = first_lanes8(n - t);
    if (t < n) vm = _mm256_max_ps(vm, _mm256_blendv_ps(ninf, _mm256_maskload_ps(s + t, tail), _mm256_castsi256_ps(tail)));
    m = reduce8_max(vm);
    t = 0;
    vm = _mm256_set1_ps(m);
    __m256 vs = _mm256_setzero_ps();
    for (; t + 8 <= n; t += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + t), vm));
        _mm256_storeu_ps(s + t, e);
        vs = _mm256_add_ps(vs, e);
    }
    if (t < n) {
        const __m256 e = _mm256_and_ps(exp256(_mm256_sub_ps(_mm256_maskload_ps(s + t, tail), vm)),
                                       _mm256_castsi256_ps(tail));
        _mm256_maskstore_ps(s + t, tail, e);
        vs = _mm256_add_ps(vs, e);
        t = n;
    }
    sum = reduce8_add(vs);
#else
    for (; t < n; t++) m = s[t] > m ? s[t] : m;
    t = 0;
#endif
    for (; t < n; t++) {
        s[t] = expf(s[t] - m);
        sum += s[t];
    }
    return sum > 0.f ? 1.f / sum : 0.f;
}

/* a prefetch the compiler cannot drop: GCC deleted loops of _mm_prefetch calls here (no instruction
 * was emitted at all: the previous per-block prefetch never ran), since a loop whose body only
 * prefetches counts as having no effect */
#if defined(__x86_64__) || defined(__i386__)
#define SHOAL_PREFETCH(insn, ptr) __asm__ volatile(insn " %0" : : "m"(*(const char *)(ptr)))
#endif

/* Prefetch every K and V row of a sequence (all KV heads) into L2 before its first work item runs.
 * The cache is read in scattered blocks, so the hardware prefetcher loses the stream at every block
 * boundary; issuing the whole sequence's lines at once keeps many misses in flight. Measured on the
 * attention of 30 layers × 32 sequences × ~190 tokens from DRAM: ~20 → ~13 ms (prefetching one
 * or two blocks ahead of the compute instead: ~14 ms). K and V lines interleaved. */
static inline void prefetch_sequence(const void *k_cache, const void *v_cache, const int64_t *tab, int64_t len,
                                     int BS, int HKV, int D, int DV, int elem) {
#if defined(__x86_64__) || defined(__i386__)
    const int64_t kb = (int64_t)BS * HKV * D * elem, vb = (int64_t)BS * HKV * DV * elem;
    for (int64_t blk = 0; blk * BS < len; blk++) {
        const char *pk = (const char *)k_cache + tab[blk] * kb, *pv = (const char *)v_cache + tab[blk] * vb;
        for (int64_t o = 0; o < kb || o < vb; o += 64) {
            if (o < kb) SHOAL_PREFETCH("prefetcht1", pk + o);
            if (o < vb) SHOAL_PREFETCH("prefetcht1", pv + o);
        }
    }
#else
    (void)k_cache, (void)v_cache, (void)tab, (void)len, (void)BS, (void)HKV, (void)D, (void)DV, (void)elem;
#endif
}

/* The next sequence's K and V lines, prefetched a few at a time from inside the weighted sum of the
 * one before it, so that its loads overlap that compute. A burst of a whole sequence's prefetches
 * instead stalls the compute while the line fill buffers drain. The attention of 30 layers over the
 * `ci` batch's shapes (32 sequences of ~160 tokens, caches from DRAM), against the burst per
 * sequence, two builds in one process, alternating, identical results: 8.90 → 8.37 and
 * 7.27 → 6.87 ms (medians of 40). A cursor with nothing started (nblk 0) or spent does nothing. */
typedef struct {
    const char *k, *v;
    const int64_t *tab;
    int64_t nblk, blk, off, kb, vb, per; /* per: steps (a K and a V line each) per pf_advance */
} pf_cursor;

/* start the cursor on a sequence, its lines spread over `work` pf_advance calls */
static inline void pf_start(pf_cursor *c, const void *k_cache, const void *v_cache, const int64_t *tab, int64_t len,
                            int BS, int HKV, int D, int DV, int elem, int64_t work) {
    c->k = (const char *)k_cache, c->v = (const char *)v_cache, c->tab = tab;
    c->nblk = (len + BS - 1) / BS, c->blk = 0, c->off = 0;
    c->kb = (int64_t)BS * HKV * D * elem, c->vb = (int64_t)BS * HKV * DV * elem;
    const int64_t steps = c->nblk * (((c->kb > c->vb ? c->kb : c->vb) + 63) / 64);
    c->per = work > 0 ? (steps + work - 1) / work : steps;
}

/* the next `per` steps (all that are left when `all`) */
static inline void pf_advance(pf_cursor *c, int all) {
#if defined(__x86_64__) || defined(__i386__)
    for (int64_t i = 0; (all || i < c->per) && c->blk < c->nblk; i++) {
        const int64_t b = c->tab[c->blk];
        if (c->off < c->kb) SHOAL_PREFETCH("prefetcht1", c->k + b * c->kb + c->off);
        if (c->off < c->vb) SHOAL_PREFETCH("prefetcht1", c->v + b * c->vb + c->off);
        c->off += 64;
        if (c->off >= c->kb && c->off >= c->vb) c->off = 0, c->blk++;
    }
#else
    (void)all;
    c->blk = c->nblk;
#endif
}

#define GMAX 8 /* query heads per KV head scored together (register accumulators); more loop in groups */

/* scores sc[g][t] = scale · q_g · k_t for the query heads g0..g0+gn of KV head h */
static inline __attribute__((always_inline)) void scores(const float *qf, const void *k_cache, const int64_t *tab, int64_t len, int BS, int HKV, int h,
                   int D, int gn, float scale, int is_bf16, float *sc, int64_t ld) {
    for (int64_t t0 = 0, blk = 0; t0 < len; t0 += BS, blk++) {
        /* block by block: no division per token (a 64-bit divide costs more than the dot) */
        const int64_t base = tab[blk] * BS, n = len - t0 < BS ? len - t0 : BS;
        for (int64_t j = 0; j < n; j++) {
            const int64_t row = ((base + j) * HKV + h) * D;
#ifdef __AVX512F__
            if (D % 16 == 0) {
                __m512 acc[GMAX];
                for (int g = 0; g < gn; g++) acc[g] = _mm512_setzero_ps();
                for (int c = 0; c < D; c += 16) {
                    __m512 k = load16(k_cache, row + c, is_bf16);
                    for (int g = 0; g < gn; g++) acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(qf + g * D + c), k, acc[g]);
                }
                for (int g = 0; g < gn; g++) sc[g * ld + t0 + j] = _mm512_reduce_add_ps(acc[g]) * scale;
                continue;
            }
#endif
            for (int g = 0; g < gn; g++) {
                float a = 0.f;
                for (int c = 0; c < D; c++)
                    a += qf[g * D + c] * (is_bf16 ? bf16_to_f32(((const uint16_t *)k_cache)[row + c])
                                                  : ((const float *)k_cache)[row + c]);
                sc[g * ld + t0 + j] = a * scale;
            }
        }
    }
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
/* 32 bf16 loaded as the dot product's operand type directly: GCC 12 moved `(__m512bh)` casts of a
 * loaded __m512i through the stack (a store and a reload per K row) */
typedef short shoal_bh_u __attribute__((vector_size(64), aligned(2), may_alias));
static inline __m512bh loadu_bh(const uint16_t *p) { return (__m512bh)(*(const shoal_bh_u *)p); }

/* Sixteen fp32 vectors → one vector of their sums, by a tree of lane shuffles (45 ops instead of
 * sixteen horizontal reductions). Output lane l holds the sum of input slot TREE_SLOT[l]; the
 * mapping is its own inverse, so the caller puts token l's products into slot TREE_SLOT[l]. */
static const int TREE_SLOT[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};

static inline __m512 sum16(const __m512 *v) {
    __m512 w[8], x[4], y[2];
    for (int i = 0; i < 8; i++)
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(v[i], v[i + 8], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 4; i++)
        x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[i], w[i + 4], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(w[i], w[i + 4], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int i = 0; i < 2; i++)
        y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[i], x[i + 2], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(x[i], x[i + 2], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_ps(y[0], y[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* bf16 scores with vdpbf16ps: the products of two bf16 numbers are exact in fp32, so this differs
 * from the fp32 path only in the order of the additions. Sixteen tokens at a time, one query head
 * at a time (16 accumulators stay in registers; the K rows are re-read from L1 per head). Needs
 * D % 32 == 0 and BS % 16 == 0. */
static inline __attribute__((always_inline)) void scores_bf16(const uint16_t *q, const uint16_t *k_cache,
                                                              const int64_t *tab, int64_t len, int BS, int HKV, int h,
                                                              int D, int gn, float scale, float *sc, int64_t ld,
                                                              pf_cursor *pfc) {
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int64_t t0 = 0, blk = 0; t0 < len; t0 += BS, blk++) {
        const int64_t base = tab[blk] * BS, nb = len - t0 < BS ? len - t0 : BS;
        for (int64_t j0 = 0; j0 < nb; j0 += 16) {
            /* all sixteen rows are inside the block (BS % 16 == 0); rows past the sequence's end
             * hold stale values and their sums are dropped by the masked store */
            const int n = nb - j0 < 16 ? (int)(nb - j0) : 16;
            const uint16_t *k0 = k_cache + ((base + j0) * HKV + h) * (int64_t)D;
            for (int g = 0; g < gn; g++) {
                const uint16_t *qg = q + (int64_t)g * D;
                pf_advance(pfc, 0);
                __m512 acc[16];
#pragma GCC unroll 16
                for (int j = 0; j < 16; j++) {
                    const uint16_t *kr = k0 + (int64_t)j * HKV * D;
                    __m512 a = _mm512_setzero_ps();
                    for (int c = 0; c < D; c += 32)
                        a = _mm512_dpbf16_ps(a, loadu_bh(kr + c), loadu_bh(qg + c));
                    acc[TREE_SLOT[j]] = a;
                }
                if (n < 16)
                    for (int j = n; j < 16; j++) acc[TREE_SLOT[j]] = _mm512_setzero_ps(); /* no stale inf/NaN */
                _mm512_mask_storeu_ps(sc + g * ld + t0 + j0, (__mmask16)((1u << n) - 1u),
                                      _mm512_mul_ps(sum16(acc), vscale));
            }
        }
    }
}
#endif

#ifdef AMX_TILES
/* Scores on AMX tiles, for bf16 caches with D % 32 == 0 (D ≤ 128) and BS % 16 == 0: sixteen cached
 * keys of one block are an A tile read in place (rows HKV·D apart), the query heads a B tile per 32
 * dimensions (pairs of dimensions × heads, zero past gn heads), loaded once per item into tiles
 * 2.. (tiles set up by the caller's amx_configure). C (tile 0) is 16 keys × 16 heads in fp32; head
 * g's column goes to sc[g·ld + t] by one gather. Same products as scores_bf16 (bf16 × bf16 exact in
 * fp32), summed in another order; no vector work per key beyond the gather. */
static inline __attribute__((always_inline)) void scores_amx(const uint16_t *q, const uint16_t *k_cache,
                                                             const int64_t *tab, int64_t len, int BS, int HKV, int h,
                                                             int D, int gn, float scale, float *sc, int64_t ld,
                                                             uint32_t *qv, float *cs) {
    const int NC = D / 32;
    /* qv[c][r][g] = dimensions 32c + 2r, 32c + 2r + 1 of head g */
    memset(qv, 0, (size_t)NC * 1024);
    for (int g = 0; g < gn; g++) {
        const uint32_t *qg = (const uint32_t *)(q + (int64_t)g * D);
        for (int c = 0; c < NC; c++)
            for (int r = 0; r < 16; r++) qv[c * 256 + r * 16 + g] = qg[c * 16 + r];
    }
    for (int c = 0; c < NC; c++) {
        switch (c) {
            case 0: _tile_loadd(2, qv, 64); break;
            case 1: _tile_loadd(3, qv + 256, 64); break;
            case 2: _tile_loadd(4, qv + 512, 64); break;
            default: _tile_loadd(5, qv + 768, 64);
        }
    }
    const int64_t stride = (int64_t)HKV * D * 2;
    const __m512i col = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(16));
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int64_t t0 = 0, blk = 0; t0 < len; t0 += BS, blk++) {
        const int64_t base = tab[blk] * BS, nb = len - t0 < BS ? len - t0 : BS;
        for (int64_t j0 = 0; j0 < nb; j0 += 16) {
            /* rows past the sequence's end hold stale values: their own rows of C only, dropped below */
            const int n = nb - j0 < 16 ? (int)(nb - j0) : 16;
            const uint16_t *k0 = k_cache + ((base + j0) * HKV + h) * (int64_t)D;
            _tile_zero(0);
            _tile_loadd(1, k0, stride);
            _tile_dpbf16ps(0, 1, 2);
            if (NC > 1) {
                _tile_loadd(1, k0 + 32, stride);
                _tile_dpbf16ps(0, 1, 3);
            }
            if (NC > 2) {
                _tile_loadd(1, k0 + 64, stride);
                _tile_dpbf16ps(0, 1, 4);
            }
            if (NC > 3) {
                _tile_loadd(1, k0 + 96, stride);
                _tile_dpbf16ps(0, 1, 5);
            }
            _tile_stored(0, cs, 64);
            const __mmask16 m = (__mmask16)((1u << n) - 1u);
            for (int g = 0; g < gn; g++)
                _mm512_mask_storeu_ps(sc + g * ld + t0 + j0, m,
                                      _mm512_mul_ps(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, col, cs + g, 4), vscale));
        }
    }
}
#endif

#ifdef __AVX512F__
/* The weighted sum row by row, for NC = DV / 16 column vectors and gn heads with gn·NC ≤ 24
 * accumulators in registers: each V row is loaded and widened once, then one FMA per head and
 * column vector (same fp32 operations in the same order as `weighted_sum`, so the same result). */
static inline __attribute__((always_inline)) void weighted_sum_rows(const float *p, const void *v_cache,
                                                                    const int64_t *tab, int64_t len, int BS, int HKV,
                                                                    int h, int NC, int gn, int is_bf16, float *acc,
                                                                    int64_t ld, pf_cursor *pfc) {
    __m512 a[24];
    for (int i = 0; i < gn * NC; i++) a[i] = _mm512_setzero_ps();
    const int DV = NC * 16;
    for (int64_t t0 = 0, blk = 0; t0 < len; t0 += BS, blk++) {
        const int64_t base = tab[blk] * BS, n = len - t0 < BS ? len - t0 : BS;
        const float *pt = p + t0;
        for (int64_t j = 0; j < n; j++) {
            const int64_t row = ((base + j) * HKV + h) * DV;
            if ((j & 3) == 0) pf_advance(pfc, 0); /* every 4th row: the cursor's loop costs more than its lines */
            __m512 v[8];
            for (int c = 0; c < NC; c++) v[c] = load16(v_cache, row + c * 16, is_bf16);
            for (int g = 0; g < gn; g++) {
                const __m512 w = _mm512_set1_ps(pt[g * ld + j]);
                for (int c = 0; c < NC; c++) a[g * NC + c] = _mm512_fmadd_ps(w, v[c], a[g * NC + c]);
            }
        }
    }
    for (int g = 0; g < gn; g++)
        for (int c = 0; c < NC; c++) _mm512_storeu_ps(acc + g * DV + c * 16, a[g * NC + c]);
}
#endif

/* acc[g][0..DV) = Σ_t p[g][t] · v_t for the query heads g0..g0+gn of KV head h */
static inline __attribute__((always_inline)) void weighted_sum(const float *p, const void *v_cache, const int64_t *tab, int64_t len, int BS, int HKV, int h,
                         int DV, int gn, int is_bf16, float *acc, int64_t ld) {
#ifdef __AVX512F__
    if (DV % 16 == 0) {
        for (int c = 0; c < DV; c += 16) { /* 16 output columns at a time, G accumulators in registers */
            __m512 a[GMAX];
            for (int g = 0; g < gn; g++) a[g] = _mm512_setzero_ps();
            for (int64_t t0 = 0, blk = 0; t0 < len; t0 += BS, blk++) {
                const int64_t base = tab[blk] * BS, n = len - t0 < BS ? len - t0 : BS;
                for (int64_t j = 0; j < n; j++) {
                    __m512 v = load16(v_cache, ((base + j) * HKV + h) * DV + c, is_bf16);
                    for (int g = 0; g < gn; g++) a[g] = _mm512_fmadd_ps(_mm512_set1_ps(p[g * ld + t0 + j]), v, a[g]);
                }
            }
            for (int g = 0; g < gn; g++) _mm512_storeu_ps(acc + g * DV + c, a[g]);
        }
        return;
    }
#endif
    memset(acc, 0, sizeof(float) * (size_t)gn * DV);
    for (int64_t t0 = 0, blk = 0; t0 < len; t0 += BS, blk++) {
        const int64_t base = tab[blk] * BS, n = len - t0 < BS ? len - t0 : BS;
        for (int64_t j = 0; j < n; j++) {
            const int64_t row = ((base + j) * HKV + h) * DV;
            for (int g = 0; g < gn; g++) {
                const float w = p[g * ld + t0 + j];
                for (int c = 0; c < DV; c++)
                    acc[g * DV + c] += w * (is_bf16 ? bf16_to_f32(((const uint16_t *)v_cache)[row + c])
                                                    : ((const float *)v_cache)[row + c]);
            }
        }
    }
}

#ifdef SHOAL_AVX2
/* ------------------------------------------------------------------------------------------------
 * The AVX2 bodies of decode attention's two products (no bf16 dot product: fp32 FMA on widened
 * values). A bf16 row is widened 16 elements (one 256-bit load) at a time into its even elements
 * (shifted left 16) and its odd ones (the low halves masked off): two operations per 16 instead of
 * a widening load and a shift per 8. The query rows are stored in that order (qsplit_avx2) and
 * the weighted sum's accumulators come out in it (put back in order when stored).
 */

/* gn query rows of D dimensions, fp32, as the AVX2 scores read them: for bf16 each 16-dimension
 * chunk as its 8 even then its 8 odd dimensions (D % 16 == 0), for fp32 as they are */
static inline void qsplit_avx2(const void *q, int64_t src, int D, int gn, int is_bf16, float *qs) {
    for (int g = 0; g < gn; g++)
        for (int c = 0; c < D; c += 16)
            for (int i = 0; i < 16 && c + i < D; i++) {
                const float v = ld(q, src + (int64_t)g * D + c + i, is_bf16);
                qs[g * D + (is_bf16 ? c + (i & 1) * 8 + i / 2 : c + i)] = v;
            }
}

/* four 8-lane vectors → the four sums, one per lane */
static inline __m128 sum4_avx2(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_extractf128_ps(u, 1), _mm256_castps256_ps128(u));
}

/* sc[g·ld + t .. + n) = scale · q_g · k_j for four key rows kr[0..4) (n ≤ 4 of them kept) and H ≤ 3
 * query heads: 4 × H accumulators in registers, each key chunk loaded and widened once for all H
 * heads. The four sums of a head come out of one hadd tree instead of four horizontal sums. */
static inline __attribute__((always_inline)) void scores4_avx2(const float *qs, const void *const kr[4], int D, int H,
                                                               int is_bf16, float scale, float *sc, int64_t ld,
                                                               int64_t t, int n) {
    __m256 acc[3][4];
    for (int g = 0; g < H; g++)
        for (int j = 0; j < 4; j++) acc[g][j] = _mm256_setzero_ps();
    if (is_bf16) {
        const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);
        for (int c = 0; c < D; c += 16)
            for (int j = 0; j < 4; j++) {
                const __m256i k = _mm256_loadu_si256((const __m256i *)((const uint16_t *)kr[j] + c));
                const __m256 ke = _mm256_castsi256_ps(_mm256_slli_epi32(k, 16));
                const __m256 ko = _mm256_castsi256_ps(_mm256_and_si256(k, hi));
                for (int g = 0; g < H; g++) {
                    acc[g][j] = _mm256_fmadd_ps(ke, _mm256_loadu_ps(qs + g * D + c), acc[g][j]);
                    acc[g][j] = _mm256_fmadd_ps(ko, _mm256_loadu_ps(qs + g * D + c + 8), acc[g][j]);
                }
            }
    } else {
        for (int c = 0; c < D; c += 8)
            for (int j = 0; j < 4; j++) {
                const __m256 k = _mm256_loadu_ps((const float *)kr[j] + c);
                for (int g = 0; g < H; g++) acc[g][j] = _mm256_fmadd_ps(k, _mm256_loadu_ps(qs + g * D + c), acc[g][j]);
            }
    }
    const __m128 vscale = _mm_set1_ps(scale);
    for (int g = 0; g < H; g++) {
        const __m128 s = _mm_mul_ps(sum4_avx2(acc[g][0], acc[g][1], acc[g][2], acc[g][3]), vscale);
        if (n == 4) {
            _mm_storeu_ps(sc + g * ld + t, s);
        } else {
            float tmp[4];
            _mm_storeu_ps(tmp, s);
            for (int j = 0; j < n; j++) sc[g * ld + t + j] = tmp[j];
        }
    }
}

/* scores for gn query heads (rows of qs from qsplit_avx2) of KV head h, four keys at a time, heads
 * in groups of ≤ 3. Needs D % 16 == 0 (bf16) or D % 8 == 0 (fp32). The cursor advances once per
 * 8 keys (with the weighted sum's once per 8 rows, the len/4 calls per item pf_start plans for). */
static inline __attribute__((always_inline)) void scores_avx2(const float *qs, const void *k_cache, const int64_t *tab,
                                                              int64_t len, int BS, int HKV, int h, int D, int gn,
                                                              float scale, int is_bf16, float *sc, int64_t ld,
                                                              pf_cursor *pfc) {
    const int elem = is_bf16 ? 2 : 4;
    for (int64_t t0 = 0, blk = 0; t0 < len; t0 += BS, blk++) {
        const int64_t base = tab[blk] * BS, nb = len - t0 < BS ? len - t0 : BS;
        for (int64_t j0 = 0; j0 < nb; j0 += 4) {
            const int n = nb - j0 < 4 ? (int)(nb - j0) : 4;
            const void *kr[4];
            for (int j = 0; j < 4; j++) /* past the end: the last key again, its sums dropped */
                kr[j] = (const char *)k_cache + ((base + j0 + (j < n ? j : n - 1)) * HKV + h) * (int64_t)D * elem;
            if ((j0 & 7) == 0) pf_advance(pfc, 0);
            for (int g0 = 0; g0 < gn; g0 += 3) {
                const float *q0 = qs + (int64_t)g0 * D;
                float *s0 = sc + g0 * ld;
                switch (gn - g0) {
                    case 1: scores4_avx2(q0, kr, D, 1, is_bf16, scale, s0, ld, t0 + j0, n); break;
                    case 2: scores4_avx2(q0, kr, D, 2, is_bf16, scale, s0, ld, t0 + j0, n); break;
                    default: scores4_avx2(q0, kr, D, 3, is_bf16, scale, s0, ld, t0 + j0, n);
                }
            }
        }
    }
}

/* acc[g][c0 .. c0 + 8·NV) = Σ_t p[g][t] · v_t over those columns, for H heads, H·NV ≤ 12
 * accumulators in registers: each V row chunk is loaded (and widened) once for all H heads. bf16:
 * NV even, the chunk's 16-column halves as evens and odds, interleaved back on the store. The
 * cursor advances once per 8 rows when `pf`. */
static inline __attribute__((always_inline)) void wsum_avx2(const float *p, const void *v_cache, const int64_t *tab,
                                                            int64_t len, int BS, int HKV, int h, int DV, int c0, int NV,
                                                            int H, int is_bf16, float *acc, int64_t ld, pf_cursor *pfc,
                                                            int pf) {
    __m256 a[12];
    for (int i = 0; i < H * NV; i++) a[i] = _mm256_setzero_ps();
    const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);
    for (int64_t t0 = 0, blk = 0; t0 < len; t0 += BS, blk++) {
        const int64_t base = tab[blk] * BS, n = len - t0 < BS ? len - t0 : BS;
        const float *pt = p + t0;
        for (int64_t j = 0; j < n; j++) {
            const int64_t row = ((base + j) * HKV + h) * DV + c0;
            if (pf && (j & 7) == 0) pf_advance(pfc, 0);
            __m256 v[4];
            if (is_bf16 && NV >= 2) {
                for (int u = 0; u < NV; u += 2) {
                    const __m256i k = _mm256_loadu_si256((const __m256i *)((const uint16_t *)v_cache + row + u * 8));
                    v[u] = _mm256_castsi256_ps(_mm256_slli_epi32(k, 16));
                    v[u + 1] = _mm256_castsi256_ps(_mm256_and_si256(k, hi));
                }
            } else {
                for (int u = 0; u < NV; u++) v[u] = _mm256_loadu_ps((const float *)v_cache + row + u * 8);
            }
            for (int g = 0; g < H; g++) {
                const __m256 w = _mm256_broadcast_ss(pt + g * ld + j);
                for (int u = 0; u < NV; u++) a[g * NV + u] = _mm256_fmadd_ps(w, v[u], a[g * NV + u]);
            }
        }
    }
    for (int g = 0; g < H; g++) {
        float *dst = acc + (int64_t)g * DV + c0;
        if (is_bf16 && NV >= 2) {
            for (int u = 0; u < NV; u += 2) { /* evens e, odds o → e0 o0 e1 o1 … */
                const __m256 lo = _mm256_unpacklo_ps(a[g * NV + u], a[g * NV + u + 1]);
                const __m256 hi2 = _mm256_unpackhi_ps(a[g * NV + u], a[g * NV + u + 1]);
                _mm256_storeu_ps(dst + u * 8, _mm256_permute2f128_ps(lo, hi2, 0x20));
                _mm256_storeu_ps(dst + u * 8 + 8, _mm256_permute2f128_ps(lo, hi2, 0x31));
            }
        } else {
            for (int u = 0; u < NV; u++) _mm256_storeu_ps(dst + u * 8, a[g * NV + u]);
        }
    }
}

/* the weighted sum for gn heads: ≤ 2 heads over 32-column chunks (DV % 32 == 0), else ≤ 5 heads
 * over 16-column chunks, else (fp32, DV % 8 == 0) ≤ 8 heads over 8 columns; each (heads, chunk) a
 * pass over the rows (with 64-column bf16 rows a 32-column pass reads one of each row's two cache
 * lines, the rest come from L1). The accumulators, the widened row chunk and the weight fit the 16
 * ymm registers: 3 heads × 32 columns (12 + 4 + 1 + the mask) spilled two accumulators, whose
 * store-to-load chain made the `ci` shape's weighted sum ~2× slower. Literal shapes per case. */
static inline __attribute__((always_inline)) void weighted_sum_avx2(const float *p, const void *v_cache,
                                                                    const int64_t *tab, int64_t len, int BS, int HKV,
                                                                    int h, int DV, int gn, int is_bf16, float *acc,
                                                                    int64_t ld, pf_cursor *pfc) {
    const int NV = DV % 32 == 0 && (gn <= 2 || !is_bf16) ? 4 : DV % 16 == 0 ? 2 : 1;
    const int HG = NV == 4 ? (is_bf16 ? 2 : 3) : NV == 2 ? 5 : 8;
    const int ngroups = (gn + HG - 1) / HG;
    int first = 1;
    for (int g0 = 0, grp = 0; g0 < gn; grp++) {
        const int H = (gn - g0 + (ngroups - grp) - 1) / (ngroups - grp); /* groups of about equal size */
        for (int c0 = 0; c0 < DV; c0 += NV * 8, first = 0) {
            const float *pg = p + g0 * ld;
            float *ag = acc + (int64_t)g0 * DV;
#define SHOAL_WS(HH, NN) wsum_avx2(pg, v_cache, tab, len, BS, HKV, h, DV, c0, NN, HH, is_bf16, ag, ld, pfc, first)
            if (NV == 4) {
                if (H == 1) SHOAL_WS(1, 4);
                else if (H == 2) SHOAL_WS(2, 4);
                else SHOAL_WS(3, 4);
            } else if (NV == 2) {
                switch (H) {
                    case 1: SHOAL_WS(1, 2); break;
                    case 2: SHOAL_WS(2, 2); break;
                    case 3: SHOAL_WS(3, 2); break;
                    case 4: SHOAL_WS(4, 2); break;
                    default: SHOAL_WS(5, 2);
                }
            } else {
                switch (H) {
                    case 1: SHOAL_WS(1, 1); break;
                    case 2: SHOAL_WS(2, 1); break;
                    case 3: SHOAL_WS(3, 1); break;
                    case 4: SHOAL_WS(4, 1); break;
                    case 5: SHOAL_WS(5, 1); break;
                    case 6: SHOAL_WS(6, 1); break;
                    case 7: SHOAL_WS(7, 1); break;
                    default: SHOAL_WS(8, 1);
                }
            }
#undef SHOAL_WS
        }
        g0 += H;
    }
}
#endif

static int attn_amx = 1; /* a benchmarking knob: set_decode_attention_amx(0) keeps the AVX-512 scores */
int set_decode_attention_amx(int on) {
    const int old = attn_amx;
    attn_amx = on;
    return old;
}

/* q [B, HQ, D]; k_cache [NB, BS, HKV, D]; v_cache [NB, BS, HKV, DV]; tables [B, W] int64;
 * seq_lens [B] int64; out [B, HQ, DV]. All contiguous, same dtype (bf16 when is_bf16, else fp32).
 * Returns 0, or -1 when a scratch allocation failed (the caller falls back). */
int paged_decode_attention(const void *q, const void *k_cache, const void *v_cache, const int64_t *tables,
                           const int64_t *seq_lens, void *out, int B, int HQ, int HKV, int D, int DV, int BS,
                           int W, float scale, int is_bf16, int nthreads) {
    const int G = HQ / HKV;
    const int GB = G < GMAX ? G : GMAX;
    int64_t max_len = 1;
    for (int b = 0; b < B; b++) max_len = seq_lens[b] > max_len ? seq_lens[b] : max_len;
    int failed = 0;
#ifdef AMX_TILES
    const int amx = is_bf16 && D % 32 == 0 && D <= 128 && BS % 16 == 0 && attn_amx && amx_permitted();
#endif
    /* contiguous ranges of items of about equal work (a sequence's length, plus a little per item) */
    const int nthr = nthreads < WS_MAX_THREADS ? nthreads : WS_MAX_THREADS, items = B * HKV;
    ws_split ws;
    ws.nth = nthr;
    {
        int64_t total = 0, acc = 0;
        for (int b = 0; b < B; b++) total += (seq_lens[b] + 8) * HKV;
        int i = 0;
        for (int t = 0; t < nthr; t++) {
            const int start = i;
            while (i < items && (acc + seq_lens[i / HKV] + 8) * nthr <= total * (t + 1)) acc += seq_lens[i / HKV] + 8, i++;
            if (t == nthr - 1) i = items;
            ws_init_range(&ws, t, (uint32_t)start, (uint32_t)i);
        }
    }
#pragma omp parallel num_threads(nthr)
    {
        /* per thread: GB query rows, GB×DV accumulators, GB×max_len scores; with AMX the query tiles
         * (D / 32 KB) and a C tile's staging (1 KB) */
        float *qf = malloc(sizeof(float) * ((size_t)GB * D + (size_t)GB * DV + (size_t)GB * (size_t)max_len));
#ifdef AMX_TILES
        uint32_t *qv = amx ? aligned_alloc(64, 4096 + 1024) : NULL;
        float *cs = qv ? (float *)(qv + 1024) : NULL;
        if (amx && !qv) {
#pragma omp atomic write
            failed = 1;
        }
        if (amx && qv) amx_configure();
#endif
        if (!qf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
            float *acc = qf + (size_t)GB * D;
            float *sc = acc + (size_t)GB * DV;
            /* the items (sequence, KV head) of the thread's own range in order, then what is left
             * of the others' (worksplit.h) */
            const int tid = omp_get_thread_num();
            const int own_start = (int)ws.r[tid].start, own_end = (int)ws.r[tid].end;
            const int elem = is_bf16 ? 2 : 4;
            pf_cursor pfc = {0};
            for (int item, prev = -2; (item = (int)ws_next(&ws, tid)) >= 0; prev = item) {
                const int b = item / HKV, h = item % HKV;
                const int64_t len = seq_lens[b];
                const int64_t *tab = tables + (int64_t)b * W;
                if (item != prev + 1) /* a first or taken sequence: nothing prefetched it */
                    prefetch_sequence(k_cache, v_cache, tab, len, BS, HKV, D, DV, elem);
                /* the thread's next sequence, its lines spread over 1.6× the cursor calls this one makes
                 * (~(HKV − h)·len/4), so ~60% of them are prefetched before it starts and the rest
                 * come on demand: all of them (spread over exactly these calls) kept the line fill
                 * buffers so busy that this sequence's own loads waited. 30 layers × the `ci` batch's
                 * 32 sequences (their lengths), from DRAM, alternating in one process: 5.27–5.28 ms
                 * with all, 4.64 with ~60%, 4.68 with half; 32 × 160 tokens: 4.53, 3.72, 3.97; the
                 * `ci` decode step ~1 ms faster (half against all) */
                /* (only within its own range: after an item taken from another thread, the next
                 * sequence is that thread's) */
                if ((h == 0 || item != prev + 1) && item >= own_start && (b + 1) * HKV < own_end)
                    pf_start(&pfc, k_cache, v_cache, tables + (int64_t)(b + 1) * W, seq_lens[b + 1], BS, HKV, D, DV,
                             elem, (int64_t)(HKV - h) * (len + 3) * 2 / 5);
                for (int g0 = 0; g0 < G; g0 += GB) {
                    const int gn = G - g0 < GB ? G - g0 : GB;
                    /* a literal head count per case: the compiler unrolls the g loops and keeps the
                     * accumulators in registers */
#ifdef AMX_TILES
                    if (amx) {
                        scores_amx((const uint16_t *)q + ((int64_t)b * HQ + h * G + g0) * D, k_cache, tab, len, BS,
                                   HKV, h, D, gn, scale, sc, len, qv, cs);
                    } else
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__)
                    if (is_bf16 && D % 32 == 0 && BS % 16 == 0) {
                        /* literal head sizes for the common cases: the per-key loop unrolls and the
                         * sixteen accumulators stay in registers (a variable D spilled them) */
#define SHOAL_SCORES(DD) \
    scores_bf16((const uint16_t *)q + ((int64_t)b * HQ + h * G + g0) * D, k_cache, tab, len, BS, HKV, h, DD, gn, scale, \
                sc, len, &pfc)
                        if (D == 64) SHOAL_SCORES(64);
                        else if (D == 128) SHOAL_SCORES(128);
                        else SHOAL_SCORES(D);
#undef SHOAL_SCORES
                    } else
#endif
#ifdef SHOAL_AVX2
                    if (is_bf16 ? D % 16 == 0 : D % 8 == 0) {
                        qsplit_avx2(q, ((int64_t)b * HQ + h * G + g0) * D, D, gn, is_bf16, qf);
                        /* literal dtypes and the common head sizes: the chunk loops unroll */
#define SHOAL_SCORES(DD, BF) scores_avx2(qf, k_cache, tab, len, BS, HKV, h, DD, gn, scale, BF, sc, len, &pfc)
                        if (is_bf16) {
                            if (D == 64) SHOAL_SCORES(64, 1);
                            else if (D == 128) SHOAL_SCORES(128, 1);
                            else SHOAL_SCORES(D, 1);
                        } else {
                            if (D == 64) SHOAL_SCORES(64, 0);
                            else if (D == 128) SHOAL_SCORES(128, 0);
                            else SHOAL_SCORES(D, 0);
                        }
#undef SHOAL_SCORES
                    } else
#endif
                    {
                        /* fp32 query rows for the plain score loop (the paths above read q as it is) */
                        for (int g = 0; g < gn; g++) {
                            const int64_t src = ((int64_t)b * HQ + h * G + g0 + g) * D;
                            for (int c = 0; c < D; c++)
                                qf[g * D + c] = is_bf16 ? bf16_to_f32(((const uint16_t *)q)[src + c])
                                                        : ((const float *)q)[src + c];
                        }
#define SHOAL_CASE(N) \
    case N: scores(qf, k_cache, tab, len, BS, HKV, h, D, N, scale, is_bf16, sc, len); break;
                    switch (gn) {
                        SHOAL_CASE(1) SHOAL_CASE(2) SHOAL_CASE(3) SHOAL_CASE(4)
                        SHOAL_CASE(5) SHOAL_CASE(6) SHOAL_CASE(7) SHOAL_CASE(8)
                    }
#undef SHOAL_CASE
                    }
                    float inv[GMAX];
                    for (int g = 0; g < gn; g++) inv[g] = softmax_unnormalised(sc + (size_t)g * len, len);
#ifdef __AVX512F__
/* literal dtypes too: no per-row test of is_bf16 */
#define SHOAL_CASE(N, NC)                                                                                   \
    case N:                                                                                                 \
        if (is_bf16) weighted_sum_rows(sc, v_cache, tab, len, BS, HKV, h, NC, N, 1, acc, len, &pfc);        \
        else weighted_sum_rows(sc, v_cache, tab, len, BS, HKV, h, NC, N, 0, acc, len, &pfc);                \
        break;
                    if (DV == 64 && gn <= 6) {
                        switch (gn) {
                            SHOAL_CASE(1, 4) SHOAL_CASE(2, 4) SHOAL_CASE(3, 4)
                            SHOAL_CASE(4, 4) SHOAL_CASE(5, 4) SHOAL_CASE(6, 4)
                        }
                    } else if (DV == 128 && gn <= 3) {
                        switch (gn) { SHOAL_CASE(1, 8) SHOAL_CASE(2, 8) SHOAL_CASE(3, 8) }
                    } else
#undef SHOAL_CASE
#endif
#ifdef SHOAL_AVX2
                    if (is_bf16 ? DV % 16 == 0 : DV % 8 == 0) {
                        if (is_bf16) weighted_sum_avx2(sc, v_cache, tab, len, BS, HKV, h, DV, gn, 1, acc, len, &pfc);
                        else weighted_sum_avx2(sc, v_cache, tab, len, BS, HKV, h, DV, gn, 0, acc, len, &pfc);
                    } else
#endif
                    {
#define SHOAL_CASE(N) \
    case N: weighted_sum(sc, v_cache, tab, len, BS, HKV, h, DV, N, is_bf16, acc, len); break;
                    switch (gn) {
                        SHOAL_CASE(1) SHOAL_CASE(2) SHOAL_CASE(3) SHOAL_CASE(4)
                        SHOAL_CASE(5) SHOAL_CASE(6) SHOAL_CASE(7) SHOAL_CASE(8)
                    }
#undef SHOAL_CASE
                    }
#if defined(__AVX512F__) && defined(__AVX512BF16__)
                    if (is_bf16 && DV % 16 == 0) {
                        /* the same fp32 product, rounded to bf16 by the instruction (nearest even) */
                        for (int g = 0; g < gn; g++) {
                            const __m512 w = _mm512_set1_ps(inv[g]);
                            uint16_t *dst = (uint16_t *)out + ((int64_t)b * HQ + h * G + g0 + g) * DV;
                            for (int i = 0; i < DV; i += 16)
                                _mm256_storeu_si256((__m256i *)(dst + i), (__m256i)_mm512_cvtneps_pbh(
                                    _mm512_mul_ps(_mm512_loadu_ps(acc + (size_t)g * DV + i), w)));
                        }
                        continue;
                    }
#endif
#ifdef SHOAL_AVX2
                    if (DV % 8 == 0) { /* the plain loops' product and rounding, 8 at a time */
                        for (int g = 0; g < gn; g++) {
                            const __m256 w = _mm256_set1_ps(inv[g]);
                            const int64_t o = ((int64_t)b * HQ + h * G + g0 + g) * DV;
                            for (int i = 0; i < DV; i += 8)
                                store8(out, o + i, _mm256_mul_ps(_mm256_loadu_ps(acc + (size_t)g * DV + i), w), is_bf16);
                        }
                        continue;
                    }
#endif
                    for (int g = 0; g < gn; g++)
                        for (int i = 0; i < DV; i++) acc[(size_t)g * DV + i] *= inv[g];
                    for (int g = 0; g < gn; g++) {
                        const int64_t o = ((int64_t)b * HQ + h * G + g0 + g) * DV;
                        if (is_bf16) {
                            uint16_t *dst = (uint16_t *)out + o;
                            for (int i = 0; i < DV; i++) dst[i] = f32_to_bf16(acc[(size_t)g * DV + i]);
                        } else {
                            memcpy((float *)out + o, acc + (size_t)g * DV, sizeof(float) * (size_t)DV);
                        }
                    }
                }
                /* what the weighted sums left (all of it on the paths without the cursor) goes before
                 * the next sequence starts */
                if (h == HKV - 1) pf_advance(&pfc, 1);
            }
        }
#ifdef AMX_TILES
        if (qv) _tile_release();
        free(qv);
#endif
        free(qf);
    }
    return failed ? -1 : 0;
}

/* ------------------------------------------------------------------------------------------------
 * Elementwise ops for eager steps, where torch runs each of their pieces as a separate pass over
 * memory (RMSNorm is five ops, rotary seven); same rounding as the plain-torch forms.
 */
#ifdef __AVX512F__
static inline void store16(void *dst, int64_t idx, __m512 v, int is_bf16) {
    if (is_bf16) {
#ifdef __AVX512BF16__
        _mm256_storeu_si256((__m256i *)((uint16_t *)dst + idx), (__m256i)_mm512_cvtneps_pbh(v));
#else
        float tmp[16];
        _mm512_storeu_ps(tmp, v);
        for (int i = 0; i < 16; i++) ((uint16_t *)dst)[idx + i] = f32_to_bf16(tmp[i]);
#endif
    } else {
        _mm512_storeu_ps((float *)dst + idx, v);
    }
}

/* x rounded to bf16 and back (what a torch bf16 op does to each result) */
static inline __m512 round_bf16(__m512 x) {
    __m512i u = _mm512_castps_si512(x);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
    u = _mm512_and_si512(u, _mm512_set1_epi32((int)0xffff0000u));
    return _mm512_castsi512_ps(u); /* (finite inputs: activations here never hold NaN/Inf) */
}
#endif

static inline float rb(float v, int is_bf16) { return is_bf16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

/* out[oi..oi + H) = x[xi..xi + H) · rs · w, in fp32, rounded once: RMSNorm's second pass */
static inline void rms_scale_row(const void *x, int64_t xi, float rs, const void *w, void *out, int64_t oi, int H,
                                 int is_bf16, int w_bf16) {
    int c = 0;
#ifdef __AVX512F__
    const __m512 vr = _mm512_set1_ps(rs);
    for (; c + 16 <= H; c += 16)
        store16(out, oi + c, _mm512_mul_ps(_mm512_mul_ps(load16(x, xi + c, is_bf16), vr), load16(w, c, w_bf16)), is_bf16);
#elif defined(SHOAL_AVX2)
    const __m256 vr = _mm256_set1_ps(rs);
    for (; c + 8 <= H; c += 8)
        store8(out, oi + c, _mm256_mul_ps(_mm256_mul_ps(load8(x, xi + c, is_bf16), vr), load8(w, c, w_bf16)), is_bf16);
#endif
    for (; c < H; c++) st(out, oi + c, ld(x, xi + c, is_bf16) * rs * ld(w, c, w_bf16), is_bf16);
}

/* out[n, :] = x[n, :] / sqrt(mean(x[n, :]^2) + eps) * w, in fp32, rounded once.
 * x rows `ldx` elements apart; out contiguous [N, H]; w [H] (w_bf16: bf16, else fp32). */
void rms_norm(const void *x, int64_t ldx, const void *w, void *out, int64_t N, int H, float eps, int is_bf16,
              int w_bf16, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (N > 8)
    for (int64_t n = 0; n < N; n++) {
        const int64_t xi = n * ldx, oi = n * H;
        float ss = 0.f;
        int c = 0;
#ifdef __AVX512F__
        __m512 acc = _mm512_setzero_ps();
        for (; c + 16 <= H; c += 16) {
            __m512 v = load16(x, xi + c, is_bf16);
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        ss = _mm512_reduce_add_ps(acc);
#elif defined(SHOAL_AVX2)
        /* the AVX-512 body's 16 lanes as two halves, reduced in its order: the same bits */
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (; c + 16 <= H; c += 16) {
            const __m256 v0 = load8(x, xi + c, is_bf16), v1 = load8(x, xi + c + 8, is_bf16);
            a0 = _mm256_fmadd_ps(v0, v0, a0);
            a1 = _mm256_fmadd_ps(v1, v1, a1);
        }
        ss = reduce16_add(a0, a1);
#endif
        for (; c < H; c++) {
            const float v = ld(x, xi + c, is_bf16);
            ss += v * v;
        }
        rms_scale_row(x, xi, 1.f / sqrtf(ss / (float)H + eps), w, out, oi, H, is_bf16, w_bf16);
    }
}

/* The residual add fused with the next RMSNorm: sum[n, :] = x[n, :] + r[n, :] (rounded to the dtype,
 * as torch's add), out[n, :] = rms_norm(sum[n, :]) · w as rms_norm above. x and r rows `ldx` and `ldr`
 * elements apart; out and sum contiguous [N, H]. One pass over x and r instead of an add's three
 * and the norm's two. */
void add_rms_norm(const void *x, int64_t ldx, const void *r, int64_t ldr, const void *w, void *out, void *sum,
                  int64_t N, int H, float eps, int is_bf16, int w_bf16, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (N > 8)
    for (int64_t n = 0; n < N; n++) {
        const int64_t xi = n * ldx, ri = n * ldr, oi = n * H;
        float ss = 0.f;
        int c = 0;
#ifdef __AVX512F__
        __m512 acc = _mm512_setzero_ps();
        for (; c + 16 <= H; c += 16) {
            __m512 v = _mm512_add_ps(load16(x, xi + c, is_bf16), load16(r, ri + c, is_bf16));
            if (is_bf16) v = round_bf16(v);
            store16(sum, oi + c, v, is_bf16);
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        ss = _mm512_reduce_add_ps(acc);
#elif defined(SHOAL_AVX2)
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (; c + 16 <= H; c += 16) { /* as rms_norm: the AVX-512 body's lanes and order */
            __m256 v0 = _mm256_add_ps(load8(x, xi + c, is_bf16), load8(r, ri + c, is_bf16));
            __m256 v1 = _mm256_add_ps(load8(x, xi + c + 8, is_bf16), load8(r, ri + c + 8, is_bf16));
            if (is_bf16) v0 = round_bf16_256(v0), v1 = round_bf16_256(v1);
            store8(sum, oi + c, v0, is_bf16);
            store8(sum, oi + c + 8, v1, is_bf16);
            a0 = _mm256_fmadd_ps(v0, v0, a0);
            a1 = _mm256_fmadd_ps(v1, v1, a1);
        }
        ss = reduce16_add(a0, a1);
#endif
        for (; c < H; c++) {
            const float v = rb(ld(x, xi + c, is_bf16) + ld(r, ri + c, is_bf16), is_bf16);
            st(sum, oi + c, v, is_bf16);
            ss += v * v;
        }
        rms_scale_row(sum, oi, 1.f / sqrtf(ss / (float)H + eps), w, out, oi, H, is_bf16, w_bf16);
    }
}

/* Rotary embedding. x [T, NH, R] with strides (sT, sH) in elements and the last dim contiguous;
 * cos/sin fp32 [T, R/2]; out contiguous [T, NH, R]. Pairs (i, i + R/2), or (2i, 2i + 1) when
 * interleaved. bf16 follows torch's bf16 ops step by step: cos/sin rounded to bf16, every product
 * and sum rounded to bf16. */
void rotary(const void *x, int64_t sT, int64_t sH, const float *cosv, const float *sinv, void *out, int64_t T, int NH,
            int R, int interleaved, int is_bf16, int nthreads) {
    const int half = R / 2;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (T > 8)
    for (int64_t t = 0; t < T; t++) {
        const float *ct = cosv + t * half, *stn = sinv + t * half;
        for (int h = 0; h < NH; h++) {
            const int64_t xi = t * sT + h * sH, oi = (t * NH + h) * (int64_t)R;
            int i = 0;
#ifdef __AVX512F__
            if (!interleaved) {
                for (; i + 16 <= half; i += 16) {
                    __m512 c = _mm512_loadu_ps(ct + i), s = _mm512_loadu_ps(stn + i);
                    __m512 x1 = load16(x, xi + i, is_bf16), x2 = load16(x, xi + half + i, is_bf16);
                    __m512 o1, o2;
                    if (is_bf16) {
                        c = round_bf16(c);
                        s = round_bf16(s);
                        o1 = _mm512_sub_ps(round_bf16(_mm512_mul_ps(x1, c)), round_bf16(_mm512_mul_ps(x2, s)));
                        o2 = _mm512_add_ps(round_bf16(_mm512_mul_ps(x2, c)), round_bf16(_mm512_mul_ps(x1, s)));
                    } else {
                        o1 = _mm512_sub_ps(_mm512_mul_ps(x1, c), _mm512_mul_ps(x2, s));
                        o2 = _mm512_add_ps(_mm512_mul_ps(x2, c), _mm512_mul_ps(x1, s));
                    }
                    store16(out, oi + i, o1, is_bf16);
                    store16(out, oi + half + i, o2, is_bf16);
                }
            }
#elif defined(SHOAL_AVX2)
            if (!interleaved) { /* elementwise: 8 at a time gives the 16-lane body's results */
                for (; i + 8 <= half; i += 8) {
                    __m256 c = _mm256_loadu_ps(ct + i), s = _mm256_loadu_ps(stn + i);
                    const __m256 x1 = load8(x, xi + i, is_bf16), x2 = load8(x, xi + half + i, is_bf16);
                    __m256 o1, o2;
                    if (is_bf16) {
                        c = round_bf16_256(c);
                        s = round_bf16_256(s);
                        o1 = _mm256_sub_ps(round_bf16_256(_mm256_mul_ps(x1, c)), round_bf16_256(_mm256_mul_ps(x2, s)));
                        o2 = _mm256_add_ps(round_bf16_256(_mm256_mul_ps(x2, c)), round_bf16_256(_mm256_mul_ps(x1, s)));
                    } else {
                        o1 = _mm256_sub_ps(_mm256_mul_ps(x1, c), _mm256_mul_ps(x2, s));
                        o2 = _mm256_add_ps(_mm256_mul_ps(x2, c), _mm256_mul_ps(x1, s));
                    }
                    store8(out, oi + i, o1, is_bf16);
                    store8(out, oi + half + i, o2, is_bf16);
                }
            }
#endif
            for (; i < half; i++) {
                const float c = rb(ct[i], is_bf16), s = rb(stn[i], is_bf16);
                const int64_t a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
                const float x1 = ld(x, xi + a, is_bf16), x2 = ld(x, xi + b, is_bf16);
                st(out, oi + a, rb(x1 * c, is_bf16) - rb(x2 * s, is_bf16), is_bf16);
                st(out, oi + b, rb(x2 * c, is_bf16) + rb(x1 * s, is_bf16), is_bf16);
            }
        }
    }
}

/* KV cache write for eager steps: row t of src (row_bytes bytes, rows src_stride bytes apart) to
 * dst + slots[t] · row_bytes. torch's index_copy_ moved ~5 GB/s here (a 2,048-token prompt chunk's
 * K or V of one layer, 786 KB, took ~170 us). */
void store_rows(const void *src, int64_t src_stride, void *dst, const int64_t *slots, int64_t T, int64_t row_bytes,
                int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (T * row_bytes >= (1 << 16))
    for (int64_t t = 0; t < T; t++)
        memcpy((char *)dst + slots[t] * row_bytes, (const char *)src + t * src_stride, (size_t)row_bytes);
}

/* Greedy sampling: out[s] = the index of the largest x[s, v] (rows `ldx` elements apart), the first
 * on ties, or of the first NaN when a row has one (as torch.max(dim=-1)). torch's bf16 max over
 * [32, 49,152] took ~0.7 ms here, single-threaded and converting every element. */
void argmax_rows(const void *x, int64_t ldx, int64_t S, int64_t V, int is_bf16, int64_t *out, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (S > 1 && S * V >= (1 << 16))
    for (int64_t s = 0; s < S; s++) {
        const int64_t xi = s * ldx;
        float best = -INFINITY;
        int64_t arg = 0, v = 0;
        int nan = 0;
#ifdef __AVX512F__
        if (V >= 16 && V <= INT32_MAX) { /* int32 lane indices */
            /* per lane: the largest value and its first index; strictly greater keeps the first */
            __m512 bv = _mm512_set1_ps(-INFINITY);
            __m512i bi = _mm512_setzero_si512(), idx = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
            const __m512i step = _mm512_set1_epi32(16);
            __mmask16 unord = 0;
            for (; v + 16 <= V; v += 16) {
                const __m512 a = load16(x, xi + v, is_bf16);
                unord |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
                const __mmask16 gt = _mm512_cmp_ps_mask(a, bv, _CMP_GT_OQ);
                bv = _mm512_mask_mov_ps(bv, gt, a);
                bi = _mm512_mask_mov_epi32(bi, gt, idx);
                idx = _mm512_add_epi32(idx, step);
            }
            if (unord) {
                nan = 1;
            } else {
                float lv[16];
                int32_t li[16];
                _mm512_storeu_ps(lv, bv);
                _mm512_storeu_si512(li, bi);
                int first = 1;
                for (int l = 0; l < 16; l++)
                    if (first || lv[l] > best || (lv[l] == best && li[l] < arg)) {
                        best = lv[l], arg = li[l], first = 0;
                    }
            }
        }
#elif defined(SHOAL_AVX2)
        if (V >= 8 && V <= INT32_MAX) { /* the AVX-512 body with 8 lanes (the same answer) */
            __m256 bv = _mm256_set1_ps(-INFINITY), unord = _mm256_setzero_ps();
            __m256i bi = _mm256_setzero_si256(), idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            const __m256i step = _mm256_set1_epi32(8);
            for (; v + 8 <= V; v += 8) {
                const __m256 a = load8(x, xi + v, is_bf16);
                unord = _mm256_or_ps(unord, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
                const __m256 gt = _mm256_cmp_ps(a, bv, _CMP_GT_OQ);
                bv = _mm256_blendv_ps(bv, a, gt);
                bi = _mm256_blendv_epi8(bi, idx, _mm256_castps_si256(gt));
                idx = _mm256_add_epi32(idx, step);
            }
            if (_mm256_movemask_ps(unord)) {
                nan = 1;
            } else {
                float lv[8];
                int32_t li[8];
                _mm256_storeu_ps(lv, bv);
                _mm256_storeu_si256((__m256i *)li, bi);
                int first = 1;
                for (int l = 0; l < 8; l++)
                    if (first || lv[l] > best || (lv[l] == best && li[l] < arg)) {
                        best = lv[l], arg = li[l], first = 0;
                    }
            }
        }
#endif
        if (nan) {
            for (v = 0; v < V; v++)
                if (isnan(ld(x, xi + v, is_bf16))) break;
            out[s] = v;
            continue;
        }
        for (; v < V; v++) {
            const float a = ld(x, xi + v, is_bf16);
            if (isnan(a)) {
                arg = v;
                break;
            }
            if (a > best) best = a, arg = v;
        }
        out[s] = arg;
    }
}

/* SwiGLU: out[n, i] = silu(x[n, i]) * x[n, I + i] for x [N, 2I] (rows `ldx` apart), out [N, I].
 * As torch: silu in fp32 rounded to the dtype, then the product rounded. */
void silu_and_mul(const void *x, int64_t ldx, void *out, int64_t N, int I, int is_bf16, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (N > 8)
    for (int64_t n = 0; n < N; n++) {
        const int64_t xi = n * ldx, oi = n * (int64_t)I;
        int i = 0;
#ifdef __AVX512F__
        const __m512 one = _mm512_set1_ps(1.f);
        for (; i + 16 <= I; i += 16) {
            __m512 g = load16(x, xi + i, is_bf16), u = load16(x, xi + I + i, is_bf16);
            __m512 e = exp512(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), g), _mm512_set1_ps(88.f)));
            __m512 s = _mm512_div_ps(g, _mm512_add_ps(one, e));
            if (is_bf16) s = round_bf16(s);
            store16(out, oi + i, _mm512_mul_ps(s, u), is_bf16);
        }
#elif defined(SHOAL_AVX2)
        const __m256 one = _mm256_set1_ps(1.f);
        /* exp256 gives exp512's bits, so this gives the AVX-512 body's results: 16 at a time as it,
         * leaving it the same last I % 16 for expf (fp32 results differ in those otherwise) */
        for (; i + 16 <= I; i += 16)
            for (int k = 0; k < 16; k += 8) {
                const __m256 g = load8(x, xi + i + k, is_bf16), u = load8(x, xi + I + i + k, is_bf16);
                const __m256 e = exp256(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), g), _mm256_set1_ps(88.f)));
                __m256 s = _mm256_div_ps(g, _mm256_add_ps(one, e));
                if (is_bf16) s = round_bf16_256(s);
                store8(out, oi + i + k, _mm256_mul_ps(s, u), is_bf16);
            }
#endif
        for (; i < I; i++) {
            const float g = ld(x, xi + i, is_bf16);
            st(out, oi + i, rb(g / (1.f + expf(-g)), is_bf16) * ld(x, xi + I + i, is_bf16), is_bf16);
        }
    }
}

/* ------------------------------------------------------------------------------------------------
 * prefill_attention_bf16: the prompt rows of a prefill or mixed batch against their paged K/V cache
 * (already holding the new tokens), causal, on AMX-BF16 tiles (else AVX512-BF16, below). S sequences; sequence s has
 * q_len[s] query rows starting at row q_start[s] of q [T, HQ, D] and seq_lens[s] cached tokens, the
 * last q_len[s] of which are its queries (earlier ones are a prefix: prefix caching or an earlier
 * chunk). Query i of s sees keys 0 .. seq_lens[s] - q_len[s] + i.
 *
 * Two passes. (1) per (sequence, KV head) the keys are laid out as the B operand of Q·Kᵀ (pairs of
 * dimensions interleaved, 16 keys a tile row) and the values as the B operand of P·V (pairs of keys
 * interleaved, zero past the end). (2) per (sequence, KV head, block of 16 query rows) and query
 * head of the group: the scores of the block against every key it sees (fp32 tiles), an exact
 * softmax per row (fp32; the probabilities rounded to bf16 for the tile product, as torch's CPU
 * flash attention does), then P·V accumulated in fp32 tiles, normalised and rounded to bf16 once.
 * Needs bf16, D % 32 == 0, DV % 16 == 0, BS % 16 == 0. Returns 0; -1 when a scratch allocation
 * failed; -2 for shapes it does not take (the caller falls back). Without AMX or AVX512-BF16 (the
 * avx2 and generic tiers) a portable fp32 body runs instead (prefill_attention_portable, below), so
 * asked with no sequences it answers 0 on every tier.
 * ------------------------------------------------------------------------------------------------ */
#if defined(AMX_TILES) || (defined(__AVX512F__) && defined(__AVX512BF16__))
#define PA_KERNEL 1
/* 2^t for t ≤ 0: a degree-4 polynomial for 2^f on [-0.5, 0.5] (relative error 3e-6; the
 * probabilities are rounded to bf16 next), scaled back with vscalefps (0 for t far below -126) */
static inline __m512 exp2_fast(__m512 t) {
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.0096004092f), f, _mm512_set1_ps(0.0559169775f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2402371863f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931219847f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

/* pass 1 for one (sequence, KV head): keys t < len from the cache, zero from len to lk */
static void amx_layout(const uint16_t *KC, const uint16_t *VC, const int64_t *tab, int64_t len, int64_t lk, int BS,
                       int HKV, int h, int D, int DV, uint16_t *kt, uint16_t *vv) {
    const int NC = D / 32, NJ = DV / 16;
    /* Kt: one gather per (16 keys, dimension pair): the 16 keys of a tile sit in one cache block */
    const __m512i rowstep = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                               _mm512_set1_epi32(HKV * D / 2));
    for (int64_t t0 = 0; t0 < lk; t0 += 16) {
        const int64_t valid = len - t0 < 0 ? 0 : len - t0 < 16 ? len - t0 : 16;
        const __mmask16 k = (__mmask16)((1u << valid) - 1);
        uint32_t *kd = (uint32_t *)kt + (t0 / 16) * NC * 256;
        const uint32_t *base = valid ? (const uint32_t *)(KC + ((tab[t0 / BS] * BS + t0 % BS) * HKV + h) * D) : NULL;
        for (int r = 0; r < D / 2; r++) {
            const __m512i v = valid ? _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), k, rowstep, base + r, 4)
                                    : _mm512_setzero_si512();
            _mm512_storeu_si512(kd + (r / 16) * 256 + (r % 16) * 16, v);
        }
    }
    /* Vv: each pair of keys interleaved word by word, 32 value columns at a time */
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37,
                                        5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int64_t t = 0; t < lk; t += 2) {
        const uint16_t *row[2];
        for (int u = 0; u < 2; u++)
            row[u] = t + u < len ? VC + ((tab[(t + u) / BS] * BS + (t + u) % BS) * HKV + h) * DV : NULL;
        uint16_t *vd = vv + (t / 32) * NJ * 512 + ((t % 32) / 2) * 32;
        int j = 0;
        for (; 2 * j + 2 <= NJ; j += 2) {
            const __m512i a = row[0] ? _mm512_loadu_si512(row[0] + j * 16) : _mm512_setzero_si512();
            const __m512i b = row[1] ? _mm512_loadu_si512(row[1] + j * 16) : _mm512_setzero_si512();
            _mm512_storeu_si512(vd + j * 512, _mm512_permutex2var_epi16(a, lo, b));
            _mm512_storeu_si512(vd + (j + 1) * 512, _mm512_permutex2var_epi16(a, hi, b));
        }
        for (; j < NJ; j++)
            for (int n = 0; n < 16; n++)
                for (int u = 0; u < 2; u++) vd[j * 512 + n * 2 + u] = row[u] ? row[u][j * 16 + n] : 0;
    }
}
#endif

#ifdef PA_KERNEL
/* The two products of pass 2 without AMX, on AVX512-BF16 (vdpbf16ps: the same bf16 products, exact
 * in fp32, summed in another order), from the same layouts. Scores: 16 query rows (qb [16][D]) ×
 * key block kb: per pair of dimensions one vector of the 16 keys' pair, times each row's pair
 * broadcast → sc[i][16·kb ..]. */
static inline void pa_scores_avx512(const uint16_t *qb, const uint16_t *kt, int64_t kblocks, int D, float *sc,
                                    int64_t ld) {
    const int NC = D / 32;
    for (int64_t kb = 0; kb < kblocks; kb++) {
        __m512 acc[16];
        for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
        const uint32_t *kd = (const uint32_t *)(kt + kb * NC * 512);
        for (int c = 0; c < NC; c++)
            for (int r = 0; r < 16; r++) {
                const __m512bh kv = (__m512bh)_mm512_load_si512(kd + c * 256 + r * 16);
                for (int i = 0; i < 16; i++) {
                    int32_t qv;
                    memcpy(&qv, qb + i * D + 32 * c + 2 * r, 4);
                    acc[i] = _mm512_dpbf16_ps(acc[i], kv, (__m512bh)_mm512_set1_epi32(qv));
                }
            }
        for (int i = 0; i < 16; i++) _mm512_storeu_ps(sc + i * ld + kb * 16, acc[i]);
    }
}

/* P·V: rows i0..i0+3 of P (pb [16][ld] bf16, zero past each row's keys) × value columns of chunks
 * j0..j0+nj-1 (nj ≤ 4), over `pairs` blocks of 32 keys → ob [4][64] fp32 */
static inline __attribute__((always_inline)) void pa_pv_avx512(const uint16_t *pb, int64_t ld, int i0,
                                                               const uint16_t *vv, int64_t pairs, int NJ, int j0,
                                                               int nj, float *ob) {
    __m512 acc[4][4];
    for (int ii = 0; ii < 4; ii++)
        for (int j = 0; j < 4; j++) acc[ii][j] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; p++)
        for (int r = 0; r < 16; r++) {
            __m512bh v[4];
            for (int j = 0; j < nj; j++) v[j] = (__m512bh)_mm512_load_si512(vv + (p * NJ + j0 + j) * 512 + r * 32);
            for (int ii = 0; ii < 4; ii++) {
                int32_t pv;
                memcpy(&pv, pb + (i0 + ii) * ld + p * 32 + 2 * r, 4);
                const __m512bh b = (__m512bh)_mm512_set1_epi32(pv);
                for (int j = 0; j < nj; j++) acc[ii][j] = _mm512_dpbf16_ps(acc[ii][j], v[j], b);
            }
        }
    for (int ii = 0; ii < 4; ii++)
        for (int j = 0; j < nj; j++) _mm512_storeu_ps(ob + ii * 64 + j * 16, acc[ii][j]);
}
#endif

#ifndef PA_KERNEL
/* ------------------------------------------------------------------------------------------------
 * prefill_attention_bf16 without AMX or AVX512-BF16 (the avx2 and generic tiers): the same causal
 * attention in fp32 on widened bf16 (FMA on AVX2; plain C that the compiler vectorises elsewhere),
 * flash-attention style. Pass (1) per (sequence, KV head) lays the keys out as fp32 [lk/16][D][16]
 * (sixteen keys side by side per dimension) and the values as fp32 [lk][DV], zero past the end.
 * Pass (2) per (sequence, KV head, block of QB query positions): the block's QB·G query rows (every
 * query head of the group: the rows that share the KV head) go over the keys they see PF_KB at a
 * time: scores, an online softmax (running max and sum per row, the output rescaled when the max
 * grows), P·V accumulated in fp32, normalised and rounded to bf16 once. Each key and value loaded
 * serves all QB·G rows. Unlike the AVX-512 body the probabilities stay fp32 (no bf16 rounding for
 * a tile product): its results within bf16 rounding of P, and closer to the exact ones.
 * ------------------------------------------------------------------------------------------------ */
#define PF_KB 64 /* keys per online-softmax step: a step's scores [QB·G][64] fp32 stay in L1 */
#ifdef SHOAL_AVX2
#define PF_RQ 6 /* query rows per score tile: 6 × 16 keys = 12 accumulators */
#else
#define PF_RQ 4
#endif

#ifdef SHOAL_AVX2
/* r[i] ← column i of the 8 × 8 matrix of rows r[0..8) */
static inline void transpose8_avx2(__m256 r[8]) {
    __m256 t[8], s[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        s[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        s[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        s[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        s[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x31);
    }
}
#endif

/* pass 1 for one (sequence, KV head): keys t < len from the cache, zero from len to lk */
static void pf_layout(const uint16_t *KC, const uint16_t *VC, const int64_t *tab, int64_t len, int64_t lk, int BS,
                      int HKV, int h, int D, int DV, float *kt, float *vf) {
    for (int64_t t0 = 0; t0 < lk; t0 += 16) {
        /* the sixteen keys sit in one cache block (BS % 16 == 0), rows HKV·D apart */
        const uint16_t *row[16];
        for (int n = 0; n < 16; n++)
            row[n] = t0 + n < len ? KC + ((tab[(t0 + n) / BS] * BS + (t0 + n) % BS) * HKV + h) * (int64_t)D : NULL;
        float *kd = kt + t0 * D;
#ifdef SHOAL_AVX2
        for (int n0 = 0; n0 < 16; n0 += 8)
            for (int d0 = 0; d0 < D; d0 += 8) {
                __m256 r[8];
                for (int i = 0; i < 8; i++) r[i] = row[n0 + i] ? bf16x8_load(row[n0 + i] + d0) : _mm256_setzero_ps();
                transpose8_avx2(r);
                for (int i = 0; i < 8; i++) _mm256_storeu_ps(kd + (int64_t)(d0 + i) * 16 + n0, r[i]);
            }
#else
        for (int d = 0; d < D; d++)
            for (int n = 0; n < 16; n++) kd[(int64_t)d * 16 + n] = row[n] ? bf16_to_f32(row[n][d]) : 0.f;
#endif
    }
    for (int64_t t = 0; t < lk; t++) {
        float *vd = vf + t * DV;
        if (t >= len) {
            memset(vd, 0, sizeof(float) * (size_t)DV);
            continue;
        }
        const uint16_t *src = VC + ((tab[t / BS] * BS + t % BS) * HKV + h) * (int64_t)DV;
        for (int c = 0; c < DV; c++) vd[c] = bf16_to_f32(src[c]);
    }
}

/* S[r][0..16) = qf[r] · the sixteen keys of kg ([D][16]) for the rows r < R (qf rows D apart, S rows
 * ldS apart) */
static inline __attribute__((always_inline)) void pf_qk(const float *qf, int D, const float *kg, float *S, int ldS,
                                                        int R) {
#ifdef SHOAL_AVX2
    __m256 a[PF_RQ][2];
    for (int r = 0; r < R; r++) a[r][0] = a[r][1] = _mm256_setzero_ps();
    for (int d = 0; d < D; d++) {
        const __m256 k0 = _mm256_loadu_ps(kg + d * 16), k1 = _mm256_loadu_ps(kg + d * 16 + 8);
        for (int r = 0; r < R; r++) {
            const __m256 qd = _mm256_broadcast_ss(qf + r * D + d);
            a[r][0] = _mm256_fmadd_ps(qd, k0, a[r][0]);
            a[r][1] = _mm256_fmadd_ps(qd, k1, a[r][1]);
        }
    }
    for (int r = 0; r < R; r++) {
        _mm256_storeu_ps(S + r * ldS, a[r][0]);
        _mm256_storeu_ps(S + r * ldS + 8, a[r][1]);
    }
#else
    float a[PF_RQ][16];
    for (int r = 0; r < R; r++)
        for (int n = 0; n < 16; n++) a[r][n] = 0.f;
    for (int d = 0; d < D; d++)
        for (int r = 0; r < R; r++) {
            const float qd = qf[r * D + d];
            for (int n = 0; n < 16; n++) a[r][n] += qd * kg[d * 16 + n];
        }
    for (int r = 0; r < R; r++)
        for (int n = 0; n < 16; n++) S[r * ldS + n] = a[r][n];
#endif
}

/* One online-softmax step of a row: its kn scores s of this key block (kn % 16 == 0), the first vc
 * visible (the rest are keys past the row's position). Updates the running max m (of the raw
 * scores) and sum l, turns s into the probabilities (0 where masked) and returns the factor the
 * row's output so far is scaled by. exp(scale·x) = 2^(l2·x), as the AVX-512 body. */
static inline float pf_softmax_row(float *s, int kn, int vc, float *m, float *l, float l2) {
    if (vc <= 0) { /* every key of the block is past this row's position */
        memset(s, 0, sizeof(float) * (size_t)kn);
        return 1.f;
    }
    float mx = -INFINITY, sum = 0.f;
    int k = 0;
#ifdef SHOAL_AVX2
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    __m256 vm = ninf;
    for (; k + 8 <= vc; k += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(s + k));
    if (k < vc) vm = _mm256_max_ps(vm, _mm256_blendv_ps(ninf, _mm256_loadu_ps(s + k), _mm256_castsi256_ps(first_lanes8(vc - k))));
    mx = reduce8_max(vm);
#else
    for (; k < vc; k++) mx = s[k] > mx ? s[k] : mx;
#endif
    const float mn = mx > *m ? mx : *m, mnl = mn * l2;
    const float corr = *m == -INFINITY ? 0.f : exp2f((*m - mn) * l2);
#ifdef SHOAL_AVX2
    const __m256 vl2 = _mm256_set1_ps(l2), vmn = _mm256_set1_ps(mnl), lo = _mm256_set1_ps(-149.f);
    __m256 vs = _mm256_setzero_ps();
    for (k = 0; k < kn; k += 8) {
        if (k >= vc) {
            _mm256_storeu_ps(s + k, _mm256_setzero_ps());
            continue;
        }
        __m256 e = exp2_256(_mm256_max_ps(_mm256_fmsub_ps(_mm256_loadu_ps(s + k), vl2, vmn), lo));
        if (k + 8 > vc) e = _mm256_and_ps(e, _mm256_castsi256_ps(first_lanes8(vc - k)));
        _mm256_storeu_ps(s + k, e);
        vs = _mm256_add_ps(vs, e);
    }
    sum = reduce8_add(vs);
#else
    for (k = 0; k < kn; k++) {
        s[k] = k < vc ? exp2f(s[k] * l2 - mnl) : 0.f;
        sum += s[k];
    }
#endif
    *l = *l * corr + sum;
    *m = mn;
    return corr;
}

#ifdef SHOAL_AVX2
/* O[r][0 .. 8·NV) = O[r]·corr[r] + Σ_k P[r][k] · vf[k][0 .. 8·NV) for rows r < R, keys k < kn (O rows
 * DV apart, P rows ldP apart, vf rows DV apart); R·NV ≤ 12 accumulators in registers */
static inline __attribute__((always_inline)) void pf_pv(const float *P, int ldP, const float *vf, int DV, int kn,
                                                        float *O, const float *corr, int R, int NV) {
    __m256 a[12];
    for (int r = 0; r < R; r++) {
        const __m256 c = _mm256_set1_ps(corr[r]);
        for (int u = 0; u < NV; u++) a[r * NV + u] = _mm256_mul_ps(_mm256_loadu_ps(O + r * DV + u * 8), c);
    }
    for (int k = 0; k < kn; k++) {
        __m256 v[4];
        for (int u = 0; u < NV; u++) v[u] = _mm256_loadu_ps(vf + (int64_t)k * DV + u * 8);
        for (int r = 0; r < R; r++) {
            const __m256 p = _mm256_broadcast_ss(P + r * ldP + k);
            for (int u = 0; u < NV; u++) a[r * NV + u] = _mm256_fmadd_ps(p, v[u], a[r * NV + u]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int u = 0; u < NV; u++) _mm256_storeu_ps(O + r * DV + u * 8, a[r * NV + u]);
}
#endif

static int prefill_attention_portable(const uint16_t *Q, const uint16_t *KC, const uint16_t *VC,
                                      const int64_t *tables, const int64_t *q_start, const int64_t *q_len,
                                      const int64_t *seq_lens, uint16_t *O, int S, int HQ, int HKV, int D, int DV,
                                      int BS, int W, float scale, int nthreads) {
    const int G = HQ / HKV;
    /* query positions per item: QB·G rows share each key and value load (16 × G = 48 rows for
     * 9 query / 3 KV heads) */
    const int QB = G == 1 ? 32 : G <= 4 ? 16 : 8, MR = QB * G;
    int64_t *off = malloc(sizeof(int64_t) * ((size_t)S + 1) * 2);
    if (!off) return -1;
    int64_t *first = off + S + 1;
    off[0] = 0, first[0] = 0;
    for (int s = 0; s < S; s++) {
        off[s + 1] = off[s] + (seq_lens[s] + 15) / 16 * 16 * HKV * (D + DV);
        first[s + 1] = first[s] + (q_len[s] + QB - 1) / QB * HKV;
    }
    float *lay = aligned_alloc(64, sizeof(float) * (size_t)(off[S] > 0 ? off[S] : 16));
    if (!lay) {
        free(off);
        return -1;
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t item = 0; item < (int64_t)S * HKV; item++) {
        const int s = (int)(item / HKV), h = (int)(item % HKV);
        const int64_t lk = (seq_lens[s] + 15) / 16 * 16;
        float *kt = lay + off[s] + (int64_t)h * lk * (D + DV);
        pf_layout(KC, VC, tables + (int64_t)s * W, seq_lens[s], lk, BS, HKV, h, D, DV, kt, kt + lk * D);
    }
    int failed = 0;
    const float l2 = scale * 1.44269504088896341f;
#pragma omp parallel num_threads(nthreads)
    {
        /* per thread: query rows [MR][D], a step's scores [MR][PF_KB], outputs [MR][DV], and per row
         * the running max, sum and rescale factor */
        float *buf = aligned_alloc(64, sizeof(float) * (size_t)MR * (D + PF_KB + DV + 3));
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
            float *qf = buf, *sc = qf + (size_t)MR * D, *ob = sc + (size_t)MR * PF_KB, *mrow = ob + (size_t)MR * DV;
            float *lrow = mrow + MR, *corr = lrow + MR;
#pragma omp for schedule(dynamic, 1)
            for (int64_t item = 0; item < first[S]; item++) {
                int s = 0;
                while (first[s + 1] <= item) s++;
                const int64_t rel = item - first[s];
                const int h = (int)(rel % HKV);
                const int64_t n = q_len[s], len = seq_lens[s], lk = (len + 15) / 16 * 16;
                const int64_t i0 = rel / HKV * QB, rows = n - i0 < QB ? n - i0 : QB;
                const int64_t pos0 = len - n + i0; /* position of the block's first query */
                const int64_t seen = pos0 + rows;  /* keys its last row sees */
                const float *kt = lay + off[s] + (int64_t)h * lk * (D + DV), *vf = kt + lk * D;
                const int M = (int)rows * G; /* row r: query position i0 + r / G, head h·G + r % G */
                for (int r = 0; r < M; r++) {
                    const uint16_t *src = Q + ((q_start[s] + i0 + r / G) * HQ + h * G + r % G) * (int64_t)D;
                    for (int d = 0; d < D; d++) qf[(size_t)r * D + d] = bf16_to_f32(src[d]);
                    mrow[r] = -INFINITY, lrow[r] = 0.f;
                }
                memset(ob, 0, sizeof(float) * (size_t)M * DV);
                for (int64_t k0 = 0; k0 < seen; k0 += PF_KB) {
                    const int kn = (int)((seen + 15) / 16 * 16 - k0 < PF_KB ? (seen + 15) / 16 * 16 - k0 : PF_KB);
                    for (int j = 0; j < kn; j += 16)
                        for (int r0 = 0; r0 < M; r0 += PF_RQ) {
                            const float *qr = qf + (size_t)r0 * D, *kg = kt + (k0 + j) * D;
                            float *sr = sc + (size_t)r0 * PF_KB + j;
                            switch (M - r0 < PF_RQ ? M - r0 : PF_RQ) {
                                case 1: pf_qk(qr, D, kg, sr, PF_KB, 1); break;
                                case 2: pf_qk(qr, D, kg, sr, PF_KB, 2); break;
                                case 3: pf_qk(qr, D, kg, sr, PF_KB, 3); break;
#if PF_RQ > 4
                                case 4: pf_qk(qr, D, kg, sr, PF_KB, 4); break;
                                case 5: pf_qk(qr, D, kg, sr, PF_KB, 5); break;
#endif
                                default: pf_qk(qr, D, kg, sr, PF_KB, PF_RQ);
                            }
                        }
                    int kmax = 0; /* keys any row sees in this step: P·V stops there */
                    for (int r = 0; r < M; r++) {
                        const int64_t v = pos0 + r / G + 1 - k0;
                        const int vc = v < kn ? (int)v : kn;
                        corr[r] = pf_softmax_row(sc + (size_t)r * PF_KB, kn, vc, mrow + r, lrow + r, l2);
                        kmax = vc > kmax ? vc : kmax;
                    }
                    const float *vk = vf + k0 * DV;
#ifdef SHOAL_AVX2
                    if (DV % 32 == 0) { /* 3 rows × 32 columns */
                        for (int c0 = 0; c0 < DV; c0 += 32)
                            for (int r0 = 0; r0 < M; r0 += 3) {
                                const float *pr = sc + (size_t)r0 * PF_KB;
                                float *orow = ob + (size_t)r0 * DV + c0;
                                switch (M - r0 < 3 ? M - r0 : 3) {
                                    case 1: pf_pv(pr, PF_KB, vk + c0, DV, kmax, orow, corr + r0, 1, 4); break;
                                    case 2: pf_pv(pr, PF_KB, vk + c0, DV, kmax, orow, corr + r0, 2, 4); break;
                                    default: pf_pv(pr, PF_KB, vk + c0, DV, kmax, orow, corr + r0, 3, 4);
                                }
                            }
                    } else { /* 6 rows × 16 columns */
                        for (int c0 = 0; c0 < DV; c0 += 16)
                            for (int r0 = 0; r0 < M; r0 += 6) {
                                const float *pr = sc + (size_t)r0 * PF_KB;
                                float *orow = ob + (size_t)r0 * DV + c0;
                                switch (M - r0 < 6 ? M - r0 : 6) {
                                    case 1: pf_pv(pr, PF_KB, vk + c0, DV, kmax, orow, corr + r0, 1, 2); break;
                                    case 2: pf_pv(pr, PF_KB, vk + c0, DV, kmax, orow, corr + r0, 2, 2); break;
                                    case 3: pf_pv(pr, PF_KB, vk + c0, DV, kmax, orow, corr + r0, 3, 2); break;
                                    case 4: pf_pv(pr, PF_KB, vk + c0, DV, kmax, orow, corr + r0, 4, 2); break;
                                    case 5: pf_pv(pr, PF_KB, vk + c0, DV, kmax, orow, corr + r0, 5, 2); break;
                                    default: pf_pv(pr, PF_KB, vk + c0, DV, kmax, orow, corr + r0, 6, 2);
                                }
                            }
                    }
#else
                    for (int r = 0; r < M; r++) {
                        float *orow = ob + (size_t)r * DV;
                        const float *pr = sc + (size_t)r * PF_KB;
                        for (int c = 0; c < DV; c++) orow[c] *= corr[r];
                        for (int k = 0; k < kmax; k++) {
                            const float p = pr[k];
                            for (int c = 0; c < DV; c++) orow[c] += p * vk[(int64_t)k * DV + c];
                        }
                    }
#endif
                }
                for (int r = 0; r < M; r++) {
                    const float inv = lrow[r] > 0.f ? 1.f / lrow[r] : 0.f;
                    uint16_t *dst = O + ((q_start[s] + i0 + r / G) * HQ + h * G + r % G) * (int64_t)DV;
                    const float *orow = ob + (size_t)r * DV;
                    int c = 0;
#ifdef SHOAL_AVX2
                    for (; c < DV; c += 8)
                        _mm_storeu_si128((__m128i *)(dst + c), bf16x8(_mm256_mul_ps(_mm256_loadu_ps(orow + c), _mm256_set1_ps(inv))));
#endif
                    for (; c < DV; c++) dst[c] = f32_to_bf16(orow[c] * inv);
                }
            }
        }
        free(buf);
    }
    free(lay), free(off);
    return failed ? -1 : 0;
}
#endif

int prefill_attention_bf16(const void *q, const void *k_cache, const void *v_cache, const int64_t *tables,
                           const int64_t *q_start, const int64_t *q_len, const int64_t *seq_lens, void *out, int S,
                           int HQ, int HKV, int D, int DV, int BS, int W, float scale, int nthreads) {
    /* the shapes the AVX-512 body takes, on every tier (the portable one needs no more than BS % 16) */
    if (D % 32 || DV % 16 || BS % 16 || HQ % HKV) return -2;
#ifndef PA_KERNEL
    return prefill_attention_portable(q, k_cache, v_cache, tables, q_start, q_len, seq_lens, out, S, HQ, HKV, D, DV,
                                      BS, W, scale, nthreads);
#else
#ifdef AMX_TILES
    const int amx = amx_permitted();
#else
    const int amx = 0;
    (void)amx;
#endif
    const int G = HQ / HKV;
    const uint16_t *Q = q, *KC = k_cache, *VC = v_cache;
    uint16_t *O = out;
    /* pass-1 layout offsets: per (s, h) Lk = seq_len rounded up to 32 keys */
    int64_t *off = malloc(sizeof(int64_t) * ((size_t)S + 1));
    if (!off) return -1;
    int64_t max_lk = 32;
    off[0] = 0;
    for (int s = 0; s < S; s++) {
        const int64_t lk = (seq_lens[s] + 31) / 32 * 32;
        max_lk = lk > max_lk ? lk : max_lk;
        off[s + 1] = off[s] + lk * HKV * (D + DV);
    }
    uint16_t *lay = aligned_alloc(64, sizeof(uint16_t) * (size_t)(off[S] > 0 ? off[S] : 32));
    if (!lay) {
        free(off);
        return -1;
    }
    /* pass 1: Kt[s][h][key block kb of 16][dim chunk c of 32][pair r][key n][2] and
     * Vv[s][h][key pair block of 32][value chunk j of 16][pair r][column n][2] */
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t item = 0; item < (int64_t)S * HKV; item++) {
        const int s = (int)(item / HKV), h = (int)(item % HKV);
        const int64_t lk = (seq_lens[s] + 31) / 32 * 32;
        uint16_t *kt = lay + off[s] + (int64_t)h * lk * (D + DV);
        amx_layout(KC, VC, tables + (int64_t)s * W, seq_lens[s], lk, BS, HKV, h, D, DV, kt, kt + lk * D);
    }
    /* pass 2: work items (s, h, block of 16 query rows), indexed through a prefix sum */
    int64_t *first = malloc(sizeof(int64_t) * ((size_t)S + 1));
    if (!first) {
        free(lay), free(off);
        return -1;
    }
    first[0] = 0;
    for (int s = 0; s < S; s++) first[s + 1] = first[s] + (q_len[s] + 15) / 16 * HKV;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        /* per thread: Q block [16][D] bf16, scores [16][max_lk] fp32, P [16][max_lk] bf16, O [16][64] fp32 */
        char *buf = aligned_alloc(64, (size_t)16 * D * 2 + (size_t)16 * max_lk * 6 + 16 * 64 * 4);
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
            uint16_t *qb = (uint16_t *)buf;
            float *sc = (float *)(buf + (size_t)16 * D * 2);
            uint16_t *pb = (uint16_t *)(sc + (size_t)16 * max_lk);
            float *ob = (float *)(pb + (size_t)16 * max_lk);
#ifdef AMX_TILES
            if (amx) amx_configure();
#endif
#pragma omp for schedule(dynamic, 1)
            for (int64_t item = 0; item < first[S]; item++) {
                int s = 0;
                while (first[s + 1] <= item) s++;
                const int64_t rel = item - first[s];
                const int h = (int)(rel % HKV), blk = (int)(rel / HKV);
                const int64_t n = q_len[s], len = seq_lens[s], lk = (len + 31) / 32 * 32;
                const int64_t i0 = (int64_t)blk * 16, rows = n - i0 < 16 ? n - i0 : 16;
                const int64_t pos0 = len - n + i0;            /* position of the block's first query */
                const int64_t seen = pos0 + rows;             /* keys the block's last row sees */
                const int64_t kblocks = (seen + 15) / 16, pairs = (seen + 31) / 32;
                const uint16_t *kt = lay + off[s] + (int64_t)h * lk * (D + DV), *vv = kt + lk * D;
                const int NC = D / 32, NJ = DV / 16;
                (void)NC; /* the tile loop's; the AVX512 scores take D */
                for (int g = 0; g < G; g++) {
                    const int hq = h * G + g;
                    for (int64_t i = 0; i < 16; i++) {
                        if (i < rows) memcpy(qb + i * D, Q + ((q_start[s] + i0 + i) * HQ + hq) * D, (size_t)D * 2);
                        else memset(qb + i * D, 0, (size_t)D * 2);
                    }
                    /* scores: tile 0 = C, 1 = Q chunk, 2 = Kt chunk */
#ifdef AMX_TILES
                    if (amx) {
                        for (int64_t kb = 0; kb < kblocks; kb++) {
                            _tile_zero(0);
                            for (int c = 0; c < NC; c++) {
                                _tile_loadd(1, qb + c * 32, D * 2);
                                _tile_loadd(2, kt + (kb * NC + c) * 512, 64);
                                _tile_dpbf16ps(0, 1, 2);
                            }
                            _tile_stored(0, sc + kb * 16, max_lk * 4);
                        }
                    } else
#endif
                        pa_scores_avx512(qb, kt, kblocks, D, sc, max_lk);
                    /* softmax per row over keys 0 .. pos0 + i; P zero past them up to the pair block */
                    float inv[16];
                    const float l2 = scale * 1.44269504088896341f; /* exp(scale·x) = 2^(l2·x) */
                    const __m512 vl2 = _mm512_set1_ps(l2);
                    for (int64_t i = 0; i < 16; i++) {
                        float *row = sc + i * max_lk;
                        uint16_t *prow = pb + i * max_lk;
                        const int64_t m = i < rows ? pos0 + i + 1 : 0;
                        __m512 vmax = _mm512_set1_ps(-INFINITY);
                        int64_t t = 0;
                        for (; t + 16 <= m; t += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(row + t));
                        if (t < m) vmax = _mm512_mask_max_ps(vmax, (__mmask16)((1u << (m - t)) - 1), vmax,
                                                             _mm512_loadu_ps(row + t));
                        const __m512 mx = _mm512_set1_ps(m ? _mm512_reduce_max_ps(vmax) * l2 : 0.f);
                        __m512 vsum = _mm512_setzero_ps();
                        for (t = 0; t + 16 <= m; t += 16) {
                            const __m512 e = exp2_fast(_mm512_fmsub_ps(_mm512_loadu_ps(row + t), vl2, mx));
                            vsum = _mm512_add_ps(vsum, e);
                            _mm256_storeu_si256((__m256i *)(prow + t), bf16x16(e));
                        }
                        if (t < m) {
                            const __m512 e = _mm512_maskz_mov_ps((__mmask16)((1u << (m - t)) - 1),
                                                                 exp2_fast(_mm512_fmsub_ps(_mm512_loadu_ps(row + t), vl2, mx)));
                            vsum = _mm512_add_ps(vsum, e);
                            _mm256_storeu_si256((__m256i *)(prow + t), bf16x16(e));
                            t += 16;
                        }
                        for (; t < pairs * 32; t += 16) _mm256_storeu_si256((__m256i *)(prow + t), _mm256_setzero_si256());
                        const float sum = _mm512_reduce_add_ps(vsum);
                        inv[i] = sum > 0.f ? 1.f / sum : 0.f;
                    }
                    /* P·V, 64 value columns at a time: tiles 4..7 = C, 0 = P chunk, 1 = V chunk; without
                     * AMX four rows at a time */
                    for (int j0 = 0; j0 < NJ; j0 += 4) {
                        const int nj = NJ - j0 < 4 ? NJ - j0 : 4;
#ifdef AMX_TILES
                        if (amx) {
                            for (int j = 0; j < nj; j++) amx_zero(4 + j);
                            for (int64_t p = 0; p < pairs; p++) {
                                _tile_loadd(0, pb + p * 32, max_lk * 2);
                                for (int j = 0; j < nj; j++) amx_dp(4 + j, vv + (p * NJ + j0 + j) * 512);
                            }
                            for (int j = 0; j < nj; j++) amx_store(4 + j, ob + 16 * j, 256);
                        } else
#endif
                            for (int i4 = 0; i4 < rows; i4 += 4) {
                                switch (nj) {
                                    case 1: pa_pv_avx512(pb, max_lk, i4, vv, pairs, NJ, j0, 1, ob + i4 * 64); break;
                                    case 2: pa_pv_avx512(pb, max_lk, i4, vv, pairs, NJ, j0, 2, ob + i4 * 64); break;
                                    case 3: pa_pv_avx512(pb, max_lk, i4, vv, pairs, NJ, j0, 3, ob + i4 * 64); break;
                                    default: pa_pv_avx512(pb, max_lk, i4, vv, pairs, NJ, j0, 4, ob + i4 * 64);
                                }
                            }
                        for (int64_t i = 0; i < rows; i++) {
                            uint16_t *dst = O + ((q_start[s] + i0 + i) * HQ + hq) * DV + j0 * 16;
                            const __m512 vinv = _mm512_set1_ps(inv[i]);
                            for (int j = 0; j < nj; j++)
                                _mm256_storeu_si256((__m256i *)(dst + j * 16),
                                                    bf16x16(_mm512_mul_ps(_mm512_loadu_ps(ob + i * 64 + j * 16), vinv)));
                        }
                    }
                }
            }
#ifdef AMX_TILES
            if (amx) _tile_release();
#endif
        }
        free(buf);
    }
    free(first), free(lay), free(off);
    return failed ? -1 : 0;
#endif
}
