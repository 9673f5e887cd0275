"""Choose, per call, between the Triton kernels and the torch reference (see package docstring).

Under the default backend ("auto") a Triton kernel that cannot be used (Triton missing, a compile
error, an unsupported shape, out of shared memory on this GPU ...) must not take a generation job
down: the first failure logs one warning on the ``forge_batch.kernels`` logger and every later call,
of every kernel, takes the reference for the rest of the process. A half-working mix of kernels would
be harder to reason about (and to reproduce) than a clean switch. When the reference rejects the same
arguments, the caller made the mistake: that error is raised and Triton stays in use. When Triton is
requested explicitly (``set_backend("triton")`` / FORGE_BATCH_KERNELS=triton, as the kernel tests
do) errors propagate.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from . import cpu_ops, reference

logger = logging.getLogger("forge_batch.kernels")

_VALID = ("auto", "reference", "triton")
_backend = os.environ.get("FORGE_BATCH_KERNELS", "auto")

_triton: ModuleType | None = None
_triton_checked = False
_triton_failed: str | None = None  # why "auto" stopped using Triton, once it has
_triton_import_error: Exception | None = None


def set_backend(name: str) -> None:
    """'auto' (Triton on CUDA, reference elsewhere), 'reference' (always) or 'triton' (always)."""
    global _backend
    if name not in _VALID:
        raise ValueError(f"kernel backend must be one of {_VALID}, got {name!r}")
    _backend = name


def get_backend() -> str:
    """The backend in force: 'auto', 'reference' or 'triton'."""
    return _backend


def triton_disabled_reason() -> str | None:
    """Why the auto backend fell back to the reference for good (None while Triton is still in use)."""
    return _triton_failed


def reset_fallback() -> None:
    """Forget an earlier Triton failure (tests; a process that fixed its environment)."""
    global _triton_failed, _triton_checked, _triton
    _triton_failed = None
    _triton_checked = False
    _triton = None


def _triton_ops() -> ModuleType | None:
    """The Triton kernel module, or None when it cannot be imported (no triton, no GPU build)."""
    global _triton, _triton_checked, _triton_import_error
    if not _triton_checked:
        _triton_checked = True
        try:
            from . import triton_ops

            _triton = triton_ops
        except Exception as exc:  # ImportError, or a Triton build without a usable backend
            _triton = None
            _triton_import_error = exc
            if _backend == "auto":
                _disable(f"importing the Triton kernels failed: {exc!r}")
    return _triton


def _disable(reason: str) -> None:
    global _triton_failed
    if _triton_failed is None:
        _triton_failed = reason
        logger.warning("Triton kernels disabled, using the torch reference from now on: %s", reason)


def _on_device(t: torch.Tensor) -> bool:
    """Whether ``t`` lives where the compiled Triton kernels run (CUDA; ROCm builds report CUDA too)."""
    return t.is_cuda


def _use_triton(t: torch.Tensor) -> bool:
    if _backend == "reference":
        return False
    if _backend == "triton":
        if _triton_ops() is None:
            raise RuntimeError(
                "kernel backend 'triton' was requested but the Triton kernels cannot be imported"
            ) from _triton_import_error
        return True
    return _on_device(t) and _triton_failed is None and _triton_ops() is not None


def _call(name: str, t: torch.Tensor, ref: Callable[..., Any], *args: Any) -> Any:
    """Run kernel ``name`` through Triton when it applies to ``t``, else (or on failure) the reference."""
    if not _use_triton(t):
        return ref(*args)
    if _backend == "triton":
        return getattr(_triton, name)(*args)
    try:
        return getattr(_triton, name)(*args)
    except Exception as exc:
        # If the reference rejects the arguments too, the caller is at fault, not Triton: its error
        # propagates and Triton stays on. Otherwise Triton is, and is switched off for good.
        result = ref(*args)
        _disable(f"{name} raised {exc!r}")
        return result


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """See ``reference.rms_norm``. CPU float32 or bfloat16 under ``auto``: the compiled one-pass kernel
    (cpu_ops)."""
    if _cpu_elementwise_ok(x, weight, residual):
        return cpu_ops.rms_norm(x, weight, eps, residual)
    return _call("rms_norm", x, reference.rms_norm, x, weight, eps, residual)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """See ``reference.silu_and_mul``. CPU float32 or bfloat16 under ``auto``: the compiled kernel (cpu_ops)."""
    if _cpu_elementwise_ok(x):
        return cpu_ops.silu_and_mul(x)
    return _call("silu_and_mul", x, reference.silu_and_mul, x)


def _cpu_elementwise_ok(x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    # Called several times per layer per step: plain checks, no generator (its cost showed in profiles).
    dtype = x.dtype
    if _backend != "auto" or dtype not in _CPU_ELEMENTWISE_DTYPES or x.dim() != 2 or x.device.type != "cpu":
        return False
    if not x.is_contiguous() or _on_device(x) or not cpu_ops.available():
        return False
    for t in others:
        if t is not None and (t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous()):
            return False
    return True


_CPU_ELEMENTWISE_DTYPES = (torch.float32, torch.bfloat16)


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """See ``reference.rotary_embedding``."""
    return _call("rotary_embedding", q, reference.rotary_embedding, positions, q, k, cos_sin_cache)


def rotary_and_store_kv(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """rotary_embedding, then store_kv of the rotated keys and the values; returns the rotated (q, k).
    CPU float32 or bfloat16 under ``auto``: one compiled pass that rotates q and k in place (cpu_ops)."""
    if _backend == "auto" and not _on_device(q) and cpu_ops.rotary_store_kv_ok(
        q, k, v, cos_sin_cache, k_cache, positions, slot_mapping
    ):
        return cpu_ops.rotary_store_kv(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping)
    q, k = rotary_embedding(positions, q, k, cos_sin_cache)
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    return q, k


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """See ``reference.store_kv`` (in place; a failed Triton attempt is simply redone by the reference)."""
    return _call("store_kv", key, reference.store_kv, key, value, k_cache, v_cache, slot_mapping)


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
    """See ``reference.paged_attention``. On the CPU under ``auto``, decode rows take the compiled C kernel
    (``cpu_ops``), which reads the paged cache in place instead of gathering it into padded tensors, and
    prefill rows behind a shared cached prefix attend to it once (cpu_ops.paged_prefill_attention)."""
    ref = reference.paged_attention
    if _backend == "auto" and q.device.type == "cpu" and _cpu_decode_ok(q):
        ref = _reference_with_cpu_decode
    return _call(
        "paged_attention", q, ref,
        q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale, max_query_len, max_context_len,
    )


_reference_with_cpu_decode = functools.partial(
    reference.paged_attention, decode_attention=cpu_ops.paged_decode_attention,
    prefill_attention=cpu_ops.paged_prefill_attention,
)


def _cpu_decode_ok(q: torch.Tensor) -> bool:
    return q.dtype in (torch.float32, torch.bfloat16) and q.shape[-1] % 16 == 0 and cpu_ops.available()
