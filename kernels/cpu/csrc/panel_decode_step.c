/* A whole decode step of a bfloat16 Llama-family model for a few sequences (one new token each, m <= 4),
 * in one call, over panel weights (panel_product.c): the batch-invariant engine's counterpart of
 * decode_step.c. Embeddings in, final normed hidden states out, every layer's K/V written to the cache.
 *
 * Why: a one-row step is ~120 small matmuls and ~200 small element-wise and attention calls; issued from
 * Python each costs more in dispatch than in arithmetic. Here the threads start once and each stage splits
 * its work with an `omp for` (its implicit barrier, or an explicit one after a matmul share, is the only
 * synchronisation).
 *
 * Every stage calls the single-threaded function the stand-alone bfloat16 kernel calls (cpu_kernels.h), on
 * the same rows, in the layer-by-layer order: rms_norm_row_bf16, panel products, rotary_store_kv_token_bf16,
 * the bfloat16 decode attention item (no cascade prefix), silu_and_mul_span_bf16. So a step's bits are the
 * layer-by-layer path's with panel weights, which are oneDNN's for the same rows in any batch.
 * Reference: that path (tests/test_panel_product.py).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"

/* One panel weight (panel_product.PanelWeight): all fields 8 bytes, filled by Python as int64. */
typedef struct {
    int64_t values, scales, mins, type, n, k, k_block;
} panel_weight;

/* One decoder layer: bfloat16 norm weights, the four matmuls, the bfloat16 KV cache
 * [blocks, block_size, kv_heads, head_dim]. */
typedef struct {
    int64_t input_norm, post_attn_norm;
    panel_weight qkv, o, gate_up, down;
    int64_t k_cache, v_cache;
} panel_layer;

#define PTR(T, v) ((T*)(intptr_t)(v))

static void product_share(const panel_weight* w, const uint16_t* x, int64_t m, uint16_t* y) {
    panel_product_share_bf16(PTR(const uint8_t, w->values), PTR(const uint16_t, w->scales),
                             PTR(const uint16_t, w->mins), (int)w->type, w->n, w->k, w->k_block, x, m, y);
}

int64_t panel_layer_fields(void) { return (int64_t)(sizeof(panel_layer) / sizeof(int64_t)); }

/* hidden [m, H] bfloat16: the tokens' embeddings (overwritten); out [m, H]: the final rms_norm's output.
 * positions, slots, context_lens [m]; block_tables [m, max_blocks]; cos_sin [max_pos, head_dim]. */
void panel_decode_step_bf16(const panel_layer* layers, int64_t num_layers, const uint16_t* final_norm, float eps,
                            uint16_t* hidden, uint16_t* out, int64_t m, const int64_t* positions, const int64_t* slots,
                            const int64_t* block_tables, int64_t max_blocks, const int64_t* context_lens,
                            const float* cos_sin, int64_t hidden_size, int64_t heads, int64_t kv_heads,
                            int64_t head_dim, int64_t intermediate, int64_t block_size, float scale, int num_threads) {
    const int64_t h = hidden_size, q_size = heads * head_dim, kv_size = kv_heads * head_dim;
    const int64_t qkv_cols = q_size + 2 * kv_size, inter = intermediate, group = heads / kv_heads;
    const int64_t att_floats = (decode_attention_scratch_floats(group, head_dim, block_size) + 15) / 16 * 16;
    /* residual stream | normed x | qkv | attention output | gate_up | silu(gate) * up, bfloat16 */
    const int64_t n_res = m * h, n_x = m * h, n_qkv = m * qkv_cols, n_att = m * q_size, n_gu = m * 2 * inter;
    const int64_t total = n_res + n_x + n_qkv + n_att + n_gu + m * inter;
    uint16_t* residual = (uint16_t*)aligned_alloc(64, (size_t)((total + 31) / 32 * 32) * sizeof(uint16_t));
    uint16_t* x = residual + n_res;
    uint16_t* qkv = x + n_x;
    uint16_t* att = qkv + n_qkv;
    uint16_t* gate_up = att + n_att;
    uint16_t* act = gate_up + n_gu;
    const int64_t silu_chunk = 256, silu_chunks = (inter + silu_chunk - 1) / silu_chunk;

    _Pragma("omp parallel num_threads(num_threads)")
    {
        float* scratch = (float*)aligned_alloc(64, (size_t)att_floats * sizeof(float));
        for (int64_t li = 0; li < num_layers; li++) {
            const panel_layer* L = layers + li;
            /* the residual stream: the embeddings, then residual + each sub-layer's output (rounded) */
            _Pragma("omp for schedule(static)")
            for (int64_t r = 0; r < m; r++) {
                if (li == 0) {
                    memcpy(residual + r * h, hidden + r * h, (size_t)h * sizeof(uint16_t));
                    rms_norm_row_bf16(hidden + r * h, NULL, PTR(const uint16_t, L->input_norm), eps, x + r * h,
                                      NULL, h);
                } else {
                    rms_norm_row_bf16(hidden + r * h, residual + r * h, PTR(const uint16_t, L->input_norm), eps,
                                      x + r * h, residual + r * h, h);
                }
            }
            product_share(&L->qkv, x, m, qkv);
            _Pragma("omp barrier")
            _Pragma("omp for schedule(static)")
            for (int64_t r = 0; r < m; r++) {
                uint16_t* row = qkv + r * qkv_cols;
                rotary_store_kv_token_bf16(row, row + q_size, row + q_size + kv_size, positions[r], cos_sin, heads,
                                           kv_heads, head_dim, PTR(uint16_t, L->k_cache), PTR(uint16_t, L->v_cache),
                                           slots[r]);
            }
            _Pragma("omp for schedule(dynamic, 1)")
            for (int64_t item = 0; item < m * kv_heads; item++) {
                const int64_t b = item / kv_heads, kh = item % kv_heads;
                const int64_t q_off = kh * group * head_dim;
                paged_decode_attention_item_bf16(
                    qkv + b * qkv_cols + q_off, PTR(const uint16_t, L->k_cache) + kh * head_dim,
                    PTR(const uint16_t, L->v_cache) + kh * head_dim, block_tables + b * max_blocks, context_lens[b],
                    att + b * q_size + q_off, group, head_dim, kv_heads, block_size, scale, scratch);
            }
            product_share(&L->o, att, m, hidden);
            _Pragma("omp barrier")
            _Pragma("omp for schedule(static)")
            for (int64_t r = 0; r < m; r++)
                rms_norm_row_bf16(hidden + r * h, residual + r * h, PTR(const uint16_t, L->post_attn_norm), eps,
                                  x + r * h, residual + r * h, h);
            product_share(&L->gate_up, x, m, gate_up);
            _Pragma("omp barrier")
            _Pragma("omp for schedule(static)")
            for (int64_t item = 0; item < m * silu_chunks; item++) {
                const int64_t r = item / silu_chunks, c0 = item % silu_chunks * silu_chunk;
                const int64_t c1 = c0 + silu_chunk < inter ? c0 + silu_chunk : inter;
                const uint16_t* g = gate_up + r * 2 * inter;
                silu_and_mul_span_bf16(g, g + inter, act + r * inter, c0, c1);
            }
            product_share(&L->down, act, m, hidden);
            _Pragma("omp barrier")
        }
        _Pragma("omp for schedule(static)")
        for (int64_t r = 0; r < m; r++)
            rms_norm_row_bf16(hidden + r * h, residual + r * h, final_norm, eps, out + r * h, residual + r * h, h);
        free(scratch);
    }
    free(residual);
}
