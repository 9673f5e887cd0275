"""bfloat16 matmul weights in oneDNN's own blocked layout, reordered once at load.

A bfloat16 F.linear on the CPU runs oneDNN's matmul (AMX or AVX512-BF16 where the CPU has them), which
first reorders the plain [n, k] weight into its kernel's layout, on every call. torch exposes the
reorder and the product on a reordered weight as ``torch.ops.mkldnn._reorder_linear_weight`` and
``_linear_pointwise`` (what inductor's CPU backend uses); the reordered weight serves any row count.
The float32 path's counterpart is mkl_packed.

Measured on a 2-vCPU Sapphire Rapids (AMX), ms per product, F.linear vs reordered, default model's
shapes: 128 rows qkv 0.182 vs 0.114, gate_up 0.476 vs 0.340, down 0.233 vs 0.177, LM head 6.45 vs 3.81;
256 rows gate_up 0.619 vs 0.479, LM head 10.98 vs 9.00. The results equal F.linear's bit for bit at
every row count we tried (1 to 2048; tests/test_packed_weights.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger("forge_batch.kernels")

# The row count the reorder is told to expect; the layout it picks serves every row count.
_NOMINAL_ROWS = 128
_available: bool | None = None


@dataclass(frozen=True)
class OneDnnWeight:
    """A [n, k] bfloat16 weight in oneDNN's layout (an opaque mkldnn tensor), for y = x @ weight.T."""

    data: torch.Tensor
    n: int
    k: int


def _ops_present() -> bool:
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")
    )


def available() -> bool:
    """Whether torch has the ops and they reproduce F.linear here (checked once, on a small product)."""
    global _available
    if _available is None:
        _available = False
        try:
            if _ops_present():
                g = torch.Generator().manual_seed(0)
                w = torch.randn(48, 64, generator=g).bfloat16()
                b = torch.randn(48, generator=g).bfloat16()
                x = torch.randn(5, 64, generator=g).bfloat16()
                _available = torch.equal(linear(x, pack(w), b), F.linear(x, w, b))
                if not _available:
                    log.warning("oneDNN's reordered bfloat16 weights disagree with F.linear; not used")
        except Exception as exc:  # an op missing or rejecting its arguments in this torch build
            log.warning("oneDNN weight reordering unavailable (%s)", exc)
    return _available


@torch.inference_mode()
def pack(weight: torch.Tensor) -> OneDnnWeight:
    """Reorder a [n, k] bfloat16 CPU weight (copied; the original stays as it is)."""
    if weight.dtype != torch.bfloat16 or weight.dim() != 2 or weight.device.type != "cpu":
        raise ValueError(f"oneDNN reordering takes a 2-D bfloat16 CPU weight, got {weight.dtype} {list(weight.shape)}")
    n, k = weight.shape
    data = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _NOMINAL_ROWS)
    return OneDnnWeight(data, n, k)


def linear(x: torch.Tensor, packed: OneDnnWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for bfloat16 x [rows, k] on the reordered weight."""
    if x.dtype != torch.bfloat16:
        x = x.to(torch.bfloat16)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed.data, bias, "none", [], "")
