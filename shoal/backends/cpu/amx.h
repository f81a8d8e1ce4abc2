/* AMX helpers shared by shoal's CPU kernels (kernels.c prefill attention, qgemv.c batched int4
 * GEMM). AMX_TILES is defined when the compiler targets AMX-BF16 on Linux. */
#ifndef SHOAL_CPU_AMX_H
#define SHOAL_CPU_AMX_H
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#define AMX_TILES 1

/* the kernel's permission to use tile data: ARCH_REQ_XCOMP_PERM (0x1023) for XFEATURE_XTILEDATA
 * (18), asked once per process (idempotent) */
static int amx_permitted(void) {
    static int state = 0; /* 0 unknown, 1 granted, -1 refused */
    if (state == 0) __atomic_store_n(&state, syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? 1 : -1, __ATOMIC_RELAXED);
    return state == 1;
}

/* every tile 16 rows × 64 bytes (per thread: call in each parallel region before using tiles) */
static void amx_configure(void) {
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) cfg.colsb[t] = 64, cfg.rows[t] = 16;
    _tile_loadconfig(&cfg);
}


/* tile numbers are immediates: these switch over the accumulator tiles 4 + j / 2 + j */
static inline void amx_zero(int t) {
    switch (t) {
        case 2: _tile_zero(2); break;
        case 3: _tile_zero(3); break;
        case 4: _tile_zero(4); break;
        case 5: _tile_zero(5); break;
        case 6: _tile_zero(6); break;
        default: _tile_zero(7);
    }
}

/* C[t] += tile 0 · B, with B loaded into tile 1 from b (64-byte rows) */
static inline void amx_dp(int t, const void *b) {
    _tile_loadd(1, b, 64);
    switch (t) {
        case 2: _tile_dpbf16ps(2, 0, 1); break;
        case 3: _tile_dpbf16ps(3, 0, 1); break;
        case 4: _tile_dpbf16ps(4, 0, 1); break;
        case 5: _tile_dpbf16ps(5, 0, 1); break;
        case 6: _tile_dpbf16ps(6, 0, 1); break;
        default: _tile_dpbf16ps(7, 0, 1);
    }
}

static inline void amx_store(int t, void *dst, int64_t stride) {
    switch (t) {
        case 2: _tile_stored(2, dst, stride); break;
        case 3: _tile_stored(3, dst, stride); break;
        case 4: _tile_stored(4, dst, stride); break;
        case 5: _tile_stored(5, dst, stride); break;
        case 6: _tile_stored(6, dst, stride); break;
        default: _tile_stored(7, dst, stride);
    }
}
#endif
#endif
