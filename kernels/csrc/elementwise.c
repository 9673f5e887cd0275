/* The decoder's element-wise steps on the CPU in one pass each, float32: at a decode step's sizes the
 * torch versions (F.rms_norm decomposes into pow, mean, add, rsqrt, mul; silu_and_mul into chunk, silu,
 * mul) cost more in dispatch and temporaries than in arithmetic. Rows are split over the threads.
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

/* exp(x) in float32 to within 2 ulp, written so the compiler vectorises it (libm's expf is a scalar call,
 * which made silu_and_mul five times slower than torch's at a batch's 128 rows): x = n ln2 + r with
 * |r| <= ln2/2, e^r by Cephes' degree-6 polynomial, 2^n put into the exponent bits. Past the float
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

void silu_and_mul_span_f32(const float* gate, const float* up, float* out, int64_t c0, int64_t c1) {
    _Pragma("omp simd")
    for (int64_t c = c0; c < c1; c++) out[c] = gate[c] / (1.f + exp_f32(-gate[c])) * up[c];
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
            _Pragma("omp simd")
            for (int i = 0; i < (int)n; i++) row[base + i] -= ((word >> i) & 1u) ? 0.f : penalty;
        }
    }
}
