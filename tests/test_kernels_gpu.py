"""The compiled Triton kernels on CUDA against the reference (also on CUDA) and the naive float64 loops.

Same comparisons as ``test_kernels.py`` (whose case builders, naive implementations and tolerance
table this file reuses) with shapes closer to real models: long and ragged prompts, cached prefixes
of thousands of tokens, decode batches, GQA layouts of Llama-3-8B (32/8, D=128) and SmolLM2 (9/3, D=64).
And the batch-invariant kernels' row bits (test_batch_invariance_triton.py's checks, compiled, 1..300 rows).
Skipped without a CUDA device, or when this process's Triton was started in interpreter mode.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from types import ModuleType

import pytest
import torch
from test_batch_invariance_triton import (
    check_attention_invariance,
    check_matmul_invariance,
    check_rms_norm_invariance,
)
from test_kernels import (
    DTYPE_IDS,
    DTYPES,
    AttentionCase,
    assert_close,
    cos_sin_cache,
    make_attention_case,
    naive_paged_attention,
)

from forge_batch.kernels import dispatch, reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
]

DEVICE = "cuda"


@pytest.fixture(scope="module")
def ops() -> ModuleType:
    """forge_batch.kernels.triton_ops, compiled (not interpreted)."""
    if "triton" in sys.modules:
        from triton.language import standard
        from triton.runtime.jit import JITFunction

        if not isinstance(standard.sum, JITFunction):
            pytest.skip("Triton runs in interpreter mode in this process (TRITON_INTERPRET=1)")
    from forge_batch.kernels import triton_ops

    return triton_ops


SCENARIOS: dict[str, tuple[list[int], list[int]]] = {
    "prefill": ([1, 127, 513, 1000, 64], [1, 127, 513, 1000, 64]),
    "chunked": ([256, 512, 17], [4096 + 256, 1024 + 512, 300]),
    "decode": ([1] * 32, [1 + 131 * i for i in range(32)]),
    "mixed": ([1] * 20 + [384, 1, 129], [50 * i + 1 for i in range(1, 21)] + [2000, 4000, 129]),
}
LAYOUTS = [(32, 8, 128, 16), (9, 3, 64, 16), (16, 16, 128, 32), (16, 4, 64, 32)]


def _case(scenario: str, layout: tuple[int, int, int, int], dtype: torch.dtype, **kw) -> AttentionCase:
    q_lens, ctx_lens = SCENARIOS[scenario]
    return make_attention_case(q_lens, ctx_lens, *layout, dtype, device=DEVICE, **kw)


@functools.lru_cache(maxsize=2)
def _shared_case(scenario: str, layout: tuple[int, int, int, int], dtype: torch.dtype) -> AttentionCase:
    """Cases are large: build each once for both hint settings (tests must not modify them)."""
    return _case(scenario, layout, dtype, seed=21)


@pytest.mark.parametrize("hints", [True, False], ids=["hints", "nohints"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: f"H{lay[0]}kv{lay[1]}-D{lay[2]}-bs{lay[3]}")
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_attention(ops, scenario, layout, dtype, hints):
    case = _shared_case(scenario, layout, dtype)
    out = ops.paged_attention(*case.args(hints=hints))
    assert out.dtype == dtype and out.shape == case.q.shape and out.device == case.q.device
    assert_close(out, reference.paged_attention(*case.args(hints=False)), dtype, "triton vs reference")
    if layout == LAYOUTS[0]:
        assert_close(out, naive_paged_attention(case), dtype, "triton vs naive")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("num_segments", [None, 1, 4, 16])
def test_attention_split_kv(ops, dtype, num_segments):
    """Few sequences with long contexts: the flash-decoding split (auto with the hint, or forced)."""
    case = make_attention_case([1, 1, 1, 5], [8000, 3000, 17, 6000], 32, 8, 128, 16, dtype, seed=22, device=DEVICE)
    out = ops.paged_attention_impl(*case.args(hints=True), num_segments=num_segments)
    assert_close(out, reference.paged_attention(*case.args(hints=False)), dtype, "split-kv vs reference")


def test_attention_garbage_and_views(ops):
    """NaN in unowned cache slots never reaches the output; q may be a strided QKV view; int64 indices."""
    case = _case("mixed", LAYOUTS[1], torch.bfloat16, seed=23, garbage=float("nan"), q_view=True,
                 index_dtype=torch.int64, pad_value=10**6)
    out = ops.paged_attention(*case.args())
    assert torch.isfinite(out).all()
    assert_close(out, naive_paged_attention(case), torch.bfloat16, "triton vs naive")


def test_attention_decode_cuda_graph(ops):
    """A decode step captures into a CUDA graph (no host sync) and replays with new context lengths."""
    case = _case("decode", LAYOUTS[0], torch.bfloat16, seed=24)
    args = case.args(hints=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.paged_attention(*args)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.paged_attention(*args)
    case.context_lens.sub_(1).clamp_(min=1)  # the next step's lengths, written in place
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, reference.paged_attention(*case.args(hints=False)), torch.bfloat16, "graph replay")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_store_kv(ops, dtype):
    gen = torch.Generator().manual_seed(25)
    t, hkv, d, bs = 3000, 8, 128, 16
    kv = torch.randn(t, 2 * hkv * d, generator=gen).to(dtype).to(DEVICE)
    key, value = kv[:, : hkv * d].view(t, hkv, d), kv[:, hkv * d:].view(t, hkv, d)
    slots = torch.randperm(400 * bs, generator=gen)[:t].to(DEVICE)
    slots[::7] = -1
    caches = [torch.zeros(400, bs, hkv, d, dtype=dtype, device=DEVICE) for _ in range(4)]
    reference.store_kv(key, value, caches[0], caches[1], slots)
    ops.store_kv(key, value, caches[2], caches[3], slots)
    assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("hidden", [576, 4096, 5120])
def test_rms_norm(ops, dtype, hidden):
    gen = torch.Generator().manual_seed(26)
    x = (3 * torch.randn(777, hidden, generator=gen)).to(dtype).to(DEVICE)
    r = torch.randn(777, hidden, generator=gen).to(dtype).to(DEVICE)
    w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype).to(DEVICE)
    for residual in (None, r):
        out, res = ops.rms_norm(x, w, 1e-5, residual)
        want, want_res = reference.rms_norm(x, w, 1e-5, residual)
        assert out.dtype == want.dtype
        assert_close(out, want, dtype, "rms_norm")
        assert_close(res, want_res, dtype, "rms_norm residual")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("inter", [1536, 14336])
def test_silu_and_mul(ops, dtype, inter):
    x = (2 * torch.randn(513, 2 * inter, generator=torch.Generator().manual_seed(27))).to(dtype).to(DEVICE)
    assert_close(ops.silu_and_mul(x), reference.silu_and_mul(x), dtype, "silu_and_mul")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize(("h", "hkv", "d"), [(32, 8, 128), (9, 3, 64)])
def test_rotary(ops, dtype, h, hkv, d):
    gen = torch.Generator().manual_seed(28)
    t = 2049
    qkv = torch.randn(t, (h + 2 * hkv) * d, generator=gen).to(dtype).to(DEVICE)
    q, k = qkv[:, : h * d].view(t, h, d), qkv[:, h * d: (h + hkv) * d].view(t, hkv, d)
    positions = torch.randint(0, 8192, (t,), generator=gen).to(DEVICE)
    cache = cos_sin_cache(8192, d).to(DEVICE)
    got, want = ops.rotary_embedding(positions, q, k, cache), reference.rotary_embedding(positions, q, k, cache)
    assert_close(got[0], want[0], dtype, "rotary q")
    assert_close(got[1], want[1], dtype, "rotary k")


def test_dispatch_auto_uses_triton_on_cuda(ops):
    backend = dispatch.KernelBackend("auto")
    case = _case("mixed", LAYOUTS[0], torch.bfloat16, seed=29)
    out = backend.paged_attention(*case.args())
    x = torch.randn(64, 2 * 256, device=DEVICE, dtype=torch.bfloat16)
    act = backend.silu_and_mul(x)
    assert backend.triton_disabled_reason() is None, backend.triton_disabled_reason()
    assert_close(out, reference.paged_attention(*case.args(hints=False)), torch.bfloat16, "dispatch attention")
    assert_close(act, reference.silu_and_mul(x), torch.bfloat16, "dispatch silu")


# --------------------------------------------------------------------------------------------------
# batch invariance of the compiled kernels: what the interpreter cannot show (the instruction a tile
# lowers to must give a row the same bits at every row count and position)
# --------------------------------------------------------------------------------------------------

GPU_ROW_COUNTS = range(1, 301)
# (out, in, bias): SmolLM2-135M's QKV (with a bias, as Qwen2's), down projection and a cut of its LM head;
# Llama-3-8B's QKV
MATMUL_SHAPES = [(960, 576, True), (576, 1536, False), (4096, 576, False), (6144, 4096, False)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize(("out_features", "in_features", "bias"), MATMUL_SHAPES,
                         ids=[f"{o}x{i}" for o, i, _ in MATMUL_SHAPES])
def test_matmul_row_bits_do_not_depend_on_the_row_count(ops, dtype, out_features, in_features, bias):
    check_matmul_invariance(ops, dtype, out_features, in_features, bias, DEVICE, GPU_ROW_COUNTS)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("hidden", [576, 4096])
def test_rms_norm_row_bits_do_not_depend_on_the_row_count(ops, dtype, hidden):
    check_rms_norm_invariance(ops, dtype, hidden, DEVICE, GPU_ROW_COUNTS)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("layout", [(32, 8, 128), (9, 3, 64)], ids=["H32kv8-D128", "H9kv3-D64"])
def test_attention_row_bits_do_not_depend_on_the_step(ops, dtype, layout):
    # contexts of 700 and 2100 tokens: where the step-dependent path splits the keys of a small decode step
    check_attention_invariance(ops, dtype, *layout, DEVICE, longer=(700, 2100))
