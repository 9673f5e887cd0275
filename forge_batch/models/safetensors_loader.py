"""Load a Hugging Face model directory (config.json, *.safetensors, tokenizer files).

Tensors keep the dtype they are stored in (usually bfloat16): converting a 7B model to float32 here
would double peak memory for nothing, since the caller casts to its compute dtype anyway.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig, hf_weight_files, read_hf_config
from .raw_weights import RawWeight
from .tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Buffers some older checkpoints saved that are recomputed by the model, not loaded.
_SKIP_SUFFIXES = ("rotary_emb.inv_freq",)


def load_hf_dir(
    path: str | Path, stored_weights: dict[str, RawWeight] | None = None
) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Read ``(config, state_dict, tokenizer)`` from a Hugging Face model directory.

    The state dict has the checkpoint's own (HF) parameter names; ``lm_head.weight`` appears only
    if the checkpoint stores it. EOS ids merge config.json, generation_config.json and the tokenizer.
    When a dict is passed as ``stored_weights``, float16/bfloat16 matrices are also put there as they
    are (see raw_weights).
    """
    path = Path(path)
    config = read_hf_config(path)
    state = _load_weights(path)
    if stored_weights is not None:
        for name, tensor in state.items():
            if tensor.dtype in (torch.float16, torch.bfloat16) and RawWeight.fits(tensor.shape):
                stored_weights[name] = RawWeight.from_tensor(tensor)
    tokenizer = Tokenizer.from_hf_dir(path, extra_eos_token_ids=config.eos_token_ids)

    config.eos_token_ids = sorted(set(config.eos_token_ids) | tokenizer.eos_token_ids)
    if config.bos_token_id is None:
        config.bos_token_id = tokenizer.bos_token_id
    return config, state, tokenizer


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    files = hf_weight_files(path)
    state: dict[str, torch.Tensor] = {}
    if files[0].suffix == ".safetensors":
        for file in files:
            # safe_open memory-maps the file; each get_tensor reads just that tensor.
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name.endswith(_SKIP_SUFFIXES):
                        continue
                    if name in state:
                        raise ValueError(f"{path}: tensor {name} appears in more than one safetensors file")
                    state[name] = f.get_tensor(name)
        return state
    logger.warning("%s: no safetensors; loading pytorch .bin with torch.load(weights_only=True)", path)
    for file in files:
        part = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        state.update({k: v for k, v in part.items() if not k.endswith(_SKIP_SUFFIXES)})
    return state
