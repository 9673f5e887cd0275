"""MKL's packed-weight GEMM called directly: a weight packed once serves products of any row count.

F.linear on the CPU goes to MKL's sgemm, which repacks the weight into its kernel's layout on every call:
about 2 ms of a decoder layer's matmuls for the default model, most of the work of a 64-row product.
torch offers the packed form as ``torch.ops.mkl._mkl_linear``, but only for the exact row count given
at packing time; at any other count it falls back to F.linear. A decode batch's row count changes
whenever sequences finish or join, so that fast path served only full 128-row batches (W1's) and not
the shrinking batches of outputs that end at different lengths (W3's JSON, any EOS). MKL's own
``cblas_sgemm_pack`` layout does not depend on the row count (its size is the same for every m) and
``cblas_sgemm_compute`` takes any m, so we call them, exported by libtorch_cpu, through ctypes.

Measured (the default model's four matmuls of one layer, ms, F.linear vs packed, median of 15 pairs):
8 rows 2.41 vs 1.04, 16 rows 4.61 vs 1.35, 64 rows 4.90 vs 3.13, 96 rows 5.70 vs 4.30, 128 rows 6.75 vs
5.33 (torch's 128-row packed path: 5.38), 256 rows 12.63 vs 10.68. From 16 rows on the results equal
F.linear's bit for bit but for an occasional last-bit difference at large inner dimensions
(tests/test_packed_weights.py); below 16 MKL sums in another order, so the model keeps F.linear there
(PACKED_MIN_ROWS in kernels/cpu/linear.py).
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("forge_batch.kernels")

# CBLAS enum values (mkl_cblas.h)
_ROW_MAJOR, _NO_TRANS, _TRANS, _PACKED, _B_MATRIX = 101, 111, 112, 151, 162
# The row count MKL's packing API asks for; its layout is the same for every m (see the module docstring).
_NOMINAL_ROWS = 128
# float32 GEMMs (MKL's packed one and F.linear) sum a row in one order whenever the row count is a multiple
# of 4 or at least 12, and in others for the last rows of 1-11 (measured on AVX-512, 1-4 threads, M=1..300);
# a batch-invariant product pads its rows up to a multiple of this.
INVARIANT_ROW_MULTIPLE = 4
_lib: ctypes.CDLL | None = None
_tried = False


@dataclass(frozen=True)
class PackedWeight:
    """A [n, k] float32 weight in MKL's packed layout, for y = x @ weight.T."""

    data: torch.Tensor  # MKL's packed buffer (opaque; float32 storage so torch owns the memory)
    n: int
    k: int


def _load() -> ctypes.CDLL | None:
    libs = sorted((Path(torch.__file__).parent / "lib").glob("libtorch_cpu.*"))
    if not libs or not torch.backends.mkl.is_available():
        return None
    lib = ctypes.CDLL(str(libs[0]))
    needed = ("cblas_sgemm_pack_get_size", "cblas_sgemm_pack", "cblas_sgemm_compute")
    if not all(hasattr(lib, f) for f in needed):
        return None
    i, vp, f32 = ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    lib.cblas_sgemm_pack_get_size.argtypes = [i, i, i, i]
    lib.cblas_sgemm_pack_get_size.restype = ctypes.c_size_t
    lib.cblas_sgemm_pack.argtypes = [i, i, i, i, i, i, f32, vp, i, vp]
    lib.cblas_sgemm_pack.restype = None
    lib.cblas_sgemm_compute.argtypes = [i, i, i, i, i, i, vp, i, vp, i, f32, vp, i]
    lib.cblas_sgemm_compute.restype = None
    return lib


def available() -> bool:
    """Whether torch's MKL exports the packed GEMM, checked once against F.linear on a small product."""
    global _lib, _tried
    if not _tried:
        _tried = True
        try:
            _lib = _load()
            if _lib is not None:
                g = torch.Generator().manual_seed(0)
                w, x = torch.randn(40, 24, generator=g), torch.randn(20, 24, generator=g)
                if not torch.allclose(linear(x, pack(w)), F.linear(x, w), rtol=1e-5, atol=1e-5):
                    raise RuntimeError("packed product differs from F.linear")
        except Exception as exc:  # an MKL with another integer width, a missing library: keep F.linear
            log.warning("MKL packed GEMM unavailable (%s); using F.linear", exc)
            _lib = None
    return _lib is not None


def pack(weight: torch.Tensor) -> PackedWeight:
    """Pack a [n, k] float32 CPU weight; the packed form computes products of any row count."""
    assert _lib is not None, "call available() first"
    w = weight.detach().contiguous()
    n, k = w.shape
    size = _lib.cblas_sgemm_pack_get_size(_B_MATRIX, _NOMINAL_ROWS, n, k)
    data = torch.empty((size + 3) // 4, dtype=torch.float32)
    _lib.cblas_sgemm_pack(_ROW_MAJOR, _B_MATRIX, _TRANS, _NOMINAL_ROWS, n, k, 1.0, w.data_ptr(), k,
                          data.data_ptr())
    return PackedWeight(data, n, k)


def linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for a 2-D float32 CPU x, through the packed weight."""
    assert _lib is not None, "call available() first"
    x = x.contiguous()
    m = x.shape[0]
    y = torch.empty((m, packed.n), dtype=torch.float32)
    if m:
        _lib.cblas_sgemm_compute(_ROW_MAJOR, _NO_TRANS, _PACKED, m, packed.n, packed.k, x.data_ptr(),
                                 packed.k, packed.data.data_ptr(), packed.k, 0.0, y.data_ptr(), packed.n)
    if bias is not None:
        y += bias
    return y
