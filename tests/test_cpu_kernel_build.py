"""The C kernels must compile wherever a C compiler is found.

The kernel tests skip when ``build.available()`` is False, as they should on a machine without a compiler;
without this test a compile error in csrc/ would turn them into skips and leave the suite green."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from forge_batch.kernels.cpu import build


def test_the_cpu_kernels_compile_where_a_c_compiler_is_found(monkeypatch):
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None or os.environ.get("FORGE_BATCH_CPU_KERNELS", "1") == "0":
        pytest.skip("no C compiler, or the CPU kernels are turned off")
    with tempfile.TemporaryDirectory() as cache:  # compile now, not a library cached by an earlier source
        monkeypatch.setenv("FORGE_BATCH_CACHE", cache)
        lib = build._build()  # raises with the compiler's own message
        assert lib.silu_and_mul_f32 is not None
        assert list(Path(cache).rglob("forge_batch_cpu-*.so"))
    assert build.available()
