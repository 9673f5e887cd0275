/* Rotary position embedding of a step's queries and keys, in place, and the keys and values written
 * into the paged cache: one pass over the fused QKV output instead of the torch reference's gather,
 * concatenations, four element-wise ops and two index_copy calls per layer. Float32, or bfloat16 rows
 * rotated in float32 and rounded once (rotary_store_kv_bf16).
 *
 * q [T, H, D], k and v [T, Hkv, D] are rows of one buffer (row stride ``stride`` floats, e.g. views of
 * the fused QKV matmul's output); cos_sin [max_pos, D] holds cos of each frequency then sin (D / 2
 * each); Hugging Face's rotate_half layout: x = [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]. The
 * cache is [blocks * block_size, Hkv, D] flat; slot -1 skips a token. Products and sums are rounded
 * separately, exactly as the reference computes them (no fused multiply-add), so results are
 * bit-identical to it. Reference: kernels/reference.py (rotary_embedding, store_kv).
 */
#include <stdint.h>
#include <string.h>

#include "cpu_kernels.h"

__attribute__((optimize("fp-contract=off"))) static void rotate_heads(float* x, int64_t heads, int64_t d,
                                                                      const float* cos, const float* sin) {
    const int64_t half = d / 2;
    for (int64_t h = 0; h < heads; h++) {
        float* x1 = x + h * d;
        float* x2 = x1 + half;
        _Pragma("omp simd")
        for (int64_t i = 0; i < half; i++) {
            const float a = x1[i], b = x2[i];
            const float a_cos = a * cos[i], b_sin = b * sin[i], b_cos = b * cos[i], a_sin = a * sin[i];
            x1[i] = a_cos + -b_sin;
            x2[i] = b_cos + a_sin;
        }
    }
}

void rotary_store_kv_token_f32(float* q, float* k, const float* v, int64_t position, const float* cos_sin,
                               int64_t heads, int64_t kv_heads, int64_t d, float* k_cache, float* v_cache,
                               int64_t slot) {
    const float* cs = cos_sin + position * d;
    const int64_t kv_row = kv_heads * d;
    rotate_heads(q, heads, d, cs, cs + d / 2);
    rotate_heads(k, kv_heads, d, cs, cs + d / 2);
    if (slot >= 0) {
        memcpy(k_cache + slot * kv_row, k, (size_t)kv_row * sizeof(float));
        memcpy(v_cache + slot * kv_row, v, (size_t)kv_row * sizeof(float));
    }
}

/* rotate_heads for bfloat16 rows: the same float32 arithmetic, the result rounded once (as the reference
 * rotates a bfloat16 tensor: in float32, then .to(bfloat16)). */
__attribute__((optimize("fp-contract=off"))) static void rotate_heads_bf16(uint16_t* x, int64_t heads, int64_t d,
                                                                           const float* cos, const float* sin) {
    const int64_t half = d / 2;
    for (int64_t h = 0; h < heads; h++) {
        uint16_t* x1 = x + h * d;
        uint16_t* x2 = x1 + half;
        _Pragma("omp simd")
        for (int64_t i = 0; i < half; i++) {
            const float a = f32_from_bf16(x1[i]), b = f32_from_bf16(x2[i]);
            const float a_cos = a * cos[i], b_sin = b * sin[i], b_cos = b * cos[i], a_sin = a * sin[i];
            x1[i] = bf16_from_f32(a_cos + -b_sin);
            x2[i] = bf16_from_f32(b_cos + a_sin);
        }
    }
}

/* rotary_store_kv_f32 for bfloat16 q, k, v and cache. */
void rotary_store_kv_bf16(uint16_t* q, uint16_t* k, const uint16_t* v, int64_t stride, const int64_t* positions,
                          const float* cos_sin, int64_t tokens, int64_t heads, int64_t kv_heads, int64_t d,
                          uint16_t* k_cache, uint16_t* v_cache, const int64_t* slots, int num_threads) {
    _Pragma("omp parallel for num_threads(num_threads) schedule(static) if(tokens > 4)")
    for (int64_t t = 0; t < tokens; t++)
        rotary_store_kv_token_bf16(q + t * stride, k + t * stride, v + t * stride, positions[t], cos_sin, heads,
                                   kv_heads, d, k_cache, v_cache, slots[t]);
}

void rotary_store_kv_token_bf16(uint16_t* q, uint16_t* k, const uint16_t* v, int64_t position, const float* cos_sin,
                                int64_t heads, int64_t kv_heads, int64_t d, uint16_t* k_cache, uint16_t* v_cache,
                                int64_t slot) {
    const int64_t kv_row = kv_heads * d;
    const float* cs = cos_sin + position * d;
    rotate_heads_bf16(q, heads, d, cs, cs + d / 2);
    rotate_heads_bf16(k, kv_heads, d, cs, cs + d / 2);
    if (slot >= 0) {
        memcpy(k_cache + slot * kv_row, k, (size_t)kv_row * sizeof(uint16_t));
        memcpy(v_cache + slot * kv_row, v, (size_t)kv_row * sizeof(uint16_t));
    }
}

void rotary_store_kv_token_f32_bf16_cache(float* q, float* k, const float* v, int64_t position,
                                          const float* cos_sin, int64_t heads, int64_t kv_heads, int64_t d,
                                          uint16_t* k_cache, uint16_t* v_cache, int64_t slot) {
    const int64_t kv_row = kv_heads * d;
    /* the float32 token's rotation, storing nothing (slot -1); then the store, rounded */
    rotary_store_kv_token_f32(q, k, v, position, cos_sin, heads, kv_heads, d, NULL, NULL, -1);
    if (slot >= 0) {
        uint16_t* kc = k_cache + slot * kv_row;
        uint16_t* vc = v_cache + slot * kv_row;
        for (int64_t i = 0; i < kv_row; i++) {
            kc[i] = bf16_from_f32(k[i]);
            vc[i] = bf16_from_f32(v[i]);
        }
    }
}

void rotary_store_kv_f32(float* q, float* k, const float* v, int64_t stride, const int64_t* positions,
                         const float* cos_sin, int64_t tokens, int64_t heads, int64_t kv_heads, int64_t d,
                         float* k_cache, float* v_cache, const int64_t* slots, int num_threads) {
    _Pragma("omp parallel for num_threads(num_threads) schedule(static) if(tokens > 4)")
    for (int64_t t = 0; t < tokens; t++)
        rotary_store_kv_token_f32(q + t * stride, k + t * stride, v + t * stride, positions[t], cos_sin, heads,
                                  kv_heads, d, k_cache, v_cache, slots[t]);
}
