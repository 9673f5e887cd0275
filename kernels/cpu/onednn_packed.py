"""bfloat16 and float32 matmul weights in oneDNN's own blocked layout, reordered once at load.

A bfloat16 F.linear on the CPU runs oneDNN's matmul (AMX or AVX512-BF16 where the CPU has them), which
first reorders the plain [n, k] weight into its kernel's layout, on every call. torch exposes the
reorder and the product on a reordered weight as ``torch.ops.mkldnn._reorder_linear_weight`` and
``_linear_pointwise`` (what inductor's CPU backend uses); the reordered weight serves any row count.

float32: F.linear runs MKL's sgemm (mkl_packed is its packed form), which on AMD CPUs takes its AVX2 code
path; oneDNN's float32 matmul runs AVX-512 there: at 256 rows on a Zen 5 EPYC 342-485 GFLOP/s against MKL's
164-223 for the default model's shapes (BENCHMARKS.md). Its numbers are float32 ones (one fused multiply-add
chain per output in k-blocks) but not MKL's bits, so the float32 engine uses one of the two throughout.

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
_available: dict[torch.dtype, bool] = {}


@dataclass(frozen=True)
class OneDnnWeight:
    """A [n, k] bfloat16 or float32 weight in oneDNN's layout (an opaque mkldnn tensor), for y = x @ weight.T."""

    data: torch.Tensor
    n: int
    k: int
    dtype: torch.dtype = torch.bfloat16


def _ops_present() -> bool:
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")
    )


def available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether torch has the ops for ``dtype`` weights and they give F.linear's numbers here (checked once per
    dtype on a small product: bit for bit in bfloat16, where F.linear is oneDNN too; within float32 rounding
    in float32, where it is MKL)."""
    if dtype not in _available:
        _available[dtype] = False
        try:
            if _ops_present() and dtype in (torch.bfloat16, torch.float32):
                g = torch.Generator().manual_seed(0)
                w = torch.randn(48, 64, generator=g).to(dtype)
                b = torch.randn(48, generator=g).to(dtype)
                x = torch.randn(5, 64, generator=g).to(dtype)
                y, expected = linear(x, pack(w), b), F.linear(x, w, b)
                same = torch.equal(y, expected) if dtype == torch.bfloat16 else torch.allclose(y, expected, 1e-5, 1e-5)
                _available[dtype] = bool(same)
                if not same:
                    log.warning("oneDNN's reordered %s weights disagree with F.linear; not used", dtype)
        except Exception as exc:  # an op missing or rejecting its arguments in this torch build
            log.warning("oneDNN weight reordering unavailable for %s (%s)", dtype, exc)
    return _available[dtype]


def float32_preferred() -> bool:
    """Whether a float32 model takes oneDNN's product rather than MKL's: on AMD CPUs, where MKL runs its AVX2
    code and oneDNN's is twice as fast. Elsewhere (Intel: MKL runs AVX-512) MKL's packed GEMM keeps the
    float32 path whose row-count invariance was measured there (kernels/cpu/linear.py)."""
    if not available(torch.float32):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("vendor_id") and "AuthenticAMD" in line for line in f)
    except OSError:
        return False


@torch.inference_mode()
def pack(weight: torch.Tensor) -> OneDnnWeight:
    """Reorder a [n, k] bfloat16 or float32 CPU weight (copied; the original stays as it is)."""
    if weight.dtype not in (torch.bfloat16, torch.float32) or weight.dim() != 2 or weight.device.type != "cpu":
        raise ValueError(f"oneDNN reordering takes a 2-D bfloat16 or float32 CPU weight, got {weight.dtype} "
                         f"{list(weight.shape)}")
    n, k = weight.shape
    data = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _NOMINAL_ROWS)
    return OneDnnWeight(data, n, k, weight.dtype)


def linear(x: torch.Tensor, packed: OneDnnWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [rows, k] on the reordered weight (x cast to the weight's dtype)."""
    if x.dtype != packed.dtype:
        x = x.to(packed.dtype)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed.data, bias, "none", [], "")
