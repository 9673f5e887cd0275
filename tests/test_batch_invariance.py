"""Batch invariance: a row's numbers do not depend on how many rows share its step, nor on their order.

Op level: the matmul forms the CPU backend uses in batch-invariant mode give row i the same bits at every
row count and row position. Engine level: greedy token ids of each prompt are the same alone, all
together, in batches of 3, and with a small or large ``max_num_seqs``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import make_tiny_model

from forge_batch.engine.llm import LLM
from forge_batch.engine.sampling_params import SamplingParams
from forge_batch.kernels import Linear
from forge_batch.kernels.cpu import mkl_packed, onednn_packed
from forge_batch.kernels.cpu.linear import MklPackedLinear, OneDnnLinear, PaddedLinear

ROW_COUNTS = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64]
# (out, in): the tiny test model's matmuls, and the default model's (SmolLM2-135M: hidden 576,
# intermediate 1536; its LM head's 49152 rows are cut to 4096 to keep the test quick).
SHAPES = [(128, 64), (64, 64), (256, 64), (64, 128), (960, 576), (576, 576), (3072, 576), (576, 1536), (4096, 576)]


def _forms(dtype: torch.dtype) -> list[tuple[str, type | None]]:
    if dtype == torch.float32:
        forms: list[tuple[str, type | None]] = [("padded F.linear", PaddedLinear)]
        if mkl_packed.available():
            forms.append(("MKL packed", MklPackedLinear))
        return forms
    forms = [("F.linear", None)]  # a bfloat16 model without oneDNN's packed form keeps plain F.linear
    if onednn_packed.available():
        forms.append(("oneDNN packed", OneDnnLinear))
    return forms


def _product(form: type | None, weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
    base = Linear(weight, bias)
    if form is None:
        return base
    if form is MklPackedLinear:
        return MklPackedLinear(base, batch_invariant=True)
    return form(base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{o}x{i}" for o, i in SHAPES])
def test_matmul_row_bits_do_not_depend_on_the_row_count_or_order(dtype, shape):
    out_features, in_features = shape
    g = torch.Generator().manual_seed(out_features * 7 + in_features)
    weight = (torch.randn(out_features, in_features, generator=g) / in_features**0.5).to(dtype)
    bias = torch.randn(out_features, generator=g).to(dtype) if out_features == 128 else None
    x = torch.randn(max(ROW_COUNTS), in_features, generator=g).to(dtype)
    for name, form in _forms(dtype):
        linear = _product(form, weight, bias)
        full = linear(x)
        assert torch.allclose(full.float(), F.linear(x, weight, bias).float(), rtol=2e-2, atol=2e-2), name
        for m in ROW_COUNTS:
            assert torch.equal(linear(x[:m]), full[:m]), f"{name}: {m} rows"
        perm = torch.randperm(x.shape[0], generator=g)
        assert torch.equal(linear(x[perm]), full[perm]), f"{name}: shuffled rows"
        for i in (0, 5, 40):  # one row alone, and the same row among others at another position
            assert torch.equal(linear(x[i:i + 1]), full[i:i + 1]), f"{name}: row {i} alone"


@pytest.fixture(scope="module")
def flat_model_dir(tmp_path_factory):
    """A tiny model with small weights: flat next-token distributions, so that a last-bit difference in a
    row's logits soon changes a greedy token (peaked distributions would hide it)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-flat"), "llama", init_std=0.02, seed=3)


PROMPTS = [
    "The quick brown fox", "Paged attention stores", "def add(a, b):", "Numbers: 1 2 3", "hello world",
    "A long time ago in a galaxy", "import torch", "Once upon a time", "SELECT * FROM t", "x = [1, 2",
    "The weather today", "Attention is all",
]


def _greedy(llm: LLM, prompts: list[str]) -> list[list[int]]:
    p = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    return [list(o.token_ids) for o in llm.generate(prompts, p)]


# bfloat16 is not here yet: its matmuls are invariant (above), but a row's attention still reduces in an
# order that depends on its step's other rows, and on this model one prompt of twelve changes a token.
@pytest.mark.parametrize("dtype", ["float32"])
def test_greedy_tokens_do_not_depend_on_the_batch(flat_model_dir, dtype):
    def engine(max_num_seqs: int) -> LLM:
        return LLM(str(flat_model_dir), device="cpu", dtype=dtype, max_num_seqs=max_num_seqs,
                   enable_prefix_caching=False)

    wide = engine(64)
    assert wide.engine_info["batch_invariant"] is True and wide.stored_weights == 0
    together = _greedy(wide, PROMPTS)
    assert len({tuple(t) for t in together}) > 1  # the prompts lead to different continuations
    alone = [_greedy(wide, [p])[0] for p in PROMPTS]
    assert alone == together
    threes = [t for i in range(0, len(PROMPTS), 3) for t in _greedy(wide, PROMPTS[i:i + 3])]
    assert threes == together
    assert _greedy(engine(4), PROMPTS) == together
