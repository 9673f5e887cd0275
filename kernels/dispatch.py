"""The kernels a model calls, as one object per engine: ``KernelBackend(name)``.

An engine chooses its backend from its config and hands it to its model; two engines in one process
may use different ones. Names:

- ``auto`` (the default): on CUDA the Triton kernels; on the CPU the compiled C kernels (kernels/cpu)
  where they apply, the torch reference elsewhere;
- ``reference``: the torch reference (kernels/reference.py) everywhere;
- ``triton``: the Triton kernels everywhere (on the CPU through the interpreter, TRITON_INTERPRET=1:
  the tests use it); errors propagate.

Under ``auto`` a Triton kernel that cannot be used (Triton missing, a compile error, an unsupported
shape, out of shared memory on this GPU ...) must not take a generation job down: the first failure logs
one warning on the ``forge_batch.kernels`` logger and every later call of that backend, to every kernel,
takes the reference. A half-working mix of kernels would be harder to reason about (and to reproduce)
than a clean switch. When the reference rejects the same arguments, the caller made the mistake: that
error is raised and Triton stays in use.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from . import reference
from .cpu import attention as cpu_attention
from .cpu import build as cpu_build
from .cpu import elementwise as cpu_elementwise

logger = logging.getLogger("forge_batch.kernels")

BACKENDS = ("auto", "reference", "triton")

# Importing the Triton kernels is a property of the process (a module imports once): cached here.
_triton: ModuleType | None = None
_triton_checked = False
_triton_import_error: Exception | None = None

_CPU_ELEMENTWISE_DTYPES = (torch.float32, torch.bfloat16)


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
    return _triton


def _on_device(t: torch.Tensor) -> bool:
    """Whether ``t`` lives where the compiled Triton kernels run (CUDA; ROCm builds report CUDA too)."""
    return t.is_cuda


class KernelBackend:
    """The kernel entry points a model calls (see the module docstring for ``name``)."""

    def __init__(self, name: str = "auto", batch_invariant: bool = False) -> None:
        if name not in BACKENDS:
            raise ValueError(f"kernel backend must be one of {BACKENDS}, got {name!r}")
        self.name = name
        # attention with one reduction order per query row, whatever the step: on the CPU
        # cpu.attention.paged_attention_per_row, on the Triton path triton_ops.paged_attention_invariant
        self.batch_invariant = batch_invariant
        self._triton_failed: str | None = None  # why "auto" stopped using Triton, once it has
        # decode and prefill attention on the CPU: the C decode kernel and the shared-prefix cascade
        self._cpu_attention = functools.partial(
            reference.paged_attention, decode_attention=cpu_attention.paged_decode_attention,
            prefill_attention=cpu_attention.paged_prefill_attention,
        )

    def __repr__(self) -> str:
        return f"KernelBackend({self.name!r}, batch_invariant={self.batch_invariant})"

    @property
    def uses_cpu_kernels(self) -> bool:
        """Whether CPU tensors may take the compiled C kernels (and the engine its one-call decode step)."""
        return self.name == "auto"

    def path(self, device: torch.device, dtype: torch.dtype) -> str:
        """What runs on ``device`` for a ``dtype`` model, for logs and metadata: 'cpu-c' (the compiled CPU
        kernels), 'triton' or 'torch' (the reference). Checking imports Triton, or waits for the CPU
        kernels' build."""
        if self.name == "reference":
            return "torch"
        if self.name == "triton":
            return "triton"
        if device.type == "cuda":
            return "triton" if _triton_ops() is not None and self._triton_failed is None else "torch"
        return "cpu-c" if dtype in _CPU_ELEMENTWISE_DTYPES and cpu_build.available() else "torch"

    def triton_disabled_reason(self) -> str | None:
        """Why this ``auto`` backend fell back to the reference for good (None while Triton is in use)."""
        return self._triton_failed

    def _disable(self, reason: str) -> None:
        if self._triton_failed is None:
            self._triton_failed = reason
            logger.warning("Triton kernels disabled, using the torch reference from now on: %s", reason)

    def _use_triton(self, t: torch.Tensor) -> bool:
        if self.name == "reference":
            return False
        if self.name == "triton":
            if _triton_ops() is None:
                raise RuntimeError(
                    "kernel backend 'triton' was requested but the Triton kernels cannot be imported"
                ) from _triton_import_error
            return True
        if not _on_device(t) or self._triton_failed is not None:
            return False
        if _triton_ops() is None:
            self._disable(f"importing the Triton kernels failed: {_triton_import_error!r}")
            return False
        return True

    def _call(self, name: str, t: torch.Tensor, ref: Callable[..., Any], *args: Any) -> Any:
        """Run kernel ``name`` through Triton when it applies to ``t``, else (or on failure) the reference."""
        if not self._use_triton(t):
            return ref(*args)
        if self.name == "triton":
            return getattr(_triton, name)(*args)
        try:
            return getattr(_triton, name)(*args)
        except Exception as exc:
            # If the reference rejects the arguments too, the caller is at fault, not Triton: its error
            # propagates and Triton stays on. Otherwise Triton is, and is switched off for good.
            result = ref(*args)
            self._disable(f"{name} raised {exc!r}")
            return result

    def _cpu_elementwise_ok(self, x: torch.Tensor, *others: torch.Tensor | None) -> bool:
        # Called several times per layer per step: plain checks, no generator (its cost showed in profiles).
        dtype = x.dtype
        if self.name != "auto" or dtype not in _CPU_ELEMENTWISE_DTYPES or x.dim() != 2 or x.device.type != "cpu":
            return False
        if not x.is_contiguous() or _on_device(x) or not cpu_build.available():
            return False
        for t in others:
            if t is not None and (t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous()):
                return False
        return True

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """See ``reference.rms_norm``. CPU float32 or bfloat16 under ``auto``: the compiled one-pass kernel."""
        if self._cpu_elementwise_ok(x, weight, residual):
            return cpu_elementwise.rms_norm(x, weight, eps, residual)
        return self._call("rms_norm", x, reference.rms_norm, x, weight, eps, residual)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """See ``reference.silu_and_mul``. CPU float32 or bfloat16 under ``auto``: the compiled kernel."""
        if self._cpu_elementwise_ok(x):
            return cpu_elementwise.silu_and_mul(x)
        return self._call("silu_and_mul", x, reference.silu_and_mul, x)

    def rotary_embedding(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """See ``reference.rotary_embedding``."""
        return self._call("rotary_embedding", q, reference.rotary_embedding, positions, q, k, cos_sin_cache)

    def rotary_and_store_kv(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """rotary_embedding, then store_kv of the rotated keys and the values; returns the rotated (q, k).
        CPU float32 or bfloat16 under ``auto``: one compiled pass that rotates q and k in place."""
        if self.name == "auto" and not _on_device(q) and cpu_elementwise.rotary_store_kv_ok(
            q, k, v, cos_sin_cache, k_cache, positions, slot_mapping
        ):
            return cpu_elementwise.rotary_store_kv(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping)
        q, k = self.rotary_embedding(positions, q, k, cos_sin_cache)
        self.store_kv(k, v, k_cache, v_cache, slot_mapping)
        return q, k

    def store_kv(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        """See ``reference.store_kv`` (in place; a failed Triton attempt is simply redone by the reference)."""
        return self._call("store_kv", key, reference.store_kv, key, value, k_cache, v_cache, slot_mapping)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """See ``reference.linear`` (F.linear). Where Triton runs: its GEMM with one tile shape for every row
        count (triton_ops.matmul), so a row's result does not depend on the rows beside it. Only the
        batch-invariant weight form (linear.TritonLinear) calls this; plain matmul weights stay F.linear
        (cuBLAS on a GPU, which picks its kernel and split-K by shape)."""
        return self._call("matmul", x, reference.linear, x, weight, bias)

    def paged_attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
        query_start_loc: torch.Tensor, context_lens: torch.Tensor, scale: float,
        max_query_len: int | None = None, max_context_len: int | None = None,
    ) -> torch.Tensor:
        """See ``reference.paged_attention``. On the CPU under ``auto``, decode rows take the compiled C
        kernel, which reads the paged cache in place instead of gathering it into padded tensors, and
        prefill rows behind a shared cached prefix attend to it once (cpu.attention.paged_prefill_attention).
        With ``batch_invariant`` every row there takes the C decode kernel as a row of its own
        (cpu.attention.paged_attention_per_row): the same bits in a prefill, a chunk or a decode step; on the
        Triton path the Triton kernel's one tiling, without split-KV (triton_ops.paged_attention_invariant)."""
        ref = reference.paged_attention
        if self.name == "auto" and q.device.type == "cpu" and _cpu_decode_ok(q):
            if self.batch_invariant:
                return cpu_attention.paged_attention_per_row(
                    q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale, max_query_len,
                    max_context_len)
            ref = self._cpu_attention
        return self._call(
            "paged_attention_invariant" if self.batch_invariant else "paged_attention", q, ref,
            q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale, max_query_len, max_context_len,
        )


def _cpu_decode_ok(q: torch.Tensor) -> bool:
    return q.dtype in (torch.float32, torch.bfloat16) and q.shape[-1] % 16 == 0 and cpu_build.available()
