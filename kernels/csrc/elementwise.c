/* The decoder's element-wise steps on the CPU in one pass each, float32: at a decode step's sizes the
 * torch versions (F.rms_norm decomposes into pow, mean, add, rsqrt, mul; silu_and_mul into chunk, silu,
 * mul) cost more in dispatch and temporaries than in arithmetic. Rows are split over the threads.
 * Compiled at first use by forge_batch.kernels.cpu_ops. References: kernels/reference.py (rms_norm,
 * silu_and_mul), which the tests compare these with.
 */
#include <math.h>
#include <stdint.h>

/* out = x_in * rsqrt(mean(x_in^2) + eps) * weight, with x_in = x + residual when residual is given
 * (then x + residual is also written to residual_out, the next layer's residual stream). The sum of
 * squares is accumulated in double: the correctly rounded mean, whatever the summation order. */
void rms_norm_f32(const float* x, const float* residual, const float* weight, float eps, float* out,
                  float* residual_out, int64_t rows, int64_t cols, int num_threads) {
    _Pragma("omp parallel for num_threads(num_threads) schedule(static)")
    for (int64_t r = 0; r < rows; r++) {
        const float* xr = x + r * cols;
        float* o = out + r * cols;
        const float* src = xr;
        if (residual) {
            const float* rr = residual + r * cols;
            float* ro = residual_out + r * cols;
            _Pragma("omp simd")
            for (int64_t c = 0; c < cols; c++) ro[c] = xr[c] + rr[c];
            src = ro;
        }
        double ss = 0.0;
        _Pragma("omp simd reduction(+:ss)")
        for (int64_t c = 0; c < cols; c++) ss += (double)src[c] * (double)src[c];
        const float inv = 1.f / sqrtf((float)(ss / (double)cols) + eps);
        _Pragma("omp simd")
        for (int64_t c = 0; c < cols; c++) o[c] = (src[c] * inv) * weight[c];
    }
}

/* x [rows, 2 * cols] = [gate | up] -> out [rows, cols] = silu(gate) * up. */
void silu_and_mul_f32(const float* x, float* out, int64_t rows, int64_t cols, int num_threads) {
    _Pragma("omp parallel for num_threads(num_threads) schedule(static)")
    for (int64_t r = 0; r < rows; r++) {
        const float* gate = x + r * 2 * cols;
        const float* up = gate + cols;
        float* o = out + r * cols;
        for (int64_t c = 0; c < cols; c++) o[c] = gate[c] / (1.f + expf(-gate[c])) * up[c];
    }
}
