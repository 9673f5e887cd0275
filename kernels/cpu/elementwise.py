"""Element-wise C kernels: rms_norm, silu_and_mul, rotary embedding fused with the KV-cache write, and
the structured-output mask's ban of disallowed logits. Each matches its torch reference (reference.py,
constraints.apply_bitmask's numpy path); a ``*_ok`` check says where the C version takes the arguments."""

from __future__ import annotations

import torch

from .build import available, lib, ptr


def ban_masked(logits: torch.Tensor, bitmask: torch.Tensor, penalty: float) -> None:
    """In place: logits [S, V] float32 -= penalty where bitmask [S, ceil(V/32)] int32 has the token's bit
    clear (constraints.apply_bitmask's CPU path, same result as its numpy version)."""
    rows, vocab = logits.shape
    lib().ban_masked_f32(
        logits.data_ptr(), bitmask.data_ptr(), rows, vocab, bitmask.shape[1], float(penalty), torch.get_num_threads()
    )


def ban_masked_ok(logits: torch.Tensor, bitmask: torch.Tensor) -> bool:
    """Whether ban_masked takes these: contiguous CPU float32 logits [S, V], int32 bitmask [S, >= V/32]."""
    return (
        logits.dtype == torch.float32 and logits.device.type == "cpu" and logits.is_contiguous()
        and bitmask.dtype == torch.int32 and bitmask.device.type == "cpu" and bitmask.is_contiguous()
        and bitmask.shape[0] == logits.shape[0] and bitmask.shape[1] * 32 >= logits.shape[1] and available()
    )


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.rms_norm for contiguous float32 or bfloat16 [T, hidden] (weight and residual of the same
    dtype) in one pass (two with a residual)."""
    rows, cols = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    c = lib()
    fn = c.rms_norm_bf16 if x.dtype == torch.bfloat16 else c.rms_norm_f32
    fn(
        x.data_ptr(), ptr(residual), weight.data_ptr(), float(eps),
        out.data_ptr(), None if residual is None else res_out.data_ptr(), rows, cols, torch.get_num_threads(),
    )
    return out, res_out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """reference.silu_and_mul for contiguous float32 or bfloat16 [T, 2 * inter]."""
    rows, cols = x.shape[0], x.shape[1] // 2
    out = torch.empty((rows, cols), dtype=x.dtype)
    c = lib()
    fn = c.silu_and_mul_bf16 if x.dtype == torch.bfloat16 else c.silu_and_mul_f32
    fn(x.data_ptr(), out.data_ptr(), rows, cols, torch.get_num_threads())
    return out


def rotary_store_kv(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.rotary_embedding then reference.store_kv, float32 or bfloat16, in one pass: q and k are
    rotated in place (views of one buffer with a shared row stride, see rotary_store_kv_ok) and returned."""
    t, h, d = q.shape
    c = lib()
    fn = c.rotary_store_kv_bf16 if q.dtype == torch.bfloat16 else c.rotary_store_kv_f32
    fn(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(0), positions.data_ptr(), cos_sin_cache.data_ptr(),
        t, h, k.shape[1], d, k_cache.data_ptr(), v_cache.data_ptr(), slot_mapping.data_ptr(),
        torch.get_num_threads(),
    )
    return q, k


def rotary_store_kv_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_sin_cache: torch.Tensor,
                       k_cache: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor) -> bool:
    """Whether rotary_store_kv takes these: CPU float32 or bfloat16 rows of one stride (the cache of the
    same dtype, the cos/sin table float32), contiguous heads and cache."""
    stride = q.stride(0)  # a single row's stride is arbitrary (never used)
    return (
        q.dtype == k.dtype == v.dtype == k_cache.dtype and q.dtype in (torch.float32, torch.bfloat16)
        and cos_sin_cache.dtype == torch.float32
        and q.device.type == "cpu" and (q.shape[0] <= 1 or k.stride(0) == v.stride(0) == stride)
        and q.stride(1) == k.stride(1) == v.stride(1) == q.shape[2] and q.stride(2) == k.stride(2) == v.stride(2) == 1
        and k_cache.is_contiguous() and cos_sin_cache.is_contiguous()
        and positions.dtype == slot_mapping.dtype == torch.int64 and positions.is_contiguous()
        and slot_mapping.is_contiguous() and available()
    )
