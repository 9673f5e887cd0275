/* Single-threaded pieces of the CPU kernels that more than one file uses: each kernel's own entry point
 * splits its work over threads and calls these; decode_step.c calls them inside its one parallel region.
 * Every kernel function here computes exactly what the kernel of the same name does for the same slice of
 * work. */
#ifndef FORGE_BATCH_CPU_KERNELS_H
#define FORGE_BATCH_CPU_KERNELS_H
#include <math.h>
#include <stdint.h>

/* exp(x) in float32 to within 2 ulp, for silu and the attention's softmax, written so the compiler
 * vectorises it (libm's expf is a scalar call: it made silu_and_mul five times slower than torch's at a
 * batch's 128 rows): x = n ln2 + r with |r| <= ln2/2, e^r by Cephes' degree-6 polynomial (the one torch's
 * vectorised silu uses: ours matched it bit for bit on an AVX-512 Xeon, within an ulp on a Sapphire Rapids
 * where torch picks another path), 2^n put into the exponent bits. Past the float
 * range (e^-87.3 ~ 1e-38, e^88.3 ~ 2e38) it returns 0 and inf, as expf does. */
static inline float exp_f32(float arg) {
    const float x = arg < -87.3f ? -87.3f : (arg > 88.3f ? 88.3f : arg);
    const float round = 12582912.f;  /* 1.5 * 2^23: adding and subtracting it rounds to an integer */
    float n = (x * 1.44269504088896341f + round) - round;
    float r = x - n * 0.693359375f;   /* ln2 in two parts so n * ln2 stays exact */
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    union { int32_t i; float f; } two_n = { .i = ((int32_t)n + 127) << 23 };
    return arg > 88.3f ? INFINITY : (arg < -87.3f ? 0.f : p * two_n.f);
}

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
/* CPUs with AVX2 but no AVX-512: where GCC cannot vectorise a loop of exp_f32 (its selects become a compare and
 * a branch per lane) or lowers the attention's 16-lane vectors badly, the kernels use 8-lane intrinsics. */
#define CPU_KERNELS_AVX2 1
#include <immintrin.h>

/* exp_f32's steps on eight lanes, fused as GCC fuses exp_f32 (-ffp-contract=fast), so the same bits (checked
 * against the scalar and 16-lane code's output). max(lo, a) and min(hi, x) are the selects' exact
 * equivalents, NaN included. */
static inline __m256 exp8(__m256 arg) {
    const __m256 lo = _mm256_set1_ps(-87.3f), hi = _mm256_set1_ps(88.3f), round = _mm256_set1_ps(12582912.f);
    const __m256 x = _mm256_min_ps(hi, _mm256_max_ps(lo, arg));
    const __m256 n = _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), round), round);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.f));
    const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
    return _mm256_andnot_ps(_mm256_cmp_ps(arg, lo, _CMP_LT_OQ),
                            _mm256_blendv_ps(e, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(arg, hi, _CMP_GT_OQ)));
}

/* Eight bfloat16 -> float32, exactly (f32_from_bf16). */
static inline __m256 load8_bf16(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

/* bf16_from_f32 on eight lanes, each result in its lane's low 16 bits: to nearest even, NaN stays NaN. */
static inline __m256i bf16_bits8(__m256 x) {
    const __m256i u = _mm256_castps_si256(x), high = _mm256_srli_epi32(u, 16);
    const __m256i rounded = _mm256_srli_epi32(
        _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(high, _mm256_set1_epi32(1)))), 16);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
    return _mm256_blendv_epi8(rounded, _mm256_or_si256(high, _mm256_set1_epi32(0x40)), nan);
}

/* x rounded to bfloat16 and back: f32_from_bf16(bf16_from_f32(x)) on eight lanes. */
static inline __m256 round8_bf16(__m256 x) { return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits8(x), 16)); }

/* Eight float32 rounded to bfloat16 (bf16_from_f32) and stored. */
static inline void store8_bf16(uint16_t* p, __m256 x) {
    const __m256i bits = bf16_bits8(x);  /* 0..0xffff a lane, so the unsigned saturating pack keeps them */
    _mm_storeu_si128((__m128i*)p, _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1)));
}
#else
#define CPU_KERNELS_AVX2 0
#endif

/* bfloat16 (the top half of a float32) -> float32, exactly. */
static inline float f32_from_bf16(uint16_t h) {
    union { uint32_t u; float f; } v = { .u = (uint32_t)h << 16 };
    return v.f;
}

/* float32 -> bfloat16, rounded to nearest even as torch rounds; NaN stays NaN. */
static inline uint16_t bf16_from_f32(float x) {
    union { float f; uint32_t u; } v = { .f = x };
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40u);
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

/* elementwise.c: one row of rms_norm_f32 (residual / residual_out NULL without a residual). */
void rms_norm_row_f32(const float* x, const float* residual, const float* weight, float eps, float* out,
                      float* residual_out, int64_t cols);
/* elementwise.c: out[c] = silu(gate[c]) * up[c] for c in [c0, c1). */
void silu_and_mul_span_f32(const float* gate, const float* up, float* out, int64_t c0, int64_t c1);
/* elementwise.c: the bfloat16 versions of the two above (rms_norm_bf16's and silu_and_mul_bf16's rounding). */
void rms_norm_row_bf16(const uint16_t* x, const uint16_t* residual, const uint16_t* weight, float eps,
                       uint16_t* out, uint16_t* residual_out, int64_t cols);
void silu_and_mul_span_bf16(const uint16_t* gate, const uint16_t* up, uint16_t* out, int64_t c0, int64_t c1);

/* rotary_store_kv.c: one token of rotary_store_kv_f32 (slot < 0 stores nothing). */
void rotary_store_kv_token_f32(float* q, float* k, const float* v, int64_t position, const float* cos_sin,
                               int64_t heads, int64_t kv_heads, int64_t d, float* k_cache, float* v_cache,
                               int64_t slot);

/* rotary_store_kv.c: the same for a bfloat16 cache (K and V rounded as they are stored). */
void rotary_store_kv_token_f32_bf16_cache(float* q, float* k, const float* v, int64_t position,
                                          const float* cos_sin, int64_t heads, int64_t kv_heads, int64_t d,
                                          uint16_t* k_cache, uint16_t* v_cache, int64_t slot);

/* rotary_store_kv.c: one token of rotary_store_kv_bf16 (bfloat16 q, k, v and cache). */
void rotary_store_kv_token_bf16(uint16_t* q, uint16_t* k, const uint16_t* v, int64_t position, const float* cos_sin,
                                int64_t heads, int64_t kv_heads, int64_t d, uint16_t* k_cache, uint16_t* v_cache,
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
/* The same item over a bfloat16 cache (queries and output stay float32). */
void paged_decode_attention_item_f32_bf16_cache(const float* q, const uint16_t* k_cache, const uint16_t* v_cache,
                                                const int64_t* table, int64_t ctx, float* out, int64_t group,
                                                int64_t head_dim, int64_t kv_heads, int64_t block_size,
                                                float scale, float* scratch);
/* The item of paged_decode_attention_bf16 (bfloat16 queries, cache and output). */
void paged_decode_attention_item_bf16(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache,
                                      const int64_t* table, int64_t ctx, uint16_t* out, int64_t group,
                                      int64_t head_dim, int64_t kv_heads, int64_t block_size, float scale,
                                      float* scratch);

/* panel_product.c: inside a parallel region, this thread's contiguous share of the 16-column groups of
 * panel_product_bf16 (rows <= 4). */
void panel_product_share_bf16(const uint8_t* values, const uint16_t* scales, const uint16_t* mins, int type,
                              int64_t n, int64_t k, int64_t k_block, const uint16_t* x, int64_t rows, uint16_t* y);
/* ... and of panel_product_f32 (float32 rows and outputs). */
void panel_product_share_f32(const uint8_t* values, const uint16_t* scales, const uint16_t* mins, int type,
                             int64_t n, int64_t k, int64_t k_block, const float* x, int64_t rows, float* y);
#endif
