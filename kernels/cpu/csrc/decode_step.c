/* A whole decode step of a Llama-family model for a few sequences (one new token each, M <= 8), in one
 * call: embeddings in, final normed hidden states out, every layer's K/V written to the paged cache.
 *
 * Why: at one or a few rows a step is ~120 small matmuls and ~200 small element-wise and attention
 * calls. Issued one by one from Python each costs more in dispatch (torch.empty, ctypes, a fork and
 * join of the OpenMP team) than in arithmetic: 6-7 ms of a 21 ms one-stream step on the default model.
 * Here the threads are started once, every stage splits its work with an `omp for` (the implicit
 * barrier after each is the only synchronisation), and scratch buffers are allocated once per step.
 *
 * Each stage calls the same single-threaded function the stand-alone kernel uses (cpu_kernels.h), in the
 * same order, so a step computes what the layer-by-layer path computes with stored weights
 * (LlamaForCausalLM.forward with keep_stored_weights): matmuls through weight_gemv (or, in a batch-invariant
 * float32 model, panel products with the GEMM library's bits: `panels`), rms_norm,
 * rotary + KV store, paged decode attention (without a cascade prefix), silu_and_mul. A bfloat16 model
 * runs it too (kv_bf16): its stored weights are the same, activations stay float32 here, and only the K/V
 * it writes and reads are bfloat16, which makes a one-stream step read fewer bytes than bfloat16 matmuls.
 * Reference: that layer-by-layer path (tests/test_decode_step.py).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"

/* One matmul weight in weight_gemv's layout (cpu_ops.StoredWeight). All fields are 8 bytes: Python
 * fills rows of an int64 tensor with them (pointers as integers). */
typedef struct {
    int64_t values, scales, mins, type, rows, cols, row_bytes;
} stored_weight;

/* One decoder layer: pointers to its float32 norm weights, optional Q/K/V bias (0 when none), matmul
 * weights and KV cache [blocks, block_size, kv_heads, head_dim] (float32, or bfloat16 with kv_bf16:
 * a bfloat16 model's cache; the step's own arithmetic stays float32). Layout: cpu_ops.DecodeStep. */
typedef struct {
    int64_t input_norm, post_attn_norm, qkv_bias;
    stored_weight qkv, o, gate_up, down;
    int64_t k_cache, v_cache;
} decode_layer;

#define PTR(T, v) ((T*)(intptr_t)(v))

/* This thread's contiguous share of the weight's outputs: weight_gemv on a stored weight, or with `panels` the
 * panel product with the GEMM library's bits (the batch-invariant step), whose seven fields (values, scales, mins, type, n,
 * k, k_block: panel_product.c) the same slots hold; a panel weight has no bias. */
static void gemv_share(const stored_weight* w, const float* x, int64_t m, const float* bias, float* y, int panels) {
    if (panels)
        panel_product_share_f32(PTR(const uint8_t, w->values), PTR(const uint16_t, w->scales),
                                PTR(const uint16_t, w->mins), (int)w->type, w->rows, w->cols, w->row_bytes, x, m, y);
    else
        weight_gemv_share_f32(PTR(const uint8_t, w->values), PTR(const float, w->scales), PTR(const float, w->mins),
                              (int)w->type, w->rows, w->cols, w->row_bytes, x, m, bias, y);
}

int64_t decode_layer_fields(void) { return (int64_t)(sizeof(decode_layer) / sizeof(int64_t)); }

/* hidden [m, H]: the tokens' embeddings, overwritten; out [m, H]: the final rms_norm's output.
 * positions, slots, context_lens [m]; block_tables [m, max_blocks]; cos_sin [max_pos, head_dim]. */
void decode_step_f32(const decode_layer* layers, int64_t num_layers, const float* final_norm, float eps,
                     float* hidden, float* out, int64_t m, const int64_t* positions, const int64_t* slots,
                     const int64_t* block_tables, int64_t max_blocks, const int64_t* context_lens,
                     const float* cos_sin, int64_t hidden_size, int64_t heads, int64_t kv_heads, int64_t head_dim,
                     int64_t intermediate, int64_t block_size, float scale, int kv_bf16, int panels, int num_threads) {
    const int64_t h = hidden_size, q_size = heads * head_dim, kv_size = kv_heads * head_dim;
    const int64_t qkv_cols = q_size + 2 * kv_size, inter = intermediate, group = heads / kv_heads;
    const int64_t att_floats = (decode_attention_scratch_floats(group, head_dim, block_size) + 15) / 16 * 16;
    /* residual stream | normed x | qkv | attention output | gate_up | silu(gate) * up */
    const int64_t n_res = m * h, n_x = m * h, n_qkv = m * qkv_cols, n_att = m * q_size, n_gu = m * 2 * inter;
    const int64_t total = n_res + n_x + n_qkv + n_att + n_gu + m * inter;
    float* residual = (float*)aligned_alloc(64, (size_t)((total + 15) / 16 * 16) * sizeof(float));
    float* x = residual + n_res;
    float* qkv = x + n_x;
    float* att = qkv + n_qkv;
    float* gate_up = att + n_att;
    float* act = gate_up + n_gu;
    const int64_t silu_chunk = 256, silu_chunks = (inter + silu_chunk - 1) / silu_chunk;

    _Pragma("omp parallel num_threads(num_threads)")
    {
        float* scratch = (float*)aligned_alloc(64, (size_t)att_floats * sizeof(float));
        for (int64_t li = 0; li < num_layers; li++) {
            const decode_layer* L = layers + li;
            /* residual += hidden (the previous layer's output; the embeddings start it), x = norm(residual) */
            _Pragma("omp for schedule(static)")
            for (int64_t r = 0; r < m; r++) {
                if (li == 0) {
                    memcpy(residual + r * h, hidden + r * h, (size_t)h * sizeof(float));
                    rms_norm_row_f32(hidden + r * h, NULL, PTR(const float, L->input_norm), eps, x + r * h, NULL, h);
                } else {
                    rms_norm_row_f32(hidden + r * h, residual + r * h, PTR(const float, L->input_norm), eps,
                                     x + r * h, residual + r * h, h);
                }
            }
            gemv_share(&L->qkv, x, m, PTR(const float, L->qkv_bias), qkv, panels);
            _Pragma("omp barrier")
            _Pragma("omp for schedule(static)")
            for (int64_t r = 0; r < m; r++) {
                float* row = qkv + r * qkv_cols;
                if (kv_bf16)
                    rotary_store_kv_token_f32_bf16_cache(row, row + q_size, row + q_size + kv_size, positions[r],
                                                         cos_sin, heads, kv_heads, head_dim,
                                                         PTR(uint16_t, L->k_cache), PTR(uint16_t, L->v_cache),
                                                         slots[r]);
                else
                    rotary_store_kv_token_f32(row, row + q_size, row + q_size + kv_size, positions[r], cos_sin,
                                              heads, kv_heads, head_dim, PTR(float, L->k_cache),
                                              PTR(float, L->v_cache), slots[r]);
            }
            _Pragma("omp for schedule(dynamic, 1)")
            for (int64_t item = 0; item < m * kv_heads; item++) {
                const int64_t b = item / kv_heads, kh = item % kv_heads;
                const int64_t q_off = kh * group * head_dim;
                if (kv_bf16)
                    paged_decode_attention_item_f32_bf16_cache(
                        qkv + b * qkv_cols + q_off, PTR(const uint16_t, L->k_cache) + kh * head_dim,
                        PTR(const uint16_t, L->v_cache) + kh * head_dim, block_tables + b * max_blocks,
                        context_lens[b], att + b * q_size + q_off, group, head_dim, kv_heads, block_size, scale,
                        scratch);
                else
                    paged_decode_attention_item_f32(
                        qkv + b * qkv_cols + q_off, PTR(const float, L->k_cache) + kh * head_dim,
                        PTR(const float, L->v_cache) + kh * head_dim, block_tables + b * max_blocks,
                        context_lens[b], att + b * q_size + q_off, group, head_dim, kv_heads, block_size, scale,
                        scratch);
            }
            gemv_share(&L->o, att, m, NULL, hidden, panels);
            _Pragma("omp barrier")
            _Pragma("omp for schedule(static)")
            for (int64_t r = 0; r < m; r++)
                rms_norm_row_f32(hidden + r * h, residual + r * h, PTR(const float, L->post_attn_norm), eps,
                                 x + r * h, residual + r * h, h);
            gemv_share(&L->gate_up, x, m, NULL, gate_up, panels);
            _Pragma("omp barrier")
            _Pragma("omp for schedule(static)")
            for (int64_t item = 0; item < m * silu_chunks; item++) {
                const int64_t r = item / silu_chunks, c0 = item % silu_chunks * silu_chunk;
                const int64_t c1 = c0 + silu_chunk < inter ? c0 + silu_chunk : inter;
                const float* g = gate_up + r * 2 * inter;
                silu_and_mul_span_f32(g, g + inter, act + r * inter, c0, c1);
            }
            gemv_share(&L->down, act, m, NULL, hidden, panels);
            _Pragma("omp barrier")
        }
        _Pragma("omp for schedule(static)")
        for (int64_t r = 0; r < m; r++)
            rms_norm_row_f32(hidden + r * h, residual + r * h, final_norm, eps, out + r * h, residual + r * h, h);
        free(scratch);
    }
    free(residual);
}
