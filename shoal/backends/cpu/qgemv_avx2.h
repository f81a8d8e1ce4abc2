/* qgemv.c's AVX2 body (x86-64-v3: AVX2, FMA, F16C; no AVX-512), for CPUs such as AMD Zen 2/3 and
 * most laptops: included from qgemv.c when QG_AVX2 (after its scratch and activation helpers).
 *
 * The same arithmetic as the VNNI body (activations int8 per group of 32, scale amax / 127 rounded
 * to nearest even; int32 within a group, fp32 across groups), with AVX2's u8 × s8 product
 * vpmaddubsw (32 byte products summed in pairs into int16) in place of vpdpbusd:
 * - int4: codes 0..15 × activations −127..127: a vpmaddubsw lane is at most 2·15·127 = 3810 in
 *   magnitude, so the 8 steps of a group (4 K positions each) sum in int16 (≤ 30480) with vpaddw,
 *   and one vpmaddwd by ones per group widens to int32: 2 ops per 32 byte products;
 * - int8: bytes q + 128 (0..255) × activations would saturate int16 (255·127·2 > 32767), so the
 *   sign trick (llama.cpp's): w = byte ^ 0x80 is q itself, and vpmaddubsw(|q|, sign(x, q)) = q·x in
 *   pairs, at most 2·128·127 = 32512; widened to int32 every step. The products are Σ q·x directly,
 *   so the +128 offset's correction (the VNNI body's 128·Σx term) is not needed: the same int32 sums
 *   the VNNI body gets after it, in fp32 without the cancellation.
 * qgemv_fast() returns 2 for this body. Against the VNNI body on a 2-core AMD EPYC (Zen 4; both in one
 * process, alternating, 2 threads, bf16 rows): int4 batch-1 576 × 1536 0.017 vs 0.013 ms, 49152 × 576
 * 0.30 vs 0.22; 8 rows × 1536 × 576 0.042 vs 0.031; 512 rows 2.28 vs 1.54 ms (1.3–1.55×); int8 batch-1
 * 1.5× and 0.8×, from 8 rows ~2.6–3× (see q2_cols8). */

#define Q2_TR 6 /* activation rows per arranged block (the column kernels' register tile) */
/* int8: rows per pass of the kernel. The sign trick holds |q| and q of both halves (4 registers), so
 * 6 rows' 12 int32 sums spill a little; 3, 4 and 6 rows measured within 4% (512 × 1536 × 576, one
 * thread, 7.0–7.3 ms) */
#define Q2_TR8 6

static inline float q2_hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 8 fp32 → 8 bf16, round to nearest even, NaN kept quiet: exactly f32_to_bf16 (scalar.h) */
static inline __m128i q2_bf16x8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), 16);
    /* |u| > 0x7f800000 as signed ints (both operands are non-negative): NaN */
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
    const __m256i q = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    const __m256i o = _mm256_blendv_epi8(r, q, nan);
    /* words 0–3 and 4–7 sit in the low halves of the two 128-bit lanes: pack, then gather qwords 0, 2 */
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(o, o), 0x08));
}

/* 8 outputs to y (fp32, or bf16 rounded as f32_to_bf16) */
static inline void q2_store8(void *y, int64_t i, __m256 v, int is_bf16) {
    if (is_bf16) _mm_storeu_si128((__m128i *)((uint16_t *)y + i), q2_bf16x8(v));
    else _mm256_storeu_ps((float *)y + i, v);
}

/* silu(g)·u in fp32 (as silu_mul512) */
static inline __m256 q2_silu_mul(__m256 g, __m256 u) {
    const __m256 e = exp256(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), g), _mm256_set1_ps(88.f)));
    return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), e)), u);
}

/* ------------------------------------------------------------------------------------------------
 * quant_gemv's row layout: rows n of the weight against R quantized activation rows (quantize_row's
 * lane order). A 32-byte half of a pair holds lane dwords alternating groups A, B, as the VNNI body's
 * 512-bit lanes do, so one 8-lane [dA, dB, …] broadcast and [sA, sB, …] conversion line up with both
 * halves.
 * ------------------------------------------------------------------------------------------------ */

/* [a, b] → [a, b, a, b, …] (8 lanes) */
static inline __m256 q2_pair_bcast(const float *ab) {
    double d;
    memcpy(&d, ab, 8);
    return _mm256_castpd_ps(_mm256_set1_pd(d));
}

/* a pair's two fp16 scales → [sA, sB, sA, sB, …] */
static inline __m256 q2_pair_half(const uint16_t *s) {
    int32_t sp;
    memcpy(&sp, s, 4);
    return _mm256_cvtph_ps(_mm_set1_epi32(sp));
}

static inline __attribute__((always_inline)) void q2_int4_rows(const uint8_t *codes, const uint16_t *scales,
                                                              const uint16_t *offs, int64_t n0, int64_t n1, int P,
                                                              int G, const int8_t *xq, const float *dx,
                                                              const float *xs, int Kp, int R, void *y, int64_t ldy,
                                                              int is_bf16) {
    const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    const int Gp = 2 * P;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *c = codes + n * (int64_t)P * 32;
        const uint16_t *s = scales + n * Gp;
        if (qg_pf_rows) { /* a later row's codes, scales and offsets (as the VNNI body) */
            for (int o = 0; o < P * 32; o += 64) qg_prefetch(c + (int64_t)qg_pf_rows * P * 32 + o);
            qg_prefetch(s + (int64_t)qg_pf_rows * Gp), qg_prefetch(offs + (n + qg_pf_rows) * Gp);
        }
        __m256 acc[QG_MAXR], acc2[QG_MAXR]; /* two chains: even and odd pairs */
        for (int r = 0; r < R; r++) acc[r] = acc2[r] = _mm256_setzero_ps();
        int p = 0;
        /* blocks of two pairs: 64 bytes, pair p in the low nibbles and pair p + 1 in the high ones */
        for (; p + 2 <= P; p += 2) {
            const __m256i v0 = _mm256_loadu_si256((const __m256i *)(c + 32 * p));
            const __m256i v1 = _mm256_loadu_si256((const __m256i *)(c + 32 * p + 32));
            const __m256i l0 = _mm256_and_si256(v0, low), l1 = _mm256_and_si256(v1, low);
            const __m256i h0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low);
            const __m256i h1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low);
            const __m256 sv0 = q2_pair_half(s + 2 * p), sv1 = q2_pair_half(s + 2 * p + 2);
            for (int r = 0; r < R; r++) {
                const int8_t *xr = xq + (int64_t)r * Kp + 64 * p;
                const float *dr = dx + (int64_t)r * Gp + 2 * p;
                /* the two halves' int16 pair sums add without overflow (≤ 2·3810) */
                const __m256i t0 = _mm256_add_epi16(_mm256_maddubs_epi16(l0, _mm256_loadu_si256((const __m256i *)xr)),
                                                    _mm256_maddubs_epi16(l1, _mm256_loadu_si256((const __m256i *)(xr + 32))));
                const __m256i t1 = _mm256_add_epi16(_mm256_maddubs_epi16(h0, _mm256_loadu_si256((const __m256i *)(xr + 64))),
                                                    _mm256_maddubs_epi16(h1, _mm256_loadu_si256((const __m256i *)(xr + 96))));
                const __m256 f0 = _mm256_cvtepi32_ps(_mm256_madd_epi16(t0, ones));
                const __m256 f1 = _mm256_cvtepi32_ps(_mm256_madd_epi16(t1, ones));
                acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(f0, q2_pair_bcast(dr)), sv0, acc[r]);
                acc2[r] = _mm256_fmadd_ps(_mm256_mul_ps(f1, q2_pair_bcast(dr + 2)), sv1, acc2[r]);
            }
        }
        if (p < P) { /* a last, unpaired pair: 32 bytes, values j and j + 32 in the nibbles of byte j */
            const __m256i v = _mm256_loadu_si256((const __m256i *)(c + 32 * p));
            const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            const __m256 sv = q2_pair_half(s + 2 * p);
            for (int r = 0; r < R; r++) {
                const int8_t *xr = xq + (int64_t)r * Kp + 64 * p;
                const __m256i t = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)xr)),
                                                   _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(xr + 32))));
                const __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(t, ones));
                acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(f, q2_pair_bcast(dx + (int64_t)r * Gp + 2 * p)), sv, acc[r]);
            }
        }
        /* + Σ_g m_g · Σ x_g */
        const uint16_t *m = offs + n * Gp;
        for (int r = 0; r < R; r++) {
            __m256 mt = _mm256_setzero_ps();
            int g = 0;
            for (; g + 8 <= G; g += 8)
                mt = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(m + g))),
                                     _mm256_loadu_ps(xs + (int64_t)r * Gp + g), mt);
            float mr = 0.f;
            for (; g < G; g++) mr += qg_half(m[g]) * xs[(int64_t)r * Gp + g];
            st(y, (int64_t)r * ldy + n, q2_hsum(_mm256_add_ps(acc[r], acc2[r])) + (q2_hsum(mt) + mr), is_bf16);
        }
    }
}

static inline __attribute__((always_inline)) void q2_int8_rows(const uint8_t *wq, const float *scales, int64_t n0,
                                                              int64_t n1, int P, const int8_t *xq, const float *dx,
                                                              int Kp, int R, void *y, int64_t ldy, int is_bf16) {
    const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    const int Gp = 2 * P;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *c = wq + n * (int64_t)Kp;
        if (qg_pf_rows)
            for (int o = 0; o < Kp; o += 64) qg_prefetch(c + (int64_t)qg_pf_rows * Kp + o);
        __m256 acc[QG_MAXR];
        for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
        for (int p = 0; p < P; p++) {
            const __m256i q0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(c + 64 * p)), flip);
            const __m256i q1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(c + 64 * p + 32)), flip);
            const __m256i a0 = _mm256_abs_epi8(q0), a1 = _mm256_abs_epi8(q1);
            for (int r = 0; r < R; r++) {
                const int8_t *xr = xq + (int64_t)r * Kp + 64 * p;
                const __m256i t0 = _mm256_maddubs_epi16(a0, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)xr), q0));
                const __m256i t1 = _mm256_maddubs_epi16(a1, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(xr + 32)), q1));
                const __m256i i = _mm256_add_epi32(_mm256_madd_epi16(t0, ones), _mm256_madd_epi16(t1, ones));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), q2_pair_bcast(dx + (int64_t)r * Gp + 2 * p), acc[r]);
            }
        }
        for (int r = 0; r < R; r++) st(y, (int64_t)r * ldy + n, scales[n] * q2_hsum(acc[r]), is_bf16);
    }
}

/* ------------------------------------------------------------------------------------------------
 * quant_gemm_vnni / _glu's column layout (kernels.to_columns; block layouts in qgemv.c above
 * qv_rows): a 64-byte vector holds the same 4 bytes of 16 output rows, i.e. two 256-bit halves of 8
 * output rows, one 32-bit lane per output. Activations are quantized once per call into blocks of
 * Q2_TR rows arranged [group][step j][row] (the row's 4 int8 values of step j as one dword) with
 * [group][row] scales and quantized sums, so one pointer and constant offsets address a tile's
 * broadcasts. One kernel for every row count: TR rows of a block × one 16-column block, the TR·2
 * int16 (int4) or int32 (int8) group sums in registers; every weight vector loaded once per TR rows
 * and every activation broadcast used for both halves.
 * ------------------------------------------------------------------------------------------------ */

/* group x[k0, k0 + 32) (zeros past K) → its 32 int8 values in natural order (q, as 8 dwords) and
 * their sum; returns the scale amax / 127 (the divisions and roundings of quantize_row) */
static inline float q2_quantize_group(const void *x, int K, int k0, int is_bf16, int32_t *q, int *qsum) {
    __m256 a[4];
    const int n = K - k0 >= 32 ? 32 : K - k0;
    if (n == 32) {
        for (int i = 0; i < 4; i++)
            a[i] = is_bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(
                                 _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + k0 + 8 * i))), 16))
                           : _mm256_loadu_ps((const float *)x + k0 + 8 * i);
    } else {
        _Alignas(32) float t[32];
        for (int i = 0; i < 32; i++) t[i] = i < n ? ld(x, k0 + i, is_bf16) : 0.f;
        for (int i = 0; i < 4; i++) a[i] = _mm256_load_ps(t + 8 * i);
    }
    const __m256 sign = _mm256_set1_ps(-0.f);
    const __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, a[0]), _mm256_andnot_ps(sign, a[1])),
                                   _mm256_max_ps(_mm256_andnot_ps(sign, a[2]), _mm256_andnot_ps(sign, a[3])));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const __m256 vi = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    __m256i qi[4];
    for (int i = 0; i < 4; i++) qi[i] = _mm256_cvtps_epi32(_mm256_mul_ps(a[i], vi)); /* nearest even */
    /* int32 → int8 (|q| ≤ 127: no saturation); the packs interleave 128-bit lanes, one permute undoes it */
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
    _mm256_store_si256((__m256i *)q, _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    const __m256i s = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]), _mm256_add_epi32(qi[2], qi[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    *qsum = _mm_cvtsi128_si32(s4);
    return amax / 127.f;
}

/* rows [b·Q2_TR, b·Q2_TR + Q2_TR) of x → block b's arranged activations: xa [Gp][8][Q2_TR] dwords, da
 * / sa [Gp][Q2_TR] scales and quantized sums dx_g · Σ xq_g (as quantize_row); rows past M and groups
 * past K are zeros */
static void q2_arrange(int b, int M, const void *x, int64_t ldx, int K, int Kp, int is_bf16, int32_t *xa, float *da,
                       float *sa) {
    const int Gp = Kp / 32, esz = is_bf16 ? 2 : 4;
    for (int r = 0; r < Q2_TR; r++) {
        const int row = b * Q2_TR + r;
        const char *xr = (const char *)x + (size_t)row * ldx * esz;
        for (int g = 0; g < Gp; g++) {
            _Alignas(32) int32_t q[8] = {0};
            int qs = 0;
            const float d = row < M && 32 * g < K ? q2_quantize_group(xr, K, 32 * g, is_bf16, q, &qs) : 0.f;
            for (int j = 0; j < 8; j++) xa[(g * 8 + j) * Q2_TR + r] = q[j];
            da[g * Q2_TR + r] = d;
            sa[g * Q2_TR + r] = d * (float)qs;
        }
    }
}

/* a register GCC must treat as unknown: keeps each accumulator's additions in program order. Without
 * it GCC reassociated a group's 8 integer additions into trees and hoisted the activation broadcasts,
 * spilling both (the int4 6-row kernel ran most of its vpaddw from the stack) */
#define Q2_OPAQUE(v) __asm__("" : "+x"(v))

/* prefetches of a group: lines [l, l + per) of pf below nl (the next block's slice this call brings
 * in), per = ceil(nl / G) lines a group (no division per group) */
static inline __attribute__((always_inline)) void q2_pf(const uint8_t *pf, int nl, int g, int per) {
    for (int l = g * per, e = l + per < nl ? l + per : nl; l < e; l++) qg_prefetch(pf + 64 * (int64_t)l);
}

/* int4, TR (1..6) rows of an arranged block (xa, da, sa already at the first row; stride Q2_TR) ×
 * column block wb (scales sb, offsets mb: [Gp][16] fp16) → o[r][0..16) fp32.
 * Step j of group g reads lane dword 2j + par of pair p = g / 2 (K positions 32g + 4j + 0..3): in a
 * full 64-byte block (pairs 2b, 2b + 1) vector 2j + par, the low nibbles for even p and the high ones
 * for odd p; in an odd last pair's 32 bytes, vector (2j + par) mod 8, low nibbles for j < 4. */
static inline __attribute__((always_inline)) void q2_cols4(int TR, const uint8_t *wb, const uint16_t *sb,
                                                          const uint16_t *mb, const int32_t *xa, const float *da,
                                                          const float *sa, int G, int P, float *o, const uint8_t *pf,
                                                          int nl) {
    const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    const int per = (nl + G - 1) / G;
    __m256 acc[Q2_TR][2];
    for (int r = 0; r < TR; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int g = 0; g < G; g++) {
        q2_pf(pf, nl, g, per);
        const int p = g >> 1, par = g & 1, tail = (P & 1) && p == P - 1;
        const uint8_t *w = wb + (int64_t)(p >> 1) * 1024;
        const int32_t *xg = xa + g * 8 * Q2_TR;
        __m256i ia[Q2_TR][2];
        for (int r = 0; r < TR; r++) ia[r][0] = ia[r][1] = _mm256_setzero_si256();
        /* three copies of the 8 steps with the nibble and the vector index constant (as the VNNI
         * body's: a run-time choice per step kept the loop rolled) */
#define Q2_STEPS(VEC, SHIFT)                                                                          \
    const uint8_t *wq = w;                                                                            \
    const int32_t *xq = xg;                                                                           \
    __asm__("" : "+r"(wq), "+r"(xq)); /* no loads shared by the three copies (hoisted above them) */  \
    _Pragma("GCC unroll 8") for (int j = 0; j < 8; j++) {                                             \
        const uint8_t *wv = wq + 64 * (VEC);                                                          \
        __m256i w0 = _mm256_loadu_si256((const __m256i *)wv), w1 = _mm256_loadu_si256((const __m256i *)(wv + 32)); \
        if (SHIFT) w0 = _mm256_srli_epi16(w0, 4), w1 = _mm256_srli_epi16(w1, 4);                     \
        w0 = _mm256_and_si256(w0, low), w1 = _mm256_and_si256(w1, low);                               \
        for (int r = 0; r < TR; r++) {                                                                \
            const __m256i xb = _mm256_set1_epi32(xq[j * Q2_TR + r]);                                  \
            ia[r][0] = _mm256_add_epi16(ia[r][0], _mm256_maddubs_epi16(w0, xb));                      \
            ia[r][1] = _mm256_add_epi16(ia[r][1], _mm256_maddubs_epi16(w1, xb));                      \
            Q2_OPAQUE(ia[r][0]); Q2_OPAQUE(ia[r][1]);                                                 \
        }                                                                                             \
    }
        if (tail) {
            Q2_STEPS((2 * j + par) & 7, j >= 4)
        } else if (p & 1) {
            Q2_STEPS(2 * j + par, 1)
        } else {
            Q2_STEPS(2 * j + par, 0)
        }
#undef Q2_STEPS
        const __m256 s0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sb + g * 16)));
        const __m256 s1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sb + g * 16 + 8)));
        const __m256 m0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mb + g * 16)));
        const __m256 m1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mb + g * 16 + 8)));
        for (int r = 0; r < TR; r++) {
            const __m256 d = _mm256_set1_ps(da[g * Q2_TR + r]), xs = _mm256_set1_ps(sa[g * Q2_TR + r]);
            acc[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(ia[r][0], ones)), _mm256_mul_ps(s0, d), acc[r][0]);
            acc[r][0] = _mm256_fmadd_ps(m0, xs, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(ia[r][1], ones)), _mm256_mul_ps(s1, d), acc[r][1]);
            acc[r][1] = _mm256_fmadd_ps(m1, xs, acc[r][1]);
        }
    }
    for (int r = 0; r < TR; r++) {
        _mm256_store_ps(o + 16 * r, acc[r][0]);
        _mm256_store_ps(o + 16 * r + 8, acc[r][1]);
    }
}

/* int8, TR (1..Q2_TR8) rows (as q2_cols4): o[r][0..16) = Σ_g dx_g · Σ q·x, the row scales not
 * applied. Step j of group g: vector 2j + par of pair p's 1024 bytes. Each product costs 4 ops per 32
 * bytes (vpsignb, vpmaddubsw, vpmaddwd, vpaddd) against int4's 2, and both vpsignb and vpmaddwd
 * count: dropping either (a wrong result, timing only) took 512 × 1536 × 576 from 6.9 to 5.1–5.2 ms;
 * so int8 runs at ~1/3 of the VNNI body where int4 runs at ~2/3. */
static inline __attribute__((always_inline)) void q2_cols8(int TR, const uint8_t *wb, const int32_t *xa,
                                                          const float *da, int G, float *o, const uint8_t *pf, int nl) {
    const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    const int per = (nl + G - 1) / G;
    __m256 acc[Q2_TR8][2];
    for (int r = 0; r < TR; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int g = 0; g < G; g++) {
        q2_pf(pf, nl, g, per);
        const int p = g >> 1, par = g & 1;
        const uint8_t *w = wb + (int64_t)p * 1024 + 64 * par;
        const int32_t *xg = xa + g * 8 * Q2_TR;
        __m256i ia[Q2_TR8][2];
        for (int r = 0; r < TR; r++) ia[r][0] = ia[r][1] = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            const __m256i q0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w + 128 * j)), flip);
            const __m256i q1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w + 128 * j + 32)), flip);
            const __m256i a0 = _mm256_abs_epi8(q0), a1 = _mm256_abs_epi8(q1);
            for (int r = 0; r < TR; r++) {
                const __m256i xb = _mm256_set1_epi32(xg[j * Q2_TR + r]);
                ia[r][0] = _mm256_add_epi32(ia[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(a0, _mm256_sign_epi8(xb, q0)), ones));
                ia[r][1] = _mm256_add_epi32(ia[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(a1, _mm256_sign_epi8(xb, q1)), ones));
                Q2_OPAQUE(ia[r][0]); Q2_OPAQUE(ia[r][1]);
            }
        }
        for (int r = 0; r < TR; r++) {
            const __m256 d = _mm256_set1_ps(da[g * Q2_TR + r]);
            acc[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[r][0]), d, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[r][1]), d, acc[r][1]);
        }
    }
    for (int r = 0; r < TR; r++) {
        _mm256_store_ps(o + 16 * r, acc[r][0]);
        _mm256_store_ps(o + 16 * r + 8, acc[r][1]);
    }
}

/* `rows` (1..Q2_TR) rows of an arranged block × column block nb → o [Q2_TR][16] fp32 (int8: the row
 * scales applied); literal row counts so that the kernels unroll their rows */
static void q2_block(int kind, int rows, const uint8_t *wb, const uint16_t *sb, const uint16_t *mb, const float *osc,
                     const int32_t *xa, const float *da, const float *sa, int G, int P, float *o, const uint8_t *pf,
                     int nl) {
    if ((kind & 15) == 4) {
        switch (rows) {
            case 1: q2_cols4(1, wb, sb, mb, xa, da, sa, G, P, o, pf, nl); break;
            case 2: q2_cols4(2, wb, sb, mb, xa, da, sa, G, P, o, pf, nl); break;
            case 3: q2_cols4(3, wb, sb, mb, xa, da, sa, G, P, o, pf, nl); break;
            case 4: q2_cols4(4, wb, sb, mb, xa, da, sa, G, P, o, pf, nl); break;
            case 5: q2_cols4(5, wb, sb, mb, xa, da, sa, G, P, o, pf, nl); break;
            default: q2_cols4(6, wb, sb, mb, xa, da, sa, G, P, o, pf, nl); break;
        }
        return;
    }
    /* int8: passes of Q2_TR8 rows (the weight block is in L1 for a second pass) */
    for (int r0 = 0; r0 < rows; r0 += Q2_TR8) {
        const int tr = rows - r0 < Q2_TR8 ? rows - r0 : Q2_TR8;
        const uint8_t *p = r0 ? wb : pf; /* the prefetch slice once */
        const int n = r0 ? 0 : nl;
        switch (tr) {
            case 1: q2_cols8(1, wb, xa + r0, da + r0, G, o + 16 * r0, p, n); break;
            case 2: q2_cols8(2, wb, xa + r0, da + r0, G, o + 16 * r0, p, n); break;
            case 3: q2_cols8(3, wb, xa + r0, da + r0, G, o + 16 * r0, p, n); break;
#if Q2_TR8 > 3
            case 4: q2_cols8(4, wb, xa + r0, da + r0, G, o + 16 * r0, p, n); break;
#endif
#if Q2_TR8 > 4
            case 5: q2_cols8(5, wb, xa + r0, da + r0, G, o + 16 * r0, p, n); break;
            case 6: q2_cols8(6, wb, xa + r0, da + r0, G, o + 16 * r0, p, n); break;
#endif
        }
    }
    const __m256 c0 = _mm256_loadu_ps(osc), c1 = _mm256_loadu_ps(osc + 8);
    for (int r = 0; r < rows; r++) {
        _mm256_store_ps(o + 16 * r, _mm256_mul_ps(c0, _mm256_load_ps(o + 16 * r)));
        _mm256_store_ps(o + 16 * r + 8, _mm256_mul_ps(c1, _mm256_load_ps(o + 16 * r + 8)));
    }
}

/* arranged activations per cache chunk (rows a thread runs every column block over) and row blocks
 * per thread from which threads split rows: qv_tiled's values */
#define Q2_CHUNK_BYTES (256 * 1024)
#define Q2_ROWSPLIT_BLOCKS 4

/* y [M, N] (or, glu, y [M, N/2] = silu(gate)·up with gate block t and up block t + N/32) for a
 * column-layout weight; the work split of qv_tiled: prompts split rows (each thread quantizes the row
 * blocks it takes and runs the whole weight over them, a chunk of ~256 KB of activations at a time),
 * decode batches split column blocks (each thread streams its part of the weight) after the rows are
 * quantized. Each output is one kernel call whichever thread makes it: bit-identical on any number of
 * threads. Returns 0, or -1 when scratch allocation failed. */
static int q2_gemm(int kind, const void *x, int64_t ldx, const void *w0, const void *w1, const void *w2, void *y,
                   int64_t ldy, int M, int64_t N, int K, int is_bf16, int nthreads, int glu) {
    const int Kp = (K + 63) / 64 * 64, Gp = Kp / 32, G = (K + 31) / 32, P = Kp / 64, TR = Q2_TR;
    const int64_t NB = N / 16, bbytes = (kind & 15) == 4 ? 16 * (int64_t)Kp / 2 : 16 * (int64_t)Kp;
    const int MB = (M + TR - 1) / TR;
    const size_t xab = (size_t)MB * TR * Kp, fab = sizeof(float) * (size_t)MB * TR * Gp * 2;
    char *arena = qg_arena_get(xab + fab);
    if (!arena) return -1;
    int32_t *xa = (int32_t *)arena;
    float *fa = (float *)(arena + xab);
    const int esz = is_bf16 ? 2 : 4;
    int MC = (Q2_CHUNK_BYTES / Kp) / TR * TR;
    if (MC < TR) MC = TR;
    const int CBK = MC / TR; /* row blocks per chunk */
    const int64_t NT = glu ? NB / 2 : NB, half = NB / 2;
    const int by_rows = MB >= Q2_ROWSPLIT_BLOCKS * nthreads;
    const int nthr = nthreads < WS_MAX_THREADS ? nthreads : WS_MAX_THREADS;
    int CB = MB / (8 * nthr);
    CB = CB < Q2_ROWSPLIT_BLOCKS ? Q2_ROWSPLIT_BLOCKS : CB > CBK ? CBK : CB;
    const int64_t TC = NT / (8 * nthr) > 1 ? NT / (8 * nthr) : 1;
    const int64_t nitems = by_rows ? (MB + CB - 1) / CB : (NT + TC - 1) / TC;
    const int64_t sbytes = 16 * (int64_t)Gp * 2; /* a block's int4 scales (and as many offsets) */
    ws_split ws;
    ws_init(&ws, nitems, nthr);
#pragma omp parallel num_threads(nthr)
    {
        const int tid = omp_get_thread_num();
        _Alignas(32) float o[2][Q2_TR * 16];
        if (!by_rows) {
#pragma omp for schedule(static)
            for (int b = 0; b < MB; b++)
                q2_arrange(b, M, x, ldx, K, Kp, is_bf16, xa + (size_t)b * TR * Kp / 4, fa + (size_t)b * TR * Gp * 2,
                           fa + (size_t)b * TR * Gp * 2 + (size_t)TR * Gp);
        }
        for (int64_t it; (it = ws_next(&ws, tid)) >= 0;) {
            const int bA = by_rows ? (int)(it * CB) : 0, bB = by_rows ? (bA + CB < MB ? bA + CB : MB) : MB;
            const int64_t tA = by_rows ? 0 : it * TC, tB = by_rows ? NT : (tA + TC < NT ? tA + TC : NT);
            if (by_rows)
                for (int b = bA; b < bB; b++)
                    q2_arrange(b, M, x, ldx, K, Kp, is_bf16, xa + (size_t)b * TR * Kp / 4,
                               fa + (size_t)b * TR * Gp * 2, fa + (size_t)b * TR * Gp * 2 + (size_t)TR * Gp);
            for (int c0 = bA; c0 < bB; c0 += CBK) {
                const int c1 = bB < c0 + CBK ? bB : c0 + CBK, nrb = c1 - c0;
                for (int64_t t = tA; t < tB; t++) {
                    for (int b = c0; b < c1; b++) {
                        const int32_t *xb = xa + (size_t)b * TR * Kp / 4;
                        const float *db = fa + (size_t)b * TR * Gp * 2, *sab = db + (size_t)TR * Gp;
                        const int rows = M - b * TR < TR ? M - b * TR : TR;
                        for (int v = 0; v < (glu ? 2 : 1); v++) {
                            const int64_t nb = t + v * half * glu;
                            const uint8_t *wb = (const uint8_t *)w0 + nb * bbytes;
                            const uint16_t *sb = (kind & 15) == 4 ? (const uint16_t *)w1 + nb * 16 * Gp : NULL;
                            const uint16_t *mb = (kind & 15) == 4 ? (const uint16_t *)w2 + nb * 16 * Gp : NULL;
                            const float *osc = (kind & 15) == 8 ? (const float *)w1 + nb * 16 : NULL;
                            /* the next tile's block: row block b - c0 of the chunk's nrb brings in its
                             * slice (of the weight, spread over the groups, and of int4's scales and
                             * offsets), so the lines arrive spread over this tile's work */
                            const uint8_t *pf = wb;
                            int nl = 0;
                            if (t + 1 < NT) {
                                const int64_t lo = bbytes * (b - c0) / nrb / 64 * 64, hi = bbytes * (b - c0 + 1) / nrb;
                                pf = wb + bbytes + lo, nl = (int)((hi - lo + 63) / 64);
                                if (sb) {
                                    const int64_t slo = sbytes * (b - c0) / nrb / 64 * 64, shi = sbytes * (b - c0 + 1) / nrb;
                                    for (int64_t a = slo; a < shi; a += 64)
                                        qg_prefetch((const char *)(sb + 16 * Gp) + a), qg_prefetch((const char *)(mb + 16 * Gp) + a);
                                }
                            }
                            q2_block(kind, rows, wb, sb, mb, osc, xb, db, sab, G, P, o[v], pf, nl);
                        }
                        for (int r = 0; r < rows; r++) {
                            const int64_t yo = (int64_t)(b * TR + r) * ldy + 16 * t;
                            for (int h = 0; h < 2; h++) {
                                __m256 v = _mm256_load_ps(o[0] + 16 * r + 8 * h);
                                if (glu) v = q2_silu_mul(v, _mm256_load_ps(o[1] + 16 * r + 8 * h));
                                q2_store8(y, yo + 8 * h, v, is_bf16);
                            }
                        }
                    }
                }
            }
        }
    }
    (void)esz;
    return 0;
}
