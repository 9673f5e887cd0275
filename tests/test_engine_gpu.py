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
