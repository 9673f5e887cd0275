/* The decoder's element-wise steps on the CPU in one pass each, float32 or bfloat16: at a decode step's sizes the
 * torch versions (F.rms_norm decomposes into pow, mean, add, rsqrt, mul; silu_and_mul into chunk, silu,
 * mul) cost more in dispatch and temporaries than in arithmetic. Rows are split over the threads. The
 * bfloat16 versions compute in float32 and round to bfloat16 where the torch reference's bfloat16 ops
 * round (each op's result), so they agree with it to a bfloat16 ulp (profile of a bfloat16 decode step:
 * the reference's mul, add, pow, silu, cat, index_copy and dtype copies took ~29% of its op time).
 * Compiled at first use by forge_batch.kernels.cpu_ops. References: kernels/reference.py (rms_norm,
 * silu_and_mul), which the tests compare these with.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "cpu_kernels.h"

/* out = x_in * rsqrt(mean(x_in^2) + eps) * weight, with x_in = x + residual when residual is given
 * (then x + residual is also written to residual_out, the next layer's residual stream). The sum of
 * squares is accumulated in double: the correctly rounded mean, whatever the summation order. */
void rms_norm_row_f32(const float* x, const float* residual, const float* weight, float eps, float* out,
                      float* residual_out, int64_t cols) {
    const float* src = x;
    if (residual) {
        _Pragma("omp simd")
        for (int64_t c = 0; c < cols; c++) residual_out[c] = x[c] + residual[c];
        src = residual_out;
    }
    double ss = 0.0;
    _Pragma("omp simd reduction(+:ss)")
    for (int64_t c = 0; c < cols; c++) ss += (double)src[c] * (double)src[c];
    const float inv = 1.f / sqrtf((float)(ss / (double)cols) + eps);
    _Pragma("omp simd")
    for (int64_t c = 0; c < cols; c++) out[c] = (src[c] * inv) * weight[c];
}

void rms_norm_f32(const float* x, const float* residual, const float* weight, float eps, float* out,
                  float* residual_out, int64_t rows, int64_t cols, int num_threads) {
    _Pragma("omp parallel for num_threads(num_threads) schedule(static)")
    for (int64_t r = 0; r < rows; r++)
        rms_norm_row_f32(x + r * cols, residual ? residual + r * cols : NULL, weight, eps, out + r * cols,
                         residual ? residual_out + r * cols : NULL, cols);
}

/* rms_norm_f32 for bfloat16 x, residual, weight and outputs. As reference.rms_norm in bfloat16: x +
 * residual rounded (the residual stream), the normalised value rounded, then the product with the
 * weight rounded. */
void rms_norm_row_bf16(const uint16_t* x, const uint16_t* residual, const uint16_t* weight, float eps,
                       uint16_t* out, uint16_t* residual_out, int64_t cols) {
    const uint16_t* src = x;
    if (residual) {
        _Pragma("omp simd")
        for (int64_t c = 0; c < cols; c++) residual_out[c] = bf16_from_f32(f32_from_bf16(x[c]) + f32_from_bf16(residual[c]));
        src = residual_out;
    }
    double ss = 0.0;
    _Pragma("omp simd reduction(+:ss)")
    for (int64_t c = 0; c < cols; c++) {
        const double v = f32_from_bf16(src[c]);
        ss += v * v;
    }
    const float inv = 1.f / sqrtf((float)(ss / (double)cols) + eps);
    _Pragma("omp simd")
    for (int64_t c = 0; c < cols; c++)
        out[c] = bf16_from_f32(f32_from_bf16(weight[c]) * f32_from_bf16(bf16_from_f32(f32_from_bf16(src[c]) * inv)));
}

void rms_norm_bf16(const uint16_t* x, const uint16_t* residual, const uint16_t* weight, float eps, uint16_t* out,
                   uint16_t* residual_out, int64_t rows, int64_t cols, int num_threads) {
    _Pragma("omp parallel for num_threads(num_threads) schedule(static)")
    for (int64_t r = 0; r < rows; r++)
        rms_norm_row_bf16(x + r * cols, residual ? residual + r * cols : NULL, weight, eps, out + r * cols,
                          residual ? residual_out + r * cols : NULL, cols);
}

#if CPU_KERNELS_AVX2
/* g / (1 + exp(-g)) on eight lanes: the scalar loops' silu, step for step. */
static inline __m256 silu8(__m256 g) {
    return _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_xor_ps(g, _mm256_set1_ps(-0.f)))));
}
#endif

/* silu_and_mul_f32 for bfloat16: silu(gate) rounded, then its product with up rounded (torch's two ops). */
void silu_and_mul_span_bf16(const uint16_t* gate, const uint16_t* up, uint16_t* out, int64_t c0, int64_t c1) {
    int64_t c = c0;
#if CPU_KERNELS_AVX2  /* GCC leaves the loop below scalar there, as in silu_and_mul_span_f32 */
    for (; c + 8 <= c1; c += 8)
        store8_bf16(out + c, _mm256_mul_ps(round8_bf16(silu8(load8_bf16(gate + c))), load8_bf16(up + c)));
#endif
    _Pragma("omp simd")
    for (int64_t i = c; i < c1; i++) {
        const float g = f32_from_bf16(gate[i]);
        const float silu = f32_from_bf16(bf16_from_f32(g / (1.f + exp_f32(-g))));
        out[i] = bf16_from_f32(silu * f32_from_bf16(up[i]));
    }
}

void silu_and_mul_bf16(const uint16_t* x, uint16_t* out, int64_t rows, int64_t cols, int num_threads) {
    _Pragma("omp parallel for num_threads(num_threads) schedule(static)")
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t* gate = x + r * 2 * cols;
        silu_and_mul_span_bf16(gate, gate + cols, out + r * cols, 0, cols);
    }
}

void silu_and_mul_span_f32(const float* gate, const float* up, float* out, int64_t c0, int64_t c1) {
    int64_t c = c0;
#if CPU_KERNELS_AVX2  /* GCC leaves the loop below scalar there: 11 cycles an element */
    for (; c + 8 <= c1; c += 8)
        _mm256_storeu_ps(out + c, _mm256_mul_ps(silu8(_mm256_loadu_ps(gate + c)), _mm256_loadu_ps(up + c)));
#endif
    _Pragma("omp simd")
    for (int64_t i = c; i < c1; i++) out[i] = gate[i] / (1.f + exp_f32(-gate[i])) * up[i];
}

/* x [rows, 2 * cols] = [gate | up] -> out [rows, cols] = silu(gate) * up. */
void silu_and_mul_f32(const float* x, float* out, int64_t rows, int64_t cols, int num_threads) {
    _Pragma("omp parallel for num_threads(num_threads) schedule(static)")
    for (int64_t r = 0; r < rows; r++)
        silu_and_mul_span_f32(x + r * 2 * cols, x + r * 2 * cols + cols, out + r * cols, 0, cols);
}

/* Structured output: logits [rows, vocab] -= penalty where bit t % 32 of mask word t / 32 of the row is
 * clear (mask [rows, words] int32, bit set = allowed; constraints.apply_bitmask). Branch-free per word so
 * it vectorises: ~6M logits a step at batch 128, where numpy's unpackbits + a torch subtraction took
 * ~8 ms. The subtraction is the same float operation as that path's, so the results are identical. */
void ban_masked_f32(float* logits, const int32_t* mask, int64_t rows, int64_t vocab, int64_t words, float penalty,
                    int num_threads) {
    _Pragma("omp parallel for num_threads(num_threads) schedule(static)")
    for (int64_t r = 0; r < rows; r++) {
        float* row = logits + r * vocab;
        const uint32_t* bits = (const uint32_t*)mask + r * words;
        for (int64_t w = 0; w * 32 < vocab; w++) {
            const uint32_t word = bits[w];
            if (word == 0xffffffffu) continue;
            const int64_t base = w * 32, n = vocab - base < 32 ? vocab - base : 32;
#if CPU_KERNELS_AVX2  /* GCC leaves the loop below scalar there: a whole word's 32 logits as four 8-lane steps */
            if (n == 32) {
                const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
                for (int q = 0; q < 4; q++) {
                    const __m256i set = _mm256_and_si256(_mm256_set1_epi32((int32_t)(word >> (8 * q))), lane_bit);
                    const __m256 banned = _mm256_castsi256_ps(_mm256_cmpeq_epi32(set, _mm256_setzero_si256()));
                    float* at = row + base + 8 * q;  /* minus the penalty where banned, minus +0 elsewhere, as below */
                    _mm256_storeu_ps(at, _mm256_sub_ps(_mm256_loadu_ps(at), _mm256_and_ps(banned, _mm256_set1_ps(penalty))));
                }
                continue;
            }
#endif
            _Pragma("omp simd")
            for (int i = 0; i < (int)n; i++) row[base + i] -= ((word >> i) & 1u) ? 0.f : penalty;
        }
    }
}
