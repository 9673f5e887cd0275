"""The CUDA path of the engine: Triton kernels and CUDA graphs (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from forge_batch import LLM, SamplingParams
from forge_batch.engine.request import GenerationRequest

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    outs = llm.generate_stream([GenerationRequest(str(i), prompt_token_ids=p, params=params)
                                for i, p in enumerate(prompts)])
    return [o.token_ids for o in sorted(outs, key=lambda o: o.index)]


def test_cuda_graphs_match_eager_and_cpu(tiny_model_dir):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (3, 17, 40, 9, 64)]
    graphs = LLM(str(tiny_model_dir), device="cuda", dtype="float32", max_num_seqs=8)
    assert graphs.runner.decode_graphs is not None and graphs.runner.decode_graphs.graphs
    eager = LLM(str(tiny_model_dir), device="cuda", dtype="float32", max_num_seqs=8, enforce_eager=True)
    cpu = LLM(str(tiny_model_dir), device="cpu", dtype="float32", max_num_seqs=8)
    assert greedy(graphs, prompts) == greedy(eager, prompts) == greedy(cpu, prompts)


def test_engine_greedy_tokens_on_triton_equal_the_reference_on_cuda(tiny_model_dir):
    """The whole engine on CUDA, compiled Triton kernels (CUDA graphs on) against the torch reference ops
    (eager): chunked prefill over a cached prefix, mixed steps, and decode give the same greedy tokens.
    float32: in bfloat16 the kernels agree to a bit or two (test_kernels_gpu), enough to flip a near-tied
    argmax of a random tiny model (seen under Triton's interpreter)."""
    g = torch.Generator().manual_seed(11)
    shared = torch.randint(3, 300, (40,), generator=g).tolist()  # a cached prefix spanning whole blocks
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (3, 21, 64, 9)]
    prompts += [shared + [5, 6, 7], shared + [8]]
    # a small token budget forces chunked prefill and mixed prefill/decode steps
    kw = dict(device="cuda", dtype="float32", max_num_seqs=4, max_num_batched_tokens=32)
    triton = LLM(str(tiny_model_dir), **kw)  # auto: Triton on CUDA
    ours = greedy(triton, prompts)
    assert triton.engine_info["kernel_path"] == "triton" and triton.model.kernels.triton_disabled_reason() is None
    reference = greedy(LLM(str(tiny_model_dir), kernel_backend="reference", enforce_eager=True, **kw), prompts)
    assert ours == reference


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
def test_engine_rows_do_not_depend_on_the_batch_on_cuda(tmp_path, temperature):
    """The default engine on a GPU (auto: Triton kernels, the fixed-tile GEMM, CUDA graphs; bfloat16): each
    prompt's tokens and logits bits alone, together, chunked a few sequences at a time, and cached."""
    from test_batch_invariance_triton import check_engine_invariance

    check_engine_invariance(None, tmp_path, "bfloat16", device="cuda", kernel_backend="auto",
                            temperature=temperature)


def test_sampler_cumsum_rows_do_not_depend_on_the_row_count_on_cuda():
    """torch's cumsum on CUDA scans one row with CUB and several with threads per row set by the row
    count; the sampler's row_cumsum gives each row one order."""
    from forge_batch.engine.sampler import row_cumsum

    g = torch.Generator().manual_seed(0)
    probs = torch.rand(300, 49152, generator=g).pow(8).softmax(dim=-1).cuda()
    full = row_cumsum(probs)
    torch.testing.assert_close(full.double(), probs.double().cumsum(dim=-1), rtol=0, atol=1e-4)
    for m in range(1, 301):
        assert torch.equal(row_cumsum(probs[:m]), full[:m]), f"{m} rows"
    perm = torch.randperm(300, generator=g).cuda()
    assert torch.equal(row_cumsum(probs[perm]), full[perm])


def test_batch_invariant_off_keeps_cublas_on_cuda(tiny_model_dir):
    from forge_batch.kernels import Linear

    llm = LLM(str(tiny_model_dir), device="cuda", dtype="bfloat16", batch_invariant=False)
    assert type(llm.model.lm_head) is Linear and llm.engine_info["batch_invariant"] is False
