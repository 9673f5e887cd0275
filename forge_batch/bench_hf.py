"""Loading a model into HF transformers for the bench's references: a transformers directory as it is, a
GGUF through transformers' GGUF reader (unpacked into dense weights, or kept in its quantized blocks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_transformers(model_path: Path, dtype: str, gguf_weights: str = "dense") -> tuple[Any, Any, str]:
    """(tokenizer, model, weights) for ``model_path`` in ``dtype`` ("bfloat16" or "float32"). ``weights``
    says what the model computes with: "dense", or "gguf-packed" when transformers (>= 5.24) keeps a
    GGUF's blocks because ``gguf_weights="packed"`` asked it to."""
    import torch
    import transformers

    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    folder, kwargs = model_path, {}
    if not model_path.is_dir():
        folder, kwargs = model_path.parent, {"gguf_file": model_path.name}
    tok = transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
    weights = "dense"
    gguf_config = getattr(transformers, "GgufConfig", None)
    if not model_path.is_dir() and gguf_config is not None:
        try:
            kwargs["quantization_config"] = gguf_config(dequantize=gguf_weights == "dense")
            weights = f"gguf-{gguf_weights}"
        except TypeError:  # a GgufConfig without the choice: this transformers unpacks GGUF files anyway
            pass
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **kwargs).eval()
    return tok, model, weights
