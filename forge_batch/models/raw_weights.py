"""Matrices as their checkpoint stores them: GGUF's quantised blocks, or float16/bfloat16 values.

A loader hands these over beside the float state dict when asked (``stored_weights=``); the engine's
CPU backend may then compute few-row steps on the stored bytes directly (kernels/cpu/stored.py) instead
of the dense copy. The loaders know file formats, not kernels: this is all they share with the backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# ggml type ids (ggml.h) of the formats kept, by name; a format names the byte layout of ``RawWeight.data``
RAW_FORMATS = {"F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "BF16": 30}


@dataclass
class RawWeight:
    """A weight [rows, cols] as stored: ``data`` is its bytes (uint8, row after row), in ``fmt``: ggml
    blocks of 32 weights for Q4_0/Q4_1/Q8_0 (an fp16 scale, Q4_1 also an fp16 minimum, then the values),
    or the float16/bfloat16 values themselves for F16/BF16."""

    fmt: str
    data: torch.Tensor
    rows: int
    cols: int

    @staticmethod
    def fits(shape: tuple[int, ...] | torch.Size) -> bool:
        """Whether a tensor of this shape is kept: a matrix of whole 32-column blocks."""
        return len(shape) == 2 and shape[1] % 32 == 0

    @classmethod
    def from_tensor(cls, weight: torch.Tensor) -> RawWeight:
        """A float16 or bfloat16 matrix as it is (a view: no copy, no rounding)."""
        fmt = {torch.float16: "F16", torch.bfloat16: "BF16"}.get(weight.dtype)
        if fmt is None:
            raise ValueError(f"only float16/bfloat16 tensors are kept as they are, got {weight.dtype}")
        rows, cols = weight.shape
        return cls(fmt, weight.contiguous().view(torch.uint8).reshape(-1), rows, cols)
