"""Keep a source checkout's root off ``sys.path`` for the scripts that load Hugging Face transformers.

A checkout holds ``./kernels`` (installed as ``forge_batch.kernels``, see pyproject). ``python -m`` run from the
checkout puts its root first on ``sys.path``, where that folder shadows Hugging Face's own ``kernels``
package, which transformers (5.25 on) imports whenever it builds a model: the import fails, far from its cause.
The ``python -m forge_batch.<script>`` entry points and the test-suite's conftest call
:func:`drop_checkout_root` first; the ``forge-batch`` command never has the checkout on its path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


def _is_root(entry: str) -> bool:
    try:
        return Path(entry or os.getcwd()).resolve() == _ROOT
    except OSError:
        return False


def drop_checkout_root() -> None:
    """Remove this checkout's root from ``sys.path`` (an installed copy has no ``./kernels`` beside it, and
    then nothing changes), and forget a ``kernels`` module already imported from it."""
    if not (_ROOT / "kernels" / "__init__.py").is_file() or not (_ROOT / "pyproject.toml").is_file():
        return
    sys.path[:] = [entry for entry in sys.path if not _is_root(entry)]
    ours = _ROOT / "kernels"
    loaded = sys.modules.get("kernels")
    if loaded is not None and Path(getattr(loaded, "__file__", None) or "/").resolve().parent == ours:
        for name in [n for n in sys.modules if n == "kernels" or n.startswith("kernels.")]:
            del sys.modules[name]
