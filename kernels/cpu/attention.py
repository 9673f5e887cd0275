"""Paged attention on the CPU: decode rows through the C kernel (reading the paged cache in place with an
online softmax), and the cascade over a prefix every sequence shares, for decode and prefill alike.
Same contracts as reference.paged_attention's decode and prefill parts (tests compare them).

``paged_attention_per_row`` is the batch-invariant form: every query row, whether of a prefill, a chunk
over a cached prefix or a decode step, goes through the C decode kernel as a row of its own (its keys in
the cache's blocks, in sequence order, one online softmax left to right), so its bits depend only on its
query and its keys, never on the step's other rows, its kind, or the prefix cache."""

from __future__ import annotations

import torch

from .. import reference
from .build import lib, ptr

# Attention over a prefix that every sequence of the batch shares (a common system prompt) is one
# dense attention of all B x G query rows of a KV head against the same keys: a matrix product that
# torch's fused CPU attention runs several times faster than B separate passes over the same blocks.
# The kernel then continues the softmax from that result over each sequence's own blocks. Below these
# sizes the extra calls cost more than they save.
CASCADE_MIN_SEQS = 8
CASCADE_MIN_WORK = 8192  # sequences x shared tokens
_shared_prefix = reference._PerStep()


def shared_prefix_blocks(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int) -> int:
    """How many leading block-table columns hold the same physical block for every sequence, all of them
    full before ``context_lens`` for every sequence (decode: its context length; prefill: its first
    query's position). Computed once per step: each layer passes the same tables tensor."""
    cached = _shared_prefix.get(block_tables, context_lens.data_ptr())
    if cached is not None:
        return cached
    n = 0
    if block_tables.shape[0] > 1 and block_tables.shape[1] > 0:
        same = (block_tables == block_tables[:1]).all(0)
        n = int(same.cumprod(0).sum())
        n = min(n, int(context_lens.min()) // block_size)
    return _shared_prefix.put(block_tables, n, context_lens.data_ptr())


def _attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        bias: torch.Tensor | None = None):
    """q [N, Hkv, R, D], k/v [N, Hkv, L, D], optional additive mask ``bias`` [N, 1, R, L] (0 or -inf)
    -> (out [N, Hkv, R, D], logsumexp [N, Hkv, R] float32)."""
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if flash is not None:
        out, lse = flash(q, k, v, 0.0, False, attn_mask=bias, scale=scale)
        return out, lse.float()
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.float()
    lse = torch.logsumexp(scores, -1)
    return torch.matmul(torch.exp(scores - lse[..., None]), v.float()).to(q.dtype), lse


def _shared_prefix_product(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ids: torch.Tensor,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query row of q [T, H, D] against the K/V of the shared blocks ``ids`` (all visible), as one
    dense product per KV head: (out [Hkv, T * G, D], lse [Hkv, T * G]), row t * G + g for query head
    kh * G + g of token t."""
    t, h, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    prefix = ids.numel() * block_size
    k_pre = k_cache.index_select(0, ids).view(1, prefix, hkv, d).transpose(1, 2)
    v_pre = v_cache.index_select(0, ids).view(1, prefix, hkv, d).transpose(1, 2)
    q_rows = q.reshape(t, hkv, h // hkv, d).transpose(0, 1).reshape(1, hkv, t * (h // hkv), d)
    out, lse = _attention_with_lse(q_rows, k_pre, v_pre, scale)
    return out[0], lse[0]


def paged_prefill_attention(
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
    """reference._prefill_attention (q [T, H, D], every sequence with at least one query) with the cascade
    of paged_decode_attention: when the sequences' leading blocks are one shared, already-cached prefix (a
    common system prompt) that every query comes after, all T x H query rows attend to it in one dense
    product and each sequence's own blocks are attended separately; the two are merged by their
    log-sum-exps. The reference instead gathers every sequence's whole context into a padded tensor
    (W2's prefill: ~58 copies of the same 20 blocks per layer and step)."""
    t, h, d = q.shape
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    # blocks every sequence holds in full before its first query
    shared = shared_prefix_blocks(block_tables, context_lens - q_lens, block_size)
    if shared == 0 or t * shared * block_size < CASCADE_MIN_WORK:
        return reference._prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale,
                                            max_query_len, max_context_len)
    group = h // hkv
    prefix = shared * block_size
    out_pre, lse_pre = _shared_prefix_product(q, k_cache, v_cache, block_tables[0, :shared].long(), scale)
    out_pre = out_pre.view(hkv, t, group, d).transpose(0, 1).reshape(t, h, d)
    lse_pre = lse_pre.view(hkv, t, group).transpose(0, 1).reshape(t, h)
    # each sequence's own blocks, causal, positions counted from the prefix's end
    out_own, lse_own = _prefill_with_lse(q, k_cache, v_cache, block_tables[:, shared:], query_start_loc,
                                         context_lens - prefix, q_lens, scale)
    top = torch.maximum(lse_pre, lse_own)
    w_pre, w_own = torch.exp(lse_pre - top), torch.exp(lse_own - top)
    merged = (out_pre.float() * w_pre[..., None] + out_own.float() * w_own[..., None]) / (w_pre + w_own)[..., None]
    return merged.to(q.dtype)


def _prefill_with_lse(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      query_start_loc: torch.Tensor, context_lens: torch.Tensor, q_lens: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of each sequence's queries over its paged K/V, as reference._prefill_attention, also
    returning each row's log-sum-exp: (out [T, H, D], lse [T, H] float32)."""
    h, d = q.shape[1], q.shape[2]
    b, hkv = block_tables.shape[0], k_cache.shape[2]
    group = h // hkv
    max_q = int(q_lens.max())
    qp, k, v, valid_q, mask = reference.prefill_layout(q, k_cache, v_cache, block_tables, query_start_loc,
                                                       context_lens, q_lens, max_q, int(context_lens.max()))
    # rows of a KV head: (query, group member), so the G heads sharing it are one batch of rows
    qp = qp.view(b, max_q, hkv, group, d).permute(0, 2, 1, 3, 4).reshape(b, hkv, max_q * group, d)
    mask = mask.repeat_interleave(group, dim=1)[:, None]  # [B, 1, Q * G, L]
    bias = torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, float("-inf"))
    out, lse = _attention_with_lse(qp, k.transpose(1, 2), v.transpose(1, 2), scale, bias)
    out = out.view(b, hkv, max_q, group, d).permute(0, 2, 1, 3, 4).reshape(b, max_q, h, d)[valid_q]
    lse = lse.view(b, hkv, max_q, group).permute(0, 2, 1, 3).reshape(b, max_q, h)[valid_q]
    return out, lse


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    cascade: bool = True,
) -> torch.Tensor:
    """q [B, H, D] (one token per sequence) -> [B, H, D]; same contract as reference._decode_attention.

    With ``cascade`` (the default), a prefix of blocks shared by the whole batch is attended once as a
    dense product (see CASCADE_MIN_*) and the kernel continues from there over each sequence's rest.
    """
    if q.dtype == torch.float32:
        fn = lib().paged_decode_attention_f32
    elif q.dtype == torch.bfloat16:
        fn = lib().paged_decode_attention_bf16
    else:
        raise TypeError(f"CPU decode attention supports float32 and bfloat16, not {q.dtype}")
    assert k_cache.dtype == q.dtype and v_cache.dtype == q.dtype
    b, h, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    if d % 16:
        raise ValueError(f"CPU decode attention needs head_dim a multiple of 16, not {d}")
    q = q.contiguous()
    k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    tables = block_tables if block_tables.dtype == torch.int64 else block_tables.to(torch.int64)
    ctx = context_lens if context_lens.dtype == torch.int64 else context_lens.to(torch.int64)
    tables, ctx = tables.contiguous(), ctx.contiguous()
    shared = shared_prefix_blocks(block_tables, ctx, block_size) if cascade and b >= CASCADE_MIN_SEQS else 0
    init_out = init_lse = None
    if shared and b * shared * block_size >= CASCADE_MIN_WORK:
        init_out, init_lse = _shared_prefix_product(q, k_cache, v_cache, tables[0, :shared], scale)  # [Hkv, B*G, ...]
        init_out, init_lse = init_out.contiguous(), init_lse.contiguous()
    else:
        shared = 0
    out = torch.empty_like(q)
    fn(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), ctx.data_ptr(), out.data_ptr(),
       ptr(init_out), ptr(init_lse),
       b, h, hkv, d, block_size, tables.shape[1], shared, float(scale), torch.get_num_threads())
    return out


def paged_attention_per_row(
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
    """reference.paged_attention (q [T, H, D] -> [T, H, D]) with one reduction order per query row: the
    token at position p of its sequence is a decode row with context p + 1 over its sequence's block table,
    without the shared-prefix cascade. A prefill's rows read their keys once per row instead of sharing a
    dense product (slower for long prompts; BENCHMARKS.md has the cost)."""
    if max_query_len == 1 or q.shape[0] == block_tables.shape[0]:  # one token per sequence: decode rows
        return paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, cascade=False)
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    seq = torch.repeat_interleave(torch.arange(q_lens.numel(), device=q.device), q_lens, output_size=q.shape[0])
    # token t of sequence s sits at position context_lens[s] - (query_start_loc[s + 1] - t) and sees keys up to it
    row_ctx = context_lens.index_select(0, seq) - query_start_loc[1:].index_select(0, seq) + 1 + torch.arange(
        q.shape[0], device=q.device)
    tables = block_tables.index_select(0, seq)
    return paged_decode_attention(q, k_cache, v_cache, tables, row_ctx, scale, cascade=False)
