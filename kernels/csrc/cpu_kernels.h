/* Single-threaded pieces of the CPU kernels that more than one file uses: each kernel's own entry point
 * splits its work over threads and calls these; decode_step.c calls them inside its one parallel region.
 * Every function here computes exactly what the kernel of the same name does for the same slice of work. */
#ifndef FORGE_BATCH_CPU_KERNELS_H
#define FORGE_BATCH_CPU_KERNELS_H
#include <stdint.h>

/* elementwise.c: one row of rms_norm_f32 (residual / residual_out NULL without a residual). */
void rms_norm_row_f32(const float* x, const float* residual, const float* weight, float eps, float* out,
                      float* residual_out, int64_t cols);
/* elementwise.c: out[c] = silu(gate[c]) * up[c] for c in [c0, c1). */
void silu_and_mul_span_f32(const float* gate, const float* up, float* out, int64_t c0, int64_t c1);

/* rotary_store_kv.c: one token of rotary_store_kv_f32 (slot < 0 stores nothing). */
void rotary_store_kv_token_f32(float* q, float* k, const float* v, int64_t position, const float* cos_sin,
                               int64_t heads, int64_t kv_heads, int64_t d, float* k_cache, float* v_cache,
                               int64_t slot);

/* weight_gemv.c: inside a parallel region, this thread's contiguous share of the N rows of
 * y = x @ W^T (+ bias); x [m_rows <= 8, k], y [m_rows, n_rows]. */
void weight_gemv_share_f32(const uint8_t* weight, const float* scales, const float* mins, int type, int64_t n_rows,
                           int64_t k, int64_t row_bytes, const float* x, int64_t m_rows, const float* bias, float* y);

/* paged_decode_attention.c: one (sequence, KV head) item of paged_decode_attention_f32 without a cascade
 * prefix. q and out point at the item's first query head; k_cache / v_cache at its KV head in block 0;
 * scratch holds decode_attention_scratch_floats(group, head_dim, block_size) floats, 64-byte aligned. */
int64_t decode_attention_scratch_floats(int64_t group, int64_t head_dim, int64_t block_size);
void paged_decode_attention_item_f32(const float* q, const float* k_cache, const float* v_cache,
                                     const int64_t* table, int64_t ctx, float* out, int64_t group,
                                     int64_t head_dim, int64_t kv_heads, int64_t block_size, float scale,
                                     float* scratch);
#endif
