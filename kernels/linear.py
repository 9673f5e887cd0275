"""A matmul weight as a callable: ``Linear(weight, bias)(x)`` is ``F.linear(x, weight, bias)``.

Models hold every matmul weight as one of these and call it; a backend may put another form of the
same product in its place (kernels/cpu/linear.py: packed, int8, stored blocks; ``TritonLinear`` here)
without the model knowing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .dispatch import KernelBackend


@dataclass(frozen=True)
class FreedWeight:
    """What a matmul weight's plain tensor becomes once its engine freed it (a packed form holds its numbers):
    its shape and dtype, no values. Not a tensor, so any product still given it fails loudly (a meta tensor
    would not: F.linear of a CPU input and a meta weight returns uninitialised memory)."""

    shape: torch.Size
    dtype: torch.dtype

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:
        return self.dtype.itemsize


class Linear:
    """F.linear on a weight [out, in] and an optional bias [out]. The tensors are the model's parameters
    themselves (not copies), so loading weights into the model updates the product."""

    __slots__ = ("weight", "bias")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight = weight
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype:  # the CPU decode step's float32 output into a bfloat16 LM head
            x = x.to(self.weight.dtype)
        return F.linear(x, self.weight, self.bias)

    def plain(self) -> Linear:
        """This product as plain F.linear on the same tensors (what every other form must equal)."""
        return Linear(self.weight, self.bias)

    @property
    def reads_weight(self) -> bool:
        """Whether a call reads ``weight``'s values. A form that computes from its own copy of them (packed,
        int8) says no, and its engine may free the plain tensor."""
        return True


class TritonLinear(Linear):
    """The product through a kernel backend's ``linear``: where Triton runs, its GEMM with one tile shape for
    every row count (triton_ops.matmul), so a row's result has the same bits however many rows share the
    call; where it does not (or after an ``auto`` backend fell back), F.linear."""

    __slots__ = ("kernels",)

    def __init__(self, base: Linear, kernels: KernelBackend) -> None:
        super().__init__(base.weight, base.bias)
        self.kernels = kernels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype:
            x = x.to(self.weight.dtype)
        return self.kernels.linear(x, self.weight, self.bias)
