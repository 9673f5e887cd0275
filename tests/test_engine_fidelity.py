"""Greedy tokens must equal Hugging Face transformers' on the same weights (an independent implementation)."""

from __future__ import annotations

import pytest
import torch
from hf_reference import hf_greedy

from forge_batch import LLM, SamplingParams
from forge_batch.engine.request import GenerationRequest

transformers = pytest.importorskip("transformers")


def ragged_prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


LENGTHS = [1, 5, 17, 33, 8, 64, 3, 40]
MAX_NEW = 12


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_and_reference(request, tiny_model_dir, tiny_qwen2_dir):
    path = tiny_model_dir if request.param == "llama" else tiny_qwen2_dir
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = ragged_prompts(hf.config.vocab_size, LENGTHS)
    expected = [hf_greedy(hf, p, MAX_NEW) for p in prompts]
    return path, prompts, expected


def run_engine(path, prompts, **engine_kwargs) -> tuple[list[list[int]], LLM]:
    llm = LLM(str(path), device="cpu", dtype="float32", **engine_kwargs)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    reqs = [GenerationRequest(str(i), prompt_token_ids=p, params=params) for i, p in enumerate(prompts)]
    outs = sorted(llm.generate_stream(reqs), key=lambda o: o.index)
    assert all(o.error is None for o in outs), [o.error for o in outs]
    assert all(o.finish_reason == "length" for o in outs)
    return [o.token_ids for o in outs], llm


@pytest.mark.parametrize(
    "engine_kwargs",
    [
        dict(max_num_seqs=1),  # one at a time
        dict(max_num_seqs=3, max_num_batched_tokens=512),  # small batches, mixed prefill/decode
        dict(max_num_seqs=8, max_num_batched_tokens=16),  # chunked prefill across steps
        dict(max_num_seqs=8, block_size=32),
    ],
    ids=["bs1", "bs3", "bs8-chunked", "block32"],
)
def test_greedy_matches_transformers(model_and_reference, engine_kwargs):
    path, prompts, expected = model_and_reference
    got, _ = run_engine(path, prompts, **engine_kwargs)
    assert got == expected


def test_same_tokens_with_prefix_caching_off_naive_cache_and_preemption(model_and_reference):
    path, prompts, expected = model_and_reference
    # Shared prefixes so the prefix cache has something to hit.
    shared = prompts[5][:48]
    prompts = prompts + [shared + p for p in prompts[:4]]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    expected = expected + [hf_greedy(hf, p, MAX_NEW) for p in prompts[len(expected):]]

    cached, llm = run_engine(path, prompts, max_num_seqs=4)
    assert cached == expected
    assert llm.stats()["prefix_cache_hit_rate"] > 0

    uncached, llm = run_engine(path, prompts, max_num_seqs=4, enable_prefix_caching=False)
    assert uncached == expected and llm.stats()["prefix_cache_hit_rate"] == 0

    naive, _ = run_engine(path, prompts, max_num_seqs=4, kv_cache="naive", max_model_len=256)
    assert naive == expected

    # 8 blocks of 16 tokens for sequences of up to 124 tokens: preemption is unavoidable.
    tight, llm = run_engine(path, prompts, max_num_seqs=8, num_blocks=9, block_size=16)
    assert llm.stats()["preemptions"] > 0
    assert tight == expected


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so that the scaled frequencies matter at the test's positions.
    "original_max_position_embeddings": 32,
}


@pytest.mark.parametrize("arch,kwargs", [("mistral", {}), ("llama", {"rope_scaling": LLAMA3_ROPE}),
                                         ("llama", {"num_kv_heads": 1, "tie_word_embeddings": True})],
                         ids=["mistral", "llama3-rope-scaling", "mqa-tied"])
def test_other_llama_family_variants_match_transformers(tmp_path, arch, kwargs):
    from tiny_models import make_tiny_model

    path = make_tiny_model(tmp_path / arch, arch, **kwargs)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = ragged_prompts(hf.config.vocab_size, [3, 40, 90], seed=1)
    expected = [hf_greedy(hf, p, MAX_NEW) for p in prompts]
    got, _ = run_engine(path, prompts, max_num_seqs=3)
    assert got == expected
