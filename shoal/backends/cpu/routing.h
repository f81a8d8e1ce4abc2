/* The row-count thresholds that choose a CPU kernel, in one place: ops.cpp includes this header and
 * routing.py reads the same lines (`#define SHOAL_<NAME> <int>`), so C++ and Python cannot disagree.
 * Each was measured on the machines named beside it; the choice rule itself is routing.py's
 * `linear_kernel`. */
#ifndef SHOAL_CPU_ROUTING_H
#define SHOAL_CPU_ROUTING_H

/* decode rows: up to this many take the packed kernels (GEMV or the few-row tiles) rather than a
 * dense matmul, whatever the tier */
#define SHOAL_PACKED_MAX_ROWS 8
/* bf16 rows above this many go to the AMX kernel where it runs: the GEMV re-reads the weight for
 * every 4 rows (measured crossover 3 rows, Xeon with AMX) */
#define SHOAL_GEMV_MAX_ROWS 3
/* the batched packed kernels (AMX quant_gemm, and the fused decode step) take up to this many rows:
 * six 16-row AMX accumulator tiles */
#define SHOAL_QUANT_GEMM_MAX_ROWS 96
/* prompt rows up to this many go through panel_gemm on AMX; above it oneDNN's prepacked bf16 matmul
 * was faster (Xeon: 2,048 rows 289-301 vs 255-264 ms for the default model's 30 layers) */
#define SHOAL_PANEL_GEMM_MAX_ROWS 1536
/* paged-cache writes of at least this many rows take the C row copy (fewer: torch's index_copy_) */
#define SHOAL_STORE_KV_MIN_ROWS 64

#endif
