"""The compiled CPU decode-attention kernel against the torch reference."""

from __future__ import annotations

import pytest
import torch

from forge_batch.kernels import cpu_ops, reference

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason="no C compiler for the CPU kernels")

# Tolerances per dtype: float32 differs by summation order only; bfloat16 by one rounding of the output.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,block_size",
    [(9, 3, 64, 16), (8, 8, 64, 16), (8, 2, 128, 32), (4, 1, 128, 16), (12, 4, 64, 32)],
)
def test_decode_attention_matches_reference(dtype, num_heads, num_kv_heads, head_dim, block_size):
    g = torch.Generator().manual_seed(num_heads * 100 + head_dim + block_size)
    num_blocks, batch = 40, 6
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    context_lens = torch.tensor([1, block_size, block_size + 1, 3 * block_size - 1, 77, 5])
    max_blocks = int((context_lens.max() + block_size - 1) // block_size)
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:max_blocks] for _ in range(batch)])
    q = torch.randn(batch, num_heads, head_dim, generator=g).to(dtype)
    scale = head_dim**-0.5
    expected = reference._decode_attention(q, k_cache, v_cache, tables, context_lens, scale, None)
    got = cpu_ops.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale)
    assert got.dtype == dtype and got.shape == expected.shape
    torch.testing.assert_close(got.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_padding_entries_of_block_tables_are_never_read():
    """Positions past a sequence's context must not influence it, whatever the padded table holds."""
    k = torch.randn(8, 16, 2, 64)
    v = torch.randn(8, 16, 2, 64)
    q = torch.randn(1, 4, 64)
    tables = torch.tensor([[3, 5, 0, 0]])
    ctx = torch.tensor([20])
    a = cpu_ops.paged_decode_attention(q, k, v, tables, ctx, 0.125)
    k[0] = float("nan")
    v[5, 4:] = float("nan")  # slots past position 19 in the second block
    b = cpu_ops.paged_decode_attention(q, k, v, tables, ctx, 0.125)
    assert torch.equal(a, b)
