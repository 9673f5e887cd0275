"""Kernel entry points used by the model. Each dispatches on the tensor's device:

- CUDA tensors take the Triton kernels (``forge_batch.kernels.triton_*``) when Triton is available;
- CPU tensors take the compiled C kernels of ``cpu_ops`` where they apply (decode attention; float32
  rms_norm, silu_and_mul, rotary_and_store_kv) and the torch reference (``forge_batch.kernels.reference``) elsewhere.

``set_backend("reference")`` (or FORGE_BATCH_KERNELS=reference) forces the reference path everywhere;
``set_backend("triton")`` forces Triton (with TRITON_INTERPRET=1 it runs on the CPU, used by the tests).
"""

from __future__ import annotations

from . import reference
from .dispatch import (
    get_backend,
    paged_attention,
    rms_norm,
    rotary_and_store_kv,
    rotary_embedding,
    set_backend,
    silu_and_mul,
    store_kv,
)

__all__ = [
    "get_backend",
    "paged_attention",
    "reference",
    "rms_norm",
    "rotary_and_store_kv",
    "rotary_embedding",
    "set_backend",
    "silu_and_mul",
    "store_kv",
]
