"""The Triton path's weight forms, kept out of the model: the counterpart of cpu_backend.py where the Triton
kernels run (CUDA; or any device with ``kernel_backend="triton"``, e.g. under Triton's interpreter).

With ``batch_invariant`` (the default) every matmul, the decoder's and the LM head, becomes a
``TritonLinear``: the Triton GEMM with one tile shape for every row count (kernels/triton_ops.py ``matmul``)
in place of cuBLAS, which picks its kernel, tile and split-K by the shape, so that a row's bits there
change with the number of rows beside it. The kernel backend's attention then runs its one tiling without
split-KV (``paged_attention_invariant``); RMSNorm is one program per row already. Without
``batch_invariant`` the weights stay plain F.linear (cuBLAS), the faster path whose numbers depend on
the step.
"""

from __future__ import annotations

import torch

from forge_batch.kernels import KernelBackend, TritonLinear
from forge_batch.models.llama import LlamaForCausalLM, matmul_slots


class TritonBackend:
    """The Triton path's weight preparation for one engine."""

    def __init__(self, kernels: KernelBackend, batch_invariant: bool = True) -> None:
        self.kernels = kernels
        self.batch_invariant = batch_invariant

    @staticmethod
    def runs(kernels: KernelBackend, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether the Triton kernels compute on ``device``: forced (``triton``), or ``auto`` on CUDA with
        Triton importable."""
        return kernels.name == "triton" or (device.type == "cuda" and kernels.path(device, dtype) == "triton")

    @torch.inference_mode()
    def prepare_weights(self, model: LlamaForCausalLM) -> int:
        """Put the batch-invariant form in place of every matmul weight (none without ``batch_invariant``).
        Returns how many were replaced."""
        if not self.batch_invariant:
            return 0
        slots = matmul_slots(model)
        for owner, name, _ in slots:
            setattr(owner, name, TritonLinear(getattr(owner, name), self.kernels))
        return len(slots)
