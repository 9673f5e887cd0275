"""A GGUF file's header: metadata and tensor table, memory-mapped, tensor bytes on demand; no torch.

Reading the header is cheap (no tensor data is touched), so the job checks (``forge-batch validate``, and
``run`` before the model loads) read it to refuse a file that is not GGUF, is corrupt or is truncated; the
loader (``gguf_loader``) reads it the same way, so both say the same thing, naming the file.

We parse the file ourselves instead of using ``gguf.GGUFReader``: the reader builds a numpy view per
metadata item and takes ~5 s on SmolLM2's 49k-token vocabulary, longer than the whole load should.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata count
_MAX_DIMS = 4  # GGML_MAX_DIMS

# ggml tensor type ids (ggml.h) we dequantise natively: id -> (name, block size, bytes per block).
GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q4_1, GGML_Q8_0, GGML_BF16 = 0, 1, 2, 3, 8, 30
NATIVE_TYPES = {
    GGML_F32: ("F32", 1, 4),
    GGML_F16: ("F16", 1, 2),
    GGML_BF16: ("BF16", 1, 2),
    GGML_Q8_0: ("Q8_0", 32, 34),
    GGML_Q4_0: ("Q4_0", 32, 18),
    GGML_Q4_1: ("Q4_1", 32, 20),
}

# GGUF metadata value types -> struct format for the fixed-size ones.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_GGUF_STRING, _GGUF_ARRAY, _GGUF_FLOAT32 = 8, 9, 6


class GGUFError(ValueError):
    """Not a GGUF file, or a corrupt or truncated one; the message names the file and what is wrong."""


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One entry of the tensor table; ``shape`` is in torch order (slowest dimension first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int


class GGUFFile:
    """A memory-mapped GGUF file: its metadata dict and tensor table; tensor data is read on demand.

    Raises :class:`GGUFError` for a file that is not GGUF, whose header does not parse (corrupt), or that
    ends before its header or its tensor data does (truncated)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as fh:
            head = fh.read(_HEADER.size)
            if head[:4] != GGUF_MAGIC:
                raise GGUFError(f"{self.path}: not a GGUF file (it starts with {head[:4]!r}, not {GGUF_MAGIC!r})")
            if len(head) < _HEADER.size:
                raise GGUFError(f"{self.path}: truncated GGUF file: {len(head)} bytes, shorter than its header")
            # ACCESS_COPY gives a writable (copy-on-write) map, so torch can wrap it without warnings;
            # we never write, so nothing is ever copied or written back.
            self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        self.size = len(self._map)
        try:
            self.metadata, self.tensors = self._parse()
        except GGUFError:
            self._map.close()
            raise
        except (struct.error, ValueError, IndexError, OverflowError, MemoryError) as exc:
            self._map.close()
            raise GGUFError(f"{self.path}: corrupt GGUF file: its header cannot be read ({exc})") from exc

    # -- parsing ---------------------------------------------------------------------------------

    def _corrupt(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: corrupt GGUF file: {what}")

    def _need(self, pos: int, n: int, what: str) -> None:
        """Fail unless ``n`` bytes of ``what`` at ``pos`` are in the file. A length larger than the whole
        file is a corrupt field or a cut-off file (which, only the original size could tell); one that
        merely runs past the end is a truncated file."""
        if n > self.size:
            raise GGUFError(
                f"{self.path}: corrupt or truncated GGUF file: {what} at byte {pos} claims {n} bytes, more "
                f"than the whole file ({self.size} bytes)"
            )
        if pos + n > self.size:
            raise GGUFError(
                f"{self.path}: truncated GGUF file: its header needs byte {pos + n} ({what}) but the file "
                f"has {self.size} bytes"
            )

    def _parse(self) -> tuple[dict[str, Any], dict[str, GGUFTensorInfo]]:
        buf = self._map
        _, version, n_tensors, n_kv = _HEADER.unpack_from(buf, 0)
        if version not in (2, 3):
            raise GGUFError(f"{self.path}: unsupported GGUF version {version} (big-endian or v1 files are not supported)")
        # Every metadata entry takes at least 12 bytes and every tensor entry 24: a count the file cannot
        # hold is a corrupt field, caught before looping over it.
        self._need(_HEADER.size, 12 * n_kv + 24 * n_tensors, f"{n_kv} metadata and {n_tensors} tensor entries")
        pos = _HEADER.size
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key, pos = self._string(pos)
            self._need(pos, 4, f"the type of metadata {key!r}")
            (vtype,) = struct.unpack_from("<I", buf, pos)
            metadata[key], pos = self._value(vtype, pos + 4, key)

        raw_infos = []
        for _ in range(n_tensors):
            name, pos = self._string(pos)
            self._need(pos, 4, f"tensor {name!r}")
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            if n_dims > _MAX_DIMS:
                raise self._corrupt(f"tensor {name!r} has {n_dims} dimensions (at most {_MAX_DIMS})")
            self._need(pos, 4 + 8 * n_dims + 12, f"tensor {name!r}")
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            raw_infos.append((name, tuple(int(d) for d in reversed(dims)), ggml_type, offset))

        alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        if alignment <= 0:
            raise self._corrupt(f"general.alignment is {alignment}")
        data_start = (pos + alignment - 1) // alignment * alignment
        tensors = {}
        end = data_start
        for name, shape, ggml_type, offset in raw_infos:
            try:
                nbytes = tensor_nbytes(ggml_type, shape)
            except ValueError as exc:
                raise self._corrupt(f"tensor {name!r}: {exc}") from None
            tensors[name] = GGUFTensorInfo(name, shape, ggml_type, data_start + offset, nbytes)
            end = max(end, data_start + offset + nbytes)
        if end > self.size:
            raise GGUFError(
                f"{self.path}: truncated GGUF file: its tensor data ends at byte {end} but the file has "
                f"{self.size} bytes"
            )
        return metadata, tensors

    def _string(self, pos: int) -> tuple[str, int]:
        self._need(pos, 8, "a string length")
        (n,) = struct.unpack_from("<Q", self._map, pos)
        self._need(pos + 8, n, "a string")
        pos += 8
        return self._map[pos : pos + n].decode("utf-8", errors="replace"), pos + n

    def _value(self, vtype: int, pos: int, key: str) -> tuple[Any, int]:
        buf = self._map
        if vtype == _GGUF_STRING:
            return self._string(pos)
        if vtype == _GGUF_ARRAY:
            self._need(pos, 12, f"array {key!r}")
            etype, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if etype == _GGUF_STRING:
                self._need(pos, 8 * count, f"array {key!r} of {count} strings")
                out = []
                unpack, mm = struct.unpack_from, self._map
                for _ in range(count):
                    if pos + 8 > self.size:  # compare first: this loop runs once per vocabulary token
                        self._need(pos, 8, f"a string length of {key!r}")
                    (n,) = unpack("<Q", mm, pos)
                    pos += 8
                    if pos + n > self.size:
                        self._need(pos, n, f"a string of {key!r}")
                    out.append(mm[pos : pos + n].decode("utf-8", errors="replace"))
                    pos += n
                return out, pos
            if etype in _NUMPY_DTYPES:
                dtype = np.dtype(_NUMPY_DTYPES[etype])
                self._need(pos, dtype.itemsize * count, f"array {key!r}")
                arr = np.frombuffer(buf, dtype=dtype, count=count, offset=pos)
                return arr.tolist(), pos + dtype.itemsize * count
            values = []  # arrays of arrays: rare, parse one by one
            for _ in range(count):
                value, pos = self._value(etype, pos, key)
                values.append(value)
            return values, pos
        fmt = _SCALAR_FORMATS.get(vtype)
        if fmt is None:
            raise self._corrupt(f"metadata {key!r} has unknown value type {vtype}")
        self._need(pos, struct.calcsize(fmt), f"metadata {key!r}")
        (value,) = struct.unpack_from(fmt, buf, pos)
        if vtype == _GGUF_FLOAT32:
            value = _tidy_float32(value)
        return value, pos + struct.calcsize(fmt)

    # -- tensors ---------------------------------------------------------------------------------

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes, zero-copy from the map, as a flat uint8 array."""
        info = self.tensors[name]
        return np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def close(self) -> None:
        """Release the map (tensors returned by ``tensor`` are independent copies)."""
        try:
            self._map.close()
        except BufferError:  # a caller still holds a ``raw`` view; the GC will unmap it later
            pass

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_gguf(path: str | os.PathLike[str]) -> None:
    """Raise :class:`GGUFError` unless ``path`` is a GGUF file whose header parses and whose tensor data
    is all there. Reads the header only (milliseconds), never the tensors."""
    GGUFFile(path).close()


def _tidy_float32(value: float) -> float:
    """GGUF stores floats as float32, so 1e-5 reads back as 9.99999974e-06; give the short decimal
    a human (and config.json) would have written, which is the same float32 value."""
    return float(str(np.float32(value)))


def tensor_nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of this ggml type and shape takes in the file."""
    n = math.prod(shape)
    if ggml_type in NATIVE_TYPES:
        _, block, size = NATIVE_TYPES[ggml_type]
    else:
        import gguf  # only needed for the exotic types

        try:
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError) as exc:
            raise ValueError(f"unknown ggml tensor type {ggml_type}") from exc
    if n % block:
        raise ValueError(f"tensor of {n} elements is not a whole number of {block}-element blocks")
    return n // block * size
