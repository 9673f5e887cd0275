"""Triton kernels for the model's hot paths, each computing what its namesake in ``reference.py`` computes.

The launch wrappers take exactly the reference's arguments and return what it returns, so
``dispatch`` can swap one for the other per call. Tests run every kernel under Triton's interpreter
(``TRITON_INTERPRET=1``, on CPU tensors) against the reference; on CUDA they are compiled for real.

Kernels:

- ``paged_attention``: one kernel for prefill, chunked prefill over a cached prefix, decode and
  mixed steps. Each program owns a tile of BLOCK_M rows = BLOCK_Q query tokens x the GROUP query heads
  that share one KV head (GQA), so K/V are loaded once per group and decode still feeds ``tl.dot``
  a 16+ row tile. Keys are walked in TILE_N tiles; each key's physical block comes from the block table,
  so the tile size is independent of the KV block size. Online softmax in float32 (exp2 domain).
  Programs map to sequences by a binary search over ``query_start_loc`` (no host sync, graph-safe).
  When few programs would cover a long context (small decode batches), the key range is split into
  segments whose partial results a second kernel merges (flash-decoding).
  ``paged_attention_invariant`` is the same kernel with one tiling for every step and no split.
- ``matmul``: F.linear with one tile shape for every row count (the batch-invariant mode's matmuls).
- ``store_kv``: scatter this step's K/V rows into the paged cache through ``slot_mapping`` (-1 skips).
- ``rms_norm``: RMSNorm with the residual add fused in front, float32 statistics.
- ``rotary_embedding``: Hugging Face rotate_half layout, cos/sin from ``cos_sin_cache``.
- ``silu_and_mul``: SwiGLU's ``silu(gate) * up``.

Batch invariance (``paged_attention_invariant``, ``matmul``, and ``rms_norm`` as it is): a row's result has
the same bits whatever else is computed with it, because nothing that shapes its arithmetic (tile sizes,
warps, the instruction ``tl.dot`` lowers to, the order its sums are taken in) is chosen from the number of
rows, sequences or tokens of a call: only from the weight's or the model's shape and the dtype. An output
element of a program's tile depends on its own row of the inputs only; other rows of the tile (another
sequence's queries, padding) never enter its sums.

Rounding follows the reference step by step (e.g. the residual sum is rounded to the activation dtype
before its statistics are taken) so that low-precision results agree to the last bit or two.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

_LOG2E = 1.4426950408889634


def _interpreted(kernel: object) -> bool:
    """True when ``kernel`` was built by Triton's interpreter (TRITON_INTERPRET=1 when this module loaded)."""
    return not isinstance(kernel, JITFunction)


def _upcast_dot(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` operands must be widened to float32 first.

    Triton's interpreter multiplies bfloat16 operands as their raw uint16 bit patterns (wrong results),
    so under the interpreter bfloat16 tiles are converted to float32 before ``tl.dot``. That computes
    the same thing a tensor core does (bf16 x bf16 products are exact in fp32, accumulated in fp32); on
    the GPU the native bfloat16 dot is used.
    """
    return dtype == torch.bfloat16 and _interpreted(_paged_attention_kernel)


# --------------------------------------------------------------------------------------------------
# paged attention
# --------------------------------------------------------------------------------------------------


@triton.jit
def _find_seq_idx(query_start_loc_ptr, q_block_global, num_seqs, BLOCK_Q: tl.constexpr):
    """Sequence owning global query block ``q_block_global``; sequence s's blocks start at qsl[s] // BLOCK_Q + s."""
    left = 0
    right = num_seqs
    while left < right:
        mid = (left + right) // 2
        start = tl.load(query_start_loc_ptr + mid)
        if start // BLOCK_Q + mid <= q_block_global:
            left = mid + 1
        else:
            right = mid
    return left - 1


@triton.jit
def _load_queries(
    q_ptr, q_start, q_block, q_len, kv_head, stride_q_t, stride_q_h,
    GROUP: tl.constexpr, HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr, UPCAST: tl.constexpr,
):
    """The program's query tile: row r is token ``q_block * BLOCK_Q + r // GROUP`` of the sequence's new
    tokens, head ``kv_head * GROUP + r % GROUP``. Returns the tile, each row's token index within the
    sequence's new tokens, its global token index, its head and whether the row exists."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_PAD)
    q_idx = q_block * BLOCK_Q + offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    row_ok = (offs_m < BLOCK_Q * GROUP) & (q_idx < q_len)
    tok = q_start + q_idx.to(tl.int64)
    q = tl.load(
        q_ptr + tok[:, None] * stride_q_t + head[:, None] * stride_q_h + offs_d[None, :],
        mask=row_ok[:, None] & (offs_d < HEAD_SIZE)[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    return q, q_idx, tok, head, row_ok


@triton.jit
def _key_tiles(
    q_block, q_len, prefix, segment, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr, NUM_SEGMENTS: tl.constexpr
):
    """The keys a query tile can see (0 .. position of its last valid query: causal) and the range of
    TILE_N key tiles this program walks: all of them, or its segment's share when the keys are split."""
    last_q = tl.minimum(q_block * BLOCK_Q + BLOCK_Q, q_len) - 1
    kv_end = prefix + last_q + 1
    num_tiles = tl.cdiv(kv_end, TILE_N)
    if NUM_SEGMENTS == 1:
        tile_lo = 0
        tile_hi = num_tiles
    else:
        per_segment = tl.cdiv(num_tiles, NUM_SEGMENTS)
        tile_lo = segment * per_segment
        tile_hi = tl.minimum(tile_lo + per_segment, num_tiles)
    return kv_end, tile_lo, tile_hi


@triton.jit
def _attend_key_tile(
    q, q_pos, m_i, l_i, acc, tile, kv_end, bt_row, k_head, v_head, scale_log2,
    stride_k_b, stride_k_s, stride_v_b, stride_v_s,
    HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
    UPCAST: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """One step of the online softmax over key tile ``tile``: load its K/V through the block table,
    score, mask (causal and past the end), rescale the running max / denominator / accumulator, add P V.
    Returns the updated (m_i, l_i, acc)."""
    offs_n = tl.arange(0, TILE_N)
    offs_d = tl.arange(0, HEAD_PAD)
    d_ok = offs_d < HEAD_SIZE
    k_pos = tile * TILE_N + offs_n
    k_ok = k_pos < kv_end
    phys = tl.load(bt_row + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
    in_block = (k_pos % BLOCK_SIZE).to(tl.int64)
    k = tl.load(
        k_head + (phys * stride_k_b + in_block * stride_k_s)[None, :] + offs_d[:, None],
        mask=k_ok[None, :] & d_ok[:, None],
        other=0.0,
    )  # [HEAD_PAD, TILE_N]
    v = tl.load(
        v_head + (phys * stride_v_b + in_block * stride_v_s)[:, None] + offs_d[None, :],
        mask=k_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [TILE_N, HEAD_PAD]
    if UPCAST:
        k = k.to(tl.float32)
    if FP32_DOT:
        s = tl.dot(q, k, input_precision="tf32x3")
    else:
        s = tl.dot(q, k)
    s = s * scale_log2
    visible = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :]
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # Rows with nothing visible yet (padding rows) keep a finite pivot so no inf - inf appears.
    m_new = tl.where(m_new > float("-inf"), m_new, 0.0)
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    # P is rounded to V's dtype before the PV product, as the reference's probs.to(v.dtype) does.
    p_v = p.to(v.dtype)
    if UPCAST:
        p_v = p_v.to(tl.float32)
        v = v.to(tl.float32)
    if FP32_DOT:
        acc = tl.dot(p_v, v, acc, input_precision="tf32x3")
    else:
        acc = tl.dot(p_v, v, acc)
    return m_new, l_i, acc


@triton.jit
def _store_attention(
    out_ptr, m_ptr, l_ptr, acc, m_i, l_i, tok, head, row_ok, segment, stride_o_t, stride_o_h,
    HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr, NUM_SEGMENTS: tl.constexpr,
):
    """Write the tile's result: normalised output rows, or (keys split in segments) the unnormalised
    accumulator with its running max and denominator for the merge kernel."""
    offs_d = tl.arange(0, HEAD_PAD)
    if NUM_SEGMENTS == 1:
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        acc = acc / l_safe[:, None]
        tl.store(
            out_ptr + tok[:, None] * stride_o_t + head[:, None] * stride_o_h + offs_d[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & (offs_d < HEAD_SIZE)[None, :],
        )
    else:
        row = tok * stride_o_t + head.to(tl.int64) * stride_o_h + segment
        tl.store(out_ptr + row[:, None] * HEAD_PAD + offs_d[None, :], acc, mask=row_ok[:, None])
        tl.store(m_ptr + row, m_i, mask=row_ok)
        tl.store(l_ptr + row, l_i, mask=row_ok)


# The batch size and the block table's width change every step: one compile for all (and no variant whose
# code differs with them, which batch invariance needs as much as the tiling does).
@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
def _paged_attention_kernel(
    out_ptr,  # [T, H, D] (NUM_SEGMENTS == 1) or float32 [T, H, NUM_SEGMENTS, HEAD_PAD] partials
    m_ptr,  # float32 [T, H, NUM_SEGMENTS] running max (log2 domain); unused when NUM_SEGMENTS == 1
    l_ptr,  # float32 [T, H, NUM_SEGMENTS] softmax denominators; unused when NUM_SEGMENTS == 1
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    context_lens_ptr,
    scale_log2,  # softmax scale * log2(e)
    num_seqs,
    stride_q_t,
    stride_q_h,
    stride_o_t,
    stride_o_h,
    stride_k_b,
    stride_k_s,
    stride_k_h,
    stride_v_b,
    stride_v_s,
    stride_v_h,
    stride_bt,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,  # HEAD_SIZE rounded up to a power of two
    BLOCK_SIZE: tl.constexpr,  # KV cache block size
    BLOCK_M: tl.constexpr,  # rows per program: BLOCK_Q tokens x GROUP heads (+ padding)
    BLOCK_Q: tl.constexpr,
    TILE_N: tl.constexpr,  # keys per inner iteration
    NUM_SEGMENTS: tl.constexpr,
    UPCAST: tl.constexpr,  # widen dot operands to fp32 (interpreter + bfloat16)
    FP32_DOT: tl.constexpr,  # float32 inputs: 3xTF32 dot (fp32-accurate on tensor cores) instead of TF32
):
    q_block_global = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)

    seq = _find_seq_idx(query_start_loc_ptr, q_block_global, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    q_len = (tl.load(query_start_loc_ptr + seq + 1) - q_start).to(tl.int32)
    q_block = (q_block_global - (q_start // BLOCK_Q + seq)).to(tl.int32)
    if q_block * BLOCK_Q >= q_len:
        return
    ctx_len = tl.load(context_lens_ptr + seq).to(tl.int32)
    prefix = ctx_len - q_len  # absolute position of the sequence's first new token

    q, q_idx, tok, head, row_ok = _load_queries(
        q_ptr, q_start, q_block, q_len, kv_head, stride_q_t, stride_q_h,
        GROUP, HEAD_SIZE, HEAD_PAD, BLOCK_M, BLOCK_Q, UPCAST,
    )
    q_pos = prefix + q_idx
    kv_end, tile_lo, tile_hi = _key_tiles(q_block, q_len, prefix, segment, BLOCK_Q, TILE_N, NUM_SEGMENTS)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_head = k_cache_ptr + kv_head.to(tl.int64) * stride_k_h
    v_head = v_cache_ptr + kv_head.to(tl.int64) * stride_v_h
    for tile in range(tile_lo, tile_hi):
        m_i, l_i, acc = _attend_key_tile(
            q, q_pos, m_i, l_i, acc, tile, kv_end, bt_row, k_head, v_head, scale_log2,
            stride_k_b, stride_k_s, stride_v_b, stride_v_s,
            HEAD_SIZE, HEAD_PAD, BLOCK_SIZE, TILE_N, UPCAST, FP32_DOT,
        )
    _store_attention(
        out_ptr, m_ptr, l_ptr, acc, m_i, l_i, tok, head, row_ok, segment, stride_o_t, stride_o_h,
        HEAD_SIZE, HEAD_PAD, NUM_SEGMENTS,
    )


@triton.jit
def _merge_segments_kernel(
    out_ptr,
    part_ptr,  # float32 [T, H, NUM_SEGMENTS, HEAD_PAD]
    m_ptr,  # float32 [T, H, NUM_SEGMENTS]
    l_ptr,
    num_heads,
    stride_o_t,
    stride_o_h,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr,
):
    """Combine the per-segment softmax partials of one (token, head) into the final output."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, NUM_SEGMENTS)
    offs_d = tl.arange(0, HEAD_PAD)
    base = (t * num_heads + h) * NUM_SEGMENTS
    l_s = tl.load(l_ptr + base + offs_s)
    # Segments that saw no key have l == 0; give them -inf so their weight is exactly 0.
    m_s = tl.where(l_s > 0.0, tl.load(m_ptr + base + offs_s), float("-inf"))
    m = tl.max(m_s, axis=0)
    w = tl.math.exp2(m_s - m)
    denom = tl.sum(l_s * w, axis=0)
    part = tl.load(part_ptr + (base + offs_s)[:, None] * HEAD_PAD + offs_d[None, :])
    acc = tl.sum(part * w[:, None], axis=0) / denom
    tl.store(out_ptr + t * stride_o_t + h * stride_o_h + offs_d, acc.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_SIZE)


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors on ``device`` (cached: asked once, safe inside CUDA graph capture)."""
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


class _AttentionConfig(NamedTuple):
    block_m: int  # rows per program (query tokens x GQA group)
    tile_n: int  # keys per inner iteration
    num_warps: int
    num_stages: int


# Rows per program of the batch-invariant attention, for every step (or the GQA group, when larger).
INVARIANT_ATTENTION_BLOCK_M = 64


def _attention_config(
    t: int, b: int, group: int, head_pad: int, dtype: torch.dtype, max_query_len: int | None,
    batch_invariant: bool = False,
) -> _AttentionConfig:
    """Tiling for a step with t query tokens over b sequences, chosen without reading device memory.

    Decode-only steps (every sequence has one query; known from max_query_len, or t == b) take the
    smallest row tile that holds a GQA group, so no MMA work is spent on rows that cannot exist
    (16 rows: mma.sync on Hopper). Prefill-heavy steps take 64 or 128 rows (wgmma) so each K/V tile
    loaded is reused across many queries. float32 tiles are twice as large, so they get smaller tiles
    and one stage less to stay inside shared memory (and registers) on an H100.

    ``batch_invariant``: one tiling for every step, from the model's shape and the dtype alone (64 rows:
    a decode step's tile is mostly padding, but decode attention waits on K/V reads, not on the MMA).
    """
    group_pad = triton.next_power_of_2(group)
    wide = dtype == torch.float32
    decode_only = max_query_len == 1 if max_query_len is not None else t == b
    if batch_invariant:
        block_m = max(INVARIANT_ATTENTION_BLOCK_M, group_pad)
    elif decode_only:
        block_m = max(16, group_pad)
    else:
        longest = max_query_len if max_query_len is not None else max(1, t - b + 1)
        rows = longest * group
        block_m = max(128 if rows >= 512 else 64 if rows >= 64 else 16, group_pad)
        if wide:
            block_m = min(block_m, max(64, group_pad))
    tile_n = 32 if wide or head_pad > 128 else 64
    num_warps = 8 if block_m >= 128 or (wide and block_m >= 64 and head_pad >= 128) else 4
    num_stages = 2 if block_m <= 16 or wide else 3
    return _AttentionConfig(block_m, tile_n, num_warps, num_stages)


def _check_attention_shapes(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
) -> None:
    """Refuse inputs the kernel would read out of bounds or misinterpret."""
    _, h, d = q.shape
    _, block_size, hkv, d_cache = k_cache.shape
    b = block_tables.shape[0]
    if d_cache != d or v_cache.shape != k_cache.shape:
        raise ValueError(f"q head size {d} and caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)} disagree")
    if h % hkv:
        raise ValueError(f"{h} query heads are not a multiple of {hkv} KV heads")
    if query_start_loc.shape[0] != b + 1 or context_lens.shape[0] != b:
        raise ValueError("query_start_loc must have B + 1 entries and context_lens B")
    if block_size & (block_size - 1):
        raise ValueError(f"KV block size must be a power of two, got {block_size}")


def _default_num_segments(q: torch.Tensor, programs: int, max_context_len: int | None, tile_n: int) -> int:
    """Split the keys (flash-decoding) when the step's programs would leave most of the GPU idle and the
    context is long enough for each segment to have several tiles; 1 (no split) otherwise."""
    if max_context_len is None or not q.is_cuda:
        return 1
    target = 2 * _sm_count(q.device)
    if programs < target and max_context_len >= 8 * tile_n:
        return min(16, triton.next_power_of_2(triton.cdiv(target, programs)),
                   triton.next_power_of_2(triton.cdiv(max_context_len, 4 * tile_n)))
    return 1


def paged_attention_impl(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_query_len: int | None = None,
    max_context_len: int | None = None,
    *,
    num_segments: int | None = None,
    block_m: int | None = None,
    tile_n: int | None = None,
    batch_invariant: bool = False,
) -> torch.Tensor:
    """``paged_attention`` with its tiling exposed (tests force the split-KV and tile paths through this).
    ``batch_invariant``: the one tiling of ``paged_attention_invariant`` (no tiling may be forced then)."""
    _check_attention_shapes(q, k_cache, v_cache, block_tables, query_start_loc, context_lens)
    if batch_invariant and (num_segments not in (None, 1) or block_m or tile_n):
        raise ValueError("batch-invariant attention has one tiling: no num_segments, block_m or tile_n")
    t, h, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    b = block_tables.shape[0]
    out = torch.empty((t, h, d), dtype=q.dtype, device=q.device)
    if t == 0 or b == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("KV caches must be contiguous in the head dimension")
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()
    query_start_loc = query_start_loc.contiguous()
    context_lens = context_lens.contiguous()

    group = h // hkv
    head_pad = max(16, triton.next_power_of_2(d))
    cfg = _attention_config(t, b, group, head_pad, q.dtype, max_query_len, batch_invariant)
    block_m = max(block_m or cfg.block_m, triton.next_power_of_2(group), 16)
    block_q = block_m // group
    tile_n = max(16, tile_n or cfg.tile_n)
    num_q_blocks = t // block_q + b  # upper bound over any split of t tokens into b sequences

    if batch_invariant:
        num_segments = 1  # a split's count would follow the step's programs, and its merge the count
    elif num_segments is None:
        num_segments = _default_num_segments(q, min(num_q_blocks, t) * hkv, max_context_len, tile_n)
    num_segments = triton.next_power_of_2(max(1, int(num_segments)))

    common = dict(
        GROUP=group, HEAD_SIZE=d, HEAD_PAD=head_pad, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_Q=block_q,
        TILE_N=tile_n, NUM_SEGMENTS=num_segments, UPCAST=_upcast_dot(q.dtype), FP32_DOT=q.dtype == torch.float32,
        num_warps=cfg.num_warps if block_m == cfg.block_m else (8 if block_m >= 128 else 4),
        num_stages=cfg.num_stages,
    )
    args = (
        q, k_cache, v_cache, block_tables, query_start_loc, context_lens, float(scale) * _LOG2E, b,
        q.stride(0), q.stride(1),
    )
    tail = (
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
    )
    grid = (num_q_blocks, hkv, num_segments)
    if num_segments == 1:
        _paged_attention_kernel[grid](out, out, out, *args, out.stride(0), out.stride(1), *tail, **common)
        return out
    part = torch.empty((t, h, num_segments, head_pad), dtype=torch.float32, device=q.device)
    m = torch.empty((t, h, num_segments), dtype=torch.float32, device=q.device)
    l_ = torch.zeros((t, h, num_segments), dtype=torch.float32, device=q.device)
    # Partials are addressed as row = token * (H * S) + head * S + segment.
    _paged_attention_kernel[grid](part, m, l_, *args, h * num_segments, num_segments, *tail, **common)
    _merge_segments_kernel[(t, h)](
        out, part, m, l_, h, out.stride(0), out.stride(1),
        HEAD_SIZE=d, HEAD_PAD=head_pad, NUM_SEGMENTS=num_segments, num_warps=4,
    )
    return out


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_query_len: int | None = None,
    max_context_len: int | None = None,
) -> torch.Tensor:
    """Causal attention of q [T, H, D] over each sequence's paged K/V (see ``reference.paged_attention``).

    max_query_len / max_context_len are hints only: they pick the tiling (and whether to split long
    contexts across programs) without a device-to-host sync; any value gives a correct result.
    """
    return paged_attention_impl(
        q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale, max_query_len, max_context_len
    )


def paged_attention_invariant(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_query_len: int | None = None,
    max_context_len: int | None = None,
) -> torch.Tensor:
    """``paged_attention`` whose query rows each get the same bits in any step: a prefill, a chunk over a
    cached prefix, a decode, a mixed step, with any number or order of sequences.

    One tiling for every step (INVARIANT_ATTENTION_BLOCK_M rows, the dtype's key tile, fixed warps) and no
    split of the keys: a row walks its keys in TILE_N tiles from the first, in order, with one online
    softmax. Its program may walk further tiles for later queries of its tile; there every key is masked,
    so the row's max, denominator and accumulator come out unchanged (x * 1 + 0). The hints are unused.
    """
    return paged_attention_impl(
        q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale, max_query_len, max_context_len,
        batch_invariant=True,
    )


# --------------------------------------------------------------------------------------------------
# KV store
# --------------------------------------------------------------------------------------------------


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    num_heads,
    stride_key_t,
    stride_key_h,
    stride_value_t,
    stride_value_h,
    stride_kc_b,
    stride_kc_s,
    stride_kc_h,
    stride_vc_b,
    stride_vc_s,
    stride_vc_h,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    if slot < 0:
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_PAD)
    mask = (offs_h < num_heads)[:, None] & (offs_d < HEAD_SIZE)[None, :]
    hh = offs_h.to(tl.int64)[:, None]
    k = tl.load(key_ptr + t * stride_key_t + hh * stride_key_h + offs_d[None, :], mask=mask)
    v = tl.load(value_ptr + t * stride_value_t + hh * stride_value_h + offs_d[None, :], mask=mask)
    tl.store(
        k_cache_ptr + blk * stride_kc_b + off * stride_kc_s + hh * stride_kc_h + offs_d[None, :],
        k.to(k_cache_ptr.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        v_cache_ptr + blk * stride_vc_b + off * stride_vc_s + hh * stride_vc_h + offs_d[None, :],
        v.to(v_cache_ptr.dtype.element_ty),
        mask=mask,
    )


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key/value [T, Hkv, D] into the paged cache at slot_mapping [T] (in place; -1 skips)."""
    t, hkv, d = key.shape
    num_blocks, block_size, hkv_c, d_c = k_cache.shape
    if (hkv, d) != (hkv_c, d_c) or value.shape != key.shape or v_cache.shape != k_cache.shape:
        raise ValueError(f"key {tuple(key.shape)} does not fit cache {tuple(k_cache.shape)}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("KV caches must be contiguous in the head dimension")
    if t == 0:
        return
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    head_pad = triton.next_power_of_2(d)
    block_h = max(1, min(triton.next_power_of_2(hkv), 4096 // head_pad))
    grid = (t, triton.cdiv(hkv, block_h))
    _store_kv_kernel[grid](
        key, value, k_cache, v_cache, slot_mapping.contiguous(), hkv,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HEAD_SIZE=d, HEAD_PAD=head_pad, BLOCK_SIZE=block_size, BLOCK_H=block_h,
        num_warps=4 if block_h * head_pad >= 1024 else 1,
    )


# --------------------------------------------------------------------------------------------------
# RMSNorm (+ fused residual add)
# --------------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_kernel(
    out_ptr,
    residual_out_ptr,
    x_ptr,
    residual_ptr,
    weight_ptr,
    n_cols,
    eps,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        # Round the sum to the residual stream's dtype first: that rounded value is what the reference
        # normalises and what the next layer adds to.
        s = (x + r).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_ro + cols, s, mask=mask)
        x = s.to(tl.float32)
        norm_dtype = residual_out_ptr.dtype.element_ty
    else:
        norm_dtype = x_ptr.dtype.element_ty
    var = tl.sum(x * x, axis=0) / n_cols
    normed = (x * tl.math.rsqrt(var + eps)).to(norm_dtype).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as a 2-D [rows, hidden] tensor with unit stride in the hidden dim (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm with the residual add fused in front: returns (norm(x + residual) * weight, x + residual)."""
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size {n}")
    x2 = _rows(x)
    res_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, res_dtype), device=x.device)
    out2 = out.view(-1, n)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual {tuple(residual.shape)} does not match x {tuple(x.shape)}")
        r2 = _rows(residual)
        residual_out = torch.empty(x.shape, dtype=res_dtype, device=x.device)
        ro2 = residual_out.view(-1, n)
    else:
        r2 = ro2 = x2
        residual_out = x
    rows = x2.shape[0]
    if rows == 0:
        return out, residual_out
    block_n = triton.next_power_of_2(n)
    num_warps = max(1, min(16, block_n // 512))
    _rms_norm_kernel[(rows,)](
        out2, ro2, x2, r2, weight.contiguous(), n, float(eps),
        x2.stride(0), r2.stride(0), out2.stride(0), ro2.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK_N=block_n, num_warps=num_warps,
    )
    return out, residual_out


# --------------------------------------------------------------------------------------------------
# Matmul with one tiling for every row count
# --------------------------------------------------------------------------------------------------

class MatmulTile(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# The tile of every batch-invariant product, whatever the number of rows: an output element is its row's
# float32 sum over K in BLOCK_K chunks, in order, each chunk one tl.dot of this shape (no split-K, no
# choice by shape as cuBLAS makes). A decode step pads its few rows into BLOCK_M, which costs MMA work but
# not weight reads (what a decode step waits on). bfloat16 and float16: the fastest of the tiles timed on an
# H200 at Llama-3.1-8B's shapes and 256 rows (scripts/matmul_tiles.py; BENCHMARKS.md), and no slower than
# 64 x 64 x 64 at 1, 64 or 2048 rows. float32 operands take twice the shared memory: its tile stays small.
MATMUL_TILES: dict[torch.dtype, MatmulTile] = {
    torch.bfloat16: MatmulTile(64, 128, 128, num_warps=8, num_stages=4),
    torch.float16: MatmulTile(64, 128, 128, num_warps=8, num_stages=4),
    torch.float32: MatmulTile(64, 64, 64, num_warps=4, num_stages=3),
}


@triton.jit(do_not_specialize=["M"])  # the row count changes every step: one compile, no special M == 1 code
def _matmul_kernel(
    out_ptr,  # [M, N]
    x_ptr,  # [M, K]
    w_ptr,  # [N, K]
    bias_ptr,  # [N]; unused without HAS_BIAS
    M,
    N,
    K,
    stride_x,
    stride_w,
    stride_o,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,  # widen dot operands to fp32 (interpreter + bfloat16)
    FP32_DOT: tl.constexpr,  # float32 inputs: 3xTF32 dot (fp32-accurate on tensor cores) instead of TF32
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_x
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_w
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < K
        a = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        b = tl.load(w_cols + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if FP32_DOT:
            acc = tl.dot(a, b, acc, input_precision="tf32x3")
        else:
            acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_o + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (x [..., K], weight [N, K], bias [N]; all of one dtype) with one tiling
    for every row count: row i of the result has the same bits whether x holds 1 row or 10,000, in any
    order (float32 accumulation, the bias added in float32, one rounding to the dtype)."""
    n, k = weight.shape
    if x.shape[-1] != k or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"matmul of x {tuple(x.shape)} with weight {tuple(weight.shape)}"
                         f"{'' if bias is None else f' and bias {tuple(bias.shape)}'} does not fit")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(f"matmul needs one dtype, got x {x.dtype}, weight {weight.dtype}"
                         f"{'' if bias is None else f', bias {bias.dtype}'}")
    tile = MATMUL_TILES.get(x.dtype)
    if tile is None:
        raise ValueError(f"matmul has no tile for {x.dtype}; it takes {', '.join(map(str, MATMUL_TILES))}")
    x2 = _rows(x)
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    out2 = out.view(-1, n)
    m = x2.shape[0]
    if m == 0 or n == 0:
        return out
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    grid = (triton.cdiv(m, tile.block_m), triton.cdiv(n, tile.block_n))
    _matmul_kernel[grid](
        out2, x2, weight, weight if bias is None else bias.contiguous(), m, n, k,
        x2.stride(0), weight.stride(0), out2.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        UPCAST=_upcast_dot(x.dtype), FP32_DOT=x.dtype == torch.float32,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    return out


# --------------------------------------------------------------------------------------------------
# SiLU-and-mul
# --------------------------------------------------------------------------------------------------


@triton.jit
def _silu_and_mul_kernel(out_ptr, x_ptr, n_cols, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
    # silu is rounded to the activation dtype before the product, as F.silu(gate) * up does.
    act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * up.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] on the last dim; returns silu(gate) * up."""
    if x.shape[-1] % 2:
        raise ValueError(f"last dim must be even (gate | up), got {x.shape[-1]}")
    n = x.shape[-1] // 2
    x2 = _rows(x)
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    out2 = out.view(-1, n)
    if x2.shape[0] == 0 or n == 0:
        return out
    block = min(1024, triton.next_power_of_2(n))
    _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](
        out2, x2, n, x2.stride(0), out2.stride(0), BLOCK=block, num_warps=4 if block >= 512 else 1
    )
    return out


# --------------------------------------------------------------------------------------------------
# Rotary embedding
# --------------------------------------------------------------------------------------------------


@triton.jit
def _rotary_kernel(
    q_out_ptr,
    k_out_ptr,
    q_ptr,
    k_ptr,
    positions_ptr,
    cos_sin_ptr,
    num_q_heads,
    num_k_heads,
    stride_q_t,
    stride_q_h,
    stride_k_t,
    stride_k_h,
    stride_qo_t,
    stride_qo_h,
    stride_ko_t,
    stride_ko_h,
    stride_cs,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HALF_PAD)
    d_ok = offs_d < HALF
    pos = tl.load(positions_ptr + t).to(tl.int64)
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    hh = offs_h.to(tl.int64)[:, None]

    mask = (offs_h < num_q_heads)[:, None] & d_ok[None, :]
    src = q_ptr + t * stride_q_t + hh * stride_q_h + offs_d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = q_out_ptr + t * stride_qo_t + hh * stride_qo_h + offs_d[None, :]
    tl.store(dst, (x1 * cos - x2 * sin).to(q_out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(q_out_ptr.dtype.element_ty), mask=mask)

    mask = (offs_h < num_k_heads)[:, None] & d_ok[None, :]
    src = k_ptr + t * stride_k_t + hh * stride_k_h + offs_d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = k_out_ptr + t * stride_ko_t + hh * stride_ko_h + offs_d[None, :]
    tl.store(dst, (x1 * cos - x2 * sin).to(k_out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(k_out_ptr.dtype.element_ty), mask=mask)


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply rotary position embedding (HF "rotate_half" layout) to q [T, H, D] and k [T, Hkv, D].

    Returns new tensors (the inputs are untouched, like the reference).
    """
    t, h, d = q.shape
    hkv = k.shape[1]
    if k.shape[0] != t or k.shape[2] != d or cos_sin_cache.shape[-1] != d or d % 2:
        raise ValueError(
            f"rotary needs q [T, H, D], k [T, Hkv, D] and cos_sin_cache [P, D] with even D; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(cos_sin_cache.shape)}"
        )
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if t == 0:
        return q_out, k_out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if cos_sin_cache.stride(-1) != 1:
        cos_sin_cache = cos_sin_cache.contiguous()
    half = d // 2
    half_pad = triton.next_power_of_2(half)
    heads = max(h, hkv)
    block_h = max(1, min(triton.next_power_of_2(heads), 2048 // half_pad))
    _rotary_kernel[(t, triton.cdiv(heads, block_h))](
        q_out, k_out, q, k, positions.contiguous(), cos_sin_cache, h, hkv,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        cos_sin_cache.stride(0),
        HALF=half, HALF_PAD=half_pad, BLOCK_H=block_h, num_warps=4 if block_h * half_pad >= 1024 else 2,
    )
    return q_out, k_out


__all__ = [
    "matmul",
    "paged_attention",
    "paged_attention_impl",
    "paged_attention_invariant",
    "rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "store_kv",
]
