"""The whole engine on the Triton kernels (interpreted on the CPU) gives the reference path's greedy tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from forge_batch import LLM, SamplingParams, kernels
from forge_batch.engine.request import GenerationRequest

pytest.importorskip("triton")

PROMPT_LENGTHS = [3, 21, 40]  # ragged; 21 and 40 span several 16-token blocks
MAX_NEW = 6

CHILD = textwrap.dedent(
    """
    import json, sys, torch
    from forge_batch import LLM, SamplingParams
    from forge_batch.engine.request import GenerationRequest
    path, prompts, max_new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    # A small token budget forces chunked prefill over a cached prefix and mixed prefill/decode steps.
    llm = LLM(path, device="cpu", dtype="float32", kernel_backend="triton", max_num_seqs=3,
              max_num_batched_tokens=24)
    params = SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True)
    outs = llm.generate_stream([GenerationRequest(str(i), prompt_token_ids=p, params=params)
                                for i, p in enumerate(prompts)])
    result = {o.request_id: o.token_ids for o in outs}
    from forge_batch.kernels import dispatch
    assert dispatch.get_backend() == "triton" and dispatch._triton_ops() is not None
    assert dispatch.triton_disabled_reason() is None
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

    previous = kernels.get_backend()
    try:
        llm = LLM(str(tiny_model_dir), device="cpu", dtype="float32", kernel_backend="reference",
                  max_num_seqs=3, max_num_batched_tokens=24)
        params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
        outs = llm.generate_stream(
            [GenerationRequest(str(i), prompt_token_ids=p, params=params) for i, p in enumerate(prompts)]
        )
        reference_tokens = {o.request_id: o.token_ids for o in outs}
    finally:
        kernels.set_backend(previous)
    assert triton_tokens == reference_tokens
