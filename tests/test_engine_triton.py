"""The whole engine on the Triton kernels (interpreted on the CPU) gives the reference path's greedy tokens,
also beside an engine on another kernel backend in the same process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from forge_batch import LLM, SamplingParams
from forge_batch.engine.request import GenerationRequest

pytest.importorskip("triton")

PROMPT_LENGTHS = [3, 21, 40]  # ragged; 21 and 40 span several 16-token blocks
MAX_NEW = 6

CHILD = textwrap.dedent(
    """
    import json, sys, torch
    from forge_batch import LLM, SamplingParams
    from forge_batch.engine.request import GenerationRequest
    from forge_batch.kernels import triton_ops
    path, prompts, max_new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    # A small token budget forces chunked prefill over a cached prefix and mixed prefill/decode steps.
    llm = LLM(path, device="cpu", dtype="float32", kernel_backend="triton", max_num_seqs=3,
              max_num_batched_tokens=24)
    # a second engine in the process, on the reference kernels, created after the first
    other = LLM(path, device="cpu", dtype="float32", kernel_backend="reference", max_num_seqs=3,
                max_num_batched_tokens=24)
    calls = []
    real = triton_ops.paged_attention_impl  # under paged_attention and paged_attention_invariant
    triton_ops.paged_attention_impl = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    params = SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True)

    def run(engine):
        outs = engine.generate_stream([GenerationRequest(str(i), prompt_token_ids=p, params=params)
                                       for i, p in enumerate(prompts)])
        return {o.request_id: o.token_ids for o in outs}

    result = run(llm)
    assert calls and llm.engine_config.kernel_path == "triton" and llm.model.kernels.name == "triton"
    assert llm.model.kernels.triton_disabled_reason() is None
    before = len(calls)
    assert run(other) == result and len(calls) == before  # the reference engine called no Triton kernel
    assert other.engine_config.kernel_path == "torch"
    print(json.dumps(result))
    """
)


def test_engine_greedy_tokens_equal_on_triton_interpreter(tiny_model_dir):
    import torch

    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(tiny_model_dir), json.dumps(prompts), str(MAX_NEW)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    triton_tokens = json.loads(child.stdout.strip().splitlines()[-1])

    llm = LLM(str(tiny_model_dir), device="cpu", dtype="float32", kernel_backend="reference",
              max_num_seqs=3, max_num_batched_tokens=24)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    outs = llm.generate_stream(
        [GenerationRequest(str(i), prompt_token_ids=p, params=params) for i, p in enumerate(prompts)]
    )
    reference_tokens = {o.request_id: o.token_ids for o in outs}
    assert triton_tokens == reference_tokens
