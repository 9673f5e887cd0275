/* Decode attention over the paged KV cache on the CPU: one query token per sequence, reading K/V in
 * place through the block table (no gather into padded tensors, which costs more memory traffic than
 * the attention itself at batch sizes a CPU runs).
 *
 * Work item = (sequence, KV head): its G = H / Hkv query heads share each K/V row read (GQA).
 * Pass 1 scores tiles of TILE positions: the tile's K rows are transposed into a [D][TILE] buffer so the
 * inner loop runs over positions (one vector register), with no horizontal sum per position. Pass 2 is
 * the softmax, pass 3 accumulates p * V row by row (vectorised over the head dimension).
 * Compiled at first use by forge_batch.kernels.cpu_ops (-O3 -march=native -fopenmp).
 * Reference: kernels/reference.py::_decode_attention.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 16

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, like torch */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* exp(x) for x <= 0 (softmax after subtracting the max), vectorisable: glibc's expf is a scalar call.
 * Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, and a degree-6 polynomial for e^r: relative
 * error below 2e-7, i.e. float precision. Results under ~1e-38 flush to 0, which softmax does not mind. */
static inline float exp_nonpositive(float x) {
    x = x < -87.f ? -87.f : x;
    const float n = __builtin_roundf(x * 1.44269504088896341f);
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.f + r * (1.f + r * (0.5f + r * (0.166666672f + r * (4.16666418e-2f
              + r * (8.33336077e-3f + r * 1.38925837e-3f)))));
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

#define DEFINE_KERNEL(NAME, T, LOAD, STORE)                                                            \
void NAME(const T* q, const T* k_cache, const T* v_cache, const int64_t* block_tables,                  \
          const int64_t* context_lens, T* out, int64_t num_seqs, int64_t num_heads,                     \
          int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t max_blocks,               \
          float scale, int num_threads) {                                                               \
    const int64_t group = num_heads / num_kv_heads;                                                     \
    const int64_t slot_stride = num_kv_heads * head_dim; /* between positions in a block */             \
    const int64_t block_stride = block_size * slot_stride;                                              \
    int64_t max_ctx = 1;                                                                                \
    for (int64_t b = 0; b < num_seqs; b++) if (context_lens[b] > max_ctx) max_ctx = context_lens[b];   \
    _Pragma("omp parallel num_threads(num_threads)")                                                    \
    {                                                                                                   \
        float* qf = (float*)malloc(sizeof(float) * group * head_dim);                                   \
        float* acc = (float*)malloc(sizeof(float) * group * head_dim);                                  \
        float* scores = (float*)malloc(sizeof(float) * group * (max_ctx + TILE));                       \
        float* kt = (float*)malloc(sizeof(float) * head_dim * TILE);                                    \
        float* row = (float*)malloc(sizeof(float) * head_dim);                                          \
        _Pragma("omp for schedule(dynamic, 1)")                                                         \
        for (int64_t item = 0; item < num_seqs * num_kv_heads; item++) {                                \
            const int64_t b = item / num_kv_heads, kh = item % num_kv_heads;                            \
            const int64_t ctx = context_lens[b];                                                        \
            const int64_t* table = block_tables + b * max_blocks;                                       \
            const int64_t nblocks = (ctx + block_size - 1) / block_size;                                \
            for (int64_t g = 0; g < group; g++) {                                                       \
                const T* qrow = q + (b * num_heads + kh * group + g) * head_dim;                        \
                for (int64_t d = 0; d < head_dim; d++) qf[g * head_dim + d] = LOAD(qrow[d]) * scale;    \
            }                                                                                           \
            /* pass 1: scores, a tile of positions at a time */                                         \
            for (int64_t blk = 0; blk < nblocks; blk++) {                                               \
                const T* kbase = k_cache + table[blk] * block_stride + kh * head_dim;                   \
                const int64_t in_block = (blk + 1) * block_size <= ctx ? block_size                     \
                                                                      : ctx - blk * block_size;         \
                for (int64_t t0 = 0; t0 < in_block; t0 += TILE) {                                       \
                    const int64_t n = in_block - t0 < TILE ? in_block - t0 : TILE;                      \
                    for (int64_t j = 0; j < n; j++) {                                                   \
                        const T* krow = kbase + (t0 + j) * slot_stride;                                 \
                        for (int64_t d = 0; d < head_dim; d++) kt[d * TILE + j] = LOAD(krow[d]);        \
                    }                                                                                   \
                    for (int64_t j = n; j < TILE; j++)                                                  \
                        for (int64_t d = 0; d < head_dim; d++) kt[d * TILE + j] = 0.f;                  \
                    const int64_t pos0 = blk * block_size + t0;                                         \
                    for (int64_t g = 0; g < group; g++) {                                               \
                        float s[TILE] = {0};                                                            \
                        const float* qg = qf + g * head_dim;                                            \
                        for (int64_t d = 0; d < head_dim; d++) {                                        \
                            const float qd = qg[d];                                                     \
                            const float* kd = kt + d * TILE;                                            \
                            _Pragma("omp simd")                                                         \
                            for (int64_t j = 0; j < TILE; j++) s[j] += qd * kd[j];                      \
                        }                                                                               \
                        float* sg = scores + g * (max_ctx + TILE) + pos0;                               \
                        for (int64_t j = 0; j < n; j++) sg[j] = s[j];                                   \
                    }                                                                                   \
                }                                                                                       \
            }                                                                                           \
            /* pass 2: softmax per head */                                                              \
            for (int64_t g = 0; g < group; g++) {                                                       \
                float* sg = scores + g * (max_ctx + TILE);                                              \
                float m = -INFINITY;                                                                    \
                for (int64_t pos = 0; pos < ctx; pos++) if (sg[pos] > m) m = sg[pos];                   \
                float sum = 0.f;                                                                        \
                _Pragma("omp simd reduction(+:sum)")                                                    \
                for (int64_t pos = 0; pos < ctx; pos++) {                                               \
                    sg[pos] = exp_nonpositive(sg[pos] - m);                                             \
                    sum += sg[pos];                                                                     \
                }                                                                                       \
                const float inv = 1.f / sum;                                                            \
                for (int64_t pos = 0; pos < ctx; pos++) sg[pos] *= inv;                                 \
            }                                                                                           \
            /* pass 3: weighted sum of V rows */                                                        \
            memset(acc, 0, sizeof(float) * group * head_dim);                                           \
            for (int64_t blk = 0; blk < nblocks; blk++) {                                               \
                const T* vbase = v_cache + table[blk] * block_stride + kh * head_dim;                   \
                const int64_t in_block = (blk + 1) * block_size <= ctx ? block_size                     \
                                                                      : ctx - blk * block_size;         \
                for (int64_t j = 0; j < in_block; j++) {                                                \
                    const T* vrow = vbase + j * slot_stride;                                            \
                    _Pragma("omp simd")                                                                 \
                    for (int64_t d = 0; d < head_dim; d++) row[d] = LOAD(vrow[d]);                      \
                    const int64_t pos = blk * block_size + j;                                           \
                    for (int64_t g = 0; g < group; g++) {                                               \
                        const float p = scores[g * (max_ctx + TILE) + pos];                             \
                        float* ag = acc + g * head_dim;                                                 \
                        _Pragma("omp simd")                                                             \
                        for (int64_t d = 0; d < head_dim; d++) ag[d] += p * row[d];                     \
                    }                                                                                   \
                }                                                                                       \
            }                                                                                           \
            for (int64_t g = 0; g < group; g++) {                                                       \
                T* orow = out + (b * num_heads + kh * group + g) * head_dim;                            \
                for (int64_t d = 0; d < head_dim; d++) orow[d] = STORE(acc[g * head_dim + d]);          \
            }                                                                                           \
        }                                                                                               \
        free(qf); free(acc); free(scores); free(kt); free(row);                                         \
    }                                                                                                   \
}

#define ID(x) (x)
DEFINE_KERNEL(paged_decode_attention_f32, float, ID, ID)
DEFINE_KERNEL(paged_decode_attention_bf16, uint16_t, bf16_to_f32, f32_to_bf16)
