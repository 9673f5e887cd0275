"""A few bfloat16 rows times a weight read from its GGUF blocks, with the bits oneDNN's bfloat16 GEMM gives
the same rows inside a batch (csrc/panel_product.c); and a few float32 rows with the bits of the float32
engine's product (oneDNN's or MKL's packed GEMM), from the same panels.

A batch-invariant bfloat16 engine runs every product through oneDNN, whose results for a row are the same
at 2 to 300 rows (a single row is padded to two). A one-row decode step then reads the whole bfloat16
model per token; from the checkpoint's 4-bit blocks it reads a third of the bytes. ``match_onednn``
repacks a stored weight into 16-column panels and finds the k-block order that reproduces oneDNN's sums on
this CPU (it varies with the shape: 512 for k <= 1024 on an AVX512-BF16 EPYC, 1024 above), checking the
bits on probe rows; where none does (another oneDNN kernel, e.g. AMX), the weight keeps oneDNN.
``match_mkl`` does the same for a float32 weight against MKL's packed GEMM (rows padded to a multiple of 4,
as the batch-invariant float32 engine runs it).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from . import mkl_packed, onednn_packed
from .build import available, cache_dir, lib, ptr
from .stored import StoredWeight

# Rows a panel product takes at once (csrc: PANEL_MAX_ROWS); more rows loop over groups of these.
PANEL_MAX_ROWS = 4
_TYPE_IDS = {"Q4_1": 3, "Q8_0": 8}
# oneDNN's k-blocking candidates, the likeliest first; the whole k (one sequential sum) last.
K_BLOCKS = (512, 1024, 256, 2048)
# MKL's float32 k-blocking candidates (192 on an AVX-512 EPYC for every shape of the default model).
F32_K_BLOCKS = (192, 256, 384, 512, 1024, 2048)
# The bit check's probe: heavy-tailed rows (as real activations are), enough of them that the outputs
# number PROBE_OUTPUTS. A wrong order changes about one bfloat16 output in 10^4 to 10^5 (measured: k=576,
# one sequential sum against oneDNN's 512-blocks, 18 of 276,480), so 2^18 outputs expect ~17 mismatches
# and miss them all with probability ~e^-17.
PROBE_OUTPUTS = 1 << 18
MAX_PROBE_ROWS = 512


def probe_row_count(n: int) -> int:
    """How many probe rows a weight with ``n`` outputs needs to find its order."""
    return max(16, min(MAX_PROBE_ROWS, -(-PROBE_OUTPUTS // n)))


@dataclass(frozen=True)
class PanelWeight:
    """An [n, k] weight's quantised values and float16 scales in 16-column panels (csrc's layout), with the
    k-block order its sums follow."""

    fmt: str
    values: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    n: int
    k: int
    k_block: int

    @staticmethod
    def supports(stored: StoredWeight) -> bool:
        """Whether a stored weight can be repacked: a known format, whole 16-column groups."""
        return stored.fmt in _TYPE_IDS and stored.rows % 16 == 0 and stored.cols % 32 == 0

    @classmethod
    def from_stored(cls, stored: StoredWeight, k_block: int) -> PanelWeight:
        """Repack ``stored`` (the GGUF blocks as StoredWeight keeps them) into panels."""
        n, k = stored.rows, stored.cols
        if not cls.supports(stored):
            raise ValueError(f"cannot repack a {stored.fmt} weight [{n}, {k}] into panels")
        values = torch.empty(n * k // (2 if stored.fmt == "Q4_1" else 1), dtype=torch.uint8)
        scales = torch.empty(n * k // 32, dtype=torch.float16)
        mins = None if stored.mins is None else torch.empty(n * k // 32, dtype=torch.float16)
        src, src_scales = stored.values.contiguous(), stored.scales.contiguous()
        src_mins = None if stored.mins is None else stored.mins.contiguous()
        lib().panel_repack(_TYPE_IDS[stored.fmt], src.data_ptr(), src_scales.data_ptr(), ptr(src_mins),
                           n, k, values.data_ptr(), scales.data_ptr(), ptr(mins))
        return cls(stored.fmt, values, scales, mins, n, k, k_block)

    def c_fields(self) -> list[int]:
        """The seven fields the C steps take for a panel weight (values, scales, mins, type, n, k, k_block)."""
        mins = 0 if self.mins is None else self.mins.data_ptr()
        return [self.values.data_ptr(), self.scales.data_ptr(), mins, _TYPE_IDS[self.fmt], self.n, self.k, self.k_block]

    def with_k_block(self, k_block: int) -> PanelWeight:
        """The same panels summed in another k-block order."""
        return PanelWeight(self.fmt, self.values, self.scales, self.mins, self.n, self.k, k_block)


def available_here(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether the compiled kernels have the panel product for ``dtype`` rows on this CPU: bfloat16 needs
    AVX512-BF16, float32 AVX-512F or AVX2 with FMA and F16C."""
    if not available():
        return False
    return bool(lib().panel_product_f32_simd() if dtype == torch.float32 else lib().panel_product_simd())


def panel_product(x: torch.Tensor, weight: PanelWeight) -> torch.Tensor:
    """x [rows, k] times ``weight`` -> [rows, n]: float32 rows give float32, any other dtype is taken as
    bfloat16; the bits are those of the library whose order ``weight.k_block`` was matched to."""
    f32 = x.dtype == torch.float32
    x = x.contiguous() if f32 else x.to(torch.bfloat16).contiguous()
    if x.dim() != 2 or x.shape[1] != weight.k:
        raise ValueError(f"panel_product takes [rows, {weight.k}], got {list(x.shape)}")
    out = torch.empty((x.shape[0], weight.n), dtype=x.dtype)
    mins = 0 if weight.mins is None else weight.mins.data_ptr()
    fn = lib().panel_product_f32 if f32 else lib().panel_product_bf16
    for r0 in range(0, x.shape[0], PANEL_MAX_ROWS):
        rows = min(PANEL_MAX_ROWS, x.shape[0] - r0)
        fn(weight.values.data_ptr(), weight.scales.data_ptr(), mins, _TYPE_IDS[weight.fmt], weight.n, weight.k,
           weight.k_block, x[r0].data_ptr(), rows, out[r0].data_ptr(), torch.get_num_threads())
    return out


@functools.lru_cache(maxsize=8)
def probe_rows(k: int, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Heavy-tailed rows [MAX_PROBE_ROWS, k] for the bit check (made once per width and dtype)."""
    g = torch.Generator().manual_seed(seed)
    shape = (MAX_PROBE_ROWS, k)
    return (torch.randn(shape, generator=g) * torch.exp(2 * torch.randn(shape, generator=g))).to(dtype)


@torch.inference_mode()
def match_onednn(stored: StoredWeight, packed: onednn_packed.OneDnnWeight, k_blocks: tuple[int, ...] = K_BLOCKS,
                 probe: int | None = None) -> PanelWeight | None:
    """``stored`` repacked with the first of ``k_blocks`` whose products equal oneDNN's on ``packed`` (the same
    weight as the model holds it) bit for bit on ``probe`` heavy-tailed rows (default: probe_row_count, what
    finding a shape's order takes), or None where none does. A few rows suffice to check another weight of a
    shape whose order is known: a wrong weight or layout shows in most outputs."""
    if not (available_here(packed.dtype) and PanelWeight.supports(stored)) or (
            (stored.rows, stored.cols) != (packed.n, packed.k)):
        return None
    x = probe_rows(stored.cols, dtype=packed.dtype)[:probe or probe_row_count(stored.rows)]
    return _first_matching(stored, x, onednn_packed.linear(x, packed), k_blocks)


@torch.inference_mode()
def match_mkl(stored: StoredWeight, packed: mkl_packed.PackedWeight, k_blocks: tuple[int, ...] = F32_K_BLOCKS,
              probe: int | None = None) -> PanelWeight | None:
    """``match_onednn`` for a float32 model on MKL: products with the bits of MKL's packed GEMM on ``packed``
    (probe rows a multiple of its INVARIANT_ROW_MULTIPLE, as the batch-invariant engine pads them)."""
    if not (available_here(torch.float32) and PanelWeight.supports(stored)) or (
            (stored.rows, stored.cols) != (packed.n, packed.k)):
        return None
    rows = probe or probe_row_count(stored.rows)
    multiple = mkl_packed.INVARIANT_ROW_MULTIPLE
    x = probe_rows(stored.cols, dtype=torch.float32)[:-(-rows // multiple) * multiple]
    return _first_matching(stored, x, mkl_packed.linear(x, packed), k_blocks)


def _first_matching(stored: StoredWeight, x: torch.Tensor, expected: torch.Tensor,
                    k_blocks: tuple[int, ...]) -> PanelWeight | None:
    """``stored`` as panels in the first of ``k_blocks`` whose product of ``x`` equals ``expected`` bit for bit."""
    panels = PanelWeight.from_stored(stored, k_blocks[0])
    for k_block in k_blocks:
        if k_block % 32:
            continue
        panel = panels.with_k_block(k_block)
        if torch.equal(panel_product(x, panel), expected):
            return panel
        if k_block >= stored.cols:
            break  # larger blocks sum the same way
    return None


# -- the orders found, remembered per machine ----------------------------------------------------------
# Finding a shape's order costs a few hundred probe rows per shape at load; what oneDNN picks depends on the
# CPU, the torch build (its oneDNN) and the thread count, so those key a small file in the kernel cache, and a
# later load checks each weight on a few rows only.


def _machine_key() -> str:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = "".join(line for line in f if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        pass
    text = f"{cpu}|{torch.__version__}|{torch.get_num_threads()}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _orders_path() -> Path:
    return cache_dir() / f"panel-orders-{_machine_key()}.json"


# Remembered for a shape whose products no candidate order reproduces on this machine (it keeps oneDNN).
NO_ORDER = 0


def remembered_k_blocks() -> dict[str, int]:
    """{"NxK": k_block, or NO_ORDER} found on this machine, torch build and thread count before (empty if
    none)."""
    try:
        found = json.loads(_orders_path().read_text())
        return {str(key): int(v) for key, v in found.items()}
    except (OSError, ValueError, AttributeError):
        return {}


def remember_k_blocks(found: dict[str, int]) -> None:
    """Add shapes' orders to this machine's file (written whole and renamed: concurrent loads are safe)."""
    merged = {**remembered_k_blocks(), **found}
    path = _orders_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(merged, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the probe again next time
