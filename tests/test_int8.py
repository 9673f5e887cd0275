"""quantization="int8": W8A8 decoder matmuls on the CPU (per-token activations, per-channel weights)."""

from __future__ import annotations

import pytest
import torch

from forge_batch.engine.llm import LLM
from forge_batch.engine.sampling_params import SamplingParams
from forge_batch.job import JobSpec
from forge_batch.kernels.cpu import build, int8
from forge_batch.kernels.cpu.linear import Int8Linear

pytestmark = pytest.mark.skipif(not build.available(), reason="no C compiler for the CPU kernels")


@pytest.mark.parametrize("rows", [1, 7, 16, 17, 130])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_linear_matches_reference_and_float(rows, with_bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(80, 48, generator=g)
    b = torch.randn(80, generator=g) if with_bias else None
    x = torch.randn(rows, 48, generator=g)
    x[0] = 0.0  # an all-zero row must not divide by zero
    qw = int8.quantize_weight_int8(w)
    got = int8.int8_linear(x, qw, b)
    torch.testing.assert_close(got, int8.int8_linear_reference(x, qw, b), atol=1e-4, rtol=1e-5)
    exact = torch.nn.functional.linear(x, w, b)
    assert (got - exact).abs().max() <= 0.05 * exact.abs().max()  # int8 error, not a different function
    assert torch.equal(got[0], exact[0])  # the zero row is exactly zero (plus the bias)


def test_int8_linear_row_does_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(0)
    qw = int8.quantize_weight_int8(torch.randn(64, 32, generator=g))
    x = torch.randn(40, 32, generator=g)
    x[5] *= 1000  # an outlier row: per-tensor activation scales would change every other row
    batch = int8.int8_linear(x, qw)
    alone = torch.cat([int8.int8_linear(x[i : i + 1], qw) for i in range(40)])
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-6)


def test_engine_int8_is_batch_invariant_and_close_to_float32(tiny_model_dir):
    prompts = [list(range(2, 30)), [5, 6, 7], [9] * 12]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    llm = LLM(str(tiny_model_dir), device="cpu", dtype="float32", quantization="int8", max_num_seqs=32)
    assert isinstance(llm.model.layers[0].qkv_proj, Int8Linear)
    requests = [{"prompt_token_ids": p} for p in prompts]
    crowd = [o.outputs[0].token_ids for o in llm.generate(requests * 8, params)][:3]
    alone = [llm.generate([r], params)[0].outputs[0].token_ids for r in requests]
    assert all(len(ids) == 10 for ids in crowd) and crowd == alone
    ref = LLM(str(tiny_model_dir), device="cpu", dtype="float32")
    ids = torch.tensor(prompts[0])
    from forge_batch.models.llama import AttentionMetadata

    def last_logits(engine: LLM) -> torch.Tensor:  # one prefill of prompt 0 through each model
        n = ids.numel()
        attn = AttentionMetadata(
            slot_mapping=torch.arange(n), block_tables=torch.arange(4)[None], query_start_loc=torch.tensor([0, n]),
            context_lens=torch.tensor([n]), max_query_len=n, max_context_len=n,
        )
        with torch.inference_mode():
            hidden = engine.model(ids, torch.arange(n), engine.runner.kv_caches, attn)
            return engine.model.compute_logits(hidden[-1:])[0]

    q, f = last_logits(llm), last_logits(ref)
    assert not torch.equal(q, f)  # really quantized
    assert torch.nn.functional.cosine_similarity(q, f, dim=0) > 0.99


def test_int8_needs_float32_on_the_cpu_and_a_known_name(tiny_model_dir):
    with pytest.raises(ValueError, match="float32"):
        LLM(str(tiny_model_dir), device="cpu", dtype="bfloat16", quantization="int8")
    with pytest.raises(ValueError, match="int8"):
        LLM(str(tiny_model_dir), device="cpu", quantization="int4")


def test_job_file_engine_quantization_key():
    base = {"input": {"path": "in.jsonl"}, "output": {"path": "out"}}
    spec = JobSpec.model_validate({**base, "engine": {"quantization": "int8"}})
    assert spec.engine.llm_kwargs()["quantization"] == "int8"
    with pytest.raises(ValueError, match="quantization"):
        JobSpec.model_validate({**base, "engine": {"quantization": "fp4"}})
