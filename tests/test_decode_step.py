"""The one-call decode step (kernels/cpu/decode_step.py, csrc/decode_step.c; built by the engine's CPU
backend) against the layer-by-layer path it replaces: the same hidden states and KV-cache writes to the
bit, and the same tokens in the engine."""

from __future__ import annotations

import pytest
import torch

from forge_batch.engine.cpu_backend import CpuBackend
from forge_batch.engine.llm import LLM
from forge_batch.engine.sampling_params import SamplingParams
from forge_batch.kernels import KernelBackend
from forge_batch.kernels.cpu import build
from forge_batch.kernels.cpu.decode_step import DecodeStep
from forge_batch.kernels.cpu.stored import WEIGHT_GEMV_MAX_ROWS, weight_gemv_fast
from forge_batch.models.config import ModelConfig
from forge_batch.models.llama import MATMUL_SOURCES, AttentionMetadata, LlamaForCausalLM
from forge_batch.models.raw_weights import RawWeight

gguf = pytest.importorskip("gguf")
from test_weight_gemv import _raw_weight  # noqa: E402  (a weight as a loader keeps it, and decodes it)

pytestmark = pytest.mark.skipif(
    not (build.available() and weight_gemv_fast()), reason="no SIMD CPU kernels (weight_gemv) here"
)


def _backend(dtype: torch.dtype = torch.float32, kernels: str = "auto") -> CpuBackend:
    return CpuBackend(KernelBackend(kernels), dtype, batch_invariant=False)  # the stored forms exist only then


BLOCK_SIZE = 16


def _model(head_dim: int, bias: bool, fmt: str, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A random 2-layer model whose matmul weights are kept in ``fmt`` (its float32 copies hold the
    same values, as after loading a checkpoint of that format; a bfloat16 model's round them)."""
    heads, kv_heads = 6, 2
    hidden = heads * head_dim
    config = ModelConfig(
        architecture="qwen2" if bias else "llama", vocab_size=300, hidden_size=hidden, intermediate_size=320,
        num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        rms_norm_eps=1e-5, max_position_embeddings=512, attention_bias=bias,
    )
    model = LlamaForCausalLM(config)
    model.init_random_weights(seed=3, std=0.05)
    stored: dict[str, RawWeight] = {}
    part_rows = {"self_attn.q_proj.weight": hidden, "self_attn.k_proj.weight": kv_heads * head_dim,
                 "self_attn.v_proj.weight": kv_heads * head_dim, "mlp.gate_proj.weight": config.intermediate_size,
                 "mlp.up_proj.weight": config.intermediate_size}
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            if bias:
                layer.qkv_bias.normal_(0, 0.1)
            for name, weight in layer.matmul_weights().items():
                offset = 0
                for part in MATMUL_SOURCES[name]:
                    rows = part_rows.get(part, weight.shape[0])
                    w = weight[offset : offset + rows]
                    stored[f"model.layers.{i}.{part}"], dense = _raw_weight(fmt, w.clone())
                    w.copy_(dense)
                    offset += rows
                assert offset == weight.shape[0]
    assert _backend().keep_stored(model, dict(stored)) == 2 * 4
    if dtype != torch.float32:
        converted = LlamaForCausalLM(config, dtype)
        converted.load_state_dict(model.state_dict())
        assert _backend(dtype).keep_stored(converted, stored) == 2 * 4
        return converted
    return model


def _step_inputs(model: LlamaForCausalLM, context_lens: list[int], seed: int):
    """A decode step of len(context_lens) sequences over random, scattered cache blocks."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    num_blocks = sum((n + BLOCK_SIZE - 1) // BLOCK_SIZE for n in context_lens) + 3
    shape = (num_blocks, BLOCK_SIZE, c.num_key_value_heads, c.head_dim)
    caches = [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(c.num_hidden_layers)]
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables, slots = [], []
    for n in context_lens:
        need = (n + BLOCK_SIZE - 1) // BLOCK_SIZE
        table, order = order[:need], order[need:]
        pos = n - 1
        slots.append(table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
        tables.append(table)
    width = max(len(t) for t in tables)
    attn = AttentionMetadata(
        slot_mapping=torch.tensor(slots), block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        query_start_loc=torch.arange(len(context_lens) + 1), context_lens=torch.tensor(context_lens),
        max_query_len=1, max_context_len=max(context_lens),
    )
    ids = torch.randint(0, c.vocab_size, (len(context_lens),), generator=g)
    return ids, torch.tensor(context_lens) - 1, caches, attn


@pytest.mark.parametrize(
    ("head_dim", "bias", "fmt", "context_lens"),
    [
        (64, False, "Q4_1", [1]),
        (64, False, "Q4_1", [37, 5, 16, 120]),
        (64, True, "Q8_0", [17, 33]),
        (32, False, "Q4_0", [9, 64, 65, 3, 200, 48, 1, 31]),  # 8 rows, the kernel's most
        (16, True, "F16", [70, 2]),
    ],
)
def test_decode_step_matches_the_layer_by_layer_path_bit_for_bit(head_dim, bias, fmt, context_lens):
    model = _model(head_dim, bias, fmt)
    ids, positions, caches, attn = _step_inputs(model, context_lens, seed=len(context_lens))
    fused_caches = [(k.clone(), v.clone()) for k, v in caches]

    step = _backend().decode_step(model, fused_caches)
    assert step is not None and step.can_run(len(context_lens), attn)
    calls = []
    real_call = DecodeStep.__call__

    def counting(self, *args):
        calls.append(args[0].shape[0])
        return real_call(self, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DecodeStep, "__call__", counting)
        fused = step(ids, positions, attn)
        layered = model(ids, positions, caches, attn)
    assert calls == [len(context_lens)]  # the fused step ran once, the model's forward did not use it

    assert torch.equal(fused, layered)
    for (k1, v1), (k2, v2) in zip(fused_caches, caches):  # the new tokens' K/V written to the same slots
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    assert not torch.equal(fused_caches[0][0], _step_inputs(model, context_lens, seed=len(context_lens))[2][0][0])


def test_decode_step_is_not_used_where_it_cannot_run():
    model = _model(32, False, "Q8_0")
    ids, positions, caches, attn = _step_inputs(model, [5, 9], seed=0)
    assert _backend().decode_step(model, caches) is not None
    assert not _backend().decode_step(model, caches).can_run(WEIGHT_GEMV_MAX_ROWS + 1, attn)  # too many rows
    half_caches = [(k.half(), v.half()) for k, v in caches]
    assert _backend().decode_step(model, half_caches) is None  # the C step reads float32 or bfloat16 caches only
    assert _backend(kernels="reference").decode_step(model, caches) is None  # a forced backend is obeyed
    assert _backend(kernels="triton").decode_step(model, caches) is None
    model.layers[1].down_proj = model.layers[1].down_proj.fallback
    assert _backend().decode_step(model, caches) is None  # every layer's matmuls must be kept
    fused = _backend().decode_step(_model(32, False, "Q8_0"), caches).step
    with pytest.raises(ValueError, match="decode_step takes"):
        fused(torch.zeros(WEIGHT_GEMV_MAX_ROWS + 1, 192), positions, attn.slot_mapping,
              attn.block_tables, attn.context_lens)
    with pytest.raises(ValueError, match="decode_step takes int64"):  # C would misread int32 indices
        fused(torch.zeros(2, 192), positions.int(), attn.slot_mapping, attn.block_tables, attn.context_lens)


def test_decode_step_over_a_bfloat16_cache_rounds_only_what_it_stores():
    """A bfloat16 cache (a bfloat16 model's): the step's arithmetic stays float32, the new tokens' K/V are
    stored rounded to nearest even, and what it computes is the float32 step's over the rounded cache."""
    model = _model(64, True, "Q4_1")
    context_lens = [37, 5, 16]
    ids, positions, caches, attn = _step_inputs(model, context_lens, seed=7)
    half = [(k.bfloat16(), v.bfloat16()) for k, v in caches]
    wide = [(k.float(), v.float()) for k, v in half]  # the same values in float32
    step_half, step_wide = _backend().decode_step(model, half), _backend().decode_step(model, wide)
    out_half = step_half(ids, positions, attn)
    out_wide = step_wide(ids, positions, attn)
    assert step_half.step.kv_bf16 and not step_wide.step.kv_bf16
    slots = attn.slot_mapping.tolist()
    rest = [s for s in range(half[0][0].shape[0] * BLOCK_SIZE) if s not in slots]
    for (kh, vh), (kw, vw), (k0, v0) in zip(half, wide, caches):
        for cache_h, cache_w, before in ((kh, kw, k0), (vh, vw, v0)):
            flat_h, flat_w, old = cache_h.flatten(0, 1), cache_w.flatten(0, 1), before.flatten(0, 1).bfloat16()
            assert torch.equal(flat_h[rest], old[rest]) and torch.equal(flat_w[rest], old[rest].float())
            assert not torch.equal(flat_h[slots], old[slots])  # the new tokens' K/V were written
    # layer 0 sees the same input either way, so its new K/V are the float32 step's, rounded
    assert torch.equal(half[0][0].flatten(0, 1)[slots], wide[0][0].flatten(0, 1)[slots].bfloat16())
    assert torch.equal(half[0][1].flatten(0, 1)[slots], wide[0][1].flatten(0, 1)[slots].bfloat16())
    assert out_half.dtype == torch.float32
    torch.testing.assert_close(out_half, out_wide, rtol=0.01, atol=0.01)
    assert not torch.equal(out_half, out_wide)  # the rounded new K/V do reach the attention


def test_bfloat16_model_runs_the_decode_step_close_to_its_layer_by_layer_path():
    model = _model(64, False, "Q4_1", dtype=torch.bfloat16)
    ids, positions, caches, attn = _step_inputs(model, [37, 5, 16, 120], seed=2)
    half = [(k.bfloat16(), v.bfloat16()) for k, v in caches]
    layered_caches = [(k.clone(), v.clone()) for k, v in half]
    step = _backend(torch.bfloat16).decode_step(model, half)
    assert step is not None
    fused = model.compute_logits(step(ids, positions, attn))
    layered = model.compute_logits(model(ids, positions, layered_caches, attn))
    assert fused.dtype == layered.dtype == torch.float32 and fused.shape == (4, model.config.vocab_size)
    # float32 arithmetic against bfloat16 activations between the layer path's ops
    torch.testing.assert_close(fused, layered, rtol=0.05, atol=0.05)
    assert (fused.argmax(-1) == layered.argmax(-1)).float().mean() >= 0.75


def test_engine_tokens_are_the_same_with_and_without_the_decode_step(tmp_path):
    from test_gguf_loader import write_tiny_gguf

    q = gguf.GGMLQuantizationType
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, "qwen2", {"token_embd.weight": q.Q8_0, "attn_q": q.Q4_1, "attn_k": q.Q4_1,
                                    "attn_v": q.Q4_1, "attn_output": q.Q4_0, "ffn_gate": q.Q8_0,
                                    "ffn_up": q.Q8_0, "ffn_down": q.Q4_1}, bias=True)
    llm = LLM(str(path), device="cpu", dtype="float32", batch_invariant=False)  # the step runs on the stored forms
    assert llm.runner.cpu_decode is not None
    prompts = [{"prompt_token_ids": [258, 5 + i, 104, 101, 108 + i][: 2 + i]} for i in range(5)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)

    def greedy() -> list[list[int]]:
        outs = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        assert all(len(ids) == 24 for ids in outs)
        return outs

    calls = []
    real_call = DecodeStep.__call__
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DecodeStep, "__call__", lambda self, *a: calls.append(1) or real_call(self, *a))
        fused = greedy()
    assert calls  # the engine's model runner took the one-call step
    llm.runner.cpu_decode = None
    assert greedy() == fused
