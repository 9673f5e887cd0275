"""int8 weights and the W8A8 matmul (quantization="int8"): weights int8 per output channel, activations
int8 per row at run time, int32 accumulation; exact integer arithmetic, so a row's result does not
depend on the other rows of its batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .build import lib, ptr


@dataclass
class Int8Weight:
    """A linear layer's weight for int8_linear: int8 [in, out] (column-major view, the layout
    torch._int_mm runs fastest with) and one float32 scale per output channel."""

    qweight: torch.Tensor
    scale: torch.Tensor


def quantize_weight_int8(weight: torch.Tensor) -> Int8Weight:
    """Symmetric per-output-channel int8 of a float weight [out, in]."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Weight(qweight=q.t(), scale=scale.contiguous())  # .t() of a contiguous [out, in]: column-major


def int8_linear(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, in] float32 -> [M, out] float32: x quantized per row (symmetric int8), one int8 matmul with
    int32 accumulation, scaled back. Exact integer arithmetic, so a row's result is the same whatever
    the other rows are."""
    x = x.contiguous()
    m, k = x.shape
    n = weight.scale.shape[0]
    threads = torch.get_num_threads()
    xq = torch.empty((m, k), dtype=torch.int8)
    x_scale = torch.empty(m, dtype=torch.float32)
    lib().quantize_rows_s8(x.data_ptr(), xq.data_ptr(), x_scale.data_ptr(), m, k, threads)
    acc = torch._int_mm(xq, weight.qweight)  # any M on the CPU (the M > 16 rule is CUDA's)
    out = torch.empty((m, n), dtype=torch.float32)
    b = None if bias is None else bias.float().contiguous()
    lib().dequantize_rows(
        acc.data_ptr(), x_scale.data_ptr(), weight.scale.data_ptr(), ptr(b),
        out.data_ptr(), m, n, threads,
    )
    return out


def int8_linear_reference(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """int8_linear in plain torch ops (the specification the compiled path is tested against)."""
    x_scale = (x.abs().amax(dim=1) / 127.0)
    x_scale = torch.where(x_scale > 0, x_scale, torch.ones_like(x_scale))
    xq = torch.round(x / x_scale[:, None]).to(torch.int64)
    acc = xq @ weight.qweight.to(torch.int64)
    out = acc.float() * x_scale[:, None] * weight.scale[None, :]
    return out if bias is None else out + bias
