/* Work split across OpenMP threads that adapts to unequal cores: each thread owns a contiguous range
 * of items and takes them from its front, in order (so what it prefetches for its next item is
 * usually its own); a thread whose range is empty takes from the back of the range with the most
 * left. With a static split every region ends when its slowest thread does: with another busy
 * process on one of the 2 cores, the `ci` recipe's prompts took 2.75–2.86 s static and 1.95 s with
 * this (344/316 → 433/421 output tokens/s; alternating in one process). With both cores free the two
 * measure the same. Shared by kernels.c and qgemv.c. */
#ifndef SHOAL_CPU_WORKSPLIT_H
#define SHOAL_CPU_WORKSPLIT_H
#include <stdint.h>

#define WS_MAX_THREADS 256

/* one range: front in the low 32 bits, back (exclusive) in the high 32, on its own cache line;
 * [start, end): the range it started as */
typedef struct {
    _Alignas(64) uint64_t fb;
    uint32_t start, end;
} ws_range;

typedef struct {
    ws_range r[WS_MAX_THREADS];
    int nth;
} ws_split;

static inline uint64_t ws_pack(uint32_t front, uint32_t back) { return (uint64_t)back << 32 | front; }

/* thread t's range [front, back); call from one thread before the parallel region */
static inline void ws_init_range(ws_split *w, int t, uint32_t front, uint32_t back) {
    __atomic_store_n(&w->r[t].fb, ws_pack(front, back), __ATOMIC_RELAXED);
    w->r[t].start = front, w->r[t].end = back;
}

/* items [0, n) in nth equal contiguous ranges; call from one thread before the parallel region */
static inline void ws_init(ws_split *w, int64_t n, int nth) {
    w->nth = nth;
    for (int t = 0; t < nth; t++) ws_init_range(w, t, (uint32_t)(n * t / nth), (uint32_t)(n * (t + 1) / nth));
}

/* the next item for thread tid, or -1 when every range is empty */
static inline int64_t ws_next(ws_split *w, int tid) {
    uint64_t v = __atomic_load_n(&w->r[tid].fb, __ATOMIC_ACQUIRE);
    while ((uint32_t)v < (uint32_t)(v >> 32)) {
        if (__atomic_compare_exchange_n(&w->r[tid].fb, &v, v + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return (uint32_t)v;
    }
    for (;;) {
        int best = -1;
        uint32_t most = 0;
        for (int t = 0; t < w->nth; t++) {
            const uint64_t u = __atomic_load_n(&w->r[t].fb, __ATOMIC_ACQUIRE);
            const uint32_t f = (uint32_t)u, b = (uint32_t)(u >> 32);
            if (b > f && b - f > most) most = b - f, best = t;
        }
        if (best < 0) return -1;
        uint64_t u = __atomic_load_n(&w->r[best].fb, __ATOMIC_ACQUIRE);
        const uint32_t f = (uint32_t)u, b = (uint32_t)(u >> 32);
        if (b > f && __atomic_compare_exchange_n(&w->r[best].fb, &u, ws_pack(f, b - 1), 0, __ATOMIC_ACQ_REL,
                                                 __ATOMIC_ACQUIRE))
            return b - 1;
    }
}
#endif
