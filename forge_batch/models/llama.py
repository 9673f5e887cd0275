"""The Llama family (Llama 2/3.x, SmolLM2, Mistral, Qwen2/2.5) over a flat batch of tokens.

All sequences' new tokens of a step are concatenated into one [T] vector (no padding); attention reads
and writes the paged KV cache through the metadata in ``AttentionMetadata``. Q/K/V and gate/up
projections are fused into one matmul each at load time, which matters on CPU where every kernel launch
of a small matmul costs as much as the arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from forge_batch import kernels
from forge_batch.kernels import mkl_packed, onednn_packed
from forge_batch.kernels.cpu_ops import (
    WEIGHT_GEMV_MAX_ROWS,
    DecodeLayerWeights,
    DecodeStep,
    Int8Weight,
    StoredWeight,
    int8_linear,
    quantize_weight_int8,
    weight_gemv,
)
from forge_batch.kernels.mkl_packed import PackedWeight
from forge_batch.kernels.onednn_packed import OneDnnWeight
from forge_batch.models.config import ModelConfig

# Float32 weights packed once into MKL's GEMM layout (kernels/mkl_packed.py) run the model's skinny matmuls
# 20-40% faster on the CPU at a decode step's batch sizes, whatever the row count. Below 16 rows MKL sums in
# another order than F.linear (and the few-row steps have their own paths), so those keep F.linear.
# bfloat16 weights reordered once for oneDNN (kernels/onednn_packed.py) give F.linear's numbers at any count.
PACKED_MIN_ROWS = 16


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: PackedWeight | OneDnnWeight | Int8Weight | None = None,
           stored: StoredWeight | None = None) -> torch.Tensor:
    """F.linear, through the layer's other forms when the model has them: the checkpoint's own
    storage format for a few rows (``stored``, see keep_stored_weights), an int8 weight (quantization
    "int8", always used), oneDNN's reordered bfloat16 weight (always used) or MKL's packed float32
    weight (when the batch is large enough)."""
    if stored is not None and x.shape[0] <= WEIGHT_GEMV_MAX_ROWS:
        # float32 arithmetic on the stored values; a bfloat16 model's rows go in and come back as bfloat16
        return weight_gemv(x.float(), stored, bias).to(x.dtype)
    if x.dtype != weight.dtype:  # decode_step's float32 output into a bfloat16 model's LM head
        x = x.to(weight.dtype)
    if isinstance(packed, OneDnnWeight):
        return onednn_packed.linear(x, packed, bias)
    if isinstance(packed, Int8Weight):
        return int8_linear(x, packed, bias)
    if packed is not None and x.shape[0] >= PACKED_MIN_ROWS:
        return mkl_packed.linear(x, packed, bias)
    return F.linear(x, weight, bias)


@dataclass
class AttentionMetadata:
    """Where each new token's K/V goes and which cached K/V each sequence attends to (see kernels)."""

    slot_mapping: torch.Tensor  # [T]
    block_tables: torch.Tensor  # [B, max_blocks]
    query_start_loc: torch.Tensor  # [B + 1]
    context_lens: torch.Tensor  # [B]
    max_query_len: int
    max_context_len: int


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, with Llama 3 / linear scaling when configured."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return inv_freq.float()
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled).float()
    raise ValueError(f"unsupported rope scaling type {kind!r} (supported: default, linear, llama3)")


def rope_cos_sin_cache(config: ModelConfig, max_positions: int) -> torch.Tensor:
    """[max_positions, head_dim]: cos of each frequency, then sin (float32)."""
    inv_freq = rope_inv_freq(config)
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


# Each fused matmul weight of a layer (DecoderLayer.matmul_weights) and the checkpoint tensors it is made
# of, row blocks in this order, relative to "model.layers.{i}.".
MATMUL_SOURCES = {
    "qkv": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "o": ("self_attn.o_proj.weight",),
    "gate_up": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "down": ("mlp.down_proj.weight",),
}


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = d
        self.q_size, self.kv_size = self.num_heads * d, self.num_kv_heads * d
        self.eps = config.rms_norm_eps
        self.scale = d**-0.5

        def empty(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)

        self.qkv_weight = empty(self.q_size + 2 * self.kv_size, h)
        self.qkv_bias = empty(self.q_size + 2 * self.kv_size) if config.attention_bias else None
        self.o_weight = empty(h, self.q_size)
        self.gate_up_weight = empty(2 * config.intermediate_size, h)
        self.down_weight = empty(h, config.intermediate_size)
        self.input_norm = empty(h)
        self.post_attn_norm = empty(h)
        # weight name -> its packed form: MKL float32 (pack_weights) or int8 (quantize_int8)
        self.packed: dict[str, PackedWeight | OneDnnWeight | Int8Weight] = {}
        # weight name -> the same weight in its checkpoint's storage format (keep_stored_weights)
        self.stored: dict[str, StoredWeight] = {}

    def matmul_weights(self) -> dict[str, torch.Tensor]:
        """The layer's matmul weights by the names ``packed`` uses."""
        return {"qkv": self.qkv_weight, "o": self.o_weight, "gate_up": self.gate_up_weight, "down": self.down_weight}

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionMetadata,
        cos_sin_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = kernels.rms_norm(hidden, self.input_norm, self.eps, residual)
        packed, stored = self.packed, self.stored
        qkv = linear(x, self.qkv_weight, self.qkv_bias, packed.get("qkv"), stored.get("qkv"))
        t = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache
        q, k = kernels.rotary_and_store_kv(positions, q, k, v, cos_sin_cache, k_cache, v_cache, attn.slot_mapping)
        o = kernels.paged_attention(
            q, k_cache, v_cache, attn.block_tables, attn.query_start_loc, attn.context_lens, self.scale,
            attn.max_query_len, attn.max_context_len,
        )
        hidden = linear(o.reshape(t, self.q_size), self.o_weight, None, packed.get("o"), stored.get("o"))
        x, residual = kernels.rms_norm(hidden, self.post_attn_norm, self.eps, residual)
        gate_up = linear(x, self.gate_up_weight, None, packed.get("gate_up"), stored.get("gate_up"))
        hidden = linear(kernels.silu_and_mul(gate_up), self.down_weight, None, packed.get("down"), stored.get("down"))
        return hidden, residual


class LlamaForCausalLM(nn.Module):
    """Decoder-only transformer of the Llama family; ``config.attention_bias`` covers Qwen2's QKV bias."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        v, h = config.vocab_size, config.hidden_size
        self.embed_tokens = nn.Parameter(torch.empty(v, h, dtype=dtype), requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(config, dtype) for _ in range(config.num_hidden_layers))
        self.norm = nn.Parameter(torch.empty(h, dtype=dtype), requires_grad=False)
        self.lm_head = (
            self.embed_tokens
            if config.tie_word_embeddings
            else nn.Parameter(torch.empty(v, h, dtype=dtype), requires_grad=False)
        )
        self.register_buffer("cos_sin_cache", rope_cos_sin_cache(config, config.max_position_embeddings),
                             persistent=False)
        self.lm_head_packed: PackedWeight | OneDnnWeight | None = None
        self.lm_head_stored: StoredWeight | None = None
        # Decode steps of up to WEIGHT_GEMV_MAX_ROWS sequences run as one C call (cpu_ops.DecodeStep) when
        # every layer's matmuls are kept in stored form; False keeps the layer-by-layer path (tests).
        self.use_decode_step = True
        self._decode_step: tuple[list, DecodeStep | None] | None = None  # (the KV caches it was built for, it)

    def _cpu_float32(self) -> bool:
        return self.embed_tokens.device.type == "cpu" and self.dtype == torch.float32

    def _cpu_stored_ok(self) -> bool:
        """Where stored weights and decode_step run: the CPU, float32 or bfloat16 (float32 arithmetic)."""
        return self.embed_tokens.device.type == "cpu" and self.dtype in (torch.float32, torch.bfloat16)

    @torch.inference_mode()
    def pack_weights(self, layers: bool = True) -> bool:
        """Repack the matmul weights for the CPU's GEMM: MKL's packed layout for float32 (see
        PACKED_MIN_ROWS), oneDNN's blocked layout for bfloat16: the LM head's, and the decoder layers'
        unless ``layers`` is False (they are int8 then). Call again after changing weights. Returns
        whether packing applies."""
        if self.embed_tokens.device.type != "cpu":
            return False
        if self.dtype == torch.float32 and mkl_packed.available():
            pack = mkl_packed.pack
        elif self.dtype == torch.bfloat16 and onednn_packed.available():
            pack = onednn_packed.pack
        else:
            return False
        if layers:
            for layer in self.layers:
                layer.packed = {name: pack(w) for name, w in layer.matmul_weights().items()}
        self.lm_head_packed = pack(self.lm_head)
        return True

    def keep_stored_weights(self, stored: dict[str, StoredWeight], layers: bool = True) -> int:
        """Keep the matmul weights also in their checkpoint's storage format (``stored``, by Hugging Face
        name, from ``load_model_files(..., stored_weights=...)``), for steps of a few rows: there
        ``weight_gemv`` reads e.g. 4-bit blocks instead of the float32 copy, several times fewer bytes,
        with the same products. Fused weights (Q/K/V, gate/up) are kept when their parts share a format.
        ``layers=False`` keeps only the LM head's (the layers are int8). CPU float32 or bfloat16 models
        (a bfloat16 model's few-row steps then compute in float32 on the checkpoint's exact values);
        returns how many of the model's matmul weights are kept."""
        if not self._cpu_stored_ok():
            return 0

        def fused(prefix: str, names: tuple[str, ...]) -> StoredWeight | None:
            parts = [stored.get(prefix + n) for n in names]
            if any(p is None for p in parts):
                return None
            return parts[0] if len(parts) == 1 else StoredWeight.concat(parts)  # type: ignore[arg-type]

        kept = 0
        self._decode_step = None
        for i, layer in enumerate(self.layers if layers else []):
            layer.stored = {}
            for name, weight in layer.matmul_weights().items():
                s = fused(f"model.layers.{i}.", MATMUL_SOURCES[name])
                if s is not None and (s.rows, s.cols) == tuple(weight.shape):
                    layer.stored[name] = s
                    kept += 1
        head = "model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"
        s = stored.get(head)
        self.lm_head_stored = s if s is not None and (s.rows, s.cols) == tuple(self.lm_head.shape) else None
        return kept + (self.lm_head_stored is not None)

    @torch.inference_mode()
    def quantize_int8(self) -> None:
        """W8A8 for every decoder matmul (quantization="int8"): weights int8 per output channel, activations
        int8 per token at run time, int32 accumulation (see cpu_ops.int8_linear). Embeddings, norms and
        the LM head stay float32: the logits keep full precision. CPU, float32 models only."""
        if not self._cpu_float32():
            raise ValueError("quantization='int8' runs on the CPU with dtype float32")
        for layer in self.layers:
            layer.packed = {name: quantize_weight_int8(w) for name, w in layer.matmul_weights().items()}

    @torch.inference_mode()
    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy Hugging Face-named weights in, fusing q/k/v and gate/up. Raises on a missing tensor."""

        def get(name: str) -> torch.Tensor:
            if name not in state_dict:
                raise KeyError(f"weight {name!r} missing from the checkpoint")
            return state_dict[name]

        def put(dst: torch.Tensor, *srcs: torch.Tensor) -> None:
            src = torch.cat(srcs, dim=0) if len(srcs) > 1 else srcs[0]
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"shape mismatch: checkpoint {tuple(src.shape)} vs model {tuple(dst.shape)}")
            dst.copy_(src.to(dst.dtype))

        put(self.embed_tokens, get("model.embed_tokens.weight"))
        put(self.norm, get("model.norm.weight"))
        if not self.config.tie_word_embeddings:
            put(self.lm_head, state_dict.get("lm_head.weight", get("model.embed_tokens.weight")))
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            for name, weight in layer.matmul_weights().items():
                put(weight, *(get(p + src) for src in MATMUL_SOURCES[name]))
            if layer.qkv_bias is not None:
                put(layer.qkv_bias, *(get(p + src.replace(".weight", ".bias")) for src in MATMUL_SOURCES["qkv"]))
            put(layer.input_norm, get(p + "input_layernorm.weight"))
            put(layer.post_attn_norm, get(p + "post_attention_layernorm.weight"))

    @torch.inference_mode()
    def init_random_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Random weights (norms at 1): for benchmarks of a model's shape without its checkpoint."""
        g = torch.Generator(device=self.embed_tokens.device).manual_seed(seed)
        for name, p in self.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=g)

    def decode_step(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> DecodeStep | None:
        """The one-call decode step over these KV caches, or None when it cannot run: a layer's matmuls not
        all kept in stored form (keep_stored_weights), not a CPU float32 or bfloat16 model, a non-default
        kernel backend."""
        if kernels.get_backend() != "auto":  # checked on every call, as every kernel's dispatch does
            return None
        if self._decode_step is not None and self._decode_step[0] is kv_caches:
            return self._decode_step[1]
        step = None
        if self._cpu_stored_ok():
            layers = []
            for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
                st = layer.stored
                if not all(name in st for name in MATMUL_SOURCES):
                    break
                bias = None if layer.qkv_bias is None else layer.qkv_bias.float()  # copies in a bf16 model
                lw = DecodeLayerWeights(layer.input_norm.float(), layer.post_attn_norm.float(), bias, st["qkv"],
                                        st["o"], st["gate_up"], st["down"], k_cache, v_cache)
                if not DecodeStep.supports(lw):
                    break
                layers.append(lw)
            else:
                first = self.layers[0]
                step = DecodeStep(layers, self.norm.float(), self.config.rms_norm_eps, self.cos_sin_cache, first.num_heads,
                                  first.num_kv_heads, first.head_dim, self.config.intermediate_size,
                                  kv_caches[0][0].shape[1], first.scale)
        self._decode_step = (kv_caches, step)  # holding the list keeps its identity (the key) unique
        return step

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        """Final hidden states [T, hidden] (normed) for the step's tokens."""
        hidden = F.embedding(input_ids, self.embed_tokens)
        if (
            attn.max_query_len == 1 and input_ids.shape[0] <= WEIGHT_GEMV_MAX_ROWS and self.use_decode_step
            and self.layers[0].stored and input_ids.device.type == "cpu"
        ):
            step = self.decode_step(kv_caches)
            if step is not None:  # float32 hidden states out, also in a bfloat16 model (see compute_logits)
                return step(hidden.float(), positions, attn.slot_mapping, attn.block_tables, attn.context_lens)
        residual = None
        for layer, kv in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv, attn, self.cos_sin_cache)
        hidden, _ = kernels.rms_norm(hidden, self.norm, self.config.rms_norm_eps, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [S, vocab] in float32 for the rows that sample (only the last position of each)."""
        return linear(hidden, self.lm_head, None, self.lm_head_packed, self.lm_head_stored).float()
