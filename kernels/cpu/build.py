"""Compile the C kernels (csrc/) once per machine and source version, and load them through ctypes.

Why C and not a torch C++ extension: it compiles in about two seconds with the system's C compiler, once
per machine and source version (a torch extension takes tens of seconds), needs no torch headers, and
ctypes releases the GIL during the call. When no compiler is available (or FORGE_BATCH_CPU_KERNELS=0),
``available()`` is False and the callers keep the torch reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)
_SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.c"))
_HEADERS = sorted((Path(__file__).parent / "csrc").glob("*.h"))
# every file's flags (_build adds a few per file)
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-ffp-contract=fast")
_lib: ctypes.CDLL | None = None
_tried = False
_build_lock = threading.Lock()
_build_thread: threading.Thread | None = None


def ptr(t: torch.Tensor | None) -> int:
    """A tensor's address for a C pointer argument; 0 (NULL) for None."""
    return 0 if t is None else t.data_ptr()


def cache_dir() -> Path:
    base = os.environ.get("FORGE_BATCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "forge-batch"
    )
    return Path(base) / "kernels"


def _compile(cc: str, flags: list[str], per_file: dict[str, list[str]], out: Path) -> None:
    """Compile every source to a shared library at ``out``: one compiler per file, all at once (the two
    largest take about 1.7 s each at -O3), then link."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_so = Path(tmp) / out.name
        objects, procs = [], []
        for src_file in sorted(_SOURCES, key=lambda p: -p.stat().st_size):
            obj = Path(tmp) / (src_file.stem + ".o")
            procs.append(subprocess.Popen([cc, *flags, *per_file.get(src_file.name, []), "-c", str(src_file),
                                           "-o", str(obj)],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
            objects.append(str(obj))
        for proc in procs:
            _, err = proc.communicate()
            if proc.returncode:
                raise RuntimeError(f"{' '.join(map(str, proc.args))} failed: {err.decode()[-2000:]}")
        subprocess.run([cc, *flags, *objects, "-o", str(tmp_so), "-lm"], check=True, capture_output=True)
        os.replace(tmp_so, out)  # atomic: concurrent builders never load half a file


def _declare(lib: ctypes.CDLL) -> None:
    """The C functions' argument types (ctypes would otherwise pass 64-bit integers as C ints)."""
    i64, f32, vp, nthreads = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int
    for name in ("paged_decode_attention_f32", "paged_decode_attention_bf16"):
        fn = getattr(lib, name)
        fn.argtypes = [vp, vp, vp, vp, vp, vp, vp, vp, i64, i64, i64, i64, i64, i64, i64, f32, nthreads]
        fn.restype = None
    lib.quantize_rows_s8.argtypes = [vp, vp, vp, i64, i64, nthreads]
    lib.dequantize_rows.argtypes = [vp, vp, vp, vp, vp, i64, i64, nthreads]
    lib.quantize_rows_s8.restype = lib.dequantize_rows.restype = None
    for dt in ("f32", "bf16"):
        getattr(lib, f"rms_norm_{dt}").argtypes = [vp, vp, vp, f32, vp, vp, i64, i64, nthreads]
        getattr(lib, f"silu_and_mul_{dt}").argtypes = [vp, vp, i64, i64, nthreads]
        getattr(lib, f"rotary_store_kv_{dt}").argtypes = [vp, vp, vp, i64, vp, vp, i64, i64, i64, i64, vp, vp, vp,
                                                          nthreads]
        for name in ("rms_norm", "silu_and_mul", "rotary_store_kv"):
            getattr(lib, f"{name}_{dt}").restype = None
    lib.weight_gemv_f32.argtypes = [vp, vp, vp, ctypes.c_int, i64, i64, i64, vp, i64, vp, vp, nthreads]
    lib.weight_decode_f32.argtypes = [vp, vp, vp, ctypes.c_int, i64, i64, i64, vp]
    lib.weight_gemv_f32.restype = lib.weight_decode_f32.restype = None
    lib.dequantize_gguf_blocks.argtypes = [ctypes.c_int, vp, i64, vp, vp, vp, ctypes.c_int, nthreads]
    lib.dequantize_gguf_blocks.restype = None
    lib.weight_gemv_simd.restype = ctypes.c_int
    lib.decode_step_f32.argtypes = [vp, i64, vp, f32, vp, vp, i64, vp, vp, vp, i64, vp, vp, i64, i64, i64, i64, i64,
                                    i64, f32, ctypes.c_int, ctypes.c_int, nthreads]
    lib.decode_step_f32.restype = None
    lib.decode_layer_fields.restype = i64
    lib.ban_masked_f32.argtypes = [vp, vp, i64, i64, i64, f32, nthreads]
    lib.ban_masked_f32.restype = None
    lib.panel_product_bf16.argtypes = [vp, vp, vp, ctypes.c_int, i64, i64, i64, vp, i64, vp, nthreads]
    lib.panel_product_bf16.restype = None
    lib.panel_product_simd.restype = ctypes.c_int
    lib.panel_product_f32.argtypes = [vp, vp, vp, ctypes.c_int, i64, i64, i64, vp, i64, vp, nthreads]
    lib.panel_product_f32.restype = None
    lib.panel_product_f32_simd.restype = ctypes.c_int
    lib.panel_repack.argtypes = [ctypes.c_int, vp, vp, vp, i64, i64, vp, vp, vp]
    lib.panel_repack.restype = None
    lib.panel_decode_step_bf16.argtypes = [vp, i64, vp, f32, vp, vp, i64, vp, vp, vp, i64, vp, vp, i64, i64, i64,
                                           i64, i64, i64, f32, nthreads]
    lib.panel_decode_step_bf16.restype = None
    lib.panel_layer_fields.restype = i64


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) found")
    src = b"".join(p.read_bytes() for p in (*_SOURCES, *_HEADERS))
    flags = list(CFLAGS)
    per_file: dict[str, list[str]] = {}
    if os.uname().machine in ("x86_64", "amd64"):
        # GCC vectorises plain loops 256 bits wide by default even on AVX-512 CPUs; at 512 the bfloat16
        # silu_and_mul and rms_norm take 25% less time (weight_gemv's one-stream steps 3% more: not there)
        per_file["elementwise.c"] = ["-mprefer-vector-width=512"]
    # panel_product.c must give the loader's bits: no fused multiply-add but its one explicit, exact one
    per_file["panel_product.c"] = ["-ffp-contract=off"]
    tag = hashlib.sha256(src + " ".join(flags).encode() + repr(per_file).encode() + os.uname().machine.encode())
    out = cache_dir() / f"forge_batch_cpu-{tag.hexdigest()[:16]}.so"
    if not out.exists():
        # the first run on a machine (or after the sources change) compiles: say so, it takes seconds
        log.info("compiling CPU kernels (%d C files with %s)...", len(_SOURCES), cc,
                 extra={"fields": {"compiler": cc, "files": len(_SOURCES), "library": str(out)}})
        t0 = time.monotonic()
        _compile(cc, flags, per_file, out)
        seconds = time.monotonic() - t0
        log.info("compiled CPU kernels in %.1f s", seconds, extra={"fields": {"seconds": round(seconds, 3), "library": str(out)}})
    lib = ctypes.CDLL(str(out))
    _declare(lib)
    return lib


def available() -> bool:
    """Whether the compiled CPU kernels can be used (built on first call, or waits for the build that
    build_in_background started)."""
    global _lib, _tried
    if _tried:
        return _lib is not None
    with _build_lock:
        if not _tried:
            if os.environ.get("FORGE_BATCH_CPU_KERNELS", "1") != "0":
                try:
                    _lib = _build()
                except Exception as exc:  # no compiler, compile error: keep the torch reference
                    log.warning("CPU kernels unavailable (%s); using the torch reference", exc)
                    _lib = None
            _tried = True
    return _lib is not None


def ready() -> bool:
    """Whether the compiled kernels are loaded already: ``available()`` without waiting for a build (for
    callers with a torch path of the same bits, which a first run's compile should not hold up)."""
    return _tried and _lib is not None


def lib() -> ctypes.CDLL:
    """The loaded library; callers check ``available()`` (or a ``*_ok`` check that does) first."""
    if _lib is None and not available():
        raise RuntimeError("the compiled CPU kernels are unavailable")
    return _lib  # type: ignore[return-value]


def build_in_background() -> None:
    """Start building (or loading) the kernels on a thread, so that a first run on a machine compiles
    while the model's weights load; ``available()`` waits for it."""
    global _build_thread
    if not _tried and _build_thread is None:
        _build_thread = threading.Thread(target=available, name="forge-batch-kernel-build", daemon=True)
        _build_thread.start()
