"""Running Triton kernels under its interpreter (TRITON_INTERPRET=1, on CPU tensors) from a test.

Triton decides between interpreting and compiling when ``triton`` is first imported (its own
``tl.sum``/``tl.max`` are built then), so one process cannot do both. When this process already has
Triton in compiled mode (another test imported transformers/torch pieces that import it) or has a GPU
whose Triton must stay compiled for the GPU tests, a module's interpreter tests run once in a child
pytest with TRITON_INTERPRET=1 and each test reports its own case's outcome from the child's junit XML.
``TRITON_INTERPRET=1 pytest tests/test_kernels.py`` runs them in-process.

A test takes the ``interpreter`` fixture (conftest.py) and calls ``interpreter(check, *args)``: ``check``
gets the interpreted ``forge_batch.kernels.triton_ops`` module first.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

_CHILD_FLAG = "FORGE_BATCH_KERNEL_TESTS_CHILD"
_mode_cache: list[str] = []
_child_cache: dict[Path, dict[str, tuple[str, str]]] = {}  # per test module: outcome per test name
_ops_cache: list[ModuleType] = []


def _interpreter_mode() -> str:
    """'here' if this process runs Triton's interpreter, 'child' if a subprocess must, 'none' without triton."""
    if _mode_cache:
        return _mode_cache[0]
    if importlib.util.find_spec("triton") is None:
        mode = "none"
    elif "triton" in sys.modules:
        from triton.language import standard
        from triton.runtime.interpreter import InterpretedFunction

        mode = "here" if isinstance(standard.sum, InterpretedFunction) else "child"
    else:
        mode = "here" if os.environ.get("TRITON_INTERPRET") == "1" else "child"
    if mode == "child" and os.environ.get(_CHILD_FLAG) == "1":
        raise RuntimeError("the interpreter child process could not start Triton in interpreter mode")
    _mode_cache.append(mode)
    return mode


def _dot_like_a_tensor_core() -> None:
    """Make the interpreter's ``tl.dot`` compute each output element the same way wherever its row sits.

    The interpreter hands ``tl.dot`` to ``np.matmul``, i.e. to numpy's OpenBLAS, whose float32 kernels on
    some x86 cores (those it runs as Cooper Lake / Haswell) give a row other bits when it moves inside the
    tile; a GPU's MMA does not. ``einsum`` without optimisation sums each element along k in one fixed
    order, so the batch-invariance tests check our kernels' tiling, not numpy's BLAS build."""
    import numpy as np
    from triton.runtime import interpreter

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a_data, b_data = a.data, b.data
        if (a.dtype.primitive_bitwidth == 8 and a.dtype.is_floating()) or (
                b.dtype.primitive_bitwidth == 8 and b.dtype.is_floating()):
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        acc = d.data.dtype
        out = np.einsum("...ik,...kj->...ij", a_data.astype(acc), b_data.astype(acc), optimize=False)
        return interpreter.TensorHandle(out + d.data, d.dtype.scalar)

    original = interpreter.InterpreterBuilder.create_dot
    if getattr(original, "__name__", "") != "create_dot" or original.__module__ == __name__:
        return  # already replaced, or a Triton whose builder differs: leave it
    interpreter.InterpreterBuilder.create_dot = create_dot


def _interpreted_ops() -> ModuleType:
    """forge_batch.kernels.triton_ops with interpreted kernels (a private copy if it was loaded compiled)."""
    if not _ops_cache:
        from triton.runtime.interpreter import InterpretedFunction

        _dot_like_a_tensor_core()

        from forge_batch.kernels import triton_ops

        if not isinstance(triton_ops._paged_attention_kernel, InterpretedFunction):
            path = Path(triton_ops.__file__)
            spec = importlib.util.spec_from_file_location("forge_batch.kernels._triton_ops_interpreted", path)
            assert spec is not None and spec.loader is not None
            triton_ops = importlib.util.module_from_spec(spec)
            prev = os.environ.get("TRITON_INTERPRET")
            os.environ["TRITON_INTERPRET"] = "1"
            try:
                spec.loader.exec_module(triton_ops)
            finally:
                if prev is None:
                    os.environ.pop("TRITON_INTERPRET", None)
                else:
                    os.environ["TRITON_INTERPRET"] = prev
        _ops_cache.append(triton_ops)
    return _ops_cache[0]


def _run_child(session: pytest.Session, rootdir: Path, module: Path) -> dict[str, tuple[str, str]]:
    """Run every selected interpreter test of test module ``module`` in one child pytest; outcome per test
    name."""
    module = module.resolve()
    if module in _child_cache:
        return _child_cache[module]
    outcomes: dict[str, tuple[str, str]] = {}
    nodeids = [
        item.nodeid for item in session.items
        if Path(str(item.path)).resolve() == module and "interpreter" in getattr(item, "fixturenames", ())
    ]
    with tempfile.TemporaryDirectory() as tmp:
        xml_path = Path(tmp) / "child.xml"
        env = {**os.environ, "TRITON_INTERPRET": "1", _CHILD_FLAG: "1"}
        # -P: not the working directory first on sys.path, where the repo's kernels/ would shadow the HF
        # `kernels` package that transformers imports when it is installed
        cmd = [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
               f"--junitxml={xml_path}", *nodeids]
        proc = subprocess.run(cmd, cwd=rootdir, env=env, capture_output=True, text=True, timeout=1800)
        if not xml_path.exists():
            raise RuntimeError(f"interpreter child pytest produced no report (rc={proc.returncode}):\n"
                               f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        for tc in ET.parse(xml_path).getroot().iter("testcase"):
            outcome, detail = "passed", ""
            for child in tc:
                if child.tag in ("failure", "error"):
                    outcome, detail = "failed", f"{child.get('message', '')}\n{child.text or ''}"
                elif child.tag == "skipped":
                    outcome, detail = "skipped", child.get("message", "")
            outcomes[tc.get("name", "")] = (outcome, detail)
    _child_cache[module] = outcomes
    return outcomes


@pytest.fixture
def interpreter(request: pytest.FixtureRequest) -> Callable[..., None]:
    """Run ``check(ops, *args)`` with interpreted Triton ops: in this process, or report the child's result."""
    mode = _interpreter_mode()
    if mode == "none":
        pytest.skip("triton is not installed")
    if mode == "here":
        ops = _interpreted_ops()
        return lambda check, *args, **kwargs: check(ops, *args, **kwargs)
    outcome, detail = _run_child(request.session, Path(str(request.config.rootpath)), Path(str(request.node.path))).get(
        request.node.name, ("failed", "the interpreter child did not run this test")
    )
    if outcome == "skipped":
        pytest.skip(detail)
    if outcome == "failed":
        pytest.fail(f"[in the TRITON_INTERPRET=1 child] {detail}", pytrace=False)
    return lambda check, *args, **kwargs: None
