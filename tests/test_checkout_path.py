"""`python -m` from a checkout: its ./kernels must not shadow Hugging Face's `kernels` package (which
transformers 5.25 on imports to build a model) in the scripts that load transformers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK = """
import sys
sys.modules.pop("kernels", None)
import kernels  # from the checkout's root, first on sys.path under -c / -m
before = kernels.__file__
from forge_batch.checkout_path import drop_checkout_root
drop_checkout_root()
try:
    import kernels
    after = kernels.__file__
except ImportError:
    after = None
print(before)
print(after)
import forge_batch.kernels.cpu.build  # the package's own kernels still import (installed mapping)
"""


@pytest.mark.skipif(not (ROOT / "kernels" / "__init__.py").is_file(), reason="runs from a source checkout")
def test_the_checkout_root_leaves_sys_path_and_its_kernels_folder_is_forgotten():
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after = out.stdout.split("\n")[:2]
    assert Path(before).resolve() == ROOT / "kernels" / "__init__.py"
    assert after == "None" or not Path(after).resolve().is_relative_to(ROOT)
