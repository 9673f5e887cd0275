/* A few bfloat16 rows times a weight kept in its GGUF blocks (Q4_1, Q8_0), giving oneDNN's bfloat16 GEMM's
 * bits: each weight is decoded to float32 as the loader decodes it (Q4_1 q * d + m, Q8_0 q * d, each step
 * rounded), rounded to bfloat16 as the model's weight was, and summed with AVX512-BF16's pair dot product in
 * oneDNN's order on these CPUs: k in blocks of k_block, each block summed from zero by one accumulator per
 * output, the blocks' sums added in order. Which k_block oneDNN uses depends on the shape, so the caller
 * finds it, and checks the bits, against oneDNN itself once per weight (kernels/cpu/panel_product.py).
 *
 * Why: a one-row decode step reads every weight once; from 4-bit blocks that is a third of the bytes of
 * the bfloat16 weight oneDNN reads, and the batch-invariant engine needs a one-row product with a batch's
 * bits. Compiled with -ffp-contract=off (build.py): the only fused multiply-add is the explicit decode below,
 * which gives the loader's twice-rounded bits (see the end of this comment).
 *
 * Weight layout ("panels"): output columns in groups of 16; per group and per pair of k, the 32 quantised
 * values in the order vdpbf16ps takes them, split in two halves: "A" = columns 0-7 and "B" = columns 8-15, each
 * half as (column c, k), (column c, k + 1) for its 8 columns. Q4_1: 16 bytes, byte e holding A's value e in its
 * low nibble and B's value e in its high one; Q8_0: A's 16 int8, then B's 16. So decoding yields the two halves
 * as float32 lanes that one bfloat16 conversion packs in vdpbf16ps's order, with no shuffle. Per group and
 * 32-k block, the 16 columns' float16 scales (and Q4_1's minimums), in column order.
 *
 * On CPUs with AVX2 but no AVX-512 (float32 rows only) the pairs are laid out for 8-lane vectors instead, so
 * that decoding needs no shuffle: Q4_1's byte j holds column j at k in its low nibble and at k + 1 in its
 * high one; Q8_0's 32 bytes are columns 0-7 at k, 0-7 at k + 1, 8-15 at k, 8-15 at k + 1. panel_repack
 * writes the layout of the build it is in, so a panel never meets the other layout's kernel.
 *
 * With one row, several column groups are in flight (panel_tile) so that vdpbf16ps's latency is not a chain,
 * and each stream is prefetched a few blocks ahead: a one-row step streams the whole model from memory.
 *
 * Exactness of the fused decode: q * d is exact in float32 (q has at most 8 bits, d is a float16 with 11), so
 * rounding q * d and then q * d + m (as the loader does) equals one fused multiply-add's single rounding.
 *
 * float32 rows (panel_product_f32) read the same panels for a float32 model, with the bits of its product
 * (oneDNN's float32 matmul, or MKL's packed sgemm with rows padded to a multiple of 4), which on these CPUs
 * both sum in the same shape of order: per output one fused multiply-add chain over k in order, in blocks of
 * k_block (oneDNN 512 / 1024, MKL 192 on an AVX-512 EPYC) each from zero, the blocks' sums added in order.
 * Each pair's two halves become the 16 columns' weights at k and at k + 1 by one two-source permute each.
 * Needs only AVX-512F, or AVX2 with FMA and F16C (its own tile and layout), so it also runs on CPUs without
 * bfloat16. */
#include <stdint.h>
#include <string.h>
#include <omp.h>

#include "cpu_kernels.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#define PANEL_PRODUCT_AVX512 1
#define PANEL_PRODUCT_F32_SIMD 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define PANEL_PRODUCT_F32_AVX2 1
#define PANEL_PRODUCT_F32_SIMD 1
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define PANEL_PRODUCT_SIMD 1
#endif

#define PANEL_TYPE_Q4_1 3
#define PANEL_TYPE_Q8_0 8
#define PANEL_MAX_ROWS 4
#define PANEL_PREFETCH_BLOCKS 8
#define PANEL_MAX_GROUPS 4  /* column groups one panel_tile keeps in flight */

int panel_product_simd(void) {
#ifdef PANEL_PRODUCT_SIMD
    return 1;
#else
    return 0;
#endif
}

int panel_product_f32_simd(void) {
#ifdef PANEL_PRODUCT_F32_SIMD
    return 1;
#else
    return 0;
#endif
}

/* Where column groups g .. g + NG - 1 start: their pairs' quantised values, their blocks' scales and (Q4_1)
 * minimums (see the layout above). */
static inline void panel_streams(const uint8_t* values, const uint16_t* scales, const uint16_t* mins, int type,
                                 int64_t k, int64_t g, int NG, const uint8_t** q, const uint16_t** gs,
                                 const uint16_t** gm) {
    const int64_t pair_bytes = type == PANEL_TYPE_Q4_1 ? 16 : 32, blocks = k / 32;
    for (int i = 0; i < NG; i++) {
        q[i] = values + (g + i) * (k / 2) * pair_bytes;
        gs[i] = scales + (g + i) * blocks * 16;
        gm[i] = mins ? mins + (g + i) * blocks * 16 : NULL;
    }
}

#ifdef PANEL_PRODUCT_AVX512
/* A pair's two halves decoded to float32: *a = half A's lanes (column e / 2, k + e % 2) for columns 0-7,
 * *b = half B's for columns 8-15. dA, mA / dB, mB: the scales and minimums of halves A and B (each column's
 * twice, see the layout above). */
static inline void decode_halves(int type, const uint8_t* q, __m512 dA, __m512 mA, __m512 dB, __m512 mB,
                                 __m512* a_out, __m512* b_out) {
    __m512 a, b;
    if (type == PANEL_TYPE_Q4_1) {
        /* a nibble to float32 by a permute of 0.0 .. 15.0 (vpermps reads only an index's low 4 bits) */
        const __m512 values = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)q));
        a = _mm512_fmadd_ps(_mm512_permutexvar_ps(v, values), dA, mA);
        b = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), values), dB, mB);
    } else {
        a = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)q))), dA);
        b = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + 16)))), dB);
    }
    *a_out = a;
    *b_out = b;
}
#endif

#ifdef PANEL_PRODUCT_SIMD
/* The 16 columns' weights at k and k + 1, decoded to float32 and rounded to bfloat16, as the 32-bit lanes
 * vdpbf16ps takes: lane j = (w[j][k], w[j][k + 1]). */
static inline __m512bh decode_pair(int type, const uint8_t* q, __m512 dA, __m512 mA, __m512 dB, __m512 mB) {
    __m512 a, b;
    decode_halves(type, q, dA, mA, dB, mB, &a, &b);
    return _mm512_cvtne2ps_pbh(b, a);  /* A's 16 bfloat16 in the low half, B's in the high half */
}
#endif

#ifdef PANEL_PRODUCT_AVX512
/* Output columns [16 g, 16 (g + NG)) for R rows. NG groups are in flight at once so that NG x R
 * accumulators are independent: with one row and one group each pair product waited for the previous
 * one (vdpbf16ps's latency), which bounded a one-row step. Each output's sum is still its own chain in the
 * same order, so the bits do not depend on NG. F32: float32 rows and outputs (see the top),
 * else bfloat16 (oneDNN's). Inlined with constant NG, R and F32 (the loops unroll, the branches fold). */
static inline __attribute__((always_inline)) void panel_tile(
    const uint8_t* values, const uint16_t* scales, const uint16_t* mins, int type, int64_t k, int64_t k_block,
    const void* x, void* y, int64_t n, int64_t g, __m512i halfA, __m512i halfB, __m512i at_k, __m512i at_k1,
    const int NG, const int R, const int F32) {
    const int64_t pair_bytes = type == PANEL_TYPE_Q4_1 ? 16 : 32;
    const uint8_t* q[PANEL_MAX_GROUPS];
    const uint16_t* gs[PANEL_MAX_GROUPS];
    const uint16_t* gm[PANEL_MAX_GROUPS];
    panel_streams(values, scales, mins, type, k, g, NG, q, gs, gm);
    __m512 total[PANEL_MAX_GROUPS][PANEL_MAX_ROWS], acc[PANEL_MAX_GROUPS][PANEL_MAX_ROWS];
    for (int64_t k0 = 0; k0 < k; k0 += k_block) {
        const int64_t k1 = k0 + k_block < k ? k0 + k_block : k;
        for (int i = 0; i < NG; i++)
            for (int r = 0; r < R; r++) acc[i][r] = _mm512_setzero_ps();
        for (int64_t b = k0 / 32; b < k1 / 32; b++) {
            __m512 dA[PANEL_MAX_GROUPS], mA[PANEL_MAX_GROUPS], dB[PANEL_MAX_GROUPS], mB[PANEL_MAX_GROUPS];
            for (int i = 0; i < NG; i++) {
                /* a few blocks ahead in each of the NG streams (a one-row step streams the weights from memory) */
                const uint8_t* ahead = q[i] + (b + PANEL_PREFETCH_BLOCKS) * 16 * pair_bytes;
                for (int64_t line = 0; line < 16 * pair_bytes; line += 64) _mm_prefetch((const char*)ahead + line, _MM_HINT_T0);
                const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(gs[i] + b * 16)));
                const __m512 m = gm[i] ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(gm[i] + b * 16)))
                                       : _mm512_setzero_ps();
                dA[i] = _mm512_permutexvar_ps(halfA, d);
                dB[i] = _mm512_permutexvar_ps(halfB, d);
                mA[i] = _mm512_permutexvar_ps(halfA, m);
                mB[i] = _mm512_permutexvar_ps(halfB, m);
            }
            for (int64_t p = b * 16; p < b * 16 + 16; p++) {
                if (F32) {
                    __m512 x0[PANEL_MAX_ROWS], x1[PANEL_MAX_ROWS];
                    for (int r = 0; r < R; r++) {
                        x0[r] = _mm512_set1_ps(((const float*)x)[r * k + 2 * p]);
                        x1[r] = _mm512_set1_ps(((const float*)x)[r * k + 2 * p + 1]);
                    }
                    for (int i = 0; i < NG; i++) {
                        __m512 a, bh;
                        decode_halves(type, q[i] + p * pair_bytes, dA[i], mA[i], dB[i], mB[i], &a, &bh);
                        const __m512 w0 = _mm512_permutex2var_ps(a, at_k, bh), w1 = _mm512_permutex2var_ps(a, at_k1, bh);
                        for (int r = 0; r < R; r++)
                            acc[i][r] = _mm512_fmadd_ps(x1[r], w1, _mm512_fmadd_ps(x0[r], w0, acc[i][r]));
                    }
                } else {
#ifdef PANEL_PRODUCT_SIMD
                    __m512bh xp[PANEL_MAX_ROWS];
                    for (int r = 0; r < R; r++) {
                        int32_t pair;
                        memcpy(&pair, (const uint16_t*)x + r * k + 2 * p, 4);
                        xp[r] = (__m512bh)_mm512_set1_epi32(pair);
                    }
                    for (int i = 0; i < NG; i++) {
                        const __m512bh w = decode_pair(type, q[i] + p * pair_bytes, dA[i], mA[i], dB[i], mB[i]);
                        for (int r = 0; r < R; r++) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], xp[r], w);
                    }
#endif
                }
            }
        }
        for (int i = 0; i < NG; i++)
            for (int r = 0; r < R; r++) total[i][r] = k0 == 0 ? acc[i][r] : _mm512_add_ps(total[i][r], acc[i][r]);
    }
    for (int i = 0; i < NG; i++)
        for (int r = 0; r < R; r++) {
            if (F32) {
                _mm512_storeu_ps((float*)y + r * n + (g + i) * 16, total[i][r]);
            } else {
#ifdef PANEL_PRODUCT_SIMD
                _mm256_storeu_si256((__m256i*)((uint16_t*)y + r * n + (g + i) * 16), (__m256i)_mm512_cvtneps_pbh(total[i][r]));
#endif
            }
        }
}

/* Output columns [16 g0, 16 g1) for rows (at most PANEL_MAX_ROWS): as many groups in flight as keep about
 * four accumulators busy. */
static inline __attribute__((always_inline)) void panel_groups(
    const uint8_t* values, const uint16_t* scales, const uint16_t* mins, int type, int64_t k, int64_t k_block,
    const void* x, int64_t rows, void* y, int64_t n, int64_t g0, int64_t g1, const int F32) {
    int32_t a_cols[16], b_cols[16], k_lanes[16], k1_lanes[16];
    for (int e = 0; e < 16; e++) {
        a_cols[e] = e / 2; b_cols[e] = 8 + e / 2;  /* lane e of half A / B: column e / 2 / 8 + e / 2 */
        /* the 16 columns at k (k + 1): the even (odd) lanes of half A, then of half B (index 16 + ...) */
        k_lanes[e] = e < 8 ? 2 * e : 16 + 2 * (e - 8);
        k1_lanes[e] = k_lanes[e] + 1;
    }
    const __m512i halfA = _mm512_loadu_si512(a_cols), halfB = _mm512_loadu_si512(b_cols);
    const __m512i at_k = _mm512_loadu_si512(k_lanes), at_k1 = _mm512_loadu_si512(k1_lanes);
    int64_t g = g0;
#define PANEL_TILES(NG, R)                                                                                   \
    for (; g + (NG) <= g1; g += (NG))                                                                        \
        panel_tile(values, scales, mins, type, k, k_block, x, y, n, g, halfA, halfB, at_k, at_k1, NG, R, F32)
    switch (rows) {
    case 1: PANEL_TILES(PANEL_MAX_GROUPS, 1); PANEL_TILES(3, 1); PANEL_TILES(2, 1); PANEL_TILES(1, 1); break;
    case 2: PANEL_TILES(2, 2); PANEL_TILES(1, 2); break;
    case 3: PANEL_TILES(1, 3); break;
    default: PANEL_TILES(1, 4); break;
    }
#undef PANEL_TILES
}
#endif

#ifdef PANEL_PRODUCT_F32_AVX2
/* The float32 panel product on AVX2 (8 lanes): the same sums in the same order as the AVX-512 tile above, so
 * the same bits, over the AVX2 layout (see the top), which decodes each pair into the 8 columns at k and at
 * k + 1 with no shuffle: fewer vector operations matter here, the decode bounds a one-row step. */
static inline __attribute__((always_inline)) void panel_tile_avx2(
    const uint8_t* values, const uint16_t* scales, const uint16_t* mins, int type, int64_t k, int64_t k_block,
    const float* x, float* y, int64_t n, int64_t g, const int NG, const int R) {
    const __m256i low4 = _mm256_set1_epi32(0x0f);
    const int q4 = type == PANEL_TYPE_Q4_1;
    const int64_t pair_bytes = q4 ? 16 : 32;
    const uint8_t* q[PANEL_MAX_GROUPS];
    const uint16_t* gs[PANEL_MAX_GROUPS];
    const uint16_t* gm[PANEL_MAX_GROUPS];
    panel_streams(values, scales, mins, type, k, g, NG, q, gs, gm);
    /* [group][row][columns 0-7, 8-15] */
    __m256 total[PANEL_MAX_GROUPS][PANEL_MAX_ROWS][2], acc[PANEL_MAX_GROUPS][PANEL_MAX_ROWS][2];
    for (int64_t k0 = 0; k0 < k; k0 += k_block) {
        const int64_t k1 = k0 + k_block < k ? k0 + k_block : k;
        for (int i = 0; i < NG; i++)
            for (int r = 0; r < R; r++) acc[i][r][0] = acc[i][r][1] = _mm256_setzero_ps();
        for (int64_t b = k0 / 32; b < k1 / 32; b++) {
            __m256 d[PANEL_MAX_GROUPS][2], m[PANEL_MAX_GROUPS][2];  /* columns 0-7, 8-15 */
            for (int i = 0; i < NG; i++) {
                const uint8_t* ahead = q[i] + (b + PANEL_PREFETCH_BLOCKS) * 16 * pair_bytes;
                for (int64_t line = 0; line < 16 * pair_bytes; line += 64) _mm_prefetch((const char*)ahead + line, _MM_HINT_T0);
                for (int h = 0; h < 2; h++) {
                    d[i][h] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(gs[i] + b * 16 + 8 * h)));
                    m[i][h] = gm[i] ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(gm[i] + b * 16 + 8 * h)))
                                    : _mm256_setzero_ps();
                }
            }
            for (int64_t p = b * 16; p < b * 16 + 16; p++) {
                __m256 x0[PANEL_MAX_ROWS], x1[PANEL_MAX_ROWS];
                for (int r = 0; r < R; r++) {
                    x0[r] = _mm256_broadcast_ss(x + r * k + 2 * p);
                    x1[r] = _mm256_broadcast_ss(x + r * k + 2 * p + 1);
                }
                for (int i = 0; i < NG; i++) {
                    const uint8_t* qp = q[i] + p * pair_bytes;
                    for (int h = 0; h < 2; h++) {  /* columns 8 h .. 8 h + 7 */
                        __m256 w0, w1;  /* at k, at k + 1 */
                        if (q4) {
                            const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(qp + 8 * h)));
                            w0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, low4)), d[i][h], m[i][h]);
                            w1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), d[i][h], m[i][h]);
                        } else {
                            const uint8_t* qh = qp + 16 * h;
                            w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)qh))),
                                               d[i][h]);
                            w1 = _mm256_mul_ps(
                                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(qh + 8)))), d[i][h]);
                        }
                        for (int r = 0; r < R; r++)
                            acc[i][r][h] = _mm256_fmadd_ps(x1[r], w1, _mm256_fmadd_ps(x0[r], w0, acc[i][r][h]));
                    }
                }
            }
        }
        for (int i = 0; i < NG; i++)
            for (int r = 0; r < R; r++)
                for (int h = 0; h < 2; h++)
                    total[i][r][h] = k0 == 0 ? acc[i][r][h] : _mm256_add_ps(total[i][r][h], acc[i][r][h]);
    }
    for (int i = 0; i < NG; i++)
        for (int r = 0; r < R; r++)
            for (int h = 0; h < 2; h++) _mm256_storeu_ps(y + r * n + (g + i) * 16 + 8 * h, total[i][r][h]);
}

static void panel_groups_avx2(const uint8_t* values, const uint16_t* scales, const uint16_t* mins, int type, int64_t k,
                              int64_t k_block, const float* x, int64_t rows, float* y, int64_t n, int64_t g0,
                              int64_t g1) {
    int64_t g = g0;
#define PANEL_TILES(NG, R) \
    for (; g + (NG) <= g1; g += (NG)) panel_tile_avx2(values, scales, mins, type, k, k_block, x, y, n, g, NG, R)
    switch (rows) {
    case 1: PANEL_TILES(2, 1); PANEL_TILES(1, 1); break;
    case 2: PANEL_TILES(1, 2); break;
    case 3: PANEL_TILES(1, 3); break;
    default: PANEL_TILES(1, 4); break;
    }
#undef PANEL_TILES
}
#endif

void panel_product_share_bf16(const uint8_t* values, const uint16_t* scales, const uint16_t* mins, int type,
                              int64_t n, int64_t k, int64_t k_block, const uint16_t* x, int64_t rows, uint16_t* y) {
#ifdef PANEL_PRODUCT_SIMD
    const int64_t groups = n / 16, t = omp_get_thread_num(), nt = omp_get_num_threads();
    panel_groups(values, scales, mins, type, k, k_block, x, rows, y, n, groups * t / nt, groups * (t + 1) / nt, 0);
#else
    (void)values; (void)scales; (void)mins; (void)type; (void)n; (void)k; (void)k_block; (void)x; (void)rows;
    (void)y;
#endif
}

void panel_product_share_f32(const uint8_t* values, const uint16_t* scales, const uint16_t* mins, int type,
                             int64_t n, int64_t k, int64_t k_block, const float* x, int64_t rows, float* y) {
#ifdef PANEL_PRODUCT_F32_SIMD
    const int64_t groups = n / 16, t = omp_get_thread_num(), nt = omp_get_num_threads();
#ifdef PANEL_PRODUCT_AVX512
    panel_groups(values, scales, mins, type, k, k_block, x, rows, y, n, groups * t / nt, groups * (t + 1) / nt, 1);
#else
    panel_groups_avx2(values, scales, mins, type, k, k_block, x, rows, y, n, groups * t / nt, groups * (t + 1) / nt);
#endif
#else
    (void)values; (void)scales; (void)mins; (void)type; (void)n; (void)k; (void)k_block; (void)x; (void)rows;
    (void)y;
#endif
}

/* x [rows, k] float32 (rows <= PANEL_MAX_ROWS) times the panels of an [n, k] weight -> y [rows, n] float32,
 * the float32 product's bits (see the top); the same shapes and threads as panel_product_bf16 below. */
void panel_product_f32(const uint8_t* values, const uint16_t* scales, const uint16_t* mins, int type, int64_t n,
                       int64_t k, int64_t k_block, const float* x, int64_t rows, float* y, int num_threads) {
    _Pragma("omp parallel num_threads(num_threads)")
    panel_product_share_f32(values, scales, mins, type, n, k, k_block, x, rows, y);
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
/* Element e (0-31) of a Q4_1 block's 16 bytes: the low nibble of byte e below 16, else the high one of e - 16. */
static inline uint8_t q4_element(const uint8_t* block, int e) {
    return e < 16 ? (uint8_t)(block[e] & 0x0F) : (uint8_t)(block[e - 16] >> 4);
}

void panel_repack(int type, const uint8_t* values, const float* scales, const float* mins, int64_t n, int64_t k,
                  uint8_t* out_values, uint16_t* out_scales, uint16_t* out_mins) {
#ifdef PANEL_PRODUCT_F32_SIMD
    const int64_t blocks = k / 32, groups = n / 16, row_bytes = type == PANEL_TYPE_Q4_1 ? k / 2 : k;
    const int64_t block_bytes = type == PANEL_TYPE_Q4_1 ? 16 : 32;  /* also a pair's bytes in the panels */
    /* Each output byte is computed once, from the 16 rows' block (in L1 together); groups write disjoint
     * bytes, so a load repacks on every core. */
    _Pragma("omp parallel for schedule(static)")
    for (int64_t g = 0; g < groups; g++) {
        for (int64_t b = 0; b < blocks; b++) {
            const uint8_t* rows[16];  /* the group's 16 rows' block b */
            for (int j = 0; j < 16; j++) rows[j] = values + (g * 16 + j) * row_bytes + b * block_bytes;
            uint8_t* pairs = out_values + (g * (k / 2) + b * 16) * block_bytes;  /* block b's 16 pairs */
            if (type == PANEL_TYPE_Q4_1) {
                for (int p = 0; p < 16; p++)
                    for (int o = 0; o < 16; o++) {
#ifdef PANEL_PRODUCT_AVX512  /* byte 2j + t: column j at k + t low, column j + 8 high */
                        const int e = 2 * p + o % 2;
                        pairs[p * 16 + o] = (uint8_t)(q4_element(rows[o / 2], e) | q4_element(rows[o / 2 + 8], e) << 4);
#else  /* byte j: column j at k low, at k + 1 high */
                        pairs[p * 16 + o] = (uint8_t)(q4_element(rows[o], 2 * p) | q4_element(rows[o], 2 * p + 1) << 4);
#endif
                    }
            } else {
                for (int j = 0; j < 16; j++)
                    for (int t = 0; t < 2; t++) {  /* column j at k + t: its byte in every pair */
#ifdef PANEL_PRODUCT_AVX512  /* columns 0-7 interleaved at k, k + 1, then 8-15 */
                        const int at = 16 * (j / 8) + 2 * (j % 8) + t;
#else  /* columns 0-7 at k, 0-7 at k + 1, then 8-15 likewise */
                        const int at = 16 * (j / 8) + 8 * t + j % 8;
#endif
                        for (int p = 0; p < 16; p++) pairs[p * 32 + at] = rows[j][2 * p + t];
                    }
            }
            for (int j = 0; j < 16; j++) {
                const int64_t row = g * 16 + j;
                out_scales[(g * blocks + b) * 16 + j] = (uint16_t)_cvtss_sh(scales[row * blocks + b], 0);
                if (mins) out_mins[(g * blocks + b) * 16 + j] = (uint16_t)_cvtss_sh(mins[row * blocks + b], 0);
            }
        }
    }
#else
    (void)type; (void)values; (void)scales; (void)mins; (void)n; (void)k; (void)out_values; (void)out_scales;
    (void)out_mins;
#endif
}
