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
#define GROUP_MAX 4
#ifndef PREFETCH_GROUPS
#define PREFETCH_GROUPS 4
#endif

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
/* `group` consecutive rows of W against M rows of x. Inlined with M and group constants (see rows_dot),
 * so the accumulators live in registers: an array indexed by a run-time M would sit on the stack and put
 * a store-to-load round trip into every accumulation. Several rows at once matter at M = 1: one row of
 * the default model is 18 blocks, and its accumulators' FMA latency chain (plus the final horizontal
 * sum) left the ports idle half the time; interleaving rows gives the core independent chains. */
static inline __attribute__((always_inline)) void rows_dot_avx512(int type, const uint8_t* row, int64_t row_bytes,
                                                                  const float* d, const float* m, int64_t blocks,
                                                                  int64_t bb, const float* x, int64_t k,
                                                                  const int m_rows, const int group, float* sums) {
    __m512 acc_lo[GROUP_MAX][MAX_ROWS], acc_hi[GROUP_MAX][MAX_ROWS];
    for (int g = 0; g < group; g++)
        for (int r = 0; r < m_rows; r++) acc_lo[g][r] = acc_hi[g][r] = _mm512_setzero_ps();
    /* Software prefetch of the rows PREFETCH_GROUPS groups ahead (rows are contiguous, so that is a fixed
     * distance), spread evenly over this group's blocks: the hardware prefetcher alone kept two threads
     * at ~8 of the ~19 GB/s this machine streams. */
    const int64_t pf_span = group * row_bytes, pf_unit = blocks * 64;
    const char* pf = (const char*)row + PREFETCH_GROUPS * pf_span;
    int64_t pf_acc = 0;
    if (d) {
        const char* pd = (const char*)(d + PREFETCH_GROUPS * group * blocks);
        const char* pm = (const char*)(m + PREFETCH_GROUPS * group * blocks);
        for (int64_t off = 0; off < group * blocks * 4; off += 64) {
            _mm_prefetch(pd + off, _MM_HINT_T0);
            if (m) _mm_prefetch(pm + off, _MM_HINT_T0);
        }
    }
    for (int64_t blk = 0; blk < blocks; blk++) {
        const float* xb = x + blk * 32;
        for (pf_acc += pf_span; pf_acc > 0; pf_acc -= pf_unit, pf += 64) _mm_prefetch(pf, _MM_HINT_T0);
        for (int g = 0; g < group; g++) {
            __m512 lo, hi;
            decode_block_avx512(type, row + g * row_bytes + blk * bb, d + g * blocks + blk, m + g * blocks + blk,
                                &lo, &hi);
            for (int r = 0; r < m_rows; r++) {
                acc_lo[g][r] = _mm512_fmadd_ps(_mm512_loadu_ps(xb + r * k), lo, acc_lo[g][r]);
                acc_hi[g][r] = _mm512_fmadd_ps(_mm512_loadu_ps(xb + r * k + 16), hi, acc_hi[g][r]);
            }
        }
    }
    for (int g = 0; g < group; g++)
        for (int r = 0; r < m_rows; r++)
            sums[g * MAX_ROWS + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc_lo[g][r], acc_hi[g][r]));
}

/* How many rows of W one call takes for M rows of x: enough independent accumulators, few enough to
 * stay in registers (measured at M = 1 on the model's rows, hot in L2: 4 rows at a time 3.1 ns per block
 * of 32 weights, one row 4.2 ns). */
static inline int rows_per_group(int m_rows) { return m_rows == 1 ? 4 : m_rows <= 3 ? 2 : 1; }

/* The same with the format a constant too: the decode's switch leaves the inner loop. */
static inline __attribute__((always_inline)) void rows_dot_typed(int type, const uint8_t* row, int64_t row_bytes,
                                                                 const float* d, const float* m, int64_t blocks,
                                                                 int64_t bb, const float* x, int64_t k, int m_rows,
                                                                 int group, float* sums) {
#define ROWS_DOT(M, G) rows_dot_avx512(type, row, row_bytes, d, m, blocks, bb, x, k, M, G, sums)
    if (group == 1) {
        switch (m_rows) {
        case 1: ROWS_DOT(1, 1); break;
        case 2: ROWS_DOT(2, 1); break;
        case 3: ROWS_DOT(3, 1); break;
        case 4: ROWS_DOT(4, 1); break;
        case 5: ROWS_DOT(5, 1); break;
        case 6: ROWS_DOT(6, 1); break;
        case 7: ROWS_DOT(7, 1); break;
        default: ROWS_DOT(8, 1); break;
        }
    } else if (m_rows == 1) {
        ROWS_DOT(1, 4);
    } else if (m_rows == 2) {
        ROWS_DOT(2, 2);
    } else {
        ROWS_DOT(3, 2);
    }
#undef ROWS_DOT
}

/* rows_per_group(m_rows) rows when group > 1, else one; sums [group][MAX_ROWS]. */
static void rows_dot(int type, const uint8_t* row, int64_t row_bytes, const float* d, const float* m,
                     int64_t blocks, int64_t bb, const float* x, int64_t k, int m_rows, int group, float* sums) {
    switch (type) {
    case W_Q4_0: rows_dot_typed(W_Q4_0, row, row_bytes, d, m, blocks, bb, x, k, m_rows, group, sums); break;
    case W_Q4_1: rows_dot_typed(W_Q4_1, row, row_bytes, d, m, blocks, bb, x, k, m_rows, group, sums); break;
    case W_Q8_0: rows_dot_typed(W_Q8_0, row, row_bytes, d, m, blocks, bb, x, k, m_rows, group, sums); break;
    case W_F16: rows_dot_typed(W_F16, row, row_bytes, d, m, blocks, bb, x, k, m_rows, group, sums); break;
    default: rows_dot_typed(W_BF16, row, row_bytes, d, m, blocks, bb, x, k, m_rows, group, sums); break;
    }
}
#else
static inline int rows_per_group(int m_rows) { (void)m_rows; return 1; }

static void rows_dot(int type, const uint8_t* row, int64_t row_bytes, const float* d, const float* m,
                     int64_t blocks, int64_t bb, const float* x, int64_t k, int m_rows, int group, float* sums) {
    (void)row_bytes; (void)group; /* one row at a time */
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

/* Rows [n0, n1) of y = x @ W^T (+ bias) on the calling thread; y's rows are y_stride apart. */
static void weight_gemv_range_f32(const uint8_t* weight, const float* scales, const float* mins, int type,
                                  int64_t k, int64_t row_bytes, const float* x, int64_t m_rows, const float* bias,
                                  float* y, int64_t y_stride, int64_t n0, int64_t n1) {
    const int64_t blocks = k / 32, bb = block_bytes(type);
    const int m = m_rows < MAX_ROWS ? (int)m_rows : MAX_ROWS;
    const int group = rows_per_group(m);
    for (int64_t n = n0; n < n1;) {
        const int g = n + group <= n1 ? group : 1;
        float sums[GROUP_MAX * MAX_ROWS];
        rows_dot(type, weight + n * row_bytes, row_bytes, scales ? scales + n * blocks : NULL,
                 mins ? mins + n * blocks : NULL, blocks, bb, x, k, m, g, sums);
        for (int i = 0; i < g; i++, n++) {
            const float b = bias ? bias[n] : 0.f;
            for (int r = 0; r < m; r++) y[r * y_stride + n] = sums[i * MAX_ROWS + r] + b;
        }
    }
}

void weight_gemv_share_f32(const uint8_t* weight, const float* scales, const float* mins, int type, int64_t n_rows,
                           int64_t k, int64_t row_bytes, const float* x, int64_t m_rows, const float* bias, float* y) {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    weight_gemv_range_f32(weight, scales, mins, type, k, row_bytes, x, m_rows, bias, y, n_rows, n_rows * t / nt,
                          n_rows * (t + 1) / nt);
}

/* x [M, K] float32 (M <= MAX_ROWS), W as above with N rows (scales, mins NULL where the format has
 * none), bias [N] or NULL -> y [M, N] float32. Each thread takes one contiguous run of rows. */
void weight_gemv_f32(const uint8_t* weight, const float* scales, const float* mins, int type, int64_t n_rows,
                     int64_t k, int64_t row_bytes, const float* x, int64_t m_rows, const float* bias, float* y,
                     int num_threads) {
    _Pragma("omp parallel num_threads(num_threads)")
    weight_gemv_share_f32(weight, scales, mins, type, n_rows, k, row_bytes, x, m_rows, bias, y);
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

/* A GGUF tensor's Q4_0 / Q4_1 / Q8_0 blocks as the file stores them (the float16 scale, Q4_1's float16 minimum,
 * then the values) to float32 [n_blocks * 32]: the loader's dequantisation (models/gguf_loader.py), bit for bit,
 * split over the threads (a load decodes the whole model). The scales and minimums come in as float32
 * [n_blocks], converted by the caller (exactly). With out_bf16, out is bfloat16 [n_blocks * 32]: those floats
 * rounded as torch's cast rounds them (a bfloat16 model's parameters, without a float32 copy on the way). */
void dequantize_gguf_blocks(int type, const uint8_t* blocks, int64_t n_blocks, const float* scales,
                            const float* mins, void* out, int out_bf16, int num_threads) {
    const int64_t head = type == W_Q4_1 ? 4 : 2, stride = head + block_bytes(type);
    _Pragma("omp parallel for num_threads(num_threads) schedule(static)")
    for (int64_t i = 0; i < n_blocks; i++) {
        const uint8_t* b = blocks + i * stride + head;
        if (!out_bf16) {
            decode_block(type, b, scales[i], mins ? mins[i] : 0.f, (float*)out + i * 32);
            continue;
        }
        float w[32];
        decode_block(type, b, scales[i], mins ? mins[i] : 0.f, w);
        uint16_t* o = (uint16_t*)out + i * 32;
        for (int j = 0; j < 32; j++) o[j] = bf16_from_f32(w[j]);
    }
}
