"""Matmuls of a few rows that read the checkpoint's own weight format (kernels/cpu/stored.py: weight_gemv)
and the fused rotary + KV-cache write (cpu/elementwise.py: rotary_store_kv), against the loader and the
torch reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from forge_batch.engine.llm import LLM
from forge_batch.engine.sampling_params import SamplingParams
from forge_batch.kernels import KernelBackend, reference
from forge_batch.kernels.cpu import build, elementwise
from forge_batch.kernels.cpu import stored as cpu_stored
from forge_batch.kernels.cpu.linear import MklPanelLinear, PanelLinear, StoredLinear
from forge_batch.kernels.cpu.stored import (
    WEIGHT_FORMATS,
    WEIGHT_GEMV_MAX_ROWS,
    StoredWeight,
    weight_gemv,
    weight_gemv_fast,
)
from forge_batch.models.gguf_loader import dequantize, load_gguf
from forge_batch.models.llama import MATMUL_SOURCES
from forge_batch.models.raw_weights import RawWeight

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

pytestmark = pytest.mark.skipif(not build.available(), reason="no C compiler for the CPU kernels")


def _raw_weight(fmt: str, w: torch.Tensor) -> tuple[RawWeight, torch.Tensor]:
    """``w`` in format ``fmt`` as a loader hands it over, and as the loader dequantises it (float32)."""
    if fmt in ("F16", "BF16"):
        half = w.to(torch.float16 if fmt == "F16" else torch.bfloat16)
        return RawWeight.from_tensor(half), half.float()
    raw = np.ascontiguousarray(gguf.quants.quantize(w.numpy(), getattr(Q, fmt))).view(np.uint8).reshape(-1)
    return RawWeight(fmt, torch.from_numpy(raw.copy()), *w.shape), dequantize(raw, WEIGHT_FORMATS[fmt][0], w.shape)


def _stored(fmt: str, w: torch.Tensor) -> tuple[StoredWeight, torch.Tensor]:
    """``w`` in format ``fmt`` as the kernel keeps it, and as the loader dequantises it (float32)."""
    raw, dense = _raw_weight(fmt, w)
    return StoredWeight.from_blocks(raw.fmt, raw.data, raw.rows, raw.cols), dense


@pytest.mark.parametrize("fmt", list(WEIGHT_FORMATS))
def test_stored_weight_decodes_to_the_loaders_float32_values_exactly(fmt):
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(1)) * 0.05
    stored, expected = _stored(fmt, w)
    # the same weights to the bit: the kernel's products equal the float32 path's
    assert torch.equal(stored.decode(), expected)


@pytest.mark.parametrize("fmt", list(WEIGHT_FORMATS))
@pytest.mark.parametrize("rows", [1, 2, 3, WEIGHT_GEMV_MAX_ROWS])
@pytest.mark.parametrize("with_bias", [False, True])
def test_weight_gemv_matches_dequantise_then_linear(fmt, rows, with_bias):
    g = torch.Generator().manual_seed(rows)
    # 203 output rows: the kernel takes them 4 or 2 at a time (one row of x, two or three), plus the rest
    w = torch.randn(203, 576, generator=g) * 0.05
    stored, dense = _stored(fmt, w)
    x = torch.randn(rows, 576, generator=g)
    bias = torch.randn(203, generator=g) if with_bias else None
    # float32 sums in another order than MKL's: agreement to rounding, not to the bit
    torch.testing.assert_close(weight_gemv(x, stored, bias), F.linear(x, dense, bias), rtol=1e-5, atol=1e-5)


def test_weight_gemv_rejects_what_it_cannot_run():
    stored, _ = _stored("Q8_0", torch.randn(8, 64))
    with pytest.raises(ValueError, match="float32"):
        weight_gemv(torch.randn(WEIGHT_GEMV_MAX_ROWS + 1, 64), stored)
    with pytest.raises(ValueError, match="multiple of 32"):
        StoredWeight.from_tensor(torch.randn(4, 40).bfloat16())
    with pytest.raises(ValueError, match="needs"):
        StoredWeight.from_blocks("Q4_1", torch.zeros(10, dtype=torch.uint8), 1, 32)


def test_fused_parts_concatenate_only_in_one_format():
    a, _ = _stored("Q4_1", torch.randn(8, 64))
    b, _ = _stored("Q4_1", torch.randn(4, 64))
    c, _ = _stored("Q8_0", torch.randn(4, 64))
    both = StoredWeight.concat([a, b])
    assert both is not None and (both.rows, both.cols) == (12, 64)
    assert torch.equal(both.decode(), torch.cat([a.decode(), b.decode()]))
    assert StoredWeight.concat([a, c]) is None


def _write_gguf(tmp_path: Path, types: dict) -> Path:
    from test_gguf_loader import write_tiny_gguf

    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, "llama", types, untied=True)
    return path


def test_gguf_loader_keeps_matrices_in_their_file_format(tmp_path):
    types = {"token_embd.weight": Q.Q8_0, "attn_q": Q.F16, "attn_k": Q.Q4_0, "attn_v": Q.Q4_1,
             "ffn_gate": Q.Q8_0, "ffn_up": Q.Q4_1, "ffn_down": Q.Q4_0, "output.weight": Q.BF16}
    stored: dict[str, RawWeight] = {}
    _, state, _ = load_gguf(_write_gguf(tmp_path, types), stored)
    assert stored["model.layers.0.self_attn.k_proj.weight"].fmt == "Q4_0"
    assert stored["lm_head.weight"].fmt == "BF16"
    assert "model.layers.0.input_layernorm.weight" not in stored  # float32 vectors are not matrices to keep
    assert "model.layers.0.self_attn.o_proj.weight" not in stored  # float32 in the file: nothing smaller
    for name, kept in stored.items():  # rows in HF order (Q/K un-permuted) and the loader's values
        decoded = StoredWeight.from_blocks(kept.fmt, kept.data, kept.rows, kept.cols).decode()
        assert torch.equal(decoded, state[name]), name


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    outs = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    assert all(len(ids) == 16 for ids in outs)
    return outs


@pytest.mark.skipif(not weight_gemv_fast(), reason="no SIMD path for weight_gemv on this CPU")
def test_engine_decodes_few_rows_from_stored_weights_with_the_same_tokens(tmp_path, monkeypatch):
    types = {"token_embd.weight": Q.Q8_0, "attn_q": Q.Q4_1, "attn_k": Q.Q4_1, "attn_v": Q.Q4_1,
             "attn_output": Q.Q4_0, "ffn_gate": Q.Q4_1, "ffn_up": Q.Q4_1, "ffn_down": Q.Q8_0,
             "output.weight": Q.Q8_0}
    llm = LLM(str(_write_gguf(tmp_path, types)), device="cpu", dtype="float32", batch_invariant=False)
    assert llm.stored_weights == 2 * 4 + 1  # every matmul of both layers, and the LM head
    assert llm.model.layers[0].qkv_proj.stored.fmt == "Q4_1" and llm.model.lm_head.stored.fmt == "Q8_0"

    llm.runner.cpu_decode = None  # the layer-by-layer path (the one-call step: test_decode_step.py)
    calls = []
    real = cpu_stored.weight_gemv
    monkeypatch.setattr(cpu_stored, "weight_gemv", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    prompts = [[258, 104, 101, 108], [258, 5, 6, 7, 8, 9, 10]]
    stored = _greedy(llm, prompts)
    assert len(calls) > 2 * 4 * 15 and max(calls) <= WEIGHT_GEMV_MAX_ROWS  # every decode step's matmuls
    for owner, name in [(layer, name) for layer in llm.model.layers for name in MATMUL_SOURCES] + [
        (llm.model, "lm_head")
    ]:
        setattr(owner, name, getattr(owner, name).fallback)  # the float32 weights again
    assert _greedy(llm, prompts) == stored


def test_mixed_formats_of_fused_parts_keep_the_float32_path(tmp_path):
    types = {"attn_q": Q.F16, "attn_k": Q.Q4_0, "attn_v": Q.Q4_1, "ffn_gate": Q.Q8_0, "ffn_up": Q.Q8_0}
    llm = LLM(str(_write_gguf(tmp_path, types)), device="cpu", dtype="float32", batch_invariant=False)
    layer = llm.model.layers[0]
    # F16 + Q4_0 + Q4_1 cannot be one matrix: neither stored nor in panels
    assert not isinstance(layer.qkv_proj, (StoredLinear, PanelLinear, MklPanelLinear))
    if weight_gemv_fast():
        assert layer.gate_up_proj.stored.fmt == "Q8_0"
    else:  # weight_gemv without its SIMD path is never kept (the panel products may be: test_panel_product.py)
        assert not isinstance(layer.gate_up_proj, StoredLinear)


def _qkv_case(tokens: int, heads=9, kv_heads=3, dim=64, blocks=12, block_size=16):
    g = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g)
    positions = torch.randint(0, 500, (tokens,), generator=g)
    slots = torch.randperm(blocks * block_size, generator=g)[:tokens]
    if tokens > 2:
        slots[1] = -1  # a padding row: never written
    cache = torch.zeros(blocks, block_size, kv_heads, dim)
    cos_sin = torch.randn(512, dim, generator=g)

    def views(buf: torch.Tensor):
        q, k, v = buf.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        return q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim), v.view(tokens, kv_heads, dim)

    return qkv, views, positions, slots, cache, cos_sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 7, 40])
def test_rotary_store_kv_is_bit_identical_to_the_reference(tokens, dtype):
    qkv, views, positions, slots, cache, cos_sin = _qkv_case(tokens)
    qkv, cache = qkv.to(dtype), cache.to(dtype)  # bfloat16: rotated in float32, rounded once, as the reference
    q, k, v = views(qkv.clone())
    assert elementwise.rotary_store_kv_ok(q, k, v, cos_sin, cache, positions, slots)
    k_cache, v_cache = cache.clone(), cache.clone()
    got_q, got_k = elementwise.rotary_store_kv(positions, q, k, v, cos_sin, k_cache, v_cache, slots)

    q, k, v = views(qkv.clone())
    exp_k_cache, exp_v_cache = cache.clone(), cache.clone()
    exp_q, exp_k = reference.rotary_embedding(positions, q, k, cos_sin)
    reference.store_kv(exp_k, v, exp_k_cache, exp_v_cache, slots)
    assert torch.equal(got_q, exp_q) and torch.equal(got_k, exp_k)
    assert torch.equal(k_cache, exp_k_cache) and torch.equal(v_cache, exp_v_cache)


def test_dispatch_fuses_rotary_and_store_only_for_cpu_float32_and_bfloat16(monkeypatch):
    calls = []
    real = elementwise.rotary_store_kv
    monkeypatch.setattr(elementwise, "rotary_store_kv", lambda *a: calls.append(1) or real(*a))
    qkv, views, positions, slots, cache, cos_sin = _qkv_case(5)
    KernelBackend().rotary_and_store_kv(positions, *views(qkv.clone()), cos_sin, cache.clone(), cache.clone(), slots)
    assert calls == [1]
    q, k, v = views(qkv.bfloat16())
    KernelBackend().rotary_and_store_kv(positions, q, k, v, cos_sin, cache.bfloat16(), cache.bfloat16(), slots)
    assert calls == [1, 1]
    q, k, v = views(qkv.half())
    KernelBackend().rotary_and_store_kv(positions, q, k, v, cos_sin, cache.half(), cache.half(), slots)
    assert calls == [1, 1]  # float16: the reference's two steps


def test_batch_invariant_engine_keeps_no_stored_weights(tmp_path):
    # weight_gemv's stored forms sum in their own order, not the packed GEMM's: a row's numbers would depend
    # on whether its step has few rows. The default (batch-invariant) engine keeps none of them; its few-row
    # products read the blocks only as panel products with the GEMM library's bits (test_panel_product.py).
    types = {"attn_q": Q.Q4_1, "attn_k": Q.Q4_1, "attn_v": Q.Q4_1, "ffn_gate": Q.Q8_0, "ffn_up": Q.Q8_0}
    llm = LLM(str(_write_gguf(tmp_path, types)), device="cpu", dtype="float32")
    assert llm.engine_info["batch_invariant"] is True
    panels = [m for layer in llm.model.layers for name in MATMUL_SOURCES
              if isinstance(m := getattr(layer, name), (PanelLinear, MklPanelLinear))]
    assert llm.stored_weights == len(panels)
    assert not any(isinstance(getattr(layer, name), StoredLinear) for layer in llm.model.layers for name in MATMUL_SOURCES)
