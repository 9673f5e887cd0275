"""Matmul weights kept in their checkpoint's own storage format (GGUF blocks, float16/bfloat16), and
``weight_gemv``, which multiplies a few rows by them reading those bytes (several times fewer than a
float32 copy) with the float32 path's products."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .build import available, lib, ptr, ready

# ggml type ids of the storage formats weight_gemv reads (ggml.h), with bytes per block of 32 weights
# in the file: an fp16 scale (Q4_1: and an fp16 minimum) before the quantised values.
WEIGHT_FORMATS = {"F16": (1, 64), "Q4_0": (2, 18), "Q4_1": (3, 20), "Q8_0": (8, 34), "BF16": (30, 64)}
_HEADER_BYTES = {"Q4_0": 2, "Q4_1": 4, "Q8_0": 2}
# Up to this many rows weight_gemv reads the stored weights once for all rows (its kernel's MAX_ROWS).
WEIGHT_GEMV_MAX_ROWS = 8


def dequantize_blocks(blocks: torch.Tensor, fmt: str, scales: torch.Tensor,
                      mins: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """A GGUF tensor's Q4_0 / Q4_1 / Q8_0 blocks (uint8 [n_blocks, bytes per block], as the file stores them)
    decoded to float32 [n_blocks * 32] with the loader's arithmetic, bit for bit, in one pass on every core;
    ``scales`` (and Q4_1's ``mins``) are the blocks' float16 values as float32 [n_blocks]. Written into
    ``out`` where given (contiguous float32 or bfloat16 of n_blocks * 32 elements, any shape: a model's
    parameter rows); into bfloat16 as ``.to(torch.bfloat16)`` rounds the float32 values.
    None where the compiled kernels are not loaded yet (a load never waits for their first compile) or for
    another format."""
    if fmt not in _HEADER_BYTES or not ready():
        return None
    type_id, width = WEIGHT_FORMATS[fmt]
    n_blocks = blocks.shape[0]
    if blocks.dtype != torch.uint8 or tuple(blocks.shape) != (n_blocks, width) or not blocks.is_contiguous():
        raise ValueError(f"{fmt} blocks must be contiguous uint8 [n, {width}], got {blocks.dtype} {list(blocks.shape)}")
    scales = scales.float().contiguous()
    mins = None if mins is None else mins.float().contiguous()
    if scales.numel() != n_blocks or (mins is not None and mins.numel() != n_blocks) or ((mins is None) != (fmt != "Q4_1")):
        raise ValueError(f"{fmt}: one scale{' and one minimum' if fmt == 'Q4_1' else ''} per block needed")
    if out is None:
        out = torch.empty(n_blocks * 32, dtype=torch.float32)
    elif out.dtype not in (torch.float32, torch.bfloat16) or out.device.type != "cpu" or not out.is_contiguous() or (
            out.numel() != n_blocks * 32):
        raise ValueError(f"{fmt}: out must be contiguous float32 or bfloat16 on the CPU with {n_blocks * 32} "
                         f"elements, got {out.dtype} {list(out.shape)} on {out.device}")
    lib().dequantize_gguf_blocks(type_id, blocks.data_ptr(), n_blocks, scales.data_ptr(), ptr(mins), out.data_ptr(),
                                 int(out.dtype == torch.bfloat16), torch.get_num_threads())
    return out


@dataclass
class StoredWeight:
    """A linear layer's weight [rows, cols] in its checkpoint's storage format, for weight_gemv.

    ``values`` is uint8 [rows, row_bytes]: per block of 32 weights the quantised values (16 bytes of
    nibbles for Q4_0/Q4_1, 32 int8 for Q8_0) or the 32 float16/bfloat16 values. The blocks' fp16
    scales (and Q4_1's minimums) sit in float32 [rows, cols / 32] (exact: fp16 converts to float32
    without rounding), which the kernel reads with plain loads."""

    fmt: str
    values: torch.Tensor
    scales: torch.Tensor | None
    mins: torch.Tensor | None
    rows: int
    cols: int

    @staticmethod
    def fits(shape: tuple[int, ...] | torch.Size) -> bool:
        """Whether a tensor of this shape can be kept: a matrix of whole 32-column blocks."""
        return len(shape) == 2 and shape[1] % 32 == 0

    @classmethod
    def from_blocks(cls, fmt: str, data: torch.Tensor, rows: int, cols: int) -> StoredWeight:
        """From a tensor's bytes as a GGUF file stores them (ggml blocks, row after row)."""
        if fmt not in WEIGHT_FORMATS:
            raise ValueError(f"unsupported weight format {fmt!r} (supported: {', '.join(WEIGHT_FORMATS)})")
        if cols % 32:
            raise ValueError(f"weight_gemv needs a multiple of 32 columns, got {cols}")
        block = WEIGHT_FORMATS[fmt][1]
        if data.dtype != torch.uint8 or data.numel() != rows * cols // 32 * block:
            raise ValueError(f"{fmt} weight [{rows}, {cols}] needs {rows * cols // 32 * block} bytes, got {data.numel()}")
        head = _HEADER_BYTES.get(fmt, 0)
        blocks = data.reshape(rows, cols // 32, block)
        scales = mins = None
        if head:
            scales = blocks[:, :, 0:2].contiguous().view(torch.float16).float().reshape(rows, -1)
            if fmt == "Q4_1":
                mins = blocks[:, :, 2:4].contiguous().view(torch.float16).float().reshape(rows, -1)
        return cls(fmt, blocks[:, :, head:].reshape(rows, -1).contiguous(), scales, mins, rows, cols)

    @classmethod
    def from_tensor(cls, weight: torch.Tensor) -> StoredWeight:
        """A float16 or bfloat16 tensor as it is (no rounding: its values are the checkpoint's)."""
        fmt = {torch.float16: "F16", torch.bfloat16: "BF16"}.get(weight.dtype)
        if fmt is None:
            raise ValueError(f"only float16/bfloat16 tensors are stored as they are, got {weight.dtype}")
        rows, cols = weight.shape
        return cls.from_blocks(fmt, weight.contiguous().view(torch.uint8).reshape(-1), rows, cols)

    @staticmethod
    def concat(parts: list[StoredWeight]) -> StoredWeight | None:
        """Row-wise concatenation (fused Q/K/V, gate/up), or None when the parts' formats differ."""
        if len({(p.fmt, p.cols) for p in parts}) != 1:
            return None

        def cat(ts: list[torch.Tensor | None]) -> torch.Tensor | None:
            return None if ts[0] is None else torch.cat(ts)  # type: ignore[arg-type]

        return StoredWeight(parts[0].fmt, torch.cat([p.values for p in parts]), cat([p.scales for p in parts]),
                            cat([p.mins for p in parts]), sum(p.rows for p in parts), parts[0].cols)

    def __post_init__(self) -> None:
        # the kernel's leading arguments, once (the tensors never move): a decode step makes 121 calls
        self._c_args = (self.values.data_ptr(), ptr(self.scales), ptr(self.mins), WEIGHT_FORMATS[self.fmt][0],
                        self.rows, self.cols, self.values.shape[1])

    def decode(self) -> torch.Tensor:
        """The weight as float32 [rows, cols], decoded by the kernel's portable path."""
        out = torch.empty((self.rows, self.cols), dtype=torch.float32)
        lib().weight_decode_f32(*self._c_args, out.data_ptr())
        return out


def weight_gemv_fast() -> bool:
    """Whether weight_gemv has its SIMD path here (without it, F.linear on float32 weights is faster)."""
    return available() and bool(lib().weight_gemv_simd())


def weight_gemv(x: torch.Tensor, weight: StoredWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight) for float32 x [M <= WEIGHT_GEMV_MAX_ROWS, cols], reading the stored format."""
    x = x.contiguous()
    m = x.shape[0]
    if m > WEIGHT_GEMV_MAX_ROWS or x.dtype != torch.float32 or x.shape[1] != weight.cols or x.device.type != "cpu":
        raise ValueError(f"weight_gemv takes float32 [<= {WEIGHT_GEMV_MAX_ROWS}, {weight.cols}], got "
                         f"{x.dtype} {list(x.shape)}")
    out = torch.empty((m, weight.rows), dtype=torch.float32)
    b = None if bias is None else bias.float().contiguous()
    lib().weight_gemv_f32(
        *weight._c_args, x.data_ptr(), m, ptr(b), out.data_ptr(), torch.get_num_threads()
    )
    return out
