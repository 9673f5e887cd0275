"""Built-in samplers, registered through ``register_samplers`` like a third party's.

The engine owns the sampler implementations (``forge_batch.engine.sampler.BUILTIN_SAMPLERS``: ``default``,
``greedy``, ``multinomial``, ...); this plugin publishes them through the hook so that ``forge-batch plugins``
lists them and a job's ``sampling.sampler`` is checked against the same registry a plugin extends. The
import is lazy so that listing plugins does not import torch.
"""

from __future__ import annotations

from typing import Any

from forge_batch.hookspecs import hookimpl


@hookimpl
def register_samplers() -> dict[str, Any]:
    try:
        from forge_batch.engine.sampler import BUILTIN_SAMPLERS
    except ImportError:  # engine not importable (e.g. torch missing): nothing to register
        return {}
    return dict(BUILTIN_SAMPLERS)
