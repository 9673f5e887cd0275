"""The architecture description the engine builds a model from, whatever the weights came in.

GGUF metadata and Hugging Face ``config.json`` spell the same facts differently; both loaders
translate into this one dataclass so the model code never sees either format.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")

# config.json "architectures" entry -> our architecture name.
_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass
class ModelConfig:
    """Shape and numerics of a Llama-family decoder (Llama 2/3.x, SmolLM2, Mistral, Qwen2/2.5).

    ``rope_scaling`` uses Hugging Face's format (``{"rope_type": "llama3", "factor": ..., ...}``)
    so the model code has one reference to follow; ``None`` means plain RoPE.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # Mistral v0.1 / Qwen2 with use_sliding_window: attention only sees this many past tokens.
    # None means full causal attention (the case for every default and most released models).
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        self.eos_token_ids = [int(i) for i in self.eos_token_ids]

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, for run summaries and ``forge-batch inspect``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> ModelConfig:
        """Translate a Hugging Face ``config.json`` dict (Llama, Mistral, Qwen2 causal LMs)."""
        arch = _hf_architecture(config)
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        head_dim = config.get("head_dim") or hidden // heads

        rope_theta, rope_scaling = _hf_rope(config)

        eos = config.get("eos_token_id")
        eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])

        sliding_window = None
        if arch == "mistral":
            sliding_window = config.get("sliding_window")
        elif arch == "qwen2" and config.get("use_sliding_window"):
            sliding_window = config.get("sliding_window")

        return cls(
            architecture=arch,
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_hidden_layers=int(config["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            # Llama/Mistral/Qwen2 config classes all default to untied embeddings.
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases (its config has no flag); Llama may opt in.
            attention_bias=True if arch == "qwen2" else bool(config.get("attention_bias", False)),
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos_ids,
            sliding_window=int(sliding_window) if sliding_window else None,
        )


def read_hf_config(folder: Path) -> ModelConfig:
    """A Hugging Face model folder's config.json as a ModelConfig (FileNotFoundError without one; ValueError for
    an architecture this engine does not build)."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: no config.json, so this is not a Hugging Face model directory")
    return ModelConfig.from_hf_config(json.loads(config_file.read_text(encoding="utf-8")))


def hf_weight_files(folder: Path) -> list[Path]:
    """A model folder's weight files: its *.safetensors, else its pytorch_model*.bin (sorted);
    FileNotFoundError without either."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors (or pytorch_model*.bin) weight files")
    return files


def _hf_architecture(config: Mapping[str, Any]) -> str:
    archs = config.get("architectures") or []
    for name in archs:
        if name in _HF_ARCHITECTURES:
            return _HF_ARCHITECTURES[name]
    if not archs and config.get("model_type") in SUPPORTED_ARCHITECTURES:
        return str(config["model_type"])
    found = ", ".join(archs) if archs else f"model_type={config.get('model_type')!r}"
    raise ValueError(
        f"unsupported model architecture ({found}); forge-batch supports "
        f"{', '.join(_HF_ARCHITECTURES)}"
    )


def _hf_rope(config: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling)`` from either the classic keys or transformers 5's
    ``rope_parameters``; the scaling dict always carries ``rope_type`` (older files say ``type``)."""
    params = config.get("rope_parameters")
    if isinstance(params, Mapping) and "rope_type" not in params and "rope_theta" not in params:
        params = None  # per-layer-type dict (e.g. {"full_attention": {...}}): not a Llama-family shape
    theta = config.get("rope_theta")
    if theta is None and params:
        theta = params.get("rope_theta")
    scaling = config.get("rope_scaling")
    if scaling is None and params:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is not None:
        scaling = dict(scaling)
        rope_type = scaling.pop("type", None)
        scaling.setdefault("rope_type", rope_type or "default")
        if scaling["rope_type"] == "default":
            scaling = None
    return float(theta if theta is not None else 10000.0), scaling
