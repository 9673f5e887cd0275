"""Faster CPU forms of a model's matmul weights, each a drop-in for ``kernels.linear.Linear``.

The engine's CPU backend builds them once at load (forge_batch/engine/cpu_backend.py) and puts them in
the model's place of the plain one; the model just calls its weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..linear import Linear
from . import int8, mkl_packed, onednn_packed, panel_product, stored

# Below 16 rows MKL's packed GEMM sums in another order than F.linear (and the few-row steps have their
# own paths), so those rows keep F.linear.
PACKED_MIN_ROWS = 16
# a batch-invariant product pads its rows up to a multiple of this (mkl_packed says why)
INVARIANT_ROW_MULTIPLE = mkl_packed.INVARIANT_ROW_MULTIPLE


def pad_rows(x: torch.Tensor, multiple: int = INVARIANT_ROW_MULTIPLE) -> torch.Tensor:
    """``x`` [M, K] with zero rows appended up to a multiple of ``multiple`` rows."""
    extra = -x.shape[0] % multiple
    return torch.cat([x, x.new_zeros(extra, x.shape[1])]) if extra else x


class MklPackedLinear(Linear):
    """A float32 weight packed once into MKL's GEMM layout (mkl_packed): the decode steps' skinny
    matmuls 20-40% faster at any row count from PACKED_MIN_ROWS, F.linear's numbers.

    ``batch_invariant``: every row count takes the packed GEMM, padded up to a multiple of INVARIANT_ROW_MULTIPLE rows, so
    a row's result has the same bits whatever the number of rows beside it."""

    __slots__ = ("packed", "batch_invariant")

    def __init__(self, base: Linear, batch_invariant: bool = False) -> None:
        super().__init__(base.weight, base.bias)
        self.packed = mkl_packed.pack(base.weight)
        self.batch_invariant = batch_invariant

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype:
            x = x.to(self.weight.dtype)
        if self.batch_invariant:
            m = x.shape[0]
            return mkl_packed.linear(pad_rows(x), self.packed, self.bias)[:m]
        if x.shape[0] >= PACKED_MIN_ROWS:
            return mkl_packed.linear(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)

    @property
    def reads_weight(self) -> bool:
        return not self.batch_invariant  # steps under PACKED_MIN_ROWS rows take F.linear


class PaddedLinear(Linear):
    """F.linear with the rows padded up to a multiple of INVARIANT_ROW_MULTIPLE: the batch-invariant product
    where MKL's packed GEMM (float32) or oneDNN's reordered weights (bfloat16) are unavailable."""

    __slots__ = ()

    def __init__(self, base: Linear) -> None:
        super().__init__(base.weight, base.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype:
            x = x.to(self.weight.dtype)
        m = x.shape[0]
        return F.linear(pad_rows(x), self.weight, self.bias)[:m]


class OneDnnLinear(Linear):
    """A bfloat16 or float32 weight reordered once into oneDNN's blocked layout (onednn_packed): in bfloat16
    F.linear's numbers at any row count, without its reorder on every call; in float32 oneDNN's own (F.linear
    is MKL there), twice MKL's speed on AMD CPUs.

    ``batch_invariant``: a single row is padded to two. oneDNN's one-row product (and F.linear's) sums some
    rows in another order than at 2 or more rows, which agree with each other (measured: K = 1536, heavy-
    tailed activations, about one row in six differed by a bfloat16 ulp in an output; M = 2..300 never;
    float32 alike)."""

    __slots__ = ("packed", "batch_invariant")

    def __init__(self, base: Linear, batch_invariant: bool = False) -> None:
        super().__init__(base.weight, base.bias)
        self.packed = onednn_packed.pack(base.weight)
        self.batch_invariant = batch_invariant

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_invariant and x.shape[0] == 1:
            return onednn_packed.linear(torch.cat([x, x.new_zeros(x.shape)]), self.packed, self.bias)[:1]
        return onednn_packed.linear(x, self.packed, self.bias)

    @property
    def reads_weight(self) -> bool:
        return False


class _PanelSteps:
    """Mixed in before a packed product: its steps of up to PANEL_MAX_ROWS rows read the checkpoint's 4/8-bit
    blocks (panel_product) with that product's bits; larger steps take the product (batch-invariant or not,
    as ``base`` was)."""

    __slots__ = ()

    def __init__(self, base: OneDnnLinear | MklPackedLinear, panel: panel_product.PanelWeight) -> None:
        Linear.__init__(self, base.weight, base.bias)  # type: ignore[arg-type]
        self.packed = base.packed
        self.batch_invariant = base.batch_invariant
        self.panel = panel

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= panel_product.PANEL_MAX_ROWS:
            return panel_product.panel_product(x.to(self.weight.dtype), self.panel)
        return super().__call__(x)  # type: ignore[misc]


class PanelLinear(_PanelSteps, OneDnnLinear):
    """A oneDNN product whose steps of up to PANEL_MAX_ROWS rows read the checkpoint's
    4/8-bit blocks (panel_product: a third of the bfloat16 weight's bytes, a sixth of the float32 one's) with
    oneDNN's bits."""

    __slots__ = ("panel",)


class MklPanelLinear(_PanelSteps, MklPackedLinear):
    """A float32 product (MKL's packed GEMM; batch-invariant, rows padded to a multiple of 4) whose steps of up
    to PANEL_MAX_ROWS rows read the checkpoint's 4/8-bit blocks (panel_product: a quarter to an eighth of the
    float32 weight's bytes) with MKL's bits."""

    __slots__ = ("panel",)


class Int8Linear(Linear):
    """W8A8 (quantization="int8"): the weight int8 per output channel, rows quantized at run time
    (int8.int8_linear). Not F.linear's numbers, but a row's result is the same in any batch."""

    __slots__ = ("quantized",)

    def __init__(self, base: Linear) -> None:
        super().__init__(base.weight, base.bias)
        self.quantized = int8.quantize_weight_int8(base.weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype:
            x = x.to(self.weight.dtype)
        return int8.int8_linear(x, self.quantized, self.bias)

    @property
    def reads_weight(self) -> bool:
        return False


class StoredLinear(Linear):
    """Steps of up to WEIGHT_GEMV_MAX_ROWS rows read the weight in its checkpoint's storage format
    (``stored``: e.g. 4-bit blocks, several times fewer bytes than float32) with the same products in
    float32 arithmetic; larger steps go to ``fallback`` (the weight's other form)."""

    __slots__ = ("stored", "fallback")

    def __init__(self, fallback: Linear, stored_weight: stored.StoredWeight) -> None:
        super().__init__(fallback.weight, fallback.bias)
        self.stored = stored_weight
        self.fallback = fallback

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= stored.WEIGHT_GEMV_MAX_ROWS:
            # a bfloat16 model's rows go in and come back as bfloat16
            return stored.weight_gemv(x.float(), self.stored, self.bias).to(x.dtype)
        return self.fallback(x)

    @property
    def reads_weight(self) -> bool:
        return self.fallback.reads_weight
