"""The vectorised sampler and logits processing, on hand-made logits."""

from __future__ import annotations

import pytest
import torch

from forge_batch.engine.sampler import (
    LogitsProcessor,
    SamplingBatch,
    argmax_rows,
    default_sampler,
    filter_logits,
    fixed_order_cumsum,
    row_cumsum,
    uniform_for,
)
from forge_batch.engine.sampling_params import SamplingParams


def batch(params, outputs=None, prompts=None, uniforms=None, eos=frozenset({0})):
    n = len(params)
    return SamplingBatch(
        params=params,
        output_token_ids=outputs or [[] for _ in range(n)],
        prompt_token_ids=prompts or [[] for _ in range(n)],
        uniforms=uniforms if uniforms is not None else torch.full((n,), 0.5, dtype=torch.float64),
        eos_token_ids=eos,
    )


def test_greedy_rows_take_argmax_and_others_sample():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=1),
              SamplingParams(temperature=0.7, top_p=1e-6), SamplingParams(temperature=1.0, min_p=1.0)]
    out = default_sampler(logits.clone(), batch(params))
    assert out.tolist() == logits.argmax(-1).tolist()


def test_top_k_keeps_exactly_k_per_row():
    logits = torch.arange(20, dtype=torch.float32).repeat(2, 1)
    filtered = filter_logits(logits.clone(), [SamplingParams(top_k=3), SamplingParams(top_k=5)])
    assert torch.isfinite(filtered[0]).sum() == 3 and torch.isfinite(filtered[1]).sum() == 5
    assert torch.isfinite(filtered[0, -3:]).all()


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    f = filter_logits(probs.log(), [SamplingParams(top_p=0.8)])
    assert torch.isfinite(f).tolist() == [[True, True, False, False]]
    f = filter_logits(probs.log(), [SamplingParams(top_p=0.81)])
    assert torch.isfinite(f).tolist() == [[True, True, True, False]]


def test_min_p_drops_tokens_below_fraction_of_max():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    f = filter_logits(probs.log(), [SamplingParams(min_p=0.5)])  # threshold 0.25
    assert torch.isfinite(f).tolist() == [[True, True, False, False]]


def test_temperature_sampling_matches_the_distribution():
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    expected = torch.softmax(logits / 0.8, -1)
    n = 4000
    us = torch.tensor([uniform_for(1234, pos) for pos in range(n)], dtype=torch.float64)
    params = [SamplingParams(temperature=0.8)] * n
    out = default_sampler(logits.repeat(n, 1), batch(params, uniforms=us))
    freq = torch.bincount(out, minlength=4).float() / n
    assert torch.allclose(freq, expected, atol=0.03), (freq, expected)


def test_same_seed_same_token_whatever_the_batch():
    torch.manual_seed(1)
    row = torch.randn(1, 100)
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    u = uniform_for(7, 42)
    alone = default_sampler(row.clone(), batch([p], uniforms=torch.tensor([u], dtype=torch.float64)))
    others = torch.randn(5, 100)
    mixed_logits = torch.cat([others[:3], row, others[3:]])
    params = [SamplingParams(temperature=1.3, top_k=5)] * 3 + [p] + [SamplingParams(temperature=0.0)] * 2
    us = torch.tensor([0.1, 0.9, 0.3, u, 0.5, 0.2], dtype=torch.float64)
    mixed = default_sampler(mixed_logits, batch(params, uniforms=us))
    assert mixed[3].item() == alone[0].item()


def test_uniforms_are_in_range_and_differ_by_seed_and_position():
    vals = {uniform_for(s, p) for s in range(20) for p in range(50)}
    assert len(vals) == 1000 and all(0.0 < v < 1.0 for v in vals)


def test_repetition_presence_frequency_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0, 1.0, 0.5]])
    params = [SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)]
    out = LogitsProcessor(frozenset())(logits.clone(), batch(params, outputs=[[2, 2, 3]], prompts=[[0, 1]]))
    # repetition: seen tokens 0,1 (prompt) and 2,3 (output): positive / 2, negative * 2
    # then output counts: token 2 twice, token 3 once -> minus 0.25*count + 0.5
    expected = torch.tensor([[1.0, -4.0, 0.5 - 0.5 - 0.5, 0.5 - 0.25 - 0.5, 0.5]])
    assert torch.allclose(out, expected)


def test_logit_bias_and_min_tokens():
    logits = torch.zeros(2, 6)
    params = [SamplingParams(logit_bias={3: 5.0, 4: -1.0}), SamplingParams(min_tokens=3, stop_token_ids=[5])]
    out = LogitsProcessor(frozenset({0}))(logits, batch(params, outputs=[[], [1, 1]]))
    assert out[0].tolist() == [0, 0, 0, 5, -1, 0]
    assert out[1, 0] == float("-inf") and out[1, 5] == float("-inf") and out[1, 1] == 0


def test_ignore_eos_min_tokens_does_not_ban_eos():
    out = LogitsProcessor(frozenset({0}))(
        torch.zeros(1, 3), batch([SamplingParams(min_tokens=2, ignore_eos=True)], outputs=[[]])
    )
    assert torch.isfinite(out).all()


def test_logits_processor_plugins_run_per_row():
    def ban_one(tokens, row):
        row[1] = float("-inf")
        return row

    out = LogitsProcessor(frozenset())(
        torch.zeros(2, 3), batch([SamplingParams(logits_processors=[ban_one]), SamplingParams()])
    )
    assert out[0, 1] == float("-inf") and out[1, 1] == 0


@pytest.mark.parametrize("vocab", [49152, 32000, 2048, 1500, 1024, 7])
def test_argmax_rows_is_torch_argmax_including_ties_nan_and_inf(vocab):
    """The chunked argmax the samplers use: same index as torch's argmax, i.e. the first maximal one,
    with NaN counting as the maximum, for vocabularies with and without a partial last chunk."""
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(9, vocab, generator=g)
    x[0] = float("-inf")  # every token banned
    x[1, 3000 % vocab] = float("nan")
    x[1, vocab - 1] = float("nan")
    x[2] = 0.0  # all tied: index 0
    x[3, vocab - 1] = x[3].max() + 1  # the maximum in the last (possibly partial) chunk
    x[4, 0] = x[4, -1] = float("inf")
    x[5] = torch.randint(0, 3, (vocab,), generator=g).float()  # ties across chunks
    x[6, vocab // 2] = x[6, vocab - 1] = x[6].max() + 2  # a tie between a full chunk and the tail
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))


def test_a_raising_logits_processor_is_reported_for_its_row_only():
    def boom(tokens, row):
        row[0] = float("nan")  # half-done work must not reach the sampler either
        raise ValueError("bad state")

    def ban_one(tokens, row):
        row[1] = float("-inf")
        return row

    b = batch([SamplingParams(), SamplingParams(logits_processors=[boom, ban_one]), SamplingParams(logits_processors=[ban_one])])
    logits = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    expected_first = logits[0].clone()
    out = LogitsProcessor(frozenset())(logits, b)
    assert list(b.row_errors) == [1] and "ValueError: bad state" in b.row_errors[1] and "boom" in b.row_errors[1]
    assert torch.equal(out[0], expected_first) and out[2, 1] == float("-inf")
    assert torch.isfinite(out[1]).all()


@pytest.mark.parametrize("width", [1, 7, 256, 257, 1000, 49152])
def test_fixed_order_cumsum_is_a_cumsum_with_one_order_per_row(width):
    """The CUDA sampler's cumulative sum (here on the CPU: the same arithmetic, in the same order): within
    float32 rounding of the exact sums, and a row's bits the same at every row count and position."""
    g = torch.Generator().manual_seed(width)
    probs = torch.rand(40, width, generator=g).pow(8).softmax(dim=-1)
    full = fixed_order_cumsum(probs)
    exact = probs.double().cumsum(dim=-1)
    assert full.dtype == probs.dtype and full.shape == probs.shape
    torch.testing.assert_close(full.double(), exact, rtol=0, atol=4 * width**0.5 * 2.0**-24)
    for m in (1, 2, 3, 17, 40):
        assert torch.equal(fixed_order_cumsum(probs[:m]), full[:m]), f"{m} rows"
    perm = torch.randperm(40, generator=g)
    assert torch.equal(fixed_order_cumsum(probs[perm]), full[perm])
    assert torch.equal(row_cumsum(probs), probs.cumsum(dim=-1))  # the CPU keeps torch's own (sequential)
