"""Plain torch implementations of every kernel: the specification the Triton kernels are tested against,
and the CPU path (written with vectorised torch ops, never per-token Python loops).

Shapes used throughout:
  T tokens in the step (all sequences' new tokens concatenated), H query heads, Hkv key/value heads,
  D head size, B sequences in the step.
  KV cache of one layer: k_cache, v_cache of shape [num_blocks, block_size, Hkv, D].
  slot_mapping [T]: flat slot (block_id * block_size + offset) each new token's K/V is written to; -1 skips.
  block_tables [B, max_blocks_per_seq] int32/int64: physical block ids of each sequence (padding is ignored).
  query_start_loc [B + 1]: cumulative query lengths; context_lens [B]: tokens in the cache for each
  sequence once this step's K/V are stored (cached prefix + new tokens).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F


class _PerStep:
    """A one-entry cache keyed by a tensor's identity: every layer of a forward pass gets the same
    ``positions`` / ``slot_mapping`` tensor, so what derives from it is computed once per step, not once
    per layer (on a CPU each small torch op costs microseconds of dispatch). Held by weak reference, so a
    new step's tensor can never be mistaken for the old one."""

    def __init__(self) -> None:
        self._key: weakref.ref | None = None
        self._extra: tuple = ()
        self.value = None

    def get(self, key: torch.Tensor, *extra):
        if self._key is not None and self._key() is key and self._extra == extra:
            return self.value
        return None

    def put(self, key: torch.Tensor, value, *extra):
        self._key, self._extra, self.value = weakref.ref(key), extra, value
        return value


_rope_tables = _PerStep()
_valid_slots = _PerStep()


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm with the residual add fused in front: returns (norm(x + residual) * weight, x + residual).

    Without a residual, the second value is x itself (the residual stream starts there).
    Computed in float32 like Hugging Face's LlamaRMSNorm, cast back to x's dtype.
    """
    if residual is not None:
        x = x + residual
    residual_out = x
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        # One fused op; the same arithmetic as below for float32 (checked bit-for-bit in the tests).
        return F.rms_norm(x, weight.shape, weight, eps), residual_out
    xf = x.float()
    variance = xf.pow(2).mean(-1, keepdim=True)
    out = (xf * torch.rsqrt(variance + eps)).to(x.dtype)
    return weight * out, residual_out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias (F.linear): x [..., K], weight [N, K], bias [N]."""
    return F.linear(x, weight, bias)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] on the last dim; returns silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply rotary position embedding (Hugging Face "rotate_half" layout) to q [T, H, D] and k [T, Hkv, D].

    cos_sin_cache [max_positions, D]: first half cos, second half sin of each frequency (D/2 each), in
    float32. Returns new tensors in q's dtype.
    """
    half = cos_sin_cache.shape[-1] // 2
    tables = _rope_tables.get(positions, cos_sin_cache.data_ptr())
    if tables is None:
        # Per step, not per layer: [T, 1, D] tables in the rotate_half layout, cos|cos and -sin|sin.
        cos_sin = cos_sin_cache.index_select(0, positions)
        cos, sin = cos_sin[:, None, :half], cos_sin[:, None, half:]
        tables = _rope_tables.put(
            positions, (torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)), cos_sin_cache.data_ptr()
        )
    cos_full, sin_signed = tables

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x if x.dtype == torch.float32 else x.float()
        # x * [cos, cos] + [x2, x1] * [-sin, sin]  ==  [x1 cos - x2 sin, x2 cos + x1 sin]
        swapped = torch.cat((xf[..., half:], xf[..., :half]), dim=-1)
        out = xf * cos_full + swapped * sin_signed
        return out if out.dtype == x.dtype else out.to(x.dtype)

    return rotate(q), rotate(k)


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key/value [T, Hkv, D] into the paged cache at slot_mapping [T] (in place; -1 skips)."""
    num_blocks, block_size, hkv, d = k_cache.shape
    all_valid = _valid_slots.get(slot_mapping)
    if all_valid is None:  # once per step: every layer shares the slot mapping
        all_valid = _valid_slots.put(slot_mapping, bool((slot_mapping >= 0).all()))
    if not all_valid:
        keep = slot_mapping >= 0
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    if key.dtype != k_cache.dtype:
        key, value = key.to(k_cache.dtype), value.to(v_cache.dtype)
    k_cache.view(num_blocks * block_size, hkv, d).index_copy_(0, slot_mapping, key)
    v_cache.view(num_blocks * block_size, hkv, d).index_copy_(0, slot_mapping, value)


def _gather_kv(
    cache: torch.Tensor, block_tables: torch.Tensor, max_context_len: int
) -> torch.Tensor:
    """[B, max_context_len, Hkv, D] view of each sequence's cached K or V (padded past its length)."""
    num_blocks, block_size, hkv, d = cache.shape
    nblk = (max_context_len + block_size - 1) // block_size
    # Padding entries (past a shorter sequence's last block) may hold any sentinel (-1, num_blocks ...):
    # clamp them to a real block; the positions they cover are masked out by the callers.
    ids = block_tables[:, :nblk].long().clamp(0, num_blocks - 1)
    # index_select of whole blocks (one copy each): ~20% faster than advanced indexing with a 2-D index
    gathered = cache.index_select(0, ids.reshape(-1))  # [B * nblk, block_size, Hkv, D]
    return gathered.view(block_tables.shape[0], nblk * block_size, hkv, d)[:, :max_context_len]


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
    decode_attention=None,
    prefill_attention=None,
) -> torch.Tensor:
    """Causal attention of q [T, H, D] over each sequence's paged K/V; returns [T, H, D].

    Handles prefill, chunked prefill over a cached prefix and decode in one call: the i-th of a
    sequence's q_len new tokens sits at position context_len - q_len + i and sees keys 0..that position.
    GQA: H must be a multiple of Hkv. The current tokens' K/V must already be stored (store_kv).
    ``decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)`` may replace the
    one-token-per-sequence path (the compiled CPU kernel does; see dispatch), and ``prefill_attention``
    (with _prefill_attention's arguments) the rest (cpu/attention.py: paged_prefill_attention does on the CPU).
    """
    if prefill_attention is None:
        prefill_attention = _prefill_attention
    if decode_attention is None:
        def decode_attention(q, k, v, tables, ctx, scale):
            return _decode_attention(q, k, v, tables, ctx, scale, None)
    q_lens = None
    if max_query_len is None:
        q_lens = query_start_loc[1:] - query_start_loc[:-1]
        max_query_len = int(q_lens.max())
    if max_query_len == 1:  # decode: nothing else to compute
        return decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
    if q_lens is None:
        q_lens = query_start_loc[1:] - query_start_loc[:-1]
    if max_context_len is None:
        max_context_len = int(context_lens.max())
    decode = q_lens == 1
    if bool(decode.any()):
        # Mixed step: attend decode rows and prefill rows separately so the prefills' padding
        # (max_query_len x max_context_len per sequence) is not paid by every decode row.
        out = torch.empty_like(q)
        starts = query_start_loc[:-1]
        d_idx = decode.nonzero().squeeze(1)
        p_idx = (~decode).nonzero().squeeze(1)
        out[starts[d_idx]] = decode_attention(
            q[starts[d_idx]], k_cache, v_cache, block_tables[d_idx], context_lens[d_idx], scale
        )
        p_lens = q_lens[p_idx]
        p_loc = torch.zeros(p_idx.numel() + 1, dtype=query_start_loc.dtype, device=q.device)
        p_loc[1:] = torch.cumsum(p_lens, 0)
        tok = torch.repeat_interleave(starts[p_idx], p_lens) + (
            torch.arange(int(p_loc[-1]), device=q.device) - torch.repeat_interleave(p_loc[:-1], p_lens)
        )
        out[tok] = prefill_attention(
            q[tok], k_cache, v_cache, block_tables[p_idx], p_loc, context_lens[p_idx], scale, None, None
        )
        return out
    return prefill_attention(
        q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale, max_query_len, max_context_len
    )


def _decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_context_len: int | None,
) -> torch.Tensor:
    """One query token per sequence: q [B, H, D] -> [B, H, D]."""
    if max_context_len is None:
        max_context_len = int(context_lens.max())
    b, h, d = q.shape
    hkv = k_cache.shape[2]
    k = _gather_kv(k_cache, block_tables, max_context_len)  # [B, L, Hkv, D]
    v = _gather_kv(v_cache, block_tables, max_context_len)
    group = h // hkv
    # [B, Hkv, group, D] @ [B, Hkv, D, L] -> [B, Hkv, group, L]; no K/V repeat needed for GQA.
    qg = q.view(b, hkv, group, d)
    scores = torch.matmul(qg, k.permute(0, 2, 3, 1)).float() * scale
    pos = torch.arange(max_context_len, device=q.device)
    scores.masked_fill_((pos[None, :] >= context_lens[:, None])[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.matmul(probs, v.permute(0, 2, 1, 3))  # [B, Hkv, group, D]
    return out.reshape(b, h, d)


def prefill_layout(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    q_lens: torch.Tensor,
    max_query_len: int,
    max_context_len: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A prefill step's attention in padded form: queries qp [B, Q, H, D], keys and values [B, L, Hkv, D],
    valid_q [B, Q] (the real queries, in q's order when selected) and mask [B, Q, L] (the keys each query
    sees: causal, within its sequence's context)."""
    t = q.shape[0]
    dev = q.device
    k = _gather_kv(k_cache, block_tables, max_context_len)
    v = _gather_kv(v_cache, block_tables, max_context_len)
    steps = torch.arange(max_query_len, device=dev)
    valid_q = steps[None, :] < q_lens[:, None]  # [B, Q]
    idx = (query_start_loc[:-1, None] + steps[None, :]).clamp(max=t - 1)
    qp = q[idx]  # [B, Q, H, D]
    q_pos = (context_lens - q_lens)[:, None] + steps[None, :]  # absolute position of each query
    k_pos = torch.arange(max_context_len, device=dev)
    mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < context_lens[:, None, None])
    return qp, k, v, valid_q, mask


def _prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_query_len: int | None,
    max_context_len: int | None,
) -> torch.Tensor:
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    if max_query_len is None:
        max_query_len = int(q_lens.max())
    if max_context_len is None:
        max_context_len = int(context_lens.max())
    qp, k, v, valid_q, mask = prefill_layout(q, k_cache, v_cache, block_tables, query_start_loc, context_lens,
                                             q_lens, max_query_len, max_context_len)
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask[:, None],
        scale=scale,
        enable_gqa=True,
    )  # [B, H, Q, D]
    return out.transpose(1, 2)[valid_q]
