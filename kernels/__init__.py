"""Kernels: tensors in, tensors out. ``KernelBackend`` (dispatch.py) is the set a model calls, one
object per engine:

- CUDA tensors take the Triton kernels (``triton_ops``) when Triton is available;
- CPU tensors take the compiled C kernels of ``cpu/`` where they apply (decode attention; float32 and
  bfloat16 rms_norm, silu_and_mul, rotary_and_store_kv) and the torch reference elsewhere.

``KernelBackend("reference")`` forces the torch reference (``reference.py``) everywhere;
``KernelBackend("triton")`` forces Triton (with TRITON_INTERPRET=1 it runs on the CPU, used by the tests).
``linear.Linear`` is a matmul weight as a callable; ``cpu/linear.py`` holds its faster CPU forms,
``linear.TritonLinear`` the Triton path's batch-invariant one.
"""

from __future__ import annotations

from . import reference
from .dispatch import BACKENDS, KernelBackend
from .linear import Linear, TritonLinear

__all__ = ["BACKENDS", "KernelBackend", "Linear", "TritonLinear", "reference"]
