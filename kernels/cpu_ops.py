"""CPU kernels in plain C, compiled at first use and called through ctypes.

Why C and not a torch C++ extension: it compiles in well under a second with the system's C compiler
(a torch extension takes tens of seconds), needs no torch headers, and ctypes releases the GIL during
the call. Each kernel has a torch reference in ``reference.py`` that the tests compare it with. When no
compiler is available (or FORGE_BATCH_CPU_KERNELS=0), ``available()`` is False and the dispatcher keeps
the reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("forge_batch.kernels")
_SRC = Path(__file__).parent / "csrc" / "paged_decode_attention.c"
_lib: ctypes.CDLL | None = None
_tried = False


def _cache_dir() -> Path:
    base = os.environ.get("FORGE_BATCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "forge-batch"
    )
    return Path(base) / "kernels"


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) found")
    src = _SRC.read_bytes()
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-ffp-contract=fast"]
    tag = hashlib.sha256(src + " ".join(flags).encode() + os.uname().machine.encode()).hexdigest()[:16]
    out = _cache_dir() / f"paged_decode_attention-{tag}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            tmp_so = Path(tmp) / out.name
            subprocess.run([cc, *flags, str(_SRC), "-o", str(tmp_so), "-lm"], check=True, capture_output=True)
            os.replace(tmp_so, out)  # atomic: concurrent builders never load half a file
    lib = ctypes.CDLL(str(out))
    i64, f32, vp = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    for name in ("paged_decode_attention_f32", "paged_decode_attention_bf16"):
        fn = getattr(lib, name)
        fn.argtypes = [vp, vp, vp, vp, vp, vp, i64, i64, i64, i64, i64, i64, f32, ctypes.c_int]
        fn.restype = None
    return lib


def available() -> bool:
    """Whether the compiled CPU kernels can be used (built on first call)."""
    global _lib, _tried
    if not _tried:
        _tried = True
        if os.environ.get("FORGE_BATCH_CPU_KERNELS", "1") == "0":
            return False
        try:
            _lib = _build()
        except Exception as exc:  # no compiler, compile error: keep the torch reference
            log.warning("CPU attention kernel unavailable (%s); using the torch reference", exc)
            _lib = None
    return _lib is not None


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q [B, H, D] (one token per sequence) -> [B, H, D]; same contract as reference._decode_attention."""
    assert _lib is not None or available()
    if q.dtype == torch.float32:
        fn = _lib.paged_decode_attention_f32  # type: ignore[union-attr]
    elif q.dtype == torch.bfloat16:
        fn = _lib.paged_decode_attention_bf16  # type: ignore[union-attr]
    else:
        raise TypeError(f"CPU decode attention supports float32 and bfloat16, not {q.dtype}")
    assert k_cache.dtype == q.dtype and v_cache.dtype == q.dtype
    q = q.contiguous()
    k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    tables = block_tables if block_tables.dtype == torch.int64 else block_tables.to(torch.int64)
    ctx = context_lens if context_lens.dtype == torch.int64 else context_lens.to(torch.int64)
    tables, ctx = tables.contiguous(), ctx.contiguous()
    b, h, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    out = torch.empty_like(q)
    fn(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), ctx.data_ptr(), out.data_ptr(),
       b, h, hkv, d, block_size, tables.shape[1], float(scale), torch.get_num_threads())
    return out
