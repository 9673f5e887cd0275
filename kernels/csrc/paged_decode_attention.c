/* Decode attention over the paged KV cache on the CPU: one query token per sequence, reading K/V in
 * place through the block table (no gather into padded tensors, which costs more memory traffic than
 * the attention itself at batch sizes a CPU runs).
 *
 * Work item = (sequence, KV head): its G = H / Hkv query heads share each K/V row read (GQA).
 * Three passes per item: scores = q.K^T for every cached position, softmax, out = p.V.
 * Compiled at first use by forge_batch.kernels.cpu_ops with -O3 -march=native -fopenmp; the inner loops
 * over the head dimension vectorise. Reference: kernels/reference.py::_decode_attention.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

#define DEFINE_KERNEL(NAME, T, LOAD, STORE)                                                            \
void NAME(const T* q, const T* k_cache, const T* v_cache, const int64_t* block_tables,                  \
          const int64_t* context_lens, T* out, int64_t num_seqs, int64_t num_heads,                     \
          int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t max_blocks,               \
          float scale, int num_threads) {                                                               \
    const int64_t group = num_heads / num_kv_heads;                                                     \
    const int64_t slot_stride = num_kv_heads * head_dim; /* between positions in a block */             \
    const int64_t block_stride = block_size * slot_stride;                                              \
    int64_t max_ctx = 0;                                                                                \
    for (int64_t b = 0; b < num_seqs; b++) if (context_lens[b] > max_ctx) max_ctx = context_lens[b];   \
    _Pragma("omp parallel num_threads(num_threads)")                                                    \
    {                                                                                                   \
        float* qf = (float*)malloc(sizeof(float) * group * head_dim);                                   \
        float* acc = (float*)malloc(sizeof(float) * group * head_dim);                                  \
        float* scores = (float*)malloc(sizeof(float) * group * (max_ctx > 0 ? max_ctx : 1));            \
        float* row = (float*)malloc(sizeof(float) * head_dim);                                          \
        _Pragma("omp for schedule(dynamic, 1)")                                                         \
        for (int64_t item = 0; item < num_seqs * num_kv_heads; item++) {                                \
            const int64_t b = item / num_kv_heads, kh = item % num_kv_heads;                            \
            const int64_t ctx = context_lens[b];                                                        \
            const int64_t* table = block_tables + b * max_blocks;                                       \
            for (int64_t g = 0; g < group; g++) {                                                       \
                const T* qrow = q + (b * num_heads + kh * group + g) * head_dim;                        \
                for (int64_t d = 0; d < head_dim; d++) qf[g * head_dim + d] = LOAD(qrow[d]) * scale;    \
            }                                                                                           \
            /* pass 1: scores */                                                                        \
            for (int64_t pos = 0; pos < ctx; pos++) {                                                   \
                const T* krow = k_cache + table[pos / block_size] * block_stride                        \
                                + (pos % block_size) * slot_stride + kh * head_dim;                     \
                _Pragma("omp simd")                                                                     \
                for (int64_t d = 0; d < head_dim; d++) row[d] = LOAD(krow[d]);                          \
                for (int64_t g = 0; g < group; g++) {                                                   \
                    const float* qg = qf + g * head_dim;                                                \
                    float s = 0.f;                                                                      \
                    _Pragma("omp simd reduction(+:s)")                                                  \
                    for (int64_t d = 0; d < head_dim; d++) s += qg[d] * row[d];                         \
                    scores[g * ctx + pos] = s;                                                          \
                }                                                                                       \
            }                                                                                           \
            /* pass 2: softmax per head */                                                              \
            for (int64_t g = 0; g < group; g++) {                                                       \
                float* sg = scores + g * ctx;                                                           \
                float m = -INFINITY;                                                                    \
                for (int64_t pos = 0; pos < ctx; pos++) if (sg[pos] > m) m = sg[pos];                   \
                float sum = 0.f;                                                                        \
                for (int64_t pos = 0; pos < ctx; pos++) { sg[pos] = expf(sg[pos] - m); sum += sg[pos]; } \
                const float inv = 1.f / sum;                                                            \
                for (int64_t pos = 0; pos < ctx; pos++) sg[pos] *= inv;                                 \
            }                                                                                           \
            /* pass 3: weighted sum of V */                                                             \
            memset(acc, 0, sizeof(float) * group * head_dim);                                           \
            for (int64_t pos = 0; pos < ctx; pos++) {                                                   \
                const T* vrow = v_cache + table[pos / block_size] * block_stride                        \
                                + (pos % block_size) * slot_stride + kh * head_dim;                     \
                _Pragma("omp simd")                                                                     \
                for (int64_t d = 0; d < head_dim; d++) row[d] = LOAD(vrow[d]);                          \
                for (int64_t g = 0; g < group; g++) {                                                   \
                    const float p = scores[g * ctx + pos];                                              \
                    float* ag = acc + g * head_dim;                                                     \
                    _Pragma("omp simd")                                                                 \
                    for (int64_t d = 0; d < head_dim; d++) ag[d] += p * row[d];                         \
                }                                                                                       \
            }                                                                                           \
            for (int64_t g = 0; g < group; g++) {                                                       \
                T* orow = out + (b * num_heads + kh * group + g) * head_dim;                            \
                for (int64_t d = 0; d < head_dim; d++) orow[d] = STORE(acc[g * head_dim + d]);          \
            }                                                                                           \
        }                                                                                               \
        free(qf); free(acc); free(scores); free(row);                                                   \
    }                                                                                                   \
}

#define ID(x) (x)
DEFINE_KERNEL(paged_decode_attention_f32, float, ID, ID)
DEFINE_KERNEL(paged_decode_attention_bf16, uint16_t, bf16_to_f32, f32_to_bf16)
