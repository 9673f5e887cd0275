"""Which engine a run uses: ``engine_factory(job, samplers=..., constraints=...)`` returns an object with
``generate_stream``, ``stats``, ``tokenizer`` and ``max_model_len`` (:class:`forge_batch.LLM` by default).

``FORGE_BATCH_ENGINE_FACTORY=module:function`` swaps it from the environment; the test-suite uses that to run
``forge-batch`` subprocesses on a fake engine, and it is the door for an out-of-process engine.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable
from typing import Any

from forge_batch.job import JobSpec

ENGINE_FACTORY_ENV = "FORGE_BATCH_ENGINE_FACTORY"

# What an engine must keep for a resumed run to write what the interrupted one would have: each of these
# can change a row's tokens (the model's content, not its name; the resolved dtype, not "auto"; the GEMM
# library and instruction set, which decide the order of a product's sums).
# (block_size too: decode attention reduces a row's keys block by block, so in bfloat16 another block size
# rounds differently)
ENGINE_IDENTITY = ("model_digest", "device", "dtype", "quantization", "max_model_len", "kernel_path", "matmul",
                   "batch_invariant", "block_size")


def default_engine_factory(job: JobSpec, *, samplers: dict[str, Any], constraints: dict[str, Any]) -> Any:
    """Build :class:`forge_batch.LLM` from the job's ``model`` and ``engine`` options.

    Options the engine does not take (an older or different engine) are dropped rather than crashing."""
    from forge_batch.engine.llm import LLM

    kwargs: dict[str, Any] = job.engine.llm_kwargs()
    kwargs["seed"] = job.sampling.seed
    kwargs["samplers"] = samplers
    if constraints:
        kwargs["constraints"] = constraints
    params = inspect.signature(LLM).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return LLM(job.model_ref(), **kwargs)


def load_engine_factory(spec: str) -> Callable[..., Any]:
    """``"package.module:function"`` -> the function."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"{ENGINE_FACTORY_ENV} must look like package.module:function, got {spec!r}")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{ENGINE_FACTORY_ENV}={spec!r} names no function: {type(e).__name__}: {e}") from None


def engine_factory_from_env() -> Callable[..., Any]:
    """The factory ``FORGE_BATCH_ENGINE_FACTORY`` names, else :func:`default_engine_factory`."""
    spec = os.environ.get(ENGINE_FACTORY_ENV)
    return load_engine_factory(spec) if spec else default_engine_factory
