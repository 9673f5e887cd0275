"""Kernels against their references, on the CPU.

Three layers, each checked against the one below:

1. ``naive_*`` here: per-sequence loops in float64 over a contiguous K/V copied out of the cache block by
   block, an explicit causal mask and plain softmax(QK^T)V -- obviously right, and slow.
2. ``forge_batch.kernels.reference``: the vectorised torch code the CPU path runs (tested against 1).
3. ``forge_batch.kernels.triton_ops``: the Triton kernels, run by Triton's interpreter on CPU tensors
   (tested against 2, and attention against 1 as well).

The interpreted tests take the ``interpreter`` fixture (tests/triton_interpreter.py: in this process under
TRITON_INTERPRET=1, else in one child pytest per test module).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from forge_batch.kernels import dispatch, reference

# Allowed |actual - expected| <= atol + rtol * |expected|, per dtype, for every comparison in this file
# (kernel vs reference, kernel vs naive float64, reference vs naive float64). Float32 kernels agree to
# rounding noise. The 16-bit rows allow ~2-3 units in the last place at |x| ~ 1: attention rounds P to
# the input dtype before the PV product, the reference's decode path rounds QK^T scores to bfloat16,
# and Triton's interpreter converts float32 -> bfloat16 by truncation, not round-to-nearest (the GPU
# rounds), so interpreted bfloat16 results can sit one ulp further away.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
}
DTYPES = list(TOLERANCES)
DTYPE_IDS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Compare in float64 with the tolerance of ``dtype`` from TOLERANCES."""
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.double().cpu(), expected.double().cpu(), atol=tol["atol"], rtol=tol["rtol"], msg=lambda m: f"{what}: {m}"
    )


# --------------------------------------------------------------------------------------------------
# paged attention cases and the naive implementation
# --------------------------------------------------------------------------------------------------


@dataclass
class AttentionCase:
    q: torch.Tensor  # [T, H, D]
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [B, max_blocks], padded with pad_value
    query_start_loc: torch.Tensor  # [B + 1]
    context_lens: torch.Tensor  # [B]
    scale: float
    max_query_len: int
    max_context_len: int

    def args(self, hints: bool = True) -> tuple[Any, ...]:
        base = (self.q, self.k_cache, self.v_cache, self.block_tables, self.query_start_loc, self.context_lens,
                self.scale)
        return (*base, self.max_query_len, self.max_context_len) if hints else base

    def to(self, device: str) -> AttentionCase:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return AttentionCase(**moved)


def make_attention_case(
    q_lens: Sequence[int],
    ctx_lens: Sequence[int],
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    block_size: int,
    dtype: torch.dtype,
    *,
    seed: int = 0,
    index_dtype: torch.dtype = torch.int32,
    pad_value: int = -1,
    garbage: float = 100.0,
    q_view: bool = False,
    device: str = "cpu",
) -> AttentionCase:
    """A step over sequences with ``q_lens`` new tokens and ``ctx_lens`` tokens in the cache (prefix + new).

    Blocks are handed out in shuffled order with spare blocks among them, so a kernel that assumes
    contiguous or ordered blocks fails. Cache slots no sequence owns (spare blocks, the tail of each
    last block) hold ``garbage``: finite garbage must be masked out; NaN checks that it is never read.
    ``q_view`` makes q a non-contiguous slice of a fused QKV tensor, as the model produces it. The
    random data are drawn on ``device`` (the GPU tests build multi-gigabyte caches).
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    assert all(0 < q <= c for q, c in zip(q_lens, ctx_lens, strict=True))
    blocks_per_seq = [math.ceil(c / block_size) for c in ctx_lens]
    num_blocks = sum(blocks_per_seq) + len(q_lens) + 1  # a spare block per sequence, plus one
    perm = torch.randperm(num_blocks, generator=gen, device=device).cpu()
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    k_cache = torch.randn(shape, generator=gen, device=device)
    v_cache = torch.randn(shape, generator=gen, device=device)
    owned = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    block_tables = torch.full((len(q_lens), max(blocks_per_seq) + 1), pad_value, dtype=index_dtype)
    used = 0
    for b, (n, ctx) in enumerate(zip(blocks_per_seq, ctx_lens, strict=True)):
        ids = perm[used: used + n]
        used += n
        block_tables[b, :n] = ids.to(index_dtype)
        owned[ids[:-1]] = True
        owned[ids[-1], : ctx - (n - 1) * block_size] = True
    unowned = ~owned.to(device)
    k_cache[unowned] = garbage
    v_cache[unowned] = garbage
    total = sum(q_lens)
    if q_view:
        qkv = torch.randn(total, (num_heads + 2 * num_kv_heads) * head_size, generator=gen, device=device)
        q = qkv.to(dtype)[:, : num_heads * head_size].view(total, num_heads, head_size)
        assert not q.is_contiguous()
    else:
        q = torch.randn(total, num_heads, head_size, generator=gen, device=device).to(dtype)
    qsl = torch.zeros(len(q_lens) + 1, dtype=index_dtype)
    qsl[1:] = torch.cumsum(torch.tensor(q_lens), 0).to(index_dtype)
    return AttentionCase(
        q=q,
        k_cache=k_cache.to(dtype),
        v_cache=v_cache.to(dtype),
        block_tables=block_tables.to(device),
        query_start_loc=qsl.to(device),
        context_lens=torch.tensor(ctx_lens, dtype=index_dtype, device=device),
        scale=head_size**-0.5,
        max_query_len=max(q_lens),
        max_context_len=max(ctx_lens),
    )


def naive_paged_attention(case: AttentionCase) -> torch.Tensor:
    """Per sequence: copy its K/V out of the cache block by block, then softmax(QK^T * scale + causal) V."""
    q = case.q.double().cpu()
    t, h, d = q.shape
    block_size, hkv = case.k_cache.shape[1], case.k_cache.shape[2]
    out = torch.zeros(t, h, d, dtype=torch.float64)
    qsl = case.query_start_loc.tolist()
    for b, ctx in enumerate(case.context_lens.tolist()):
        start, end = qsl[b], qsl[b + 1]
        n = math.ceil(ctx / block_size)
        ids = case.block_tables[b, :n].tolist()
        k = torch.cat([case.k_cache[i].cpu() for i in ids])[:ctx].double()  # [ctx, Hkv, D]
        v = torch.cat([case.v_cache[i].cpu() for i in ids])[:ctx].double()
        k = k.repeat_interleave(h // hkv, dim=1)  # query head j uses KV head j // group
        v = v.repeat_interleave(h // hkv, dim=1)
        q_pos = torch.arange(ctx - (end - start), ctx)
        causal = torch.arange(ctx)[None, :] <= q_pos[:, None]  # [q, ctx]
        scores = torch.einsum("qhd,khd->hqk", q[start:end], k) * case.scale
        scores = scores.masked_fill(~causal, float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)
    return out


# Scenarios: (query lengths, context lengths). Context = cached prefix + this step's tokens.
SCENARIOS: dict[str, tuple[list[int], list[int]]] = {
    "prefill": ([7, 19, 2], [7, 19, 2]),  # ragged prompts, nothing cached
    "chunked": ([5, 16, 3], [37, 36, 20]),  # chunked prefill over cached prefixes of 32, 20, 17
    "decode": ([1, 1, 1, 1], [1, 17, 40, 64]),
    "mixed": ([1, 9, 1, 4, 1], [30, 9, 50, 20, 3]),  # decodes between a prefill and a chunk
}
# (query heads, KV heads, head size, block size): GQA ratios 1 / 3 / 4, head sizes 64 / 128, blocks 16 / 32.
LAYOUTS: list[tuple[int, int, int, int]] = [(2, 2, 64, 16), (6, 2, 128, 32), (8, 2, 64, 32), (4, 1, 128, 16)]
ATTENTION_GRID = [
    pytest.param(s, layout, dtype, id=f"{s}-H{layout[0]}kv{layout[1]}-D{layout[2]}-bs{layout[3]}-{DTYPE_IDS[dtype]}")
    for s, layout, dtype in itertools.product(SCENARIOS, LAYOUTS, DTYPES)
]


def _case(scenario: str, layout: tuple[int, int, int, int], dtype: torch.dtype, **kw: Any) -> AttentionCase:
    q_lens, ctx_lens = SCENARIOS[scenario]
    return make_attention_case(q_lens, ctx_lens, *layout, dtype, **kw)


# --------------------------------------------------------------------------------------------------
# the reference against the naive implementations (plain torch, always in-process)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("scenario", "layout", "dtype"), ATTENTION_GRID)
def test_reference_attention_matches_naive(scenario: str, layout: tuple[int, int, int, int], dtype: torch.dtype):
    case = _case(scenario, layout, dtype, seed=1)
    out = reference.paged_attention(*case.args(hints=False))
    assert out.dtype == dtype and out.shape == case.q.shape
    assert_close(out, naive_paged_attention(case), dtype, "reference vs naive")


def test_reference_attention_hints_and_padding():
    """Hints, int64 indices and any block-table padding value give the same result."""
    case = _case("mixed", (6, 2, 64, 16), torch.float32, seed=2)
    expected = naive_paged_attention(case)
    assert_close(reference.paged_attention(*case.args(hints=True)), expected, torch.float32, "with hints")
    case64 = _case("mixed", (6, 2, 64, 16), torch.float32, seed=2, index_dtype=torch.int64, pad_value=10**6)
    assert_close(reference.paged_attention(*case64.args(hints=False)), expected, torch.float32, "int64, big pad")


def naive_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None):
    h = x.double() if residual is None else (x + residual).double()
    return h / torch.sqrt((h * h).mean(-1, keepdim=True) + eps) * weight.double(), h


def naive_rotary(positions: torch.Tensor, x: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) by angle pos * base^(-2i/D), written as complex multiplication."""
    d = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = positions.double()[:, None] * inv_freq[None, :]  # [T, D/2]
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double()) * torch.polar(
        torch.ones_like(angle), angle
    )[:, None, :]
    return torch.cat((z.real, z.imag), dim=-1)


def cos_sin_cache(max_pos: int, d: int, base: float = 10000.0) -> torch.Tensor:
    """[max_pos, D] = cat(cos, sin) of each frequency; angles in float64 so large positions stay exact."""
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).float()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_reference_elementwise_match_naive(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 96, generator=gen).to(dtype)
    r = torch.randn(5, 96, generator=gen).to(dtype)
    w = (1 + 0.1 * torch.randn(96, generator=gen)).to(dtype)
    for res in (None, r):
        out, res_out = reference.rms_norm(x, w, 1e-6, res)
        want, want_res = naive_rms_norm(x, w, 1e-6, res)
        assert_close(out, want, dtype, "rms_norm")
        assert_close(res_out, want_res, dtype, "rms_norm residual")
    gu = torch.randn(4, 3, 2 * 40, generator=gen).to(dtype)
    g, u = gu.double().chunk(2, dim=-1)
    assert_close(reference.silu_and_mul(gu), g / (1 + torch.exp(-g)) * u, dtype, "silu_and_mul")
    q = torch.randn(6, 4, 64, generator=gen).to(dtype)
    k = torch.randn(6, 2, 64, generator=gen).to(dtype)
    pos = torch.tensor([0, 1, 7, 100, 100, 511])
    q_out, k_out = reference.rotary_embedding(pos, q, k, cos_sin_cache(512, 64))
    assert_close(q_out, naive_rotary(pos, q, 10000.0), dtype, "rotary q")
    assert_close(k_out, naive_rotary(pos, k, 10000.0), dtype, "rotary k")


def test_reference_store_kv_matches_loop():
    gen = torch.Generator().manual_seed(4)
    key, value = torch.randn(2, 7, 2, 64, generator=gen)
    slots = torch.tensor([5, -1, 16, 17, 63, -1, 0])
    k_cache, v_cache = torch.zeros(2, 4, 16, 2, 64)
    reference.store_kv(key, value, k_cache, v_cache, slots)
    want_k, want_v = torch.zeros(2, 4, 16, 2, 64)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            want_k[s // 16, s % 16] = key[i]
            want_v[s // 16, s % 16] = value[i]
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


# --------------------------------------------------------------------------------------------------
# dispatch: fallback to the reference (no Triton needed)
# --------------------------------------------------------------------------------------------------


class _BrokenOps:
    """Stands in for triton_ops: every kernel raises, as a failed compile would."""

    def __init__(self) -> None:
        self.calls = 0

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def broken(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            raise RuntimeError(f"{name}: PTX compile failed (simulated)")

        return broken


@pytest.fixture
def broken_triton(monkeypatch: pytest.MonkeyPatch) -> _BrokenOps:
    ops = _BrokenOps()
    monkeypatch.setattr(dispatch, "_triton", ops)
    monkeypatch.setattr(dispatch, "_triton_checked", True)
    monkeypatch.setattr(dispatch, "_on_device", lambda t: True)  # treat CPU tensors as CUDA ones
    return ops


def test_dispatch_falls_back_once_with_one_warning(broken_triton: _BrokenOps, caplog: pytest.LogCaptureFixture):
    backend = dispatch.KernelBackend("auto")
    x = torch.randn(3, 32)
    w = torch.ones(32)
    with caplog.at_level(logging.WARNING, logger="forge_batch.kernels"):
        first = backend.rms_norm(x, w, 1e-6)
        second = backend.rms_norm(x, w, 1e-6, x)
        act = backend.silu_and_mul(x)
    assert torch.equal(first[0], reference.rms_norm(x, w, 1e-6)[0])
    assert torch.equal(second[0], reference.rms_norm(x, w, 1e-6, x)[0])
    # the CPU kernel's exp is within an ulp of torch's, which itself differs by CPU (test_cpu_kernels)
    torch.testing.assert_close(act, reference.silu_and_mul(x), atol=1e-6, rtol=1e-5)
    assert broken_triton.calls == 1  # after the first failure Triton is not tried again
    warnings = [r for r in caplog.records if r.name == "forge_batch.kernels" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "rms_norm" in warnings[0].getMessage()
    assert backend.triton_disabled_reason() is not None
    # the fallback belongs to that backend (that engine): another one still tries Triton
    other = dispatch.KernelBackend("auto")
    assert other.triton_disabled_reason() is None
    other.silu_and_mul(x)
    assert broken_triton.calls == 2


def test_dispatch_caller_errors_do_not_disable_triton(broken_triton: _BrokenOps):
    """Arguments the reference rejects too are the caller's bug: that error is raised, Triton stays on."""
    backend = dispatch.KernelBackend("auto")
    with pytest.raises(RuntimeError) as info:
        backend.silu_and_mul(torch.randn(2, 7))  # odd width: no [gate | up] split
    assert "simulated" not in str(info.value)
    assert backend.triton_disabled_reason() is None


def test_dispatch_forced_triton_propagates_errors(broken_triton: _BrokenOps):
    backend = dispatch.KernelBackend("triton")
    with pytest.raises(RuntimeError, match="simulated"):
        backend.silu_and_mul(torch.randn(2, 8))
    assert backend.triton_disabled_reason() is None


def test_dispatch_cpu_auto_uses_reference_without_importing_triton(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(dispatch, "_triton_ops", lambda: pytest.fail("Triton must not be touched on CPU"))
    x = torch.randn(2, 16)
    backend = dispatch.KernelBackend("auto")
    torch.testing.assert_close(backend.silu_and_mul(x), reference.silu_and_mul(x), atol=1e-6, rtol=1e-5)


def test_kernel_backend_names_are_checked():
    with pytest.raises(ValueError, match="kernel backend"):
        dispatch.KernelBackend("cuda")


# --------------------------------------------------------------------------------------------------
# Triton kernels (interpreted) against the reference
# --------------------------------------------------------------------------------------------------


def check_attention(ops: ModuleType, case: AttentionCase, dtype: torch.dtype, hints: bool, **tiling: Any) -> None:
    fn = ops.paged_attention_impl if tiling else ops.paged_attention
    out = fn(*case.args(hints=hints), **tiling)
    assert out.dtype == dtype and out.shape == case.q.shape
    assert_close(out, reference.paged_attention(*case.args(hints=False)), dtype, "triton vs reference")
    assert_close(out, naive_paged_attention(case), dtype, "triton vs naive")


@pytest.mark.parametrize(("scenario", "layout", "dtype"), ATTENTION_GRID)
def test_triton_attention(interpreter, scenario: str, layout: tuple[int, int, int, int], dtype: torch.dtype):
    # Alternate between passing the length hints and not, so both tiling choices are covered.
    hints = LAYOUTS.index(layout) % 2 == 0
    interpreter(check_attention, _case(scenario, layout, dtype, seed=5), dtype, hints)


TILINGS = [
    # Small row tiles: several query blocks per sequence, GQA group 3 not dividing 16 rows.
    pytest.param("chunked", (6, 2, 64, 32), {"block_m": 16, "tile_n": 16}, id="chunked-bm16-tn16-bs32"),
    pytest.param("mixed", (8, 2, 128, 16), {"block_m": 16, "tile_n": 32}, id="mixed-bm16-tn32-bs16"),
    pytest.param("prefill", (4, 1, 64, 16), {"block_m": 64, "tile_n": 16}, id="prefill-bm64-tn16"),
    # Split-KV (flash-decoding) partials and their merge, including segments that get no keys.
    pytest.param("decode", (8, 2, 64, 16), {"num_segments": 4, "tile_n": 16}, id="decode-seg4-tn16"),
    pytest.param("mixed", (6, 2, 128, 32), {"num_segments": 2}, id="mixed-seg2"),
    pytest.param("chunked", (2, 2, 64, 16), {"num_segments": 8, "tile_n": 16, "block_m": 16}, id="chunked-seg8"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize(("scenario", "layout", "tiling"), TILINGS)
def test_triton_attention_tilings(interpreter, scenario, layout, tiling: dict[str, int], dtype: torch.dtype):
    interpreter(check_attention, _case(scenario, layout, dtype, seed=6), dtype, False, **tiling)


def _check_attention_inputs(ops: ModuleType) -> None:
    # q as a strided view of a fused QKV projection, int64 indices, a large padding sentinel.
    case = _case("mixed", (6, 2, 64, 16), torch.bfloat16, seed=7, q_view=True, index_dtype=torch.int64,
                 pad_value=10**6)
    check_attention(ops, case, torch.bfloat16, True)
    # Unowned cache slots full of NaN must never reach the output (the reference would need them finite).
    case = _case("mixed", (8, 2, 64, 32), torch.float32, seed=8, garbage=float("nan"))
    out = ops.paged_attention(*case.args())
    assert torch.isfinite(out).all()
    assert_close(out, naive_paged_attention(case), torch.float32, "NaN-garbage cache")


def test_triton_attention_inputs(interpreter):
    interpreter(_check_attention_inputs)


def _check_store_kv(ops: ModuleType, dtype: torch.dtype, hkv: int, d: int, bs: int) -> None:
    gen = torch.Generator().manual_seed(9)
    t = 11
    kv = torch.randn(t, 2 * hkv * d + 8, generator=gen).to(dtype)  # strided views, as a fused projection gives
    key = kv[:, : hkv * d].view(t, hkv, d)
    value = kv[:, hkv * d: 2 * hkv * d].view(t, hkv, d)
    slots = torch.randperm(4 * bs, generator=gen)[:t]
    slots[[2, 7]] = -1
    caches = [torch.full((4, bs, hkv, d), 7.0, dtype=dtype) for _ in range(4)]
    reference.store_kv(key, value, caches[0], caches[1], slots)
    ops.store_kv(key, value, caches[2], caches[3], slots)
    assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize(("hkv", "d", "bs"), [(2, 64, 16), (1, 128, 32)], ids=["kv2-D64-bs16", "kv1-D128-bs32"])
def test_triton_store_kv(interpreter, dtype, hkv, d, bs):
    interpreter(_check_store_kv, dtype, hkv, d, bs)


def _check_rms_norm(ops: ModuleType, dtype: torch.dtype, hidden: int, with_residual: bool) -> None:
    gen = torch.Generator().manual_seed(10)
    x = (3 * torch.randn(2, 3, hidden, generator=gen)).to(dtype)
    residual = torch.randn(2, 3, hidden, generator=gen).to(dtype) if with_residual else None
    w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    out, res = ops.rms_norm(x, w, 1e-5, residual)
    want, want_res = reference.rms_norm(x, w, 1e-5, residual)
    assert out.dtype == want.dtype and out.shape == want.shape and res.dtype == want_res.dtype
    assert_close(out, want, dtype, "rms_norm out")
    assert_close(res, want_res, dtype, "rms_norm residual")
    if residual is None:
        assert res is x  # the residual stream starts at x itself, as in the reference
    # float32 weight on a low-precision activation promotes the output, as ``weight * out`` does.
    out32, _ = ops.rms_norm(x, w.float(), 1e-5, residual)
    want32, _ = reference.rms_norm(x, w.float(), 1e-5, residual)
    assert out32.dtype == want32.dtype
    assert_close(out32, want32, dtype, "rms_norm fp32 weight")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("hidden", [64, 100])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_triton_rms_norm(interpreter, dtype, hidden, with_residual):
    interpreter(_check_rms_norm, dtype, hidden, with_residual)


def _check_silu_and_mul(ops: ModuleType, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = (2 * torch.randn(*shape, generator=torch.Generator().manual_seed(11))).to(dtype)
    out = ops.silu_and_mul(x)
    want = reference.silu_and_mul(x)
    assert out.dtype == want.dtype and out.shape == want.shape
    assert_close(out, want, dtype, "silu_and_mul")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", [(5, 2 * 80), (2, 3, 2 * 1100)], ids=["2d-80", "3d-1100"])
def test_triton_silu_and_mul(interpreter, dtype, shape):
    interpreter(_check_silu_and_mul, dtype, shape)


def _check_rotary(ops: ModuleType, dtype: torch.dtype, h: int, hkv: int, d: int) -> None:
    gen = torch.Generator().manual_seed(12)
    t = 7
    qkv = torch.randn(t, (h + 2 * hkv) * d, generator=gen).to(dtype)
    q = qkv[:, : h * d].view(t, h, d)  # strided views of a fused projection
    k = qkv[:, h * d: (h + hkv) * d].view(t, hkv, d)
    positions = torch.tensor([0, 1, 2, 9, 300, 4095, 17])
    cache = cos_sin_cache(4096, d)
    q_out, k_out = ops.rotary_embedding(positions, q, k, cache)
    q_want, k_want = reference.rotary_embedding(positions, q, k, cache)
    assert q_out.dtype == dtype and k_out.shape == k.shape
    assert_close(q_out, q_want, dtype, "rotary q")
    assert_close(k_out, k_want, dtype, "rotary k")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize(("h", "hkv", "d"), [(4, 2, 64), (6, 2, 128)], ids=["H4kv2-D64", "H6kv2-D128"])
def test_triton_rotary(interpreter, dtype, h, hkv, d):
    interpreter(_check_rotary, dtype, h, hkv, d)


def _check_dispatch_triton_backend(ops: ModuleType) -> None:
    """KernelBackend('triton') routes every entry point to the Triton kernels (here: interpreted)."""
    prev = (dispatch._triton, dispatch._triton_checked)
    dispatch._triton, dispatch._triton_checked = ops, True
    backend = dispatch.KernelBackend("triton")
    try:
        case = _case("mixed", (4, 2, 64, 16), torch.float32, seed=13)
        assert_close(backend.paged_attention(*case.args()), naive_paged_attention(case), torch.float32, "dispatch")
        x = torch.randn(3, 2 * 64)
        assert_close(backend.silu_and_mul(x), reference.silu_and_mul(x), torch.float32, "dispatch silu")
    finally:
        dispatch._triton, dispatch._triton_checked = prev


def test_dispatch_triton_backend(interpreter):
    interpreter(_check_dispatch_triton_backend)


# --------------------------------------------------------------------------------------------------
# the kernels compile for Hopper (no GPU needed: Triton's compiler and ptxas run on the CPU)
# --------------------------------------------------------------------------------------------------

_COMPILE_SCRIPT = textwrap.dedent(
    """
    import sys, torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature
    sys.path.insert(0, sys.argv[1])
    from test_kernels import make_attention_case
    from forge_batch.kernels import triton_ops as T

    TARGET = GPUTarget("cuda", 90, 32)
    H100_SHARED = 232448  # bytes of shared memory one block may use on sm_90
    seen = []

    def compile_instead_of_run(self, *args, grid, warmup, **kwargs):
        # What JITFunction.run does up to the launch, for a fixed sm_90 target instead of the driver's.
        backend = make_backend(TARGET)
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound, spec, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, spec, options)
        kernel = triton.compile(ASTSource(self, signature, constexprs, attrs), target=TARGET,
                                options=options.__dict__)
        assert kernel.metadata.shared <= H100_SHARED, (self.__name__, kernel.metadata.shared)
        seen.append(self.__name__)

    JITFunction.run = compile_instead_of_run
    decode, prefill = ([1] * 4, [40] * 4, True), ([300, 1], [300, 50], False)
    attention = [  # (dtype, step, layout): the tile shapes the wrappers pick, largest shared memory first
        (torch.float32, prefill, (32, 8, 128, 16)),
        (torch.float32, decode, (32, 8, 128, 16)),
        (torch.bfloat16, prefill, (32, 8, 128, 16)),
        (torch.bfloat16, decode, (32, 8, 128, 16)),
        (torch.bfloat16, prefill, (12, 4, 64, 32)),
        (torch.float16, decode, (9, 3, 64, 16)),
    ]
    for dtype, (q_lens, ctx_lens, hints), layout in attention:
        case = make_attention_case(q_lens, ctx_lens, *layout, dtype)
        T.paged_attention(*case.args(hints=hints))
    case = make_attention_case([1, 1], [900, 900], 32, 8, 128, 16, torch.bfloat16)
    T.paged_attention_impl(*case.args(), num_segments=8)
    for dtype, layout in [(torch.float32, (32, 8, 128, 16)), (torch.bfloat16, (32, 8, 128, 16)),
                          (torch.float16, (9, 3, 64, 16)), (torch.bfloat16, (64, 1, 64, 16))]:
        case = make_attention_case([1, 40], [40, 300], *layout, dtype)  # the batch-invariant tiling
        T.paged_attention_invariant(*case.args())
    for dtype in (torch.bfloat16, torch.float32, torch.float16):  # the batch-invariant GEMM, with a bias
        T.matmul(torch.randn(3, 576, dtype=dtype), torch.randn(960, 576, dtype=dtype), torch.randn(960, dtype=dtype))
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(4, 576, dtype=dtype)
        T.rms_norm(x, torch.ones(576, dtype=dtype), 1e-6, x)
        T.silu_and_mul(torch.randn(4, 2 * 1536, dtype=dtype))
        q, k = torch.randn(3, 9, 64, dtype=dtype), torch.randn(3, 3, 64, dtype=dtype)
        T.rotary_embedding(torch.arange(3), q, k, torch.randn(8, 64))
        T.store_kv(k, k, torch.zeros(2, 16, 3, 64, dtype=dtype), torch.zeros(2, 16, 3, 64, dtype=dtype),
                   torch.arange(3))
    print("compiled:", sorted(set(seen)), len(seen))
    """
)


def test_triton_kernels_compile_for_hopper():
    """Every launch configuration the wrappers choose compiles for sm_90 and fits its shared memory.

    The interpreter does not catch what only the compiler rejects (layouts, dot shapes, types, shared
    memory use), so this compiles the same launches for an H100 target, on the CPU, in a subprocess
    whose Triton is in compiled mode.
    """
    pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, str(Path(__file__).parent)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    if proc.returncode != 0 and "No such file or directory" in proc.stderr and "ptxas" in proc.stderr:
        pytest.skip("this Triton build has no ptxas to compile with")
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "compiled:" in proc.stdout and "_matmul_kernel" in proc.stdout
