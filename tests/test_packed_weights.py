"""Packed matmul weights on the CPU (MKL's for float32, oneDNN's for bfloat16): F.linear's numbers at any
row count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from forge_batch.engine import cpu_backend
from forge_batch.engine.llm import LLM
from forge_batch.engine.sampling_params import SamplingParams
from forge_batch.kernels import Linear
from forge_batch.kernels.cpu import mkl_packed, onednn_packed
from forge_batch.kernels.cpu.linear import PACKED_MIN_ROWS, MklPackedLinear, OneDnnLinear
from forge_batch.kernels.linear import FreedWeight
from forge_batch.models.llama import MATMUL_SOURCES

pytestmark = pytest.mark.skipif(not mkl_packed.available(), reason="torch built without MKL")


@pytest.mark.parametrize("rows", [1, PACKED_MIN_ROWS - 1, PACKED_MIN_ROWS, 97, 128, 130, 700])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_is_bit_identical(rows, with_bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 64, generator=g)
    b = torch.randn(96, generator=g) if with_bias else None
    packed = MklPackedLinear(Linear(w, b))
    x = torch.randn(rows, 64, generator=g)
    assert torch.equal(packed(x), F.linear(x, w, b))


@pytest.mark.parametrize("rows", [1, 3, 16, 37, 100, 128, 129, 300])
def test_one_packing_serves_every_row_count(rows):
    """One pack of the default model's widest shapes computes any row count (torch's own packed op only
    the count it was packed for): F.linear's numbers up to float rounding, the output a fresh tensor."""
    g = torch.Generator().manual_seed(rows)
    for n, k in ((3072, 576), (576, 1536)):
        w = torch.randn(n, k, generator=g) * 0.05
        packed = mkl_packed.pack(w)
        assert (packed.n, packed.k) == (n, k)
        x = torch.randn(2 * rows, k, generator=g)[::2]  # not contiguous: linear copies it
        y = mkl_packed.linear(x, packed)
        assert y.shape == (rows, n) and y.is_contiguous()
        torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert mkl_packed.linear(torch.empty(0, k), packed).shape == (0, n)


onednn = pytest.mark.skipif(not onednn_packed.available(torch.bfloat16),
                            reason="no oneDNN bfloat16 weight reordering in this torch or on this CPU")


@onednn
@pytest.mark.parametrize("rows", [1, 3, 16, 37, 128, 129, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_onednn_reordered_bfloat16_weight_gives_f_linear_bit_for_bit(rows, with_bias):
    """One reorder serves every row count, with F.linear's exact numbers (the same oneDNN kernel, minus
    the per-call reorder of the weight)."""
    g = torch.Generator().manual_seed(rows)
    for n, k in ((3072, 576), (576, 1536), (96, 64)):
        w = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
        b = torch.randn(n, generator=g).bfloat16() if with_bias else None
        packed = OneDnnLinear(Linear(w, b))
        assert (packed.packed.n, packed.packed.k) == (n, k)
        x = torch.randn(rows, k, generator=g).bfloat16()
        y = packed(x)
        assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
        assert torch.equal(y, F.linear(x, w, b))


def test_onednn_pack_rejects_what_it_cannot_reorder():  # checked before any oneDNN op: runs on every CPU
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        onednn_packed.pack(torch.randn(8, 16).half())
    with pytest.raises(ValueError, match="2-D"):
        onednn_packed.pack(torch.randn(8))


@pytest.mark.parametrize(
    ("dtype", "weight_type"),
    [("float32", OneDnnLinear if onednn_packed.float32_preferred() else MklPackedLinear),
     pytest.param("bfloat16", OneDnnLinear, marks=onednn)],
)
def test_engine_packs_cpu_weights_and_matches_unpacked(tiny_model_dir, monkeypatch, dtype, weight_type):
    """oneDNN's reordered weights (float32: MKL's packed ones but on AMD CPUs): the same tokens as plain
    F.linear."""
    monkeypatch.setattr(cpu_backend, "release_plain_weight", lambda *args: False)  # plain F.linear needs them
    prompts = [{"prompt_token_ids": ids} for ids in ([1, 5, 9, 2, 7], list(range(3, 40)), [4] * 20)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    llm = LLM(str(tiny_model_dir), device="cpu", dtype=dtype, max_num_seqs=32)
    assert llm.packed_weights and isinstance(llm.model.lm_head, weight_type)
    layer = llm.model.layers[0]
    assert {name for name in MATMUL_SOURCES if isinstance(getattr(layer, name), weight_type)} == set(MATMUL_SOURCES)
    assert {type(getattr(layer, name)) for name in MATMUL_SOURCES} == {weight_type}
    packed = [o.outputs[0].token_ids for o in llm.generate(prompts * 8, params)]  # 24 rows per decode step
    assert all(len(ids) == 12 for ids in packed)
    for owner, name in [(layer, name) for layer in llm.model.layers for name in MATMUL_SOURCES] + [
        (llm.model, "lm_head")
    ]:
        setattr(owner, name, getattr(owner, name).plain())  # F.linear on the same weights
    plain = [o.outputs[0].token_ids for o in llm.generate(prompts * 8, params)]
    assert packed == plain


@pytest.mark.parametrize("batch_invariant", [True, False])
@pytest.mark.parametrize("quantization", [None, "int8"])
def test_engine_frees_the_plain_weights_no_product_reads(tiny_model_dir, monkeypatch, batch_invariant, quantization):
    """A packed (or int8) product computes from its own copy of the weight: the plain one is freed (a
    FreedWeight of its shape and dtype in the model's place and the product's), the same tokens come out, and
    a plain F.linear still given it fails instead of computing. MKL's non-invariant product reads the plain
    weight under PACKED_MIN_ROWS rows, and a tied LM head is the embedding: those stay."""
    prompts = [{"prompt_token_ids": ids} for ids in ([1, 5, 9, 2, 7], list(range(3, 40)), [4] * 20)]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    args = dict(device="cpu", dtype="float32", batch_invariant=batch_invariant, quantization=quantization)
    with monkeypatch.context() as m:
        m.setattr(cpu_backend, "release_plain_weight", lambda *args: False)
        kept = LLM(str(tiny_model_dir), **args)
    expected = [o.outputs[0].token_ids for o in kept.generate(prompts * 3, params)]
    shapes = {name: w.shape for name, w in kept.model.layers[0].matmul_weights().items()}
    del kept
    llm = LLM(str(tiny_model_dir), **args)
    model = llm.model
    for layer in model.layers:
        for name, weight in layer.matmul_weights().items():
            form = getattr(layer, name)
            assert form.weight is weight
            assert isinstance(weight, torch.Tensor) == form.reads_weight, (name, type(form).__name__)
            assert weight.shape == shapes[name] and weight.dtype == torch.float32
    freed = [isinstance(layer.qkv_weight, FreedWeight) for layer in model.layers]
    reads = isinstance(model.layers[0].qkv_proj, MklPackedLinear) and not batch_invariant and quantization is None
    assert all(freed) != reads and any(freed) == all(freed)
    if all(freed):
        assert "qkv_weight" not in dict(model.layers[0].named_parameters())
        with pytest.raises(TypeError):
            Linear(model.layers[0].o_weight)(torch.randn(3, model.config.hidden_size))
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.embed_tokens
    assert [o.outputs[0].token_ids for o in llm.generate(prompts * 3, params)] == expected


@pytest.mark.parametrize("batch_invariant", [True, False])
def test_float32_logits_into_a_buffer_in_pieces_have_the_whole_products_bits(tiny_model_dir, batch_invariant):
    """A float32 step's logits written into the runner's buffer go through the LM head 64-127 rows at a time
    (a whole 256-row result is past glibc's mmap threshold and was page-faulted in each step): the same bits as
    one call on all the rows, for every packed form the engine picks."""
    from forge_batch.models.llama import LOGITS_ROWS_PER_CALL

    llm = LLM(str(tiny_model_dir), device="cpu", dtype="float32", batch_invariant=batch_invariant)
    model = llm.model
    g = torch.Generator().manual_seed(0)
    calls: list[int] = []
    real = type(model.lm_head).__call__
    for rows in (1, LOGITS_ROWS_PER_CALL - 1, 2 * LOGITS_ROWS_PER_CALL + 5, 300):
        hidden = torch.randn(rows, model.config.hidden_size, generator=g) * 3
        out = torch.empty(rows, model.lm_head.weight.shape[0])
        calls.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(type(model.lm_head), "__call__", lambda self, x: calls.append(x.shape[0]) or real(self, x))
            into = model.compute_logits(hidden, out=out)
        assert into.data_ptr() == out.data_ptr() and sum(calls) == rows
        assert all(LOGITS_ROWS_PER_CALL <= n < 2 * LOGITS_ROWS_PER_CALL for n in calls) or calls == [rows]
        assert torch.equal(into, model.lm_head(hidden).float())
