/* Helpers of the int8 (W8A8) linear on the CPU: activations quantized per row (per token), so a
 * token's result never depends on what else is in the batch, and the int32 products scaled back.
 * The matmul itself is torch._int_mm (oneDNN, VNNI on CPUs that have it); these two passes replace
 * five or six torch ops each, which at a decode step's sizes cost more than the arithmetic.
 * Compiled at first use by forge_batch.kernels.cpu_ops. Reference: cpu_ops.int8_linear_reference.
 */
#include <math.h>
#include <stdint.h>

/* q[r, :] = round(x[r, :] / scale[r]), scale[r] = max|x[r, :]| / 127 (1 for an all-zero row). */
void quantize_rows_s8(const float* x, int8_t* q, float* scales, int64_t rows, int64_t cols, int num_threads) {
    _Pragma("omp parallel for num_threads(num_threads) schedule(static)")
    for (int64_t r = 0; r < rows; r++) {
        const float* xr = x + r * cols;
        float amax = 0.f;
        _Pragma("omp simd reduction(max:amax)")
        for (int64_t c = 0; c < cols; c++) amax = fmaxf(amax, fabsf(xr[c]));
        const float scale = amax > 0.f ? amax / 127.f : 1.f;
        const float inv = 1.f / scale;
        int8_t* qr = q + r * cols;
        _Pragma("omp simd")
        for (int64_t c = 0; c < cols; c++) qr[c] = (int8_t)__builtin_rintf(xr[c] * inv);  /* |.| <= 127 */
        scales[r] = scale;
    }
}

/* out[r, n] = acc[r, n] * a_scale[r] * w_scale[n] (+ bias[n]). */
void dequantize_rows(const int32_t* acc, const float* a_scale, const float* w_scale, const float* bias,
                     float* out, int64_t rows, int64_t cols, int num_threads) {
    _Pragma("omp parallel for num_threads(num_threads) schedule(static)")
    for (int64_t r = 0; r < rows; r++) {
        const int32_t* ar = acc + r * cols;
        float* o = out + r * cols;
        const float s = a_scale[r];
        if (bias) {
            _Pragma("omp simd")
            for (int64_t c = 0; c < cols; c++) o[c] = (float)ar[c] * s * w_scale[c] + bias[c];
        } else {
            _Pragma("omp simd")
            for (int64_t c = 0; c < cols; c++) o[c] = (float)ar[c] * s * w_scale[c];
        }
    }
}
