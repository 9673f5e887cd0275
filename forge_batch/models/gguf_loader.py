"""Load a GGUF file (llama.cpp's format) into Hugging Face-named float32 tensors.

The header (metadata, tensor table) is read by ``gguf_file.GGUFFile``, which refuses a file that is not
GGUF, is corrupt or is truncated, naming it. The common quantisations (F32/F16/BF16/Q8_0/Q4_0/Q4_1) are
dequantised with vectorised torch ops (the 4/8-bit ones by a compiled kernel with the same bits, in one pass,
where the CPU kernels are loaded already); anything else (K-quants, IQ*) falls back to
``gguf.quants.dequantize`` (correct, slower). Given a model's parameters (``load_gguf(into=...)``), each
tensor that decodes in one pass is written straight into its rows, so a load holds no second copy of the model.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from forge_batch.kernels.cpu.stored import dequantize_blocks

from .config import ModelConfig
from .gguf_file import (
    GGML_BF16,
    GGML_F16,
    GGML_F32,
    GGML_Q4_0,
    GGML_Q4_1,
    GGML_Q8_0,
    NATIVE_TYPES,
    GGUFError,
    GGUFFile,
)
from .raw_weights import RAW_FORMATS, RawWeight
from .tokenizer import Tokenizer

__all__ = ["GGUFError", "GGUFFile", "dequantize", "dequantize_into", "llama3_rope_factors", "load_gguf",
           "read_gguf_metadata", "read_tensor", "unpermute_rotary"]

logger = logging.getLogger(__name__)

# GGUF architecture name -> ours. Mistral files from llama.cpp's converter say "llama".
_GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


# ``load_gguf(into=...)``: (config, the file's tensor shapes by Hugging Face name) -> where to write them
WeightDestinations = Callable[[ModelConfig, dict[str, tuple[int, ...]]], Mapping[str, torch.Tensor]]


# -- dequantisation ---------------------------------------------------------------------------------


def read_tensor(f: GGUFFile, name: str) -> torch.Tensor:
    """A tensor of ``f`` dequantised to a fresh float32 torch tensor in torch (HF) shape."""
    info = f.tensors[name]
    return dequantize(f.raw(name), info.ggml_type, info.shape)


def dequantize(raw: np.ndarray, ggml_type: int, shape: Iterable[int]) -> torch.Tensor:
    """Decode ``raw`` (the tensor's bytes) of ggml type ``ggml_type`` into a float32 tensor of ``shape``.

    Block layouts follow ggml-common.h: every block starts with an fp16 scale ``d`` (Q4_1 adds an
    fp16 minimum ``m``); Q4 blocks pack element ``j`` in the low nibble and ``j + 16`` in the high one.
    """
    shape = tuple(shape)
    data = torch.from_numpy(raw)  # uint8 view; every op below writes to fresh memory
    if ggml_type in _FLOAT_TYPES:
        values = data.view(_FLOAT_TYPES[ggml_type])
        out = values.clone() if ggml_type == GGML_F32 else values.float()
    elif ggml_type in _BLOCK_HEADER_BYTES:
        blocks, head = _blocks(data, ggml_type)
        compiled = _dequantize_compiled(blocks, head, ggml_type)  # the same bits in one pass, where loaded
        if compiled is not None:
            out = compiled
        elif ggml_type == GGML_Q8_0:
            out = blocks[:, 2:].view(torch.int8).float().mul_(head)
        else:
            packed = blocks[:, -16:]
            q = torch.empty(packed.shape[0], 32, dtype=torch.uint8)
            torch.bitwise_and(packed, 0x0F, out=q[:, :16])
            torch.bitwise_right_shift(packed, 4, out=q[:, 16:])
            out = q.float()
            if ggml_type == GGML_Q4_1:
                out.mul_(head[:, 0:1]).add_(head[:, 1:2])
            else:
                out.sub_(8.0).mul_(head[:, 0:1])
    else:
        out = _dequantize_with_gguf(raw, ggml_type, shape)
    return out.reshape(shape)


def dequantize_into(raw: np.ndarray, ggml_type: int, out: torch.Tensor) -> bool:
    """Decode ``raw`` as ``dequantize`` does, straight into ``out`` (a contiguous CPU tensor of the tensor's
    element count, e.g. a model parameter's rows; another dtype is cast as ``copy_`` casts). Returns False,
    writing nothing, where that would take several passes (the torch ops of the 4/8-bit formats before the
    compiled kernels are loaded, other formats' decoders): the caller dequantizes those in batches."""
    if out.device.type != "cpu" or not out.is_contiguous():
        return False
    data = torch.from_numpy(raw)
    if ggml_type in _FLOAT_TYPES:
        values = data.view(_FLOAT_TYPES[ggml_type])
        if values.numel() != out.numel():
            raise ValueError(f"{values.numel()} values in the file for a destination of {out.numel()}")
        out.copy_(values.view(out.shape))  # one pass: the cast (or copy) is the whole decode
        return True
    if ggml_type not in _BLOCK_HEADER_BYTES:
        return False
    blocks, head = _blocks(data, ggml_type)
    if out.dtype in (torch.float32, torch.bfloat16):  # the compiled pass writes (and rounds) these itself
        return _dequantize_compiled(blocks, head, ggml_type, out.view(-1)) is not None
    decoded = _dequantize_compiled(blocks, head, ggml_type)
    if decoded is None:
        return False
    out.copy_(decoded.view(out.shape))
    return True


# The 4/8-bit block formats (name and bytes per block: gguf_file.NATIVE_TYPES) by their header's bytes: the fp16
# d, and Q4_1's fp16 m; the values follow. Float formats: their torch dtype.
_BLOCK_HEADER_BYTES = {GGML_Q8_0: 2, GGML_Q4_0: 2, GGML_Q4_1: 4}
_FLOAT_TYPES = {GGML_F32: torch.float32, GGML_F16: torch.float16, GGML_BF16: torch.bfloat16}


def _blocks(data: torch.Tensor, ggml_type: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [n_blocks, block bytes], and the blocks' header values in float32 [n_blocks, 1 or 2]."""
    blocks = data.view(-1, NATIVE_TYPES[ggml_type][2])
    return blocks, blocks[:, :_BLOCK_HEADER_BYTES[ggml_type]].view(torch.float16).float()


def _dequantize_compiled(blocks: torch.Tensor, head: torch.Tensor, ggml_type: int,
                         out: torch.Tensor | None = None) -> torch.Tensor | None:
    """The compiled kernel's decode (into ``out`` where given), or None before the CPU kernels are loaded."""
    fmt = NATIVE_TYPES[ggml_type][0]
    return dequantize_blocks(blocks, fmt, head[:, 0], head[:, 1] if ggml_type == GGML_Q4_1 else None, out)


def _dequantize_with_gguf(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    import gguf

    qtype = gguf.GGMLQuantizationType(ggml_type)
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    values = gguf.quants.dequantize(raw.reshape(rows, -1), qtype)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


def unpermute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's converter, which reorders each Q/K head's rows from HF's rotate-half layout
    to interleaved pairs: ``w.reshape(n_head, 2, d // 2, ...).swapaxes(1, 2)``. Works for biases too."""
    return weight[torch.from_numpy(rotary_row_order(weight.shape[0], n_heads))].contiguous()


def rotary_row_order(rows: int, n_heads: int) -> np.ndarray:
    """Row indices ``idx`` such that ``hf_weight = gguf_weight[idx]`` for a permuted Q/K tensor.

    A pure row permutation, so it can be applied to quantised rows before dequantising."""
    head_dim = rows // n_heads
    if head_dim * n_heads != rows or head_dim % 2:
        raise ValueError(f"cannot un-permute {rows} rows into {n_heads} heads")
    return np.arange(rows).reshape(n_heads, head_dim // 2, 2).swapaxes(1, 2).reshape(-1)


# Dequantise up to this many elements per batch: large enough that a model loads in a handful of
# torch ops (each op is a thread barrier, which costs milliseconds on a busy 2-core machine),
# small enough that the gathered raw bytes stay a modest extra copy.
_BATCH_ELEMENTS = 1 << 26


def _dequantize_all(
    f: GGUFFile, plan: list[tuple[str, str, np.ndarray | None]], stored: dict[str, RawWeight] | None = None,
    into: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Dequantise ``plan`` entries ``(gguf_name, hf_name, row_order)``: straight into ``into[hf_name]`` where
    ``dequantize_into`` can (the entry is then that tensor), else batching same-type tensors.

    Returned tensors of one batch are views into one float32 buffer (freed when all are dropped).
    With ``stored``, 2-D tensors in one of RAW_FORMATS are also kept there, as the file stores them."""
    out: dict[str, torch.Tensor] = {}
    by_type: dict[int, list[tuple[str, str, np.ndarray | None]]] = {}
    for entry in plan:
        info = f.tensors[entry[0]]
        dst = into.get(entry[1]) if into else None
        if dst is not None and tuple(dst.shape) == tuple(info.shape):
            raw = _reorder_raw(f, entry[0], entry[2])
            if dequantize_into(raw, info.ggml_type, dst):
                _keep_stored(stored, entry[1], raw, info.ggml_type, info.shape)
                out[entry[1]] = dst
                continue
        if info.ggml_type in NATIVE_TYPES:
            by_type.setdefault(info.ggml_type, []).append(entry)
        else:
            out[entry[1]] = _reorder(read_tensor(f, entry[0]), entry[2])
    for ggml_type, entries in by_type.items():
        batch: list[tuple[str, str, np.ndarray | None]] = []
        count = 0
        for entry in [*entries, None]:
            n = math.prod(f.tensors[entry[0]].shape) if entry else 0
            if batch and (entry is None or count + n > _BATCH_ELEMENTS):
                raws = [_reorder_raw(f, name, order) for name, _, order in batch]
                for (name, hf_name, _), raw in zip(batch, raws):
                    _keep_stored(stored, hf_name, raw, ggml_type, f.tensors[name].shape)
                flat = dequantize(raws[0] if len(raws) == 1 else np.concatenate(raws), ggml_type, (count,))
                offset = 0
                for name, hf_name, _ in batch:
                    shape = f.tensors[name].shape
                    size = math.prod(shape)
                    out[hf_name] = flat[offset : offset + size].view(shape)
                    offset += size
                batch, count = [], 0
            if entry is not None:
                batch.append(entry)
                count += n
    return out


_STORED_FORMATS = {type_id: name for name, type_id in RAW_FORMATS.items()}


def _keep_stored(stored: dict[str, RawWeight] | None, hf_name: str, raw: np.ndarray, ggml_type: int,
                 shape: tuple[int, ...]) -> None:
    """Put a matrix's blocks into ``stored`` as a RawWeight (a copy: the file's map closes after loading),
    where it is one of RAW_FORMATS."""
    if stored is None or ggml_type not in _STORED_FORMATS or not RawWeight.fits(shape):
        return
    data = torch.from_numpy(np.array(raw, dtype=np.uint8)).reshape(-1)
    stored[hf_name] = RawWeight(_STORED_FORMATS[ggml_type], data, shape[0], shape[1])


def _reorder_raw(f: GGUFFile, name: str, order: np.ndarray | None) -> np.ndarray:
    raw = f.raw(name)
    if order is None:
        return raw
    return raw.reshape(len(order), -1)[order].reshape(-1)


def _reorder(tensor: torch.Tensor, order: np.ndarray | None) -> torch.Tensor:
    return tensor if order is None else tensor[torch.from_numpy(order)].contiguous()


# -- config -------------------------------------------------------------------------------------------


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The file's metadata only (for ``inspect`` and checks); no tensor is read."""
    with GGUFFile(path) as f:
        return dict(f.metadata)


def _config_from_gguf(f: GGUFFile, tokenizer: Tokenizer) -> ModelConfig:
    md = f.metadata
    gguf_arch = md.get("general.architecture")
    arch = _GGUF_ARCHITECTURES.get(gguf_arch)
    if arch is None:
        raise ValueError(
            f"{f.path}: unsupported GGUF architecture {gguf_arch!r}; supported: {', '.join(_GGUF_ARCHITECTURES)}"
        )

    def key(name: str, default: Any = None) -> Any:
        return md.get(f"{gguf_arch}.{name}", default)

    def required(name: str) -> Any:
        value = key(name)
        if value is None:
            raise ValueError(f"{f.path}: GGUF metadata lacks {gguf_arch}.{name}")
        return value

    heads = int(required("attention.head_count"))
    kv_heads = key("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # per-layer list (some hybrid models); Llama family is uniform
        if len(set(kv_heads)) != 1:
            raise ValueError(f"{f.path}: per-layer KV head counts are not supported")
        kv_heads = kv_heads[0]
    hidden = int(required("embedding_length"))
    head_dim = int(key("attention.key_length") or hidden // heads)

    embd = f.tensors.get("token_embd.weight")
    vocab_size = key("vocab_size") or (embd.shape[0] if embd else tokenizer.vocab_size)

    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab_size),
        hidden_size=hidden,
        intermediate_size=int(required("feed_forward_length")),
        num_hidden_layers=int(required("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(kv_heads),
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling_from_gguf(f, gguf_arch, head_dim),
        max_position_embeddings=int(key("context_length", 2048)),
        tie_word_embeddings="output.weight" not in f.tensors,
        attention_bias="blk.0.attn_q.bias" in f.tensors,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=sorted(tokenizer.eos_token_ids),
        sliding_window=key("attention.sliding_window"),
    )


def _rope_scaling_from_gguf(f: GGUFFile, arch: str, head_dim: int) -> dict[str, Any] | None:
    """HF-style ``rope_scaling`` from GGUF keys; Llama 3.1+ files carry the llama3 scaling only as a
    precomputed ``rope_freqs.weight`` tensor, whose parameters we recover (and verify) here."""
    md = f.metadata
    kind = md.get(f"{arch}.rope.scaling.type")
    factor = md.get(f"{arch}.rope.scaling.factor") or md.get(f"{arch}.rope.scale_linear")
    orig = md.get(f"{arch}.rope.scaling.original_context_length")
    if "rope_freqs.weight" in f.tensors:
        freqs = read_tensor(f, "rope_freqs.weight").double()
        theta = float(md.get(f"{arch}.rope.freq_base", 10000.0))
        return _llama3_scaling_from_factors(freqs, theta, head_dim, orig)
    if kind in (None, "none"):
        if factor and kind is None and factor != 1.0:  # old files: only rope.scale_linear
            return {"rope_type": "linear", "factor": float(factor)}
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor or 1.0)}
    if kind == "yarn":
        scaling: dict[str, Any] = {"rope_type": "yarn", "factor": float(factor or 1.0)}
        if orig:
            scaling["original_max_position_embeddings"] = int(orig)
        for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                                 ("yarn_ext_factor", "extrapolation_factor"),
                                 ("yarn_attn_factor", "attention_factor")):
            value = md.get(f"{arch}.rope.scaling.{gguf_key}")
            if value is not None:
                scaling[hf_key] = float(value)
        return scaling
    raise ValueError(f"{f.path}: unsupported RoPE scaling type {kind!r}")


def _llama3_scaling_from_factors(
    factors: torch.Tensor, theta: float, head_dim: int, orig_ctx: int | None
) -> dict[str, Any] | None:
    """Invert llama.cpp's llama3 ``rope_freqs``: 1 for short wavelengths, ``factor`` for long ones and
    ``1 / ((1 - s) / factor + s)`` in between, with ``s = (orig / wavelen - low) / (high - low)``."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    factor = float(factors.max())
    if factor <= 1.0 + 1e-6:
        return None  # all ones: plain RoPE
    mid = (factors > 1.0 + 1e-4) & (factors < factor * (1.0 - 1e-4))
    if int(mid.sum()) >= 2:
        # s is linear in 1/wavelen: s = orig/(high-low) * (1/wavelen) - low/(high-low)
        s = (1.0 / factors[mid] - 1.0 / factor) / (1.0 - 1.0 / factor)
        x = 1.0 / wavelen[mid]
        slope, intercept = np.polyfit(x.numpy(), s.numpy(), 1)
        # Every released llama3 config uses low_freq_factor=1; the fit then gives high and orig.
        low = 1.0
        span = -low / float(intercept)
        high = low + span
        orig = float(slope) * span
    elif int(mid.sum()) == 1:  # one point in the band: Meta's low/high factors, orig from the point
        low, high = 1.0, 4.0
        s = float((1.0 / factors[mid] - 1.0 / factor) / (1.0 - 1.0 / factor))
        orig = float(wavelen[mid]) * (s * (high - low) + low)
    else:  # nothing to fit: Meta's published defaults
        low, high, orig = 1.0, 4.0, float(orig_ctx or 8192)
    if orig_ctx:
        orig = float(orig_ctx)
    scaling = {
        "rope_type": "llama3",
        "factor": round(float(factor), 4),
        "low_freq_factor": round(float(low), 4),
        "high_freq_factor": round(float(high), 4),
        "original_max_position_embeddings": int(round(orig)),
    }
    rebuilt = llama3_rope_factors(scaling, theta, head_dim)
    if not torch.allclose(rebuilt, factors, rtol=1e-3, atol=1e-3):
        logger.warning("rope_freqs.weight does not match a llama3 scaling; using the fitted %s anyway", scaling)
    return scaling


def llama3_rope_factors(scaling: dict[str, Any], theta: float, head_dim: int) -> torch.Tensor:
    """The per-frequency divisors llama3 RoPE scaling applies (what llama.cpp stores as rope_freqs)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    orig = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = orig / low, orig / high
    smooth = (orig / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    out = torch.where(wavelen < high_wavelen, torch.ones_like(wavelen), mid)
    return torch.where(wavelen > low_wavelen, torch.full_like(wavelen, factor), out)


# -- public entry point -------------------------------------------------------------------------------


def load_gguf(
    path: str | Path, stored_weights: dict[str, RawWeight] | None = None, into: WeightDestinations | None = None,
) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Read a GGUF file into ``(config, state_dict, tokenizer)``.

    The state dict uses Hugging Face parameter names and float32 tensors (the caller casts);
    ``lm_head.weight`` is present only when the file has an untied ``output.weight``. Tensors of the
    same ggml type share one buffer (they are views), so don't resize them in place. When a dict is
    passed as ``stored_weights``, matrices stored as Q4_0/Q4_1/Q8_0/F16/BF16 are also put there, by the
    same names, in their file format (see raw_weights).

    ``into`` is called once the config is read, with the file's tensor shapes by Hugging Face name; it returns
    tensors to write those weights into (a model's parameter rows: ``LlamaForCausalLM.weight_destinations``),
    of any dtype. Each tensor written there is its own entry in the state dict, so a load holds no second copy.
    """
    path = Path(path)
    with GGUFFile(path) as f:
        tokenizer = Tokenizer.from_gguf_metadata(f.metadata)
        config = _config_from_gguf(f, tokenizer)
        permute = config.architecture in ("llama", "mistral")
        plan: list[tuple[str, str, np.ndarray | None]] = []
        for name, info in f.tensors.items():
            hf_name = _hf_name(name)
            if hf_name is None:
                if name != "rope_freqs.weight":
                    logger.warning("%s: ignoring unexpected tensor %s", path.name, name)
                continue
            order = None
            if permute and (".q_proj." in hf_name or ".k_proj." in hf_name):
                heads = config.num_attention_heads if ".q_proj." in hf_name else config.num_key_value_heads
                order = rotary_row_order(info.shape[0], heads)
            plan.append((name, hf_name, order))
        destinations = into(config, {hf: f.tensors[name].shape for name, hf, _ in plan}) if into else None
        state = _dequantize_all(f, plan, stored_weights, destinations)
    _check_complete(state, config, path)
    return config, state, tokenizer


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}.{m.group(3)}"
    return None


def _check_complete(state: dict[str, torch.Tensor], config: ModelConfig, path: Path) -> None:
    """Fail at load time, with the missing names, rather than deep in the model constructor."""
    expected = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(config.num_hidden_layers):
        expected += [f"model.layers.{i}.{part}.weight" for part in _LAYER_TENSORS.values()]
    missing = [n for n in expected if n not in state]
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"{path}: GGUF lacks tensors {', '.join(missing[:5])}{more}")
