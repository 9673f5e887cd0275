"""Logprobs (SamplingParams.logprobs / prompt_logprobs) equal transformers' log-softmax of the same
weights' logits, whatever the batching, chunking, prefix cache or sampling options."""

from __future__ import annotations

import math

import pytest
import torch

from forge_batch import LLM, Logprob, SamplingParams
from forge_batch.engine import llm_engine
from forge_batch.engine.request import GenerationRequest

transformers = pytest.importorskip("transformers")

ATOL = 2e-4  # float32, two independent implementations of the same model


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir), device="cpu", dtype="float32", max_num_batched_tokens=16, block_size=4)


def hf_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits at every position of ``ids`` ([len, V])."""
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(dim=-1)


def check_position(entry: dict, chosen: int, reference: torch.Tensor, k: int) -> None:
    """One position's dict: the chosen token's logprob and rank, then the top k in order, as the reference."""
    ids = list(entry)
    assert ids[0] == chosen
    assert entry[chosen].logprob == pytest.approx(float(reference[chosen]), abs=ATOL)
    assert entry[chosen].rank == int((reference > reference[chosen]).sum()) + 1
    top = [(t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= k]
    assert [lp.rank for _, lp in sorted(top, key=lambda x: x[1].rank)] == list(range(1, k + 1))
    ref_values, ref_ids = reference.topk(k)
    by_rank = sorted(top, key=lambda x: x[1].rank)
    assert [lp.logprob for _, lp in by_rank] == pytest.approx(ref_values.tolist(), abs=ATOL)
    values = [lp.logprob for _, lp in by_rank]
    assert values == sorted(values, reverse=True)
    # the ids agree wherever the reference has no near-tie
    for (tok, _), ref_tok, ref_v in zip(by_rank, ref_ids.tolist(), ref_values.tolist()):
        if tok != ref_tok:
            assert float(reference[tok]) == pytest.approx(ref_v, abs=ATOL)
    assert len(entry) in (k, k + 1)


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(3, vocab, (9,), generator=g).tolist()
    # two share a prefix (the prefix cache must not skip the scored positions), one is longer than a step
    return [shared + [11, 12], shared + [13], torch.randint(3, vocab, (37,), generator=g).tolist(), [7]]


@pytest.mark.parametrize("sampling", [dict(temperature=0.0),
                                      dict(temperature=0.7, top_k=20, repetition_penalty=1.3, seed=5)])
def test_logprobs_equal_transformers_log_softmax(llm, hf_model, sampling):
    k, pk = 5, 3
    params = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=k, prompt_logprobs=pk, **sampling)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts(hf_model.config.vocab_size)], params)
    for out in outs:
        assert out.error is None
        sample = out.outputs[0]
        ids = out.prompt_token_ids + sample.token_ids
        # raw model logprobs (before temperature and penalties): equal to the model's own log-softmax
        reference = hf_logprobs(hf_model, ids)
        assert len(sample.logprobs) == len(sample.token_ids)
        n_prompt = len(out.prompt_token_ids)
        for j, (tok, entry) in enumerate(zip(sample.token_ids, sample.logprobs)):
            check_position(entry, tok, reference[n_prompt - 1 + j], k)
        assert sample.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(sample.token_ids, sample.logprobs)))
        assert sample.cumulative_logprob == pytest.approx(
            sum(float(reference[n_prompt - 1 + j, t]) for j, t in enumerate(sample.token_ids)), abs=10 * ATOL)
        assert len(out.prompt_logprobs) == n_prompt and out.prompt_logprobs[0] is None
        for i in range(1, n_prompt):
            check_position(out.prompt_logprobs[i], out.prompt_token_ids[i], reference[i - 1], pk)


def test_logprobs_zero_is_the_chosen_token_only_and_n_samples_each_have_theirs(llm, hf_model):
    params = SamplingParams(max_tokens=5, n=3, temperature=1.0, seed=1, ignore_eos=True, logprobs=0)
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, params)[0]
    for sample in out.outputs:
        reference = hf_logprobs(hf_model, out.prompt_token_ids + sample.token_ids)
        assert [list(e) for e in sample.logprobs] == [[t] for t in sample.token_ids]
        for j, (tok, entry) in enumerate(zip(sample.token_ids, sample.logprobs)):
            assert entry[tok].logprob == pytest.approx(float(reference[2 + j, tok]), abs=ATOL)
    assert out.prompt_logprobs is None


def test_logprobs_survive_preemption(tiny_model_dir, hf_model):
    # a cache of 6 blocks of 4 tokens for 4 sequences that each grow to 17 tokens: preemption by recompute
    small = LLM(str(tiny_model_dir), device="cpu", dtype="float32", block_size=4, num_blocks=8, max_num_seqs=4)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    reqs = [GenerationRequest(str(i), prompt_token_ids=[3 + i, 9, 10, 11, 12], params=params) for i in range(4)]
    outs = list(small.generate_stream(reqs))
    assert small.stats()["preemptions"] > 0
    for out in outs:
        sample = out.outputs[0]
        reference = hf_logprobs(hf_model, out.prompt_token_ids + sample.token_ids)
        assert len(sample.logprobs) == len(sample.token_ids) == 12
        for j, (tok, entry) in enumerate(zip(sample.token_ids, sample.logprobs)):
            check_position(entry, tok, reference[4 + j], 2)
        assert len(out.prompt_logprobs) == 5
        for i in range(1, 5):
            check_position(out.prompt_logprobs[i], out.prompt_token_ids[i], reference[i - 1], 1)


def test_no_logprob_work_when_not_asked(llm, monkeypatch):
    """Off costs nothing: no log-softmax, no top-k, and no field filled."""
    def refuse(*args, **kwargs):
        raise AssertionError("logprobs computed although no request asked")

    monkeypatch.setattr(llm_engine, "position_logprobs", refuse)
    monkeypatch.setattr(torch.Tensor, "log_softmax", refuse)
    out = llm.generate({"prompt_token_ids": [5, 6, 7, 8]}, SamplingParams(max_tokens=4, temperature=0.8, seed=2))[0]
    assert out.error is None and len(out.token_ids) > 0
    assert out.outputs[0].logprobs is None and out.outputs[0].cumulative_logprob is None
    assert out.prompt_logprobs is None


def test_logprobs_name_their_tokens(llm):
    out = llm.generate("Batch generation", SamplingParams(max_tokens=3, temperature=0, logprobs=2, prompt_logprobs=1))[0]
    tokenizer = llm.get_tokenizer()
    for entry in [*out.outputs[0].logprobs, *out.prompt_logprobs[1:]]:
        for tok, lp in entry.items():
            assert isinstance(lp, Logprob)
            assert lp.decoded_token == tokenizer.decode([tok], skip_special_tokens=False)
            assert math.isfinite(lp.logprob) and lp.logprob <= 0


def test_logprobs_options_are_checked():
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=-1)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=True)


def test_more_logprobs_than_the_engine_allows_fails_the_request(llm):
    out = llm.generate({"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=2, logprobs=21))[0]
    assert out.error is not None and "max_logprobs" in out.error


def test_prompt_scoring_requests_sharing_a_prefix_are_admitted_together(tiny_model_dir):
    """A request scoring its prompt computes it whole, so it never waits for another's prefix block."""
    llm = LLM(str(tiny_model_dir), device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=512)
    shared = list(range(5, 21))
    params = SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=1)
    for i in range(4):
        assert llm.add_request(GenerationRequest(str(i), prompt_token_ids=[*shared, 30 + i], params=params)) is None
    llm.step()
    assert len(llm.scheduler.waiting) == 0 and len(llm.scheduler.running) == 4
