/* A few bfloat16 rows times a weight kept in its GGUF blocks (Q4_1, Q8_0), giving oneDNN's bfloat16 GEMM's
 * bits: each weight is decoded to float32 as the loader decodes it (Q4_1 q * d + m, Q8_0 q * d, each step
 * rounded), rounded to bfloat16 as the model's weight was, and summed with AVX512-BF16's pair dot product in
 * oneDNN's order on these CPUs: k in blocks of k_block, each block summed from zero by one accumulator per
 * output, the blocks' sums added in order. Which k_block oneDNN uses depends on the shape, so the caller
 * finds it, and checks the bits, against oneDNN itself once per weight (kernels/cpu/panel_product.py).
 *
 * Why: a one-row decode step reads every weight once; from 4-bit blocks that is a third of the bytes of
 * the bfloat16 weight oneDNN reads, and the batch-invariant engine needs a one-row product with a batch's
 * bits. Compiled with -ffp-contract=off (build.py): q * d + m must round twice, as torch computes it.
 *
 * Weight layout ("panels"): output columns in groups of 16; per group and per pair of k, the 16 columns'
 * two quantised values (Q4_1: one byte per column, k in the low nibble and k + 1 in the high one; Q8_0: 16
 * int8 for k, then 16 for k + 1); per group and 32-k block, the 16 columns' float16 scales (and Q4_1's
 * minimums). */
#include <stdint.h>
#include <string.h>
#include <omp.h>

#include "cpu_kernels.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define PANEL_PRODUCT_SIMD 1
#endif

#define PANEL_TYPE_Q4_1 3
#define PANEL_TYPE_Q8_0 8
#define PANEL_MAX_ROWS 4

int panel_product_simd(void) {
#ifdef PANEL_PRODUCT_SIMD
    return 1;
#else
    return 0;
#endif
}

#ifdef PANEL_PRODUCT_SIMD
/* The 16 columns' weights at k (even) and k + 1 (odd), decoded to float32 and rounded to bfloat16, as the
 * 32-bit lanes vdpbf16ps takes: lane j = (w[j][k], w[j][k + 1]). */
static inline __m512bh decode_pair(int type, const uint8_t* q, __m512 d, __m512 m, __m512i interleave) {
    __m512 even, odd;
    if (type == PANEL_TYPE_Q4_1) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)q));
        even = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0x0F)));
        odd = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
        even = _mm512_add_ps(_mm512_mul_ps(even, d), m);
        odd = _mm512_add_ps(_mm512_mul_ps(odd, d), m);
    } else {
        even = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)q))), d);
        odd = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + 16)))), d);
    }
    /* [even 0..15, odd 0..15] as bfloat16, then interleaved to (even j, odd j) pairs */
    const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(odd, even);
    return (__m512bh)_mm512_permutexvar_epi16(interleave, both);
}

/* Output columns [16 g0, 16 g1) for rows (at most PANEL_MAX_ROWS). */
static void panel_groups(const uint8_t* values, const uint16_t* scales, const uint16_t* mins, int type,
                         int64_t k, int64_t k_block, const uint16_t* x, int64_t rows, uint16_t* y, int64_t n,
                         int64_t g0, int64_t g1) {
    const int64_t pair_bytes = type == PANEL_TYPE_Q4_1 ? 16 : 32, blocks = k / 32;
    int16_t order[32];
    for (int j = 0; j < 16; j++) { order[2 * j] = (int16_t)j; order[2 * j + 1] = (int16_t)(16 + j); }
    const __m512i interleave = _mm512_loadu_si512(order);
    for (int64_t g = g0; g < g1; g++) {
        const uint8_t* q = values + g * (k / 2) * pair_bytes;
        const uint16_t* gs = scales + g * blocks * 16;
        const uint16_t* gm = mins ? mins + g * blocks * 16 : NULL;
        __m512 total[PANEL_MAX_ROWS], acc[PANEL_MAX_ROWS];
        for (int64_t k0 = 0; k0 < k; k0 += k_block) {
            const int64_t k1 = k0 + k_block < k ? k0 + k_block : k;
            for (int r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps();
            for (int64_t b = k0 / 32; b < k1 / 32; b++) {
                const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(gs + b * 16)));
                const __m512 m = gm ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(gm + b * 16)))
                                    : _mm512_setzero_ps();
                for (int64_t p = b * 16; p < b * 16 + 16; p++) {
                    const __m512bh w = decode_pair(type, q + p * pair_bytes, d, m, interleave);
                    for (int r = 0; r < rows; r++) {
                        int32_t pair;
                        memcpy(&pair, x + r * k + 2 * p, 4);
                        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32(pair), w);
                    }
                }
            }
            for (int r = 0; r < rows; r++) total[r] = k0 == 0 ? acc[r] : _mm512_add_ps(total[r], acc[r]);
        }
        for (int r = 0; r < rows; r++)
            _mm256_storeu_si256((__m256i*)(y + r * n + g * 16), (__m256i)_mm512_cvtneps_pbh(total[r]));
    }
}
#endif

void panel_product_share_bf16(const uint8_t* values, const uint16_t* scales, const uint16_t* mins, int type,
                              int64_t n, int64_t k, int64_t k_block, const uint16_t* x, int64_t rows, uint16_t* y) {
#ifdef PANEL_PRODUCT_SIMD
    const int64_t groups = n / 16, t = omp_get_thread_num(), nt = omp_get_num_threads();
    panel_groups(values, scales, mins, type, k, k_block, x, rows, y, n, groups * t / nt, groups * (t + 1) / nt);
#else
    (void)values; (void)scales; (void)mins; (void)type; (void)n; (void)k; (void)k_block; (void)x; (void)rows;
    (void)y;
#endif
}

/* x [rows, k] bfloat16 (rows <= PANEL_MAX_ROWS) times the panels of an [n, k] weight -> y [rows, n]
 * bfloat16; n a multiple of 16, k of 32 and k_block a multiple of 32. Threads take contiguous column
 * groups (a column's sum never depends on the thread count). */
void panel_product_bf16(const uint8_t* values, const uint16_t* scales, const uint16_t* mins, int type, int64_t n,
                        int64_t k, int64_t k_block, const uint16_t* x, int64_t rows, uint16_t* y, int num_threads) {
    _Pragma("omp parallel num_threads(num_threads)")
    panel_product_share_bf16(values, scales, mins, type, n, k, k_block, x, rows, y);
}

/* Repack an [n, k] weight from StoredWeight's layout (per row: Q4_1 16 bytes of nibbles per 32-k block,
 * element j low and j + 16 high; Q8_0 32 int8 per block; float32 scales / minimums [n, k / 32], exact
 * float16 values) into the panels above. */
void panel_repack(int type, const uint8_t* values, const float* scales, const float* mins, int64_t n, int64_t k,
                  uint8_t* out_values, uint16_t* out_scales, uint16_t* out_mins) {
#ifdef PANEL_PRODUCT_SIMD
    const int64_t blocks = k / 32, groups = n / 16, row_bytes = type == PANEL_TYPE_Q4_1 ? k / 2 : k;
    for (int64_t g = 0; g < groups; g++)
        for (int64_t j = 0; j < 16; j++) {
            const int64_t row = g * 16 + j;
            const uint8_t* src = values + row * row_bytes;
            for (int64_t kk = 0; kk < k; kk += 2) {
                const int64_t p = kk / 2;
                if (type == PANEL_TYPE_Q4_1) {
                    const int64_t b = kk / 32, e = kk % 32;  /* element e of block b: byte e % 16, high if >= 16 */
                    const uint8_t* blk = src + b * 16;
                    const uint8_t lo = e < 16 ? (blk[e] & 0x0F) : (blk[e - 16] >> 4);
                    const uint8_t hi = e + 1 < 16 ? (blk[e + 1] & 0x0F) : (blk[e + 1 - 16] >> 4);
                    out_values[(g * (k / 2) + p) * 16 + j] = (uint8_t)(lo | (hi << 4));
                } else {
                    out_values[(g * (k / 2) + p) * 32 + j] = src[kk];
                    out_values[(g * (k / 2) + p) * 32 + 16 + j] = src[kk + 1];
                }
            }
            for (int64_t b = 0; b < blocks; b++) {
                out_scales[(g * blocks + b) * 16 + j] = (uint16_t)_cvtss_sh(scales[row * blocks + b], 0);
                if (mins) out_mins[(g * blocks + b) * 16 + j] = (uint16_t)_cvtss_sh(mins[row * blocks + b], 0);
            }
        }
#else
    (void)type; (void)values; (void)scales; (void)mins; (void)n; (void)k; (void)out_values; (void)out_scales;
    (void)out_mins;
#endif
}
