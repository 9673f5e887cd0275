"""forge-batch: batch (offline) LLM generation on a continuous-batching engine with a paged KV cache.

    from forge_batch import LLM, SamplingParams
    llm = LLM("smollm2-135m-instruct")
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0.0))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from forge_batch.api import LLM
    from forge_batch.engine.outputs import CompletionOutput, Logprob, RequestOutput
    from forge_batch.engine.request import GenerationRequest
    from forge_batch.engine.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "GenerationRequest", "Logprob", "RequestOutput", "SamplingParams", "__version__"]

_LAZY = {
    "LLM": "forge_batch.api",
    "SamplingParams": "forge_batch.engine.sampling_params",
    "RequestOutput": "forge_batch.engine.outputs",
    "CompletionOutput": "forge_batch.engine.outputs",
    "Logprob": "forge_batch.engine.outputs",
    "GenerationRequest": "forge_batch.engine.request",
}


def __getattr__(name: str) -> Any:
    # Lazy so that `forge-batch validate` and plugin listing do not pay for importing torch.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'forge_batch' has no attribute {name!r}")
