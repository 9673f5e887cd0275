/* y = x @ W^T for a few rows of x, reading W in the checkpoint's own storage format (ggml Q4_0, Q4_1,
 * Q8_0 blocks, or float16 / bfloat16) instead of its float32 copy.
 *
 * Why: at one or a few rows a decode step is bound by memory bandwidth, not arithmetic, and a float32
 * copy of a 4-bit checkpoint is 6x the bytes of the original. Each weight is decoded to float32 exactly
 * as the loader's dequantisation does (d * q, or d * q + m, where d * q is exact in float32), so every
 * product x[k] * w[k] equals the float32 path's; only the order of the sums differs, as between any two
 * GEMM kernels. Accumulation is float32.
 *
 * Layout (cpu_ops.StoredWeight repacks ggml's blocks once at load): the quantised values of W's N rows,
 * row_bytes each, with the blocks' fp16 scales d (and Q4_1's minimums m) moved out to float32 arrays
 * [N, K / 32]: converting two fp16 scalars per block inside the loop cost as many instructions as the
 * block's arithmetic. Per block of 32 weights:
 *   Q4_0: 16 bytes of nibbles   w = (q - 8) * d
 *   Q4_1: 16 bytes of nibbles   w = q * d + m
 *   Q8_0: 32 int8               w = q * d
 * with element j of a 4-bit block in the low nibble of byte j and element j + 16 in its high nibble.
 * float16 / bfloat16 rows are K plain values (no scales). Rows of W are split over the threads.
 * Reference: the loader's dequantisation followed by F.linear (tests/test_weight_gemv.py).
 */
#include <stdint.h>
#include <string.h>

#include <omp.h>

#include "cpu_kernels.h"
#if defined(__AVX512F__) && defined(__F16C__)
#include <immintrin.h>
#define WEIGHT_GEMV_AVX512 1
#endif

enum { W_F16 = 1, W_Q4_0 = 2, W_Q4_1 = 3, W_Q8_0 = 8, W_BF16 = 30 }; /* ggml type ids */
#define MAX_ROWS 8

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: renormalise */
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Bytes of quantised values per block of 32 weights. */
static int64_t block_bytes(int type) {
    switch (type) {
    case W_Q4_0:
    case W_Q4_1: return 16;
    case W_Q8_0: return 32;
    default: return 64; /* 32 x 16-bit */
    }
}

/* Decode one block to float32 (the portable path, and the specification of the SIMD one). */
static void decode_block(int type, const uint8_t* b, float d, float m, float* w) {
    switch (type) {
    case W_Q4_0:
        for (int j = 0; j < 16; j++) {
            w[j] = (float)((b[j] & 0x0f) - 8) * d;
            w[j + 16] = (float)((b[j] >> 4) - 8) * d;
        }
        break;
    case W_Q4_1:
        for (int j = 0; j < 16; j++) {
            w[j] = (float)(b[j] & 0x0f) * d + m;
            w[j + 16] = (float)(b[j] >> 4) * d + m;
        }
        break;
    case W_Q8_0:
        for (int j = 0; j < 32; j++) w[j] = (float)(int8_t)b[j] * d;
        break;
    case W_F16:
        for (int j = 0; j < 32; j++) w[j] = half_to_float((uint16_t)(b[2 * j] | (b[2 * j + 1] << 8)));
        break;
    default: /* W_BF16 */
        for (int j = 0; j < 32; j++) {
            uint32_t bits = (uint32_t)(b[2 * j] | (b[2 * j + 1] << 8)) << 16;
            memcpy(&w[j], &bits, 4);
        }
        break;
    }
}

#ifdef WEIGHT_GEMV_AVX512
/* The two halves (elements 0-15, 16-31) of one block as float32 vectors. */
static inline __attribute__((always_inline)) void decode_block_avx512(int type, const uint8_t* b, const float* d,
                                                                      const float* m, __m512* lo, __m512* hi) {
    const __m128i low4 = _mm_set1_epi8(0x0f);
    switch (type) {
    case W_Q4_0: {
        const __m512 vd = _mm512_set1_ps(*d), eight = _mm512_set1_ps(8.f);
        const __m128i q = _mm_loadu_si128((const __m128i*)b);
        *lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(q, low4)));
        *hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), low4)));
        *lo = _mm512_mul_ps(_mm512_sub_ps(*lo, eight), vd);
        *hi = _mm512_mul_ps(_mm512_sub_ps(*hi, eight), vd);
        break;
    }
    case W_Q4_1: {
        const __m512 vd = _mm512_set1_ps(*d), vm = _mm512_set1_ps(*m);
        const __m128i q = _mm_loadu_si128((const __m128i*)b);
        *lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(q, low4)));
        *hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), low4)));
        /* q * d is exact in float32 (4 x 11 significant bits), so the fused form rounds once, like
           the loader's separate multiply and add */
        *lo = _mm512_fmadd_ps(*lo, vd, vm);
        *hi = _mm512_fmadd_ps(*hi, vd, vm);
        break;
    }
    case W_Q8_0: {
        const __m512 vd = _mm512_set1_ps(*d);
        *lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)b))), vd);
        *hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(b + 16)))), vd);
        break;
    }
    case W_F16:
        *lo = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)b));
        *hi = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(b + 32)));
        break;
    default: /* W_BF16: the high half of a float32 */
        *lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)b)), 16));
        *hi = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(b + 32))), 16));
        break;
    }
}
#endif

int weight_gemv_simd(void) {
#ifdef WEIGHT_GEMV_AVX512
    return 1;
#else
    return 0;
#endif
}

#ifdef WEIGHT_GEMV_AVX512
/* One row of W against M rows of x. Inlined with M a constant (see weight_gemv_f32), so the
 * accumulators live in registers: an array indexed by a run-time M would sit on the stack and put a
 * store-to-load round trip into every accumulation. */
static inline __attribute__((always_inline)) void row_dot_avx512(int type, const uint8_t* row, const float* d,
                                                                 const float* m, int64_t blocks, int64_t bb,
                                                                 const float* x, int64_t k, const int m_rows,
                                                                 float* sums) {
    __m512 acc_lo[MAX_ROWS], acc_hi[MAX_ROWS];
    for (int r = 0; r < m_rows; r++) acc_lo[r] = acc_hi[r] = _mm512_setzero_ps();
    for (int64_t blk = 0; blk < blocks; blk++) {
        __m512 lo, hi;
        decode_block_avx512(type, row + blk * bb, d + blk, m + blk, &lo, &hi);
        const float* xb = x + blk * 32;
        for (int r = 0; r < m_rows; r++) {
            acc_lo[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xb + r * k), lo, acc_lo[r]);
            acc_hi[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xb + r * k + 16), hi, acc_hi[r]);
        }
    }
    for (int r = 0; r < m_rows; r++) sums[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc_lo[r], acc_hi[r]));
}

/* The same with the format a constant too: the decode's switch leaves the inner loop. */
static inline __attribute__((always_inline)) void row_dot_typed(int type, const uint8_t* row, const float* d,
                                                                const float* m, int64_t blocks, int64_t bb,
                                                                const float* x, int64_t k, int m_rows,
                                                                float* sums) {
    switch (m_rows) {
    case 1: row_dot_avx512(type, row, d, m, blocks, bb, x, k, 1, sums); break;
    case 2: row_dot_avx512(type, row, d, m, blocks, bb, x, k, 2, sums); break;
    case 3: row_dot_avx512(type, row, d, m, blocks, bb, x, k, 3, sums); break;
    case 4: row_dot_avx512(type, row, d, m, blocks, bb, x, k, 4, sums); break;
    case 5: row_dot_avx512(type, row, d, m, blocks, bb, x, k, 5, sums); break;
    case 6: row_dot_avx512(type, row, d, m, blocks, bb, x, k, 6, sums); break;
    case 7: row_dot_avx512(type, row, d, m, blocks, bb, x, k, 7, sums); break;
    default: row_dot_avx512(type, row, d, m, blocks, bb, x, k, 8, sums); break;
    }
}

static void row_dot(int type, const uint8_t* row, const float* d, const float* m, int64_t blocks, int64_t bb,
                    const float* x, int64_t k, int m_rows, float* sums) {
    switch (type) {
    case W_Q4_0: row_dot_typed(W_Q4_0, row, d, m, blocks, bb, x, k, m_rows, sums); break;
    case W_Q4_1: row_dot_typed(W_Q4_1, row, d, m, blocks, bb, x, k, m_rows, sums); break;
    case W_Q8_0: row_dot_typed(W_Q8_0, row, d, m, blocks, bb, x, k, m_rows, sums); break;
    case W_F16: row_dot_typed(W_F16, row, d, m, blocks, bb, x, k, m_rows, sums); break;
    default: row_dot_typed(W_BF16, row, d, m, blocks, bb, x, k, m_rows, sums); break;
    }
}
#else
static void row_dot(int type, const uint8_t* row, const float* d, const float* m, int64_t blocks, int64_t bb,
                    const float* x, int64_t k, int m_rows, float* sums) {
    float w[32];
    for (int r = 0; r < m_rows; r++) sums[r] = 0.f;
    for (int64_t blk = 0; blk < blocks; blk++) {
        decode_block(type, row + blk * bb, d ? d[blk] : 0.f, m ? m[blk] : 0.f, w);
        for (int r = 0; r < m_rows; r++) {
            const float* xb = x + r * k + blk * 32;
            float s = 0.f;
            for (int j = 0; j < 32; j++) s += xb[j] * w[j];
            sums[r] += s;
        }
    }
}
#endif

void weight_gemv_range_f32(const uint8_t* weight, const float* scales, const float* mins, int type, int64_t k,
                           int64_t row_bytes, const float* x, int64_t m_rows, const float* bias, float* y,
                           int64_t y_stride, int64_t n0, int64_t n1) {
    const int64_t blocks = k / 32, bb = block_bytes(type);
    const int m = m_rows < MAX_ROWS ? (int)m_rows : MAX_ROWS;
    for (int64_t n = n0; n < n1; n++) {
        float sums[MAX_ROWS];
        const float* d = scales ? scales + n * blocks : NULL;
        const float* mn = mins ? mins + n * blocks : NULL;
        row_dot(type, weight + n * row_bytes, d, mn, blocks, bb, x, k, m, sums);
        const float b = bias ? bias[n] : 0.f;
        for (int r = 0; r < m; r++) y[r * y_stride + n] = sums[r] + b;
    }
}

/* x [M, K] float32 (M <= MAX_ROWS), W as above with N rows (scales, mins NULL where the format has
 * none), bias [N] or NULL -> y [M, N] float32. Each thread takes one contiguous run of rows. */
void weight_gemv_f32(const uint8_t* weight, const float* scales, const float* mins, int type, int64_t n_rows,
                     int64_t k, int64_t row_bytes, const float* x, int64_t m_rows, const float* bias, float* y,
                     int num_threads) {
    _Pragma("omp parallel num_threads(num_threads)")
    {
        const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
        weight_gemv_range_f32(weight, scales, mins, type, k, row_bytes, x, m_rows, bias, y, n_rows,
                              n_rows * t / nt, n_rows * (t + 1) / nt);
    }
}

/* Decode whole rows to float32 [N, K] with the same arithmetic (tests). */
void weight_decode_f32(const uint8_t* weight, const float* scales, const float* mins, int type, int64_t n_rows,
                       int64_t k, int64_t row_bytes, float* out) {
    const int64_t blocks = k / 32, bb = block_bytes(type);
    for (int64_t n = 0; n < n_rows; n++)
        for (int64_t blk = 0; blk < blocks; blk++) {
            const int64_t i = n * blocks + blk;
            decode_block(type, weight + n * row_bytes + blk * bb, scales ? scales[i] : 0.f, mins ? mins[i] : 0.f,
                         out + n * k + blk * 32);
        }
}
