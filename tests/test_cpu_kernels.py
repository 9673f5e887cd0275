"""The compiled CPU decode-attention kernel against the torch reference."""

from __future__ import annotations

import pytest
import torch

from forge_batch.kernels import KernelBackend, reference
from forge_batch.kernels.cpu import attention, build, elementwise

pytestmark = pytest.mark.skipif(not build.available(), reason="no C compiler for the CPU kernels")

# Tolerances per dtype: float32 differs by summation order only; bfloat16 by one rounding of the output.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,block_size",
    [(9, 3, 64, 16), (8, 8, 64, 16), (8, 2, 128, 32), (4, 1, 128, 16), (12, 4, 64, 32), (8, 4, 64, 8)],
)
@pytest.mark.parametrize("batch", [6, 20])  # 20: one work item per sequence (ITEM_PER_SEQ_MIN), not per KV head
def test_decode_attention_matches_reference(dtype, num_heads, num_kv_heads, head_dim, block_size, batch):
    g = torch.Generator().manual_seed(num_heads * 100 + head_dim + block_size)
    num_blocks = 40
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    lens = [1, block_size, block_size + 1, 3 * block_size - 1, 77, 5]
    context_lens = torch.tensor(lens + [int(x) for x in torch.randint(1, 90, (batch - len(lens),), generator=g)])
    max_blocks = int((context_lens.max() + block_size - 1) // block_size)
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:max_blocks] for _ in range(batch)])
    q = torch.randn(batch, num_heads, head_dim, generator=g).to(dtype)
    scale = head_dim**-0.5
    expected = reference._decode_attention(q, k_cache, v_cache, tables, context_lens, scale, None)
    got = attention.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale)
    assert got.dtype == dtype and got.shape == expected.shape
    torch.testing.assert_close(got.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (9, 3)])
@pytest.mark.parametrize("context", [20, 21])  # the last block's positions even or odd (a V pair half past it)
def test_padding_entries_of_block_tables_are_never_read(dtype, num_heads, num_kv_heads, context):
    """Positions past a sequence's context must not influence it, whatever the padded table holds."""
    k = torch.randn(8, 16, num_kv_heads, 64).to(dtype)
    v = torch.randn(8, 16, num_kv_heads, 64).to(dtype)
    q = torch.randn(1, num_heads, 64).to(dtype)
    tables = torch.tensor([[3, 5, 0, 0]])
    ctx = torch.tensor([context])
    a = attention.paged_decode_attention(q, k, v, tables, ctx, 0.125)
    k[0] = float("nan")
    k[5, context - 16:] = float("nan")  # slots past the context in the second block
    v[5, context - 16:] = float("nan")
    b = attention.paged_decode_attention(q, k, v, tables, ctx, 0.125)
    assert torch.equal(a, b)


def _shared_prefix_case(dtype, block_size=16, batch=12, shared=5, num_heads=9, num_kv_heads=3, head_dim=64):
    g = torch.Generator().manual_seed(7)
    num_blocks = shared + batch * 4 + 2
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    prefix = torch.randperm(num_blocks, generator=g)[:shared]
    rest = [i for i in range(num_blocks) if i not in set(prefix.tolist())]
    # own tail lengths 0 (context ends exactly at the shared prefix) up to 3 blocks and a bit
    tails = [0, 1, block_size - 1, block_size, 3 * block_size + 5] + [int(x) for x in torch.randint(1, 40, (batch - 5,), generator=g)]
    context_lens = torch.tensor([shared * block_size + t for t in tails])
    max_blocks = int((context_lens.max() + block_size - 1) // block_size)
    tables = torch.zeros(batch, max_blocks, dtype=torch.int64)
    for i in range(batch):
        own = rest[i * 4 : i * 4 + 4]
        tables[i, :shared] = prefix
        tables[i, shared:] = torch.tensor(own[: max_blocks - shared])
    q = torch.randn(batch, num_heads, head_dim, generator=g).to(dtype)
    return q, k_cache, v_cache, tables, context_lens


def test_shared_prefix_blocks_counts_full_common_leading_blocks():
    q, k, v, tables, ctx = _shared_prefix_case(torch.float32)
    assert attention.shared_prefix_blocks(tables, ctx, 16) == 5
    other = tables.clone()
    other[3, 2] = other[3, 2] + 1  # one sequence differs in the third block: only two are shared
    assert attention.shared_prefix_blocks(other, ctx, 16) == 2
    short = ctx.clone()
    short[0] = 4 * 16 + 3  # a sequence that ends inside the fifth block: that block is not full for it
    assert attention.shared_prefix_blocks(tables.clone(), short, 16) == 4
    assert attention.shared_prefix_blocks(tables[:1].clone(), ctx[:1].clone(), 16) == 0  # one sequence: nothing shared


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(9, 3, 64), (8, 2, 128)])
@pytest.mark.parametrize("batch", [12, 20])  # work items per KV head / per sequence
def test_shared_prefix_cascade_matches_reference(monkeypatch, dtype, num_heads, num_kv_heads, head_dim, batch):
    """The shared prefix attended as one dense product, the rest by the kernel: same result as attending
    each sequence on its own (the torch reference), including sequences with nothing past the prefix."""
    monkeypatch.setattr(attention, "CASCADE_MIN_WORK", 1)
    q, k, v, tables, ctx = _shared_prefix_case(
        dtype, batch=batch, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim
    )
    scale = head_dim**-0.5
    expected = reference._decode_attention(q, k, v, tables, ctx, scale, None)
    got = attention.paged_decode_attention(q, k, v, tables, ctx, scale)
    plain = attention.paged_decode_attention(q, k, v, tables, ctx, scale, cascade=False)
    torch.testing.assert_close(got.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(plain.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])
    if dtype == torch.float32:
        assert not torch.equal(got, plain)  # the cascade path really ran (a different summation order)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(9, 3), (18, 3), (8, 2)])
def test_sequences_visited_in_tiles_over_a_shared_prefix_keep_their_bits_alone(dtype, block_size, num_heads,
                                                                                num_kv_heads):
    """Where a whole batch shares its leading blocks, the kernel visits them block by block across tiles of
    sequences (each read once a tile; bfloat16 with AVX512-BF16 and 3 or 6 query heads a KV head: the
    tile-wide visit): every sequence's output has the bits it has alone, and sequences whose context ends at
    the prefix or inside it are among them."""
    batch, shared = 80, 6
    q, k, v, tables, ctx = _shared_prefix_case(dtype, block_size=block_size, batch=batch, shared=shared,
                                               num_heads=num_heads, num_kv_heads=num_kv_heads)
    ctx[5] = shared * block_size - 3  # ends inside the last shared block: the tile shares one block fewer
    scale = 64**-0.5
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # tiles of batch / 16 sequences
    try:
        together = attention.paged_decode_attention(q, k, v, tables, ctx, scale, cascade=False)
        for i in range(batch):
            alone = attention.paged_decode_attention(q[i:i + 1], k, v, tables[i:i + 1], ctx[i:i + 1], scale,
                                                     cascade=False)
            assert torch.equal(together[i], alone[0]), i
    finally:
        torch.set_num_threads(threads)
    expected = reference._decode_attention(q, k, v, tables, ctx, scale, None)
    torch.testing.assert_close(together.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_with_scores_far_apart_keeps_its_bits_and_the_reference(dtype):
    """Queries large enough that a block's scores span more than exp's float range (weights below e^-87.3,
    which the softmax's exp flushes to 0 by its clamps): the same bits in a tile as alone, close to attention
    computed in float64."""
    batch = 48
    q, k, v, tables, ctx = _shared_prefix_case(dtype, batch=batch, shared=4)
    q = (q.float() * 25).to(dtype)
    scale = 64**-0.5
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        together = attention.paged_decode_attention(q, k, v, tables, ctx, scale, cascade=False)
        for i in range(0, batch, 7):
            alone = attention.paged_decode_attention(q[i:i + 1], k, v, tables[i:i + 1], ctx[i:i + 1], scale,
                                                     cascade=False)
            assert torch.equal(together[i], alone[0]), i
    finally:
        torch.set_num_threads(threads)
    scores = torch.einsum("bhd,nskd->bhnsk", q.float()[:, :3], k.float()[:, :, :1]) * scale
    assert (scores.amax() - scores.amin()) > 2 * 87.3  # past the clamps
    # in float64: the reference in bfloat16 rounds scores of ~100 by ~0.5, which moves such peaked weights
    expected = reference._decode_attention(q.double(), k.double(), v.double(), tables, ctx, scale, None)
    tol = 1e-4 if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(together.double(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("rows,hidden", [(1, 64), (7, 576), (130, 96)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(rows, hidden, with_residual):
    g = torch.Generator().manual_seed(rows + hidden)
    x = torch.randn(rows, hidden, generator=g) * 3
    w = torch.randn(hidden, generator=g)
    res = torch.randn(rows, hidden, generator=g) if with_residual else None
    out, res_out = elementwise.rms_norm(x, w, 1e-5, res)
    exp_out, exp_res = reference.rms_norm(x, w, 1e-5, res)
    torch.testing.assert_close(out, exp_out, atol=1e-6, rtol=1e-5)
    assert torch.equal(res_out, exp_res)  # the residual stream is a plain add: exact


def _bf16_agrees(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Every value within one bfloat16 rounding step of the reference's, nearly all identical."""
    assert got.dtype == expected.dtype == torch.bfloat16 and got.shape == expected.shape
    torch.testing.assert_close(got.float(), expected.float(), atol=1e-6, rtol=2**-7)
    assert (got == expected).float().mean() >= 0.99


@pytest.mark.parametrize("rows,hidden", [(1, 64), (7, 576), (130, 96)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_bfloat16_rounds_where_the_reference_does(rows, hidden, with_residual):
    g = torch.Generator().manual_seed(rows + hidden)
    x = (torch.randn(rows, hidden, generator=g) * 3).bfloat16()
    w = torch.randn(hidden, generator=g).bfloat16()
    res = torch.randn(rows, hidden, generator=g).bfloat16() if with_residual else None
    out, res_out = elementwise.rms_norm(x, w, 1e-5, res)
    exp_out, exp_res = reference.rms_norm(x, w, 1e-5, res)
    _bf16_agrees(out, exp_out)
    assert torch.equal(res_out, exp_res)  # one add, rounded once: exact


@pytest.mark.parametrize("rows,inter", [(1, 64), (9, 1536), (128, 40)])
def test_silu_and_mul_matches_reference(rows, inter):
    x = torch.randn(rows, 2 * inter, generator=torch.Generator().manual_seed(inter)) * 4
    torch.testing.assert_close(elementwise.silu_and_mul(x), reference.silu_and_mul(x), atol=1e-6, rtol=1e-5)
    _bf16_agrees(elementwise.silu_and_mul(x.bfloat16()), reference.silu_and_mul(x.bfloat16()))


def test_silu_and_mul_exp_holds_over_the_whole_float_range():
    """The kernel's own vectorised exp: gate values far past where e^-gate over- or underflows give
    silu's limits (0 and gate), never inf or NaN, and float precision in between."""
    gate = torch.cat([torch.linspace(-200, 200, 40001), torch.tensor([-1e30, -89.0, -87.5, 87.5, 89.0, 1e30])])
    x = torch.cat([gate, torch.full_like(gate, 1.5)])[None]
    got, expected = elementwise.silu_and_mul(x), reference.silu_and_mul(x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=1e-30, rtol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_vector_and_scalar_paths_give_the_same_bits(dtype):
    """A row of one column runs the kernel's scalar loop; a long row its vector loop (8-lane intrinsics on AVX2
    CPUs without AVX-512, GCC's vectorisation elsewhere). Each element must come out the same either way, so a
    value's bits do not depend on where the row's width puts it; in bfloat16 that includes both roundings (ties
    to even, NaN kept)."""
    g = torch.Generator().manual_seed(5)
    gate = torch.cat([torch.randn(4093, generator=g) * 6, torch.linspace(-120, 120, 997),
                      torch.tensor([-1e30, -89.0, -87.3, -0.0, 0.0, 1e-40, 87.3, 89.0, 1e30, float("inf"), -float("inf"),
                                    float("nan")])]).to(dtype)
    up = torch.randn(gate.numel(), generator=g).to(dtype)
    wide = elementwise.silu_and_mul(torch.cat([gate, up])[None])[0]
    narrow = elementwise.silu_and_mul(torch.stack([gate, up], dim=1))[:, 0]
    bits = torch.int32 if dtype == torch.float32 else torch.int16  # -inf gives NaN (-inf / inf): the same NaN both ways
    assert torch.equal(wide.view(bits), narrow.contiguous().view(bits))


def test_dispatch_takes_the_compiled_elementwise_kernels_for_cpu_float32_and_bfloat16(monkeypatch):
    backend = KernelBackend("auto")
    calls = []
    monkeypatch.setattr(elementwise, "silu_and_mul", lambda x: calls.append("silu") or reference.silu_and_mul(x))
    backend.silu_and_mul(torch.randn(4, 8))
    backend.silu_and_mul(torch.randn(4, 8, dtype=torch.bfloat16))
    backend.silu_and_mul(torch.randn(4, 8, dtype=torch.float16))  # float16: the reference
    backend.silu_and_mul(torch.randn(8, 4).t())  # not contiguous: the reference
    assert calls == ["silu", "silu"]
    norms = []
    monkeypatch.setattr(elementwise, "rms_norm", lambda *a: norms.append(a[0].dtype) or reference.rms_norm(*a))
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    backend.rms_norm(x, torch.ones(8, dtype=torch.bfloat16), 1e-6, x)
    backend.rms_norm(x, torch.ones(8), 1e-6)  # the weight in another dtype: the reference
    assert norms == [torch.bfloat16]


def _prefill_case(dtype, q_lens, ctx_lens, shared_blocks, num_heads=9, num_kv_heads=3, head_dim=64, block_size=16):
    """A prefill step: sequence i has ctx_lens[i] tokens cached or new, its last q_lens[i] are the queries;
    its first ``shared_blocks`` blocks are one set of physical blocks common to all, the rest its own."""
    g = torch.Generator().manual_seed(sum(q_lens) + sum(ctx_lens))
    width = max((n + block_size - 1) // block_size for n in ctx_lens)
    num_blocks = shared_blocks + len(ctx_lens) * width + 2
    k = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    own = iter(torch.randperm(num_blocks - shared_blocks, generator=g).add(shared_blocks).tolist())
    tables = torch.tensor([list(range(shared_blocks)) + [next(own) for _ in range(width - shared_blocks)]
                           for _ in ctx_lens])
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=g).to(dtype)
    loc = torch.tensor([0] + q_lens).cumsum(0)
    return q, k, v, tables, loc, torch.tensor(ctx_lens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("q_lens", "ctx_lens", "shared"),
    [
        ([5, 1, 30, 12], [85, 81, 120, 92], 5),  # prompts behind a cached 80-token prefix
        ([16, 40], [64 + 16, 64 + 40], 4),  # the queries start exactly at the prefix's end
        ([3, 9, 2], [150, 100, 70], 3),  # chunked prefill: context beyond the prefix cached too
    ],
)
def test_prefill_cascade_over_a_shared_prefix_matches_reference(monkeypatch, dtype, q_lens, ctx_lens, shared):
    monkeypatch.setattr(attention, "CASCADE_MIN_WORK", 1)
    q, k, v, tables, loc, ctx = _prefill_case(dtype, q_lens, ctx_lens, shared)
    expected = reference._prefill_attention(q, k, v, tables, loc, ctx, 0.125, None, None)
    calls = []
    real = attention._shared_prefix_product
    monkeypatch.setattr(attention, "_shared_prefix_product", lambda *a: calls.append(a[3].numel() * 16) or real(*a))
    got = attention.paged_prefill_attention(q, k, v, tables, loc, ctx, 0.125)
    assert calls == [shared * 16]  # the prefix was attended once, as one dense product
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_prefill_cascade_needs_a_prefix_before_every_query(monkeypatch):
    monkeypatch.setattr(attention, "CASCADE_MIN_WORK", 1)
    calls = []
    monkeypatch.setattr(attention, "_shared_prefix_product", lambda *a: calls.append(1))
    # the second sequence's queries start inside the first common block: no cascade, the reference's answer
    q, k, v, tables, loc, ctx = _prefill_case(torch.float32, [5, 40], [85, 50], 5)
    expected = reference._prefill_attention(q, k, v, tables, loc, ctx, 0.125, None, None)
    assert torch.equal(attention.paged_prefill_attention(q, k, v, tables, loc, ctx, 0.125), expected)
    q, k, v, tables, loc, ctx = _prefill_case(torch.float32, [5], [85], 5)  # one sequence: nothing shared
    assert torch.equal(attention.paged_prefill_attention(q, k, v, tables, loc, ctx, 0.125),
                       reference._prefill_attention(q, k, v, tables, loc, ctx, 0.125, None, None))
    assert calls == []
