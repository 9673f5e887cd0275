"""MKL-packed matmul weights (the float32 CPU path): same numbers as F.linear, used where they pay."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from forge_batch.engine.llm import LLM
from forge_batch.engine.sampling_params import SamplingParams
from forge_batch.models import llama

pytestmark = pytest.mark.skipif(not llama.mkl_packing_available(), reason="torch built without MKL")


@pytest.mark.parametrize("rows", [1, llama.PACKED_MIN_ROWS - 1, llama.PACKED_MIN_ROWS, 130, 700])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_is_bit_identical(rows, with_bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 64, generator=g)
    b = torch.randn(96, generator=g) if with_bias else None
    packed = torch.ops.mkl._mkl_reorder_linear_weight(w, 128)
    x = torch.randn(rows, 64, generator=g)
    assert torch.equal(llama.linear(x, w, b, packed), F.linear(x, w, b))


def test_engine_packs_float32_cpu_weights_and_matches_unpacked(tiny_model_dir):
    prompts = [{"prompt_token_ids": ids} for ids in ([1, 5, 9, 2, 7], list(range(3, 40)), [4] * 20)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    llm = LLM(str(tiny_model_dir), device="cpu", dtype="float32", max_num_seqs=32)
    assert llm.packed_weights and llm.model.lm_head_packed is not None
    assert set(llm.model.layers[0].packed) == {"qkv", "o", "gate_up", "down"}
    packed = [o.outputs[0].token_ids for o in llm.generate(prompts * 8, params)]  # 24 rows per decode step
    assert all(len(ids) == 12 for ids in packed)
    for layer in llm.model.layers:
        layer.packed = {}
    llm.model.lm_head_packed = None
    plain = [o.outputs[0].token_ids for o in llm.generate(prompts * 8, params)]
    assert packed == plain


def test_bfloat16_weights_are_not_packed(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert not llm.packed_weights and llm.model.lm_head_packed is None
