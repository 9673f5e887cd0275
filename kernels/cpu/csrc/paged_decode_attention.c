/* Decode attention over the paged KV cache on the CPU: one query token per sequence, reading K/V in
 * place through the block table (no gather into padded tensors, which costs more memory traffic than
 * the attention itself at batch sizes a CPU runs).
 *
 * Work item = a sequence (from ITEM_PER_SEQ_MIN sequences on) or a (sequence, KV head); the G = H / Hkv
 * query heads of a KV head share every K/V row read (GQA). One pass over the blocks with an online
 * softmax (running max and sum per head, the accumulator rescaled when the max grows), so each K and V
 * row is read from memory once and nothing the size of the context is written; the next block is
 * prefetched while one is computed. Rows are handled as 16-float vectors
 * (GCC vector extensions: AVX-512 registers under -march=native on this machine, plain code elsewhere),
 * so head_dim must be a multiple of 16; the dispatcher keeps the torch reference otherwise.
 *
 * Cascade: with first_block > 0, positions before it were already attended by the caller (a prefix
 * every sequence shares, done as one dense product: cpu_ops.paged_decode_attention), which passes that
 * output and its log-sum-exp; the online softmax starts from them instead of from nothing.
 *
 * Profile that shaped it (batch 128, context 200, 9 query / 3 KV heads of 64, 2 threads): the first
 * version (three passes, K transposed through a scratch tile, libm roundf inside exp) took 12.3 ms per
 * layer; one pass + a vectorised exp + the reduce16 tree + prefetch: 4.3 ms. Items per sequence rather
 * than per KV head (batch 128, context ~94, the same build in one process): 1.54-1.80 ms against 1.91-2.11.
 * With AVX512-BF16 (Sapphire Rapids and later) the bfloat16 kernel's q . k products run as vdpbf16ps on
 * the stored rows (dot_bf16): 1.06 -> 0.87 ms at batch 128, context ~100, bfloat16, 2 threads.
 * W2's shape (batch 256, context ~440 behind a shared prefix, one row each: batch-invariant mode), AVX512-BF16
 * without AMX: 2.83 -> 1.99 ms (bfloat16), 2.71 -> 2.43 ms (float32) from widening each V row once for the
 * query heads of its KV head (their accumulators side by side in registers) and keeping the softmax's max
 * and sum in vectors (the sum had become a chain of sixteen scalar adds per head and block); then
 * 1.99 -> 1.67 ms (bfloat16), 2.43 -> 2.06 ms (float32) from testing a chunk's scores against the running
 * max with one mask compare before taking their max (any_above), and no branch per key in the scores; then 1.67 -> 1.37 ms
 * (bfloat16) from scores_bf16_pairs: K transposed in registers once for the group's heads, scores in lanes.
 * AVX2 without AVX-512 (Zen 2, float32, 2 threads): scores, exp and the V pass on 8-lane intrinsics, where GCC
 * had scalarised the 16-lane selects: W2's shape 8.1 -> 5.6 ms, 256 sequences of context 20-300 7.0 -> 5.8 ms.
 * Tiles of sequences over a shared prefix (see DEFINE_KERNEL), same machine: W2's shape 5.8-6.0 -> 5.1-5.3 ms,
 * once the tile's first sequence alone prefetches the shared blocks (every sequence asking for blocks already
 * in cache cost more than the tiles saved); the same bits as before over 720 cases.
 * Zen 5 (AVX512-BF16, no AMX), 2 threads, eight layers' caches cycled (python scripts/attention_cost.py
 * --against e3bd565, interleaved): bfloat16 W1 decode (contexts 100-168, a sequence's blocks far apart)
 * 1.23-1.30 -> 0.86-0.87 ms a layer, W2 decode 1.43-1.44 -> 1.11-1.12; float32 2.23 -> 1.98 and 2.22 -> 2.02.
 * From asking for the next block a few lines at a time in the V pass (prefetch_pair: asked for all at once
 * at the block's start, the lines filled the core's miss buffers and stalled it, so memory time and arithmetic
 * added up) and from fixed-size accumulator arrays (as variable-length arrays they lived on the stack: a load
 * and a store around every FMA). Same bits. Tried and dropped (same bits, ~3% on W2's shape each): the
 * tile's shared K transposed once per tile (alone; it is part of tile_shared_block_bf16 now); visiting the
 * shared blocks four at a time. Then a tile's shared blocks visited for the whole tile at once, phase by phase
 * (tile_shared_block_bf16), with tiles of 16: W2 decode 1.10 -> 0.84 ms a layer, W1 unchanged, same bits; then
 * 0.85 -> 0.77 from its V rows and weights kept in registers, two sequences' scores from one K load, and exp16's
 * clamps skipped where no lane needs them (softmax_weights; float32 W2 2.05 -> 1.96). Same bits as 1b77ab0's over
 * 36 shapes (1-256 sequences, 3 head layouts, 0-25 shared blocks), float32 and bfloat16. Then, bfloat16 with
 * AVX512-BF16 only, the V pass as vdpbf16ps pair products with the softmax weights rounded to bfloat16
 * (v_pass_pairs; other bits than before, still the same alone or in any batch): W2 decode 0.79 -> 0.69 ms a
 * layer, W1 0.94 -> 0.92. Greedy bfloat16 tokens against transformers' bfloat16 (32 prompts x 48 tokens, the
 * default model): 12 of 32 identical, mean common prefix 31.6 tokens; before, 11 and 34.2 (bfloat16 runs part
 * at near-ties either way).
 * Compiled at first use by forge_batch.kernels.cpu_ops (-O3 -march=native -fopenmp).
 * Reference: kernels/reference.py::_decode_attention.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "cpu_kernels.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if CPU_KERNELS_AVX2
/* On AVX2 GCC lowers arithmetic on the 16-lane vectors below poorly (broadcasts built through the stack,
 * accumulators spilled in halves, selects scalarised), so the scores, the softmax weights and the V pass run
 * on 8-lane vectors there: the same operations lane by lane, so the same bits. */
static inline __m256 load8_f32(const float* p) { return _mm256_loadu_ps(p); }
#define LOAD8(p) _Generic((p), const float*: load8_f32, const uint16_t*: load8_bf16)(p)
#endif

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));     /* unaligned float load/store */
typedef uint16_t h16u __attribute__((vector_size(32), aligned(2)));  /* unaligned 16 x bf16 */
typedef uint32_t u16v __attribute__((vector_size(64)));

static inline v16 load_f32(const float* p) { return *(const v16u*)p; }
static inline v16 load_bf16(const uint16_t* p) {  /* bf16 is the top half of f32 */
#if defined(__AVX512F__)
    /* one vpmovzxwd from memory and a shift: GCC lowered the vector conversion below to two 8-lane
     * widenings and an insert */
    return (v16)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16);
#else
    u16v wide = __builtin_convertvector(*(const h16u*)p, u16v) << 16;
    return (v16)wide;
#endif
}
static inline void store_f32(float* p, v16 x) { *(v16u*)p = x; }
static inline void store_bf16(uint16_t* p, v16 x) {  /* round to nearest even, like torch; NaN stays NaN */
    u16v u = (u16v)x;
    u16v rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    u16v nan = ((u & 0x7fffffffu) > 0x7f800000u);  /* all-ones lanes where x is NaN */
    rounded = (rounded & ~nan) | (((u >> 16) | 0x40u) & nan);
    *(h16u*)p = __builtin_convertvector(rounded, h16u);
}

/* Sixteen horizontal sums at once: lane j of the result is the sum of t[j]'s lanes. A pairwise
 * transpose-and-add tree (8 + 4 + 2 + 1 steps of two shuffles and an add) in place of sixteen
 * separate horizontal sums: about a third of the shuffle and add instructions, and the scores come out in one register. */
static inline v16 reduce16(const v16* t) {
    v16 u[8], w[4], z[2];
    for (int p = 0; p < 8; p++)  /* [2p: 8 partials | 2p+1: 8 partials] */
        u[p] = __builtin_shufflevector(t[2 * p], t[2 * p + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
             + __builtin_shufflevector(t[2 * p], t[2 * p + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int p = 0; p < 4; p++)  /* positions 4p .. 4p+3, 4 partials each */
        w[p] = __builtin_shufflevector(u[2 * p], u[2 * p + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
             + __builtin_shufflevector(u[2 * p], u[2 * p + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int p = 0; p < 2; p++)  /* positions 8p .. 8p+7, 2 partials each */
        z[p] = __builtin_shufflevector(w[2 * p], w[2 * p + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
             + __builtin_shufflevector(w[2 * p], w[2 * p + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return __builtin_shufflevector(z[0], z[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
         + __builtin_shufflevector(z[0], z[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

typedef int32_t i16v __attribute__((vector_size(64)));
static inline v16 vmax16(v16 x, v16 y) {
    const i16v gt = x > y; /* all-ones lanes where x is larger */
    return (v16)(((i16v)x & gt) | ((i16v)y & ~gt));
}

/* The largest of sixteen lanes (NaN-free scores), by halving. */
static inline float max16(v16 x) {
    v16 y = __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    x = vmax16(x, y);
    y = __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    x = vmax16(x, y);
    y = __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    x = vmax16(x, y);
    y = __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    x = vmax16(x, y);
    return x[0];
}

/* Whether any lane of x is above y: one compare and a mask test, where the max16 chain (shuffle,
 * compare, blend, four times over) would stall each head's scores; most blocks raise no row's max. */
static inline int any_above(v16 x, float y) {
#if defined(__AVX512F__)
    return _mm512_cmp_ps_mask((__m512)x, _mm512_set1_ps(y), _CMP_GT_OQ) != 0;
#else
    for (int j = 0; j < 16; j++)
        if (x[j] > y) return 1;
    return 0;
#endif
}

static inline int any_below(v16 x, float y) {
#if defined(__AVX512F__)
    return _mm512_cmp_ps_mask((__m512)x, _mm512_set1_ps(y), _CMP_LT_OQ) != 0;
#else
    for (int j = 0; j < 16; j++)
        if (x[j] < y) return 1;
    return 0;
#endif
}

static const v16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
static inline v16 select16(i16v mask, v16 yes, v16 no) { return (v16)(((i16v)yes & mask) | ((i16v)no & ~mask)); }

/* Ask for two positions' K and V rows of one KV head (row_bytes each, stride_bytes apart) of the block after
 * this one. Called once per position pair of the V pass, so the next block's lines are requested a few at a
 * time while this block's arithmetic runs: asked for all at once at the block's start, they filled the core's
 * miss buffers, which stalled it until they arrived (see the top). */
static inline void prefetch_pair(const char* k, const char* v, int64_t row_bytes, int64_t stride_bytes) {
    for (int64_t c = 0; c < row_bytes; c += 64) {
        __builtin_prefetch(k + c);
        __builtin_prefetch(k + stride_bytes + c);
        __builtin_prefetch(v + c);
        __builtin_prefetch(v + stride_bytes + c);
    }
}

/* Positions J and J + 1 of query head G's KV head in the next block (next_block, an offset into the caches;
 * see prefetch_pair), asked for from the V passes below, once per KV head (their item's variables). */
#define PREFETCH_NEXT(G, J)                                                                             \
    prefetch_pair((const char*)(k_cache + next_block + (G) / per_kv * head_dim + (J) * slot_stride),     \
                  (const char*)(v_cache + next_block + (G) / per_kv * head_dim + (J) * slot_stride),     \
                  head_dim * (int64_t)sizeof(*k_cache), slot_stride * (int64_t)sizeof(*k_cache))

/* The scores of up to sixteen keys for hg query heads of one KV head, bfloat16 q and K, with AVX512-BF16's
 * pairwise dot product (vdpbf16ps: 32 products an instruction, exact, summed in float32). A chunk of K rows
 * is transposed in registers, 16 x 16 (bf16 pairs) at a time, so that lane j of a vector is key j's pair:
 * then every instruction adds one q pair (broadcast) times that pair of sixteen keys, and the scores come
 * out in lanes with no horizontal sums, for every head of the group from one transpose. Four accumulators
 * (pair p in p % 4) break the add chain; one fixed order per row. Lanes past cnt hold -inf. */
#if defined(__AVX512BF16__)
#define HAVE_DPBF16 1
static inline void transpose16(__m512i r[16]) {  /* 16 x 16 dwords: r[c] lane j = r_in[j] lane c */
    __m512i t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int a = 0; a < 4; a++) {  /* u[4a + e]: rows 4a..4a+3 of element 4k + e in 128-bit lane k */
        u[4 * a] = _mm512_unpacklo_epi64(t[4 * a], t[4 * a + 2]);
        u[4 * a + 1] = _mm512_unpackhi_epi64(t[4 * a], t[4 * a + 2]);
        u[4 * a + 2] = _mm512_unpacklo_epi64(t[4 * a + 1], t[4 * a + 3]);
        u[4 * a + 3] = _mm512_unpackhi_epi64(t[4 * a + 1], t[4 * a + 3]);
    }
    for (int e = 0; e < 4; e++) {
        const __m512i v = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x88), w = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x88);
        const __m512i v2 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xdd), w2 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xdd);
        r[e] = _mm512_shuffle_i32x4(v, w, 0x88);
        r[8 + e] = _mm512_shuffle_i32x4(v, w, 0xdd);
        r[4 + e] = _mm512_shuffle_i32x4(v2, w2, 0x88);
        r[12 + e] = _mm512_shuffle_i32x4(v2, w2, 0xdd);
    }
}

static inline __attribute__((always_inline)) void scores_bf16_pairs(
        const uint16_t* q, const uint16_t* kbase, int64_t slot_stride, int64_t cnt, const int64_t nv,
        const int64_t hg, float scale, float* s, int64_t srow) {
    const uint32_t* qd = (const uint32_t*)(const void*)q;  /* q pairs of head h: qd[h * 8 * nv ...] */
    __m512 acc[3][4];  /* hg <= 3; a fixed size keeps them in registers (a VLA lives on the stack) */
    for (int64_t h = 0; h < hg; h++)
        for (int a = 0; a < 4; a++) acc[h][a] = _mm512_setzero_ps();
    for (int64_t c = 0; c < nv / 2; c++) {  /* 16 pairs (32 values) of the head dim at a time */
        __m512i r[16];
        for (int64_t j = 0; j < 16; j++)  /* a short chunk repeats its last key (masked below) */
            r[j] = _mm512_loadu_si512(kbase + (j < cnt ? j : cnt - 1) * slot_stride + 32 * c);
        transpose16(r);
#pragma GCC unroll 16
        for (int p = 0; p < 16; p++)
#pragma GCC unroll 4
            for (int64_t h = 0; h < hg; h++)
                acc[h][p % 4] = _mm512_dpbf16_ps(acc[h][p % 4], (__m512bh)_mm512_set1_epi32((int)qd[h * 8 * nv + 16 * c + p]),
                                                 (__m512bh)r[p]);
    }
    for (int64_t h = 0; h < hg; h++) {
        v16 sc = (v16)_mm512_add_ps(_mm512_add_ps(acc[h][0], acc[h][1]), _mm512_add_ps(acc[h][2], acc[h][3])) * scale;
        if (cnt < 16) sc = select16(lane < (float)cnt, sc, (v16){0} - INFINITY);
        store_f32(s + h * srow, sc);
    }
}

/* Two positions' V rows (16 columns each) as sixteen bfloat16 pairs, the even position in each pair's low half;
 * no odd row (past a block's end): zeros. */
static inline __m512i v_pair(const uint16_t* even, const uint16_t* odd) {
    const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(const void*)even));
    if (!odd) return lo;
    return _mm512_or_si512(lo, _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(const void*)odd)), 16));
}

/* The V pass of hg query heads of one KV head over a block's n positions, bfloat16 V: the softmax weights
 * rounded to bfloat16 (as torch's attention rounds them before its bfloat16 product with V) and each
 * vdpbf16ps adding two positions' weighted V rows into sixteen columns, pair after pair in one fixed order:
 * half the instructions of float32 multiply-adds on V widened to float32. acc: head g0's first column, heads nv
 * apart; s0: the heads' weights, srow apart (weights past n are 0). V rows come in pairs from vp (a shared
 * block paired once: vp[k * nv + i]) or are paired here from vbase (slot_stride apart); with next_k / next_v the
 * next block's rows are asked for along the way (see prefetch_pair). */
static inline __attribute__((always_inline)) void v_pass_pairs(
        v16* acc, const float* s0, int64_t srow, const uint16_t* vbase, int64_t slot_stride, int64_t n,
        const int64_t nv, const int64_t hg, const __m512i* vp, const char* next_k, const char* next_v) {
    for (int64_t i0 = 0; i0 < nv; i0 += 4) {
        const int64_t vi = nv - i0 < 4 ? nv - i0 : 4;
        __m512 a[3][4]; /* hg <= 3 */
        for (int64_t h = 0; h < hg; h++)
            for (int64_t i = 0; i < vi; i++) a[h][i] = (__m512)acc[h * nv + i0 + i];
        for (int64_t j0 = 0; j0 < n; j0 += 16) {
            uint32_t wp[3][8];
            for (int64_t h = 0; h < hg; h++)
                _mm256_storeu_si256((__m256i*)(void*)wp[h], (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(s0 + h * srow + j0)));
            const int64_t pairs = (n - j0 + 1) / 2 < 8 ? (n - j0 + 1) / 2 : 8;
            for (int64_t k = 0; k < pairs; k++) {
                const int64_t j = j0 + 2 * k;
                if (next_k && i0 == 0)
                    prefetch_pair(next_k + j * slot_stride * 2, next_v + j * slot_stride * 2, 16 * nv * 2, slot_stride * 2);
                __m512i v[4], w[3]; /* opaque (asm): kept in registers, not reloaded for each product */
                for (int64_t i = 0; i < vi; i++) {
                    v[i] = vp ? vp[k * nv + i0 + i]
                              : v_pair(vbase + j * slot_stride + 16 * (i0 + i),
                                       j + 1 < n ? vbase + (j + 1) * slot_stride + 16 * (i0 + i) : NULL);
                    __asm__("" : "+v"(v[i]));
                }
                for (int64_t h = 0; h < hg; h++) { w[h] = _mm512_set1_epi32((int)wp[h][k]); __asm__("" : "+v"(w[h])); }
                for (int64_t h = 0; h < hg; h++)
                    for (int64_t i = 0; i < vi; i++) a[h][i] = _mm512_dpbf16_ps(a[h][i], (__m512bh)w[h], (__m512bh)v[i]);
            }
        }
        for (int64_t h = 0; h < hg; h++)
            for (int64_t i = 0; i < vi; i++) acc[h * nv + i0 + i] = (v16)a[h][i];
    }
}
#else
#define HAVE_DPBF16 0
static inline void scores_bf16_pairs(const uint16_t* q, const uint16_t* kbase, int64_t slot_stride, int64_t cnt,
                                     int64_t nv, int64_t hg, float scale, float* s, int64_t srow) {
    (void)q, (void)kbase, (void)slot_stride, (void)cnt, (void)nv, (void)hg, (void)scale, (void)s, (void)srow;
}
static inline void v_pass_pairs(v16* acc, const float* s0, int64_t srow, const uint16_t* vbase, int64_t slot_stride,
                                int64_t n, int64_t nv, int64_t hg, const void* vp, const char* next_k, const char* next_v) {
    (void)acc, (void)s0, (void)srow, (void)vbase, (void)slot_stride, (void)n, (void)nv, (void)hg, (void)vp;
    (void)next_k, (void)next_v;
}
#endif

/* exp_f32's steps on sixteen lanes at once (exp_f32 in a loop leaves the compiler masked code and a
 * scalar sum after it). */
static inline v16 exp16_in_range(v16 x) { /* -87.3 <= x <= 88.3, or NaN */
    const v16 round = (v16){0} + 12582912.f;
    const v16 n = (x * 1.44269504088896341f + round) - round;
    v16 r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    v16 p = (v16){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    const v16 two_n = (v16)((__builtin_convertvector(n, i16v) + 127) << 23);
    return p * two_n;
}
static inline v16 exp16(v16 arg) {
    const v16 lo = (v16){0} - 87.3f, hi = (v16){0} + 88.3f;
    v16 x = select16(arg < lo, lo, arg);
    x = select16(x > hi, hi, x);
    const v16 e = exp16_in_range(x);
    return select16(arg < lo, (v16){0}, select16(arg > hi, (v16){0} + INFINITY, e));
}

/* A head's softmax weights over a block, in place of its scores (exp(score - max)), added into its sixteen
 * running sums lane by lane. */
static inline void softmax_weights(float* sg, int64_t n, float max, v16* lsum) {
#if CPU_KERNELS_AVX2
    float* sums = (float*)lsum;
    __m256 s0 = _mm256_loadu_ps(sums), s1 = _mm256_loadu_ps(sums + 8);
    const __m256 mx = _mm256_set1_ps(max);
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
        const __m256 w0 = exp8(_mm256_sub_ps(_mm256_loadu_ps(sg + j0), mx));
        const __m256 w1 = exp8(_mm256_sub_ps(_mm256_loadu_ps(sg + j0 + 8), mx));
        _mm256_storeu_ps(sg + j0, w0);
        _mm256_storeu_ps(sg + j0 + 8, w1);
        s0 = _mm256_add_ps(s0, w0);
        s1 = _mm256_add_ps(s1, w1);
    }
    _mm256_storeu_ps(sums, s0);
    _mm256_storeu_ps(sums + 8, s1);
#else
    for (int64_t j0 = 0; j0 < n; j0 += 16) { /* x <= 0: exp16's clamps only where a lane is below -87.3 (same bits) */
        const v16 x = load_f32(sg + j0) - max;
        const v16 w = any_below(x, -87.3f) ? exp16(x) : exp16_in_range(x);
        store_f32(sg + j0, w);
        *lsum += w;
    }
#endif
}

/* The running max raised to a chunk's scores: a mask test first, the max16 chain only where a lane is above
 * (most blocks raise no row's max). The max is exact, so any order gives the same value. */
static inline float raised_max(v16 sc, float bmax) {
    if (any_above(sc, bmax)) {
        const float top = max16(sc);
        bmax = top > bmax ? top : bmax;
    }
    return bmax;
}

/* One head's online-softmax step over a block whose max is known (bmax): what came before rescaled to a new
 * max (by exp(old - new): 0 on the first block), the block's n scores turned into weights in place and added
 * into the running sums. The item and the tile-wide visit both take it, so both keep the same bits. */
static inline __attribute__((always_inline)) void softmax_step(float* sg, int64_t n, float bmax, float* m, v16* lsum,
                                                               v16* acc, int64_t nv) {
    if (bmax > *m) {
        const float c = exp_f32(*m - bmax);
        *lsum *= c;
        for (int64_t i = 0; i < nv; i++) acc[i] *= c;
        *m = bmax;
    }
    softmax_weights(sg, n, bmax, lsum); /* the sum stays in lanes to the end */
}

/* The sum of sixteen lanes, by halving (one fixed order). */
static inline float sum16(v16 x) {
    x += __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    x += __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    x += __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    x += __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    return x[0];
}

#if CPU_KERNELS_AVX2
/* Lane j: key j's full sum of the 8 lanes of f[j], in reduce16's order after its first step
 * ((f0 + f4) + (f2 + f6)) + ((f1 + f5) + (f3 + f7)), by three steps of two shuffles and an add. */
static inline __m256 reduce8(const __m256 f[8]) {
    __m256 g[4], h[2];
    for (int p = 0; p < 4; p++)  /* lanes 0-3: key p's l + (l + 4); lanes 4-7: key p + 4's */
        g[p] = _mm256_add_ps(_mm256_permute2f128_ps(f[p], f[p + 4], 0x20), _mm256_permute2f128_ps(f[p], f[p + 4], 0x31));
    for (int p = 0; p < 2; p++)  /* per 128 bits: key 2p's (l + 2) sums, then key 2p + 1's */
        h[p] = _mm256_add_ps(_mm256_shuffle_ps(g[2 * p], g[2 * p + 1], 0x44), _mm256_shuffle_ps(g[2 * p], g[2 * p + 1], 0xee));
    return _mm256_add_ps(_mm256_shuffle_ps(h[0], h[1], 0x88), _mm256_shuffle_ps(h[0], h[1], 0xdd));
}

/* One head's scores over a block on 8-lane vectors, as the 16-lane code computes them (same bits): per key
 * the products unfused, as GCC leaves the 16-lane loop on AVX2, lanes l and l + 8 summed first, then
 * reduce8. Stores them (lanes past n: -inf, whole chunks of 16) and returns the running max raised to them. */
#define DEFINE_SCORES_AVX2(NAME, TC)                                                                 \
static inline __attribute__((always_inline)) float NAME(const TC* kbase, const float* qs, int64_t slot_stride, \
                                                        int64_t n, const int64_t nv, float* sg, float bmax) { \
    for (int64_t j0 = 0; j0 < n; j0 += 16) {                                                            \
        const int64_t cnt = n - j0 < 16 ? n - j0 : 16;                                                  \
        __m256 sc[2];                                                                                   \
        for (int half = 0; half < 2; half++) {                                                          \
            __m256 f[8];                                                                                \
            for (int j = 0; j < 8; j++) { /* a short chunk repeats its last key (masked below) */      \
                const int64_t key = 8 * half + j < cnt ? 8 * half + j : cnt - 1;                       \
                const TC* krow = kbase + (j0 + key) * slot_stride;                                      \
                __m256 lo = _mm256_mul_ps(_mm256_loadu_ps(qs), LOAD8(krow));                            \
                __m256 hi = _mm256_mul_ps(_mm256_loadu_ps(qs + 8), LOAD8(krow + 8));                    \
                for (int64_t i = 1; i < nv; i++) {                                                      \
                    lo = _mm256_add_ps(lo, _mm256_mul_ps(_mm256_loadu_ps(qs + 16 * i), LOAD8(krow + 16 * i)));     \
                    hi = _mm256_add_ps(hi, _mm256_mul_ps(_mm256_loadu_ps(qs + 16 * i + 8), LOAD8(krow + 16 * i + 8))); \
                }                                                                                       \
                f[j] = _mm256_add_ps(lo, hi);                                                           \
            }                                                                                           \
            sc[half] = reduce8(f);                                                                      \
        }                                                                                               \
        if (cnt < 16) {                                                                                 \
            const __m256 inf = _mm256_set1_ps(-INFINITY), first = _mm256_set_ps(7, 6, 5, 4, 3, 2, 1, 0);  \
            for (int half = 0; half < 2; half++)                                                        \
                sc[half] = _mm256_blendv_ps(inf, sc[half], _mm256_cmp_ps(_mm256_add_ps(first, _mm256_set1_ps(8.f * half)), \
                                                                         _mm256_set1_ps((float)cnt), _CMP_LT_OQ)); \
        }                                                                                               \
        _mm256_storeu_ps(sg + j0, sc[0]);                                                               \
        _mm256_storeu_ps(sg + j0 + 8, sc[1]);                                                           \
        const __m256 mx = _mm256_set1_ps(bmax); /* any_above, then max16, on the two halves */          \
        if (_mm256_movemask_ps(_mm256_or_ps(_mm256_cmp_ps(sc[0], mx, _CMP_GT_OQ), _mm256_cmp_ps(sc[1], mx, _CMP_GT_OQ)))) { \
            __m256 top = _mm256_max_ps(sc[0], sc[1]); /* the max is exact in any order */             \
            top = _mm256_max_ps(top, _mm256_permute2f128_ps(top, top, 0x01));                          \
            top = _mm256_max_ps(top, _mm256_shuffle_ps(top, top, 0x4e));                               \
            top = _mm256_max_ps(top, _mm256_shuffle_ps(top, top, 0xb1));                               \
            bmax = _mm256_cvtss_f32(top);                                                               \
        }                                                                                               \
    }                                                                                                   \
    return bmax;                                                                                        \
}
DEFINE_SCORES_AVX2(scores_avx2_f32, float)
DEFINE_SCORES_AVX2(scores_avx2_bf16, uint16_t)
#define SCORES_AVX2(kbase, qs, slot_stride, n, nv, sg, bmax) \
    _Generic((kbase), const float*: scores_avx2_f32, const uint16_t*: scores_avx2_bf16)(kbase, qs, slot_stride, n, nv, sg, bmax)

/* The V pass on 8-lane vectors: per head and per half of head_dim (whose 8 + 8 accumulators fit the 16
 * registers), positions in pairs into the even and odd accumulators, as the 16-lane pass does. */
#define V_PASS_AVX2(TC)                                                                              \
        for (int64_t g = g0; g < g0 + hg; g++) {                                                        \
            const TC* vbase = vblock + g / per_kv * head_dim;                                            \
            const float* sg = s + g * srow;                                                             \
            float* accg = (float*)(acc + g * nv);                                                       \
            for (int64_t half = 0; half < nv; half += 2) { /* 32 columns of the head at a time */      \
                const int64_t w = nv - half < 2 ? 2 * (nv - half) : 4; /* 8-lane vectors in this half */ \
                __m256 a[4], a2[4];                                                                     \
                for (int64_t c = 0; c < w; c++) {                                                       \
                    a[c] = _mm256_loadu_ps(accg + 16 * half + 8 * c);                                   \
                    a2[c] = _mm256_setzero_ps();                                                        \
                }                                                                                       \
                int64_t j = 0;                                                                          \
                for (; j + 1 < n; j += 2) {                                                             \
                    const TC* vrow = vbase + j * slot_stride + 16 * half;                               \
                    if (next_block >= 0 && half == 0 && g % per_kv == 0) PREFETCH_NEXT(g, j);         \
                    const __m256 se = _mm256_set1_ps(sg[j]), so = _mm256_set1_ps(sg[j + 1]);           \
                    for (int64_t c = 0; c < w; c++) {                                                   \
                        a[c] = _mm256_fmadd_ps(se, LOAD8((const TC*)(vrow + 8 * c)), a[c]);             \
                        a2[c] = _mm256_fmadd_ps(so, LOAD8((const TC*)(vrow + slot_stride + 8 * c)), a2[c]); \
                    }                                                                                   \
                }                                                                                       \
                if (j < n) {                                                                            \
                    const TC* vrow = vbase + j * slot_stride + 16 * half;                               \
                    const __m256 se = _mm256_set1_ps(sg[j]);                                            \
                    for (int64_t c = 0; c < w; c++) a[c] = _mm256_fmadd_ps(se, LOAD8((const TC*)(vrow + 8 * c)), a[c]); \
                }                                                                                       \
                for (int64_t c = 0; c < w; c++) _mm256_storeu_ps(accg + 16 * half + 8 * c, _mm256_add_ps(a[c], a2[c])); \
            }                                                                                           \
        }
#else
#define V_PASS_AVX2(TC) {}
#define SCORES_AVX2(kbase, qs, slot_stride, n, nv, sg, bmax) (bmax)
#endif

/* One work item: `group` consecutive query heads of one sequence, `per_kv` of them to each KV head from
 * the item's first: either one KV head and its query heads (group == per_kv) or the whole sequence.
 * `nv` = head_dim / 16 and `hg` (query heads whose V pass runs together, a divisor of per_kv) are
 * compile-time constants in the specialised copies below, so rows and accumulators live in registers.
 * Per block: each head's scores and softmax state in turn (a block's K rows for one KV head are read
 * from memory by its first query head and from L1 by the others), then one pass over the V rows for
 * hg heads at a time. The softmax sum stays in sixteen lanes (lsum) until the end, summed in one fixed
 * tree, so every row's order depends only on its own context length: the same bits alone or in any
 * batch. Cascade state of query head g is at row (g / per_kv) * init_kv_rows + g % per_kv. */
#define DEFINE_ITEM(NAME, T, LOADV, STOREV, TC, LOADC, DPBF16)                                        \
static inline __attribute__((always_inline)) void NAME(                                                 \
        const T* q, const TC* k_cache, const TC* v_cache, const int64_t* table, int64_t ctx, T* out,    \
        int64_t group, int64_t per_kv, const int64_t nv, const int64_t hg, int64_t slot_stride,         \
        int64_t block_stride,                                                                           \
        int64_t block_size, int64_t first_block, float scale, float* s, float* m, v16* lsum, v16* acc, \
        const T* init_out, const float* init_lse, int64_t init_kv_rows, int64_t blk_from, int64_t blk_to, \
        int64_t prefetch_from) {                                                                        \
    const int64_t head_dim = nv * 16;                                                                   \
    const int64_t nblocks = (ctx + block_size - 1) / block_size;                                        \
    const int64_t srow = (block_size + 15) / 16 * 16; /* a head's scores: whole 16-lane chunks */       \
    const int dp = DPBF16 && nv % 2 == 0; /* q and K both bfloat16: pairwise dot products */           \
    const int64_t blk_end = blk_to < nblocks ? blk_to : nblocks;                                        \
    if (blk_from <= first_block) /* the first visit: the softmax state from nothing or the cascade's */ \
    for (int64_t g = 0; g < group; g++) {                                                               \
        if (init_out) { /* positions before first_block already attended: output o, log-sum-exp L */   \
            const int64_t row = g / per_kv * init_kv_rows + g % per_kv;                                 \
            m[g] = init_lse[row]; /* == the state (max L, sum 1, acc o) */                              \
            lsum[g] = (v16){1.f}; /* lane 0: 1, the others 0 */                                \
            for (int64_t i = 0; i < nv; i++) acc[g * nv + i] = LOADV(init_out + row * head_dim + 16 * i); \
        } else {                                                                                        \
            m[g] = -INFINITY;                                                                           \
            lsum[g] = (v16){0};                                                                 \
            for (int64_t i = 0; i < nv; i++) acc[g * nv + i] = (v16){0};                                \
        }                                                                                               \
    }                                                                                                   \
    for (int64_t blk = blk_from > first_block ? blk_from : first_block; blk < blk_end; blk++) {          \
        const TC* kblock = k_cache + table[blk] * block_stride;                                          \
        const TC* vblock = v_cache + table[blk] * block_stride;                                          \
        const int64_t n = (blk + 1) * block_size <= ctx ? block_size : ctx - blk * block_size;          \
        /* the next block is elsewhere in memory: the V pass asks for it (prefetch_pair); a tile's first \
         * sequence asks for the shared blocks */                                                      \
        const int64_t next_block = blk + 1 < nblocks && blk >= prefetch_from ? table[blk + 1] * block_stride : -1; \
        for (int64_t g0 = 0; g0 < group; g0 += hg) { /* hg query heads of one KV head */               \
        if (dp) /* every head of the group at once, from one transpose of each chunk */               \
            for (int64_t j0 = 0; j0 < n; j0 += 16)                                                      \
                scores_bf16_pairs((const uint16_t*)(const void*)(q + g0 * head_dim),                    \
                                  (const uint16_t*)(const void*)(kblock + g0 / per_kv * head_dim + j0 * slot_stride), \
                                  slot_stride, n - j0 < 16 ? n - j0 : 16, nv, hg, scale, s + g0 * srow + j0, srow);                                                          \
        for (int64_t g = g0; g < g0 + hg; g++) { /* each head's scores and softmax state */             \
            const TC* kbase = kblock + g / per_kv * head_dim;                                            \
            v16 qg[nv];                                                                                 \
            for (int64_t i = 0; i < nv; i++) qg[i] = LOADV(q + g * head_dim + 16 * i) * scale;          \
            float* sg = s + g * srow;                                                                   \
            float bmax = m[g];                                                                          \
            if (CPU_KERNELS_AVX2 && !dp)                                                                \
                bmax = SCORES_AVX2(kbase, (const float*)qg, slot_stride, n, nv, sg, bmax);              \
            else for (int64_t j0 = 0; j0 < n; j0 += 16) { /* scores, sixteen positions at a time */     \
                const int64_t cnt = n - j0 < 16 ? n - j0 : 16;                                          \
                v16 sc;                                                                                 \
                if (dp)                                                                                 \
                    sc = load_f32(sg + j0);                                                             \
                else {                                                                                  \
                    v16 t[16];                                                                          \
                    for (int64_t j = 0; j < 16; j++) { /* no branch: a short chunk repeats its last key */ \
                        const TC* krow = kbase + (j0 + (j < cnt ? j : cnt - 1)) * slot_stride;           \
                        v16 dot = qg[0] * LOADC(krow);                                                  \
                        for (int64_t i = 1; i < nv; i++) dot += qg[i] * LOADC(krow + 16 * i);           \
                        t[j] = dot;                                                                     \
                    }                                                                                   \
                    sc = reduce16(t); /* lane j: t[j]'s lanes alone */                                  \
                    if (cnt < 16) sc = select16(lane < (float)cnt, sc, (v16){0} - INFINITY);           \
                    store_f32(sg + j0, sc);                                                             \
                }                                                                                       \
                bmax = raised_max(sc, bmax);                                                            \
            }                                                                                           \
            softmax_step(sg, n, bmax, m + g, lsum + g, acc + g * nv, nv);                               \
        }                                                                                               \
        if (CPU_KERNELS_AVX2) V_PASS_AVX2(TC)                                                           \
        else if (dp) /* bfloat16 V and weights in pairs (v_pass_pairs) */                               \
            v_pass_pairs(acc + g0 * nv, s + g0 * srow, srow,                                            \
                         (const uint16_t*)(const void*)(vblock + g0 / per_kv * head_dim), slot_stride, n, nv, hg, NULL, \
                         next_block >= 0 && g0 % per_kv == 0 ? (const char*)(k_cache + next_block + g0 / per_kv * head_dim) : NULL, \
                         next_block >= 0 && g0 % per_kv == 0 ? (const char*)(v_cache + next_block + g0 / per_kv * head_dim) : NULL); \
        else {   /* weighted V rows, each widened once for the hg heads; per head two accumulator sets (even, \
             * odd positions) halve the FMA latency chain */                                            \
            const TC* vbase = vblock + g0 / per_kv * head_dim;                                           \
            const float* s0 = s + g0 * srow;                                                            \
            /* vi of the nv 16-lane columns at a time, so that the 2 x hg x vi accumulators (at most 12) stay \
             * in registers beside the V rows; each accumulator's sum is unchanged */                   \
            const int64_t vi = hg * nv <= 6 ? nv : nv % 2 == 0 && hg * 2 <= 6 ? 2 : 1;                   \
            for (int64_t i0 = 0; i0 < nv; i0 += vi) {                                                   \
            v16 a[3][6], a2[3][6]; /* fixed sizes (hg <= 3, hg x vi <= 6): a VLA lived on the stack */ \
            for (int64_t h = 0; h < hg; h++)                                                            \
                for (int64_t i = 0; i < vi; i++) { a[h][i] = acc[(g0 + h) * nv + i0 + i]; a2[h][i] = (v16){0}; } \
            int64_t j = 0;                                                                              \
            for (; j + 1 < n; j += 2) {                                                                 \
                const TC* vrow = vbase + j * slot_stride + 16 * i0;                                      \
                if (next_block >= 0 && g0 % per_kv == 0 && i0 == 0) PREFETCH_NEXT(g0, j);              \
                for (int64_t i = 0; i < vi; i++) {                                                      \
                    const v16 ve = LOADC(vrow + 16 * i), vo = LOADC(vrow + slot_stride + 16 * i);       \
                    for (int64_t h = 0; h < hg; h++) {                                                  \
                        a[h][i] += s0[h * srow + j] * ve;                                               \
                        a2[h][i] += s0[h * srow + j + 1] * vo;                                          \
                    }                                                                                   \
                }                                                                                       \
            }                                                                                           \
            if (j < n)                                                                                  \
                for (int64_t i = 0; i < vi; i++) {                                                      \
                    const v16 ve = LOADC(vbase + j * slot_stride + 16 * (i0 + i));                      \
                    for (int64_t h = 0; h < hg; h++) a[h][i] += s0[h * srow + j] * ve;                  \
                }                                                                                       \
            for (int64_t h = 0; h < hg; h++)                                                            \
                for (int64_t i = 0; i < vi; i++) acc[(g0 + h) * nv + i0 + i] = a[h][i] + a2[h][i];      \
            }                                                                                           \
        }                                                                                               \
        }                                                                                               \
    }                                                                                                   \
    if (blk_to < nblocks) return; /* the sequence's state waits in the scratch for its next visit */    \
    for (int64_t g = 0; g < group; g++) {                                                               \
        const float inv = 1.f / sum16(lsum[g]);                                                 \
        for (int64_t i = 0; i < nv; i++) STOREV(out + g * head_dim + 16 * i, acc[g * nv + i] * inv);    \
    }                                                                                                   \
}

/* Per-thread scratch of an item: acc [group x head_dim] (64-byte aligned at the start) | running sums
 * [group x 16 lanes] | scores [group x block_size rounded up to 16] | running max [group]. */
int64_t decode_attention_scratch_floats(int64_t group, int64_t head_dim, int64_t block_size) {
    return group * head_dim + 16 * group + group * ((block_size + 15) / 16 * 16) + group;
}

/* An item with its scratch carved out and head_dim's vector count as a constant where it is common. */
#define DEFINE_RUN_ITEM(NAME, ITEM, T, TC)                                                             \
static void NAME(const T* q, const TC* k_cache, const TC* v_cache, const int64_t* table, int64_t ctx, T* out, \
                 int64_t group, int64_t per_kv, int64_t head_dim, int64_t slot_stride, int64_t block_size, \
                 int64_t first_block, float scale, float* scratch, const T* init_out, const float* init_lse, \
                 int64_t init_kv_rows, int64_t blk_from, int64_t blk_to, int64_t prefetch_from) {       \
    const int64_t nv = head_dim / 16, block_stride = block_size * slot_stride;                          \
    v16* acc = (v16*)scratch;                                                                           \
    v16* lsum = (v16*)(scratch + group * head_dim);                                                     \
    float* s = scratch + group * head_dim + 16 * group;                                                 \
    float* m = s + group * ((block_size + 15) / 16 * 16);                                                          \
    /* hg: query heads sharing a KV head whose V pass runs together (their accumulators in registers) */ \
    if (nv == 4 && per_kv % 3 == 0)                                                                     \
        ITEM(q, k_cache, v_cache, table, ctx, out, group, per_kv, 4, 3, slot_stride, block_stride,      \
             block_size, first_block, scale, s, m, lsum, acc, init_out, init_lse, init_kv_rows, blk_from, blk_to, prefetch_from); \
    else if (nv == 4 && per_kv % 2 == 0)                                                                \
        ITEM(q, k_cache, v_cache, table, ctx, out, group, per_kv, 4, 2, slot_stride, block_stride,      \
             block_size, first_block, scale, s, m, lsum, acc, init_out, init_lse, init_kv_rows, blk_from, blk_to, prefetch_from); \
    else if (nv == 4)                                                                                   \
        ITEM(q, k_cache, v_cache, table, ctx, out, group, per_kv, 4, 1, slot_stride, block_stride,      \
             block_size, first_block, scale, s, m, lsum, acc, init_out, init_lse, init_kv_rows, blk_from, blk_to, prefetch_from); \
    else if (nv == 8)                                                                                   \
        ITEM(q, k_cache, v_cache, table, ctx, out, group, per_kv, 8, 1, slot_stride, block_stride,      \
             block_size, first_block, scale, s, m, lsum, acc, init_out, init_lse, init_kv_rows, blk_from, blk_to, prefetch_from); \
    else                                                                                                \
        ITEM(q, k_cache, v_cache, table, ctx, out, group, per_kv, nv, 1, slot_stride, block_stride,     \
             block_size, first_block, scale, s, m, lsum, acc, init_out, init_lse, init_kv_rows, blk_from, blk_to, prefetch_from); \
}

/* One shared block (full, block_size 16) for every sequence of a tile, bfloat16 with AVX512-BF16, head_dim 64 and
 * a multiple of 3 query heads per KV head. Each sequence's arithmetic is its item's for that block (the same
 * scores_bf16_pairs products in the same order, the same softmax step, the same v_pass_pairs), so the same bits;
 * but per KV head the block's K is transposed and its V rows paired once for the whole tile (kt: 32 x 64 bytes,
 * vp: 32 x 64 bytes of per-thread scratch), and the work runs phase by phase across the tile: every sequence's
 * scores, then every softmax step, then every V pass. The sequences are independent, so the core overlaps one's
 * work with the next's, where an item's scores -> max -> exp -> V chain left most of its pipes idle: W2's shape,
 * Zen 5, 1.10 -> 0.84 ms a layer with tiles of 16 (0d862f9). Measured then, on 24 shared blocks: the phases took
 * 0.70 ms, the same code with each softmax step right after its sequence's scores (shared K and V, no phases)
 * 0.82. */
#if HAVE_DPBF16
#define TILE_BLOCK_FITS(head_dim, per_kv, block_size) ((head_dim) == 64 && (per_kv) % 3 == 0 && (block_size) == 16)
static void tile_shared_block_bf16(const uint16_t* q, const uint16_t* kblock, const uint16_t* vblock, int64_t nb,
                                   int64_t num_heads, int64_t num_kv_heads, float scale, float* scratch,
                                   int64_t floats, __m512i* kt, __m512i* vp) {
    enum { nv = 4, hg = 3, head_dim = 64, srow = 16 };
    const int64_t per_kv = num_heads / num_kv_heads, slot_stride = num_kv_heads * head_dim;
    for (int64_t kh = 0; kh < num_kv_heads; kh++) {
        const uint16_t* kbase = kblock + kh * head_dim;
        const uint16_t* vbase = vblock + kh * head_dim;
        for (int c = 0; c < nv / 2; c++) {
            for (int j = 0; j < 16; j++) kt[16 * c + j] = _mm512_loadu_si512(kbase + j * slot_stride + 32 * c);
            transpose16(kt + 16 * c);
        }
        for (int k = 0; k < 8; k++) /* the block's V rows in pairs, for v_pass_pairs */
            for (int i = 0; i < nv; i++)
                vp[k * nv + i] = v_pair(vbase + 2 * k * slot_stride + 16 * i, vbase + (2 * k + 1) * slot_stride + 16 * i);
        for (int64_t r0 = 0; r0 < nb; r0 += 2) { /* scores, as scores_bf16_pairs: two sequences a K load */
            const int rows = r0 + 1 < nb ? 2 : 1;
            for (int64_t g0 = kh * per_kv; g0 < (kh + 1) * per_kv; g0 += hg) {
                const uint32_t* qd[2];
                __m512 acc[2][hg][4];
                for (int r = 0; r < 2; r++) {
                    qd[r] = (const uint32_t*)(const void*)(q + ((r0 + (r < rows ? r : 0)) * num_heads + g0) * head_dim);
                    for (int h = 0; h < hg; h++)
                        for (int a = 0; a < 4; a++) acc[r][h][a] = _mm512_setzero_ps();
                }
                for (int c = 0; c < nv / 2; c++)
#pragma GCC unroll 16
                    for (int p = 0; p < 16; p++) {
                        __m512i k = kt[16 * c + p];
                        __asm__("" : "+v"(k)); /* opaque: kept in a register for both, not reloaded per product */
#pragma GCC unroll 2
                        for (int r = 0; r < 2; r++)
#pragma GCC unroll 4
                            for (int h = 0; h < hg; h++)
                                acc[r][h][p % 4] = _mm512_dpbf16_ps(acc[r][h][p % 4], (__m512bh)_mm512_set1_epi32((int)qd[r][h * 8 * nv + 16 * c + p]),
                                                                    (__m512bh)k);
                    }
                for (int r = 0; r < rows; r++) {
                    float* s = scratch + (r0 + r) * floats + num_heads * head_dim + 16 * num_heads;
                    for (int h = 0; h < hg; h++)
                        store_f32(s + (g0 + h) * srow,
                                  (v16)_mm512_add_ps(_mm512_add_ps(acc[r][h][0], acc[r][h][1]), _mm512_add_ps(acc[r][h][2], acc[r][h][3])) * scale);
                }
            }
        }
        for (int64_t r = 0; r < nb; r++) { /* softmax steps, as the item's */
            float* row = scratch + r * floats;
            v16* accr = (v16*)row;
            v16* lsum = (v16*)(row + num_heads * head_dim);
            float* s = row + num_heads * head_dim + 16 * num_heads;
            float* m = s + num_heads * srow;
            for (int64_t g = kh * per_kv; g < (kh + 1) * per_kv; g++)
                softmax_step(s + g * srow, srow, raised_max(load_f32(s + g * srow), m[g]), m + g, lsum + g,
                             accr + g * nv, nv);
        }
        for (int64_t r = 0; r < nb; r++) { /* V passes, as the item's */
            float* row = scratch + r * floats;
            const float* s = row + num_heads * head_dim + 16 * num_heads;
            for (int64_t g0 = kh * per_kv; g0 < (kh + 1) * per_kv; g0 += hg)
                v_pass_pairs((v16*)row + g0 * nv, s + g0 * srow, srow, NULL, 0, 16, nv, hg, vp, NULL, NULL);
        }
    }
}
#else
#define TILE_BLOCK_FITS(head_dim, per_kv, block_size) 0
static void tile_shared_block_bf16(const uint16_t* q, const uint16_t* kblock, const uint16_t* vblock, int64_t nb,
                                   int64_t num_heads, int64_t num_kv_heads, float scale, float* scratch,
                                   int64_t floats, void* kt, void* vp) {
    (void)q, (void)kblock, (void)vblock, (void)nb, (void)num_heads, (void)num_kv_heads, (void)scale, (void)scratch;
    (void)floats, (void)kt, (void)vp;
}
#endif

/* Items: with at least ITEM_PER_SEQ_MIN sequences, one per tile of up to TILE_SEQS consecutive sequences (all
 * their heads), so a thread reads each block's K and V as two contiguous runs of block_size x Hkv x head_dim
 * values, which the hardware prefetcher streams (per KV head, the rows it needs are strided by Hkv x head_dim).
 * With fewer sequences, one per (sequence, KV head), so the threads have enough items to share.
 *
 * A tile's leading blocks that are the same blocks for all its sequences (a shared system prompt, prefix
 * caching) are visited block by block across the tile, each sequence's state waiting in its own scratch
 * between visits, so a shared block is read from memory once a tile and from cache by the others: W2's
 * 400 shared positions had every sequence stream ~0.6 MB a layer from L3. Where tile_shared_block_bf16 fits,
 * it does such a visit for the whole tile at once. The last shared block and the rest of each sequence follow
 * alone. Each sequence's blocks run in the same order with the same arithmetic either way, so the tiles
 * change no bits (the tile a sequence falls in depends on the batch; its output must not). Up to 16 sequences
 * a tile where tile_shared_block_bf16 serves (W2's shape 0.92 -> 0.89 ms with 16 rather than 8), 8 elsewhere (as
 * tuned on a Zen 2 with AVX2, where a tile's scratch must stay within a smaller L1). */
#define ITEM_PER_SEQ_MIN 16
#define TILE_SEQS 8
#define TILE_SEQS_WIDE 16
#define DEFINE_KERNEL(NAME, RUN_ITEM, T, TILE_BLOCK) /* TILE_BLOCK: 1 where tile_shared_block_bf16 serves */ \
void NAME(const T* q, const T* k_cache, const T* v_cache, const int64_t* block_tables,                  \
          const int64_t* context_lens, T* out, const T* init_out, const float* init_lse,                \
          int64_t num_seqs, int64_t num_heads,                                                          \
          int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t max_blocks,               \
          int64_t first_block, float scale, int num_threads) {                                          \
    const int64_t per_kv = num_heads / num_kv_heads;                                                    \
    const int64_t slot_stride = num_kv_heads * head_dim; /* between positions in a block */             \
    const int64_t kv_split = num_seqs >= ITEM_PER_SEQ_MIN ? 1 : num_kv_heads; /* items per sequence */  \
    const int64_t group = num_heads / kv_split; /* query heads per item */                              \
    /* sequences per item: tiles where the whole batch shares its first block, still 8 items a thread */ \
    const int tile_blocks = TILE_BLOCK && TILE_BLOCK_FITS(head_dim, per_kv, block_size);               \
    const int64_t tile_max = tile_blocks ? TILE_SEQS_WIDE : TILE_SEQS;                                  \
    int64_t tile = num_seqs / (8 * (int64_t)num_threads);                                              \
    for (int64_t b = 0; b < num_seqs && tile > 1; b++)                                                  \
        if (context_lens[b] <= first_block * block_size                                                 \
            || block_tables[b * max_blocks + first_block] != block_tables[first_block]) tile = 1;      \
    tile = kv_split > 1 || tile < 1 ? 1 : tile > tile_max ? tile_max : tile;                            \
    const int64_t floats = (decode_attention_scratch_floats(group, head_dim, block_size) + 15) / 16 * 16; \
    const int64_t items = (num_seqs + tile - 1) / tile * kv_split;                                      \
    _Pragma("omp parallel num_threads(num_threads)")                                                    \
    {                                                                                                   \
        float* scratch = (float*)aligned_alloc(64, sizeof(float) * (floats * tile + 64 * 16));          \
        v16* tile_kv = (v16*)(scratch + floats * tile); /* a block's K transposed (32), V paired (32) */ \
        _Pragma("omp for schedule(dynamic, 1)")                                                         \
        for (int64_t item = 0; item < items; item++) {                                                  \
            const int64_t b0 = item / kv_split * tile, kh = item % kv_split; /* kh: the first KV head */ \
            const int64_t nb = num_seqs - b0 < tile ? num_seqs - b0 : tile;                             \
            int64_t shared = first_block; /* blocks [first_block, shared): the same for the whole tile */ \
            if (nb > 1) {                                                                               \
                int64_t common = max_blocks;                                                            \
                for (int64_t i = 0; i < nb; i++) {                                                      \
                    const int64_t n = (context_lens[b0 + i] + block_size - 1) / block_size;             \
                    common = n < common ? n : common;                                                   \
                }                                                                                       \
                for (; shared < common; shared++) {                                                     \
                    int64_t i = 1;                                                                      \
                    while (i < nb && block_tables[(b0 + i) * max_blocks + shared] == block_tables[b0 * max_blocks + shared]) i++; \
                    if (i < nb) break;                                                                  \
                }                                                                                       \
            }                                                                                           \
            /* visits: the shared blocks one at a time across the tile, the last with each sequence's rest */ \
            for (int64_t from = first_block; ; from++) {                                                \
                const int64_t to = from + 1 < shared ? from + 1 : INT64_MAX;                             \
                if (tile_blocks && to != INT64_MAX) { /* a full shared block, not the last */            \
                    if (from == first_block) /* each sequence's softmax state, as its first visit sets it */ \
                        for (int64_t i = 0; i < nb; i++)                                                \
                            RUN_ITEM(q, k_cache, v_cache, block_tables + (b0 + i) * max_blocks, context_lens[b0 + i], \
                                     out, group, per_kv, head_dim, slot_stride, block_size, first_block, scale, \
                                     scratch + i * floats, init_out ? init_out + (b0 + i) * per_kv * head_dim : NULL, \
                                     init_out ? init_lse + (b0 + i) * per_kv : NULL, num_seqs * per_kv, from, from, 0); \
                    const int64_t blk = block_tables[b0 * max_blocks + from] * block_size * slot_stride;  \
                    tile_shared_block_bf16((const uint16_t*)(const void*)(q + b0 * num_heads * head_dim), \
                                           (const uint16_t*)(const void*)(k_cache + blk),               \
                                           (const uint16_t*)(const void*)(v_cache + blk), nb, num_heads, \
                                           num_kv_heads, scale, scratch, floats, (void*)tile_kv, (void*)(tile_kv + 32)); \
                    continue;                                                                           \
                }                                                                                       \
                for (int64_t i = 0; i < nb; i++) {                                                      \
                    const int64_t b = b0 + i;                                                           \
                    const int64_t head0 = (b * num_heads + kh * per_kv) * head_dim;                     \
                    /* init_out [Hkv, B, G, D] and init_lse [Hkv, B, G]: the layout attention over a shared \
                     * prefix comes out in (cpu_ops.paged_decode_attention) */                          \
                    const int64_t init_row = (kh * num_seqs + b) * per_kv;                              \
                    RUN_ITEM(q + head0, k_cache + kh * head_dim, v_cache + kh * head_dim,               \
                             block_tables + b * max_blocks, context_lens[b], out + head0, group, per_kv, \
                             head_dim, slot_stride, block_size, first_block, scale, scratch + i * floats, \
                             init_out ? init_out + init_row * head_dim : NULL,                          \
                             init_out ? init_lse + init_row : NULL, num_seqs * per_kv, from, to,        \
                             i == 0 ? 0 : shared - 1);                                                  \
                }                                                                                       \
                if (to == INT64_MAX) break;                                                             \
            }                                                                                           \
        }                                                                                               \
        free(scratch);                                                                                  \
    }                                                                                                   \
}

DEFINE_ITEM(attend_f32, float, load_f32, store_f32, float, load_f32, 0)
DEFINE_ITEM(attend_bf16, uint16_t, load_bf16, store_bf16, uint16_t, load_bf16, HAVE_DPBF16)
/* float32 queries and output over a bfloat16 cache: decode_step.c's layers in a bfloat16 model */
DEFINE_ITEM(attend_f32_bf16_cache, float, load_f32, store_f32, uint16_t, load_bf16, 0)
DEFINE_RUN_ITEM(run_item_f32, attend_f32, float, float)
DEFINE_RUN_ITEM(run_item_bf16, attend_bf16, uint16_t, uint16_t)
DEFINE_RUN_ITEM(run_item_f32_bf16_cache, attend_f32_bf16_cache, float, uint16_t)
DEFINE_KERNEL(paged_decode_attention_f32, run_item_f32, float, 0)
DEFINE_KERNEL(paged_decode_attention_bf16, run_item_bf16, uint16_t, 1)

/* One item for decode_step.c, which runs it inside its own parallel region (see cpu_kernels.h). */
void paged_decode_attention_item_f32(const float* q, const float* k_cache, const float* v_cache,
                                     const int64_t* table, int64_t ctx, float* out, int64_t group,
                                     int64_t head_dim, int64_t kv_heads, int64_t block_size, float scale,
                                     float* scratch) {
    run_item_f32(q, k_cache, v_cache, table, ctx, out, group, group, head_dim, kv_heads * head_dim, block_size, 0,
                 scale, scratch, NULL, NULL, 0, 0, INT64_MAX, 0);
}

void paged_decode_attention_item_f32_bf16_cache(const float* q, const uint16_t* k_cache, const uint16_t* v_cache,
                                                const int64_t* table, int64_t ctx, float* out, int64_t group,
                                                int64_t head_dim, int64_t kv_heads, int64_t block_size,
                                                float scale, float* scratch) {
    run_item_f32_bf16_cache(q, k_cache, v_cache, table, ctx, out, group, group, head_dim, kv_heads * head_dim,
                            block_size, 0, scale, scratch, NULL, NULL, 0, 0, INT64_MAX, 0);
}

void paged_decode_attention_item_bf16(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache,
                                      const int64_t* table, int64_t ctx, uint16_t* out, int64_t group,
                                      int64_t head_dim, int64_t kv_heads, int64_t block_size, float scale,
                                      float* scratch) {
    run_item_bf16(q, k_cache, v_cache, table, ctx, out, group, group, head_dim, kv_heads * head_dim, block_size, 0,
                  scale, scratch, NULL, NULL, 0, 0, INT64_MAX, 0);
}
