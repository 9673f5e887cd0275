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

from forge_batch.kernels import KernelBackend, Linear
from forge_batch.models.config import ModelConfig


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


# Each fused matmul of a layer, by its attribute (a kernels.Linear), and the checkpoint tensors its weight is
# made of, row blocks in this order, relative to "model.layers.{i}.".
MATMUL_SOURCES = {
    "qkv_proj": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "o_proj": ("self_attn.o_proj.weight",),
    "gate_up_proj": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "down_proj": ("mlp.down_proj.weight",),
}
# The checkpoint tensor of the LM head's weight, untied and tied
LM_HEAD_SOURCE = {False: "lm_head.weight", True: "model.embed_tokens.weight"}


class DecoderLayer(nn.Module):
    """One decoder layer. Its matmuls are ``kernels.Linear`` callables over the layer's parameters (see
    MATMUL_SOURCES); an engine backend may replace them with faster forms of the same product."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, kernels: KernelBackend) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = d
        self.q_size, self.kv_size = self.num_heads * d, self.num_kv_heads * d
        self.eps = config.rms_norm_eps
        self.scale = d**-0.5
        self.kernels = kernels

        def empty(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)

        self.qkv_weight = empty(self.q_size + 2 * self.kv_size, h)
        self.qkv_bias = empty(self.q_size + 2 * self.kv_size) if config.attention_bias else None
        self.o_weight = empty(h, self.q_size)
        self.gate_up_weight = empty(2 * config.intermediate_size, h)
        self.down_weight = empty(h, config.intermediate_size)
        self.input_norm = empty(h)
        self.post_attn_norm = empty(h)
        self.qkv_proj = Linear(self.qkv_weight, self.qkv_bias)
        self.o_proj = Linear(self.o_weight)
        self.gate_up_proj = Linear(self.gate_up_weight)
        self.down_proj = Linear(self.down_weight)

    def matmul_weights(self) -> dict[str, torch.Tensor]:
        """The layer's matmul weights by the names of MATMUL_SOURCES."""
        return {"qkv_proj": self.qkv_weight, "o_proj": self.o_weight, "gate_up_proj": self.gate_up_weight,
                "down_proj": self.down_weight}

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionMetadata,
        cos_sin_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kernels = self.kernels
        x, residual = kernels.rms_norm(hidden, self.input_norm, self.eps, residual)
        qkv = self.qkv_proj(x)
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
        hidden = self.o_proj(o.reshape(t, self.q_size))
        x, residual = kernels.rms_norm(hidden, self.post_attn_norm, self.eps, residual)
        hidden = self.down_proj(kernels.silu_and_mul(self.gate_up_proj(x)))
        return hidden, residual


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``b`` is ``a``'s very elements (a loader wrote the weight in place)."""
    return (a.device == b.device and a.dtype == b.dtype and a.data_ptr() == b.data_ptr()
            and a.shape == b.shape and a.stride() == b.stride())


# Rows per LM-head call when the logits go into a caller's buffer (see compute_logits): 64 x 49152 float32 is
# 12.6 MB, and at 64 rows MKL's and oneDNN's packed GEMMs sum each row as at 256.
LOGITS_ROWS_PER_CALL = 64


class LlamaForCausalLM(nn.Module):
    """Decoder-only transformer of the Llama family; ``config.attention_bias`` covers Qwen2's QKV bias.

    ``kernels`` is the engine's kernel backend (a default ``KernelBackend()`` when none is given)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32,
                 kernels: KernelBackend | None = None) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.kernels = kernels if kernels is not None else KernelBackend()
        v, h = config.vocab_size, config.hidden_size
        self.embed_tokens = nn.Parameter(torch.empty(v, h, dtype=dtype), requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(config, dtype, self.kernels) for _ in range(config.num_hidden_layers))
        self.norm = nn.Parameter(torch.empty(h, dtype=dtype), requires_grad=False)
        self.lm_head_weight = (
            self.embed_tokens
            if config.tie_word_embeddings
            else nn.Parameter(torch.empty(v, h, dtype=dtype), requires_grad=False)
        )
        self.lm_head = Linear(self.lm_head_weight)
        self.register_buffer("cos_sin_cache", rope_cos_sin_cache(config, config.max_position_embeddings),
                             persistent=False)

    def weight_slots(self) -> list[tuple[torch.Tensor, tuple[str, ...]]]:
        """Each parameter with the Hugging Face tensors its rows come from, in row order (q/k/v and gate/up
        are fused). The LM head's slot is first and only where it is untied; without a tensor of its own in
        the checkpoint it takes the embedding's (``load_weights``)."""
        slots: list[tuple[torch.Tensor, tuple[str, ...]]] = []
        if not self.config.tie_word_embeddings:
            slots.append((self.lm_head_weight, (LM_HEAD_SOURCE[False],)))
        slots += [(self.embed_tokens, ("model.embed_tokens.weight",)), (self.norm, ("model.norm.weight",))]
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            for name, weight in layer.matmul_weights().items():
                slots.append((weight, tuple(p + src for src in MATMUL_SOURCES[name])))
            if layer.qkv_bias is not None:
                slots.append((layer.qkv_bias, tuple(p + src.replace(".weight", ".bias")
                                                    for src in MATMUL_SOURCES["qkv_proj"])))
            slots += [(layer.input_norm, (p + "input_layernorm.weight",)),
                      (layer.post_attn_norm, (p + "post_attention_layernorm.weight",))]
        return slots

    def weight_destinations(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        """Where each checkpoint tensor goes, as views of the parameters' rows, for a loader that writes
        the tensors in place (``load_weights`` then copies nothing for them). ``shapes``: the checkpoint's
        tensor shapes by name; a slot whose parts do not fill its parameter exactly gets no views, and
        ``load_weights`` reports the mismatch."""
        out: dict[str, torch.Tensor] = {}
        for dst, names in self.weight_slots():
            parts = [tuple(shapes[name]) for name in names if name in shapes]
            if len(parts) != len(names) or any(s[1:] != tuple(dst.shape[1:]) for s in parts) or (
                    sum(s[0] for s in parts) != dst.shape[0]):
                continue
            row = 0
            for name, shape in zip(names, parts):
                out[name] = dst[row:row + shape[0]]
                row += shape[0]
        return out

    @torch.inference_mode()
    def load_weights(self, state_dict: dict[str, torch.Tensor], consume: bool = False) -> None:
        """Copy Hugging Face-named weights in, fusing q/k/v and gate/up. Raises on a missing tensor.
        ``consume``: take each tensor out of ``state_dict`` once copied, so that a loader's buffers are freed
        as the load goes (the load holds the model about once, not twice). A tensor that is already its
        destination (``weight_destinations``) is not copied."""

        def get(name: str, keep: bool = False) -> torch.Tensor:
            if name not in state_dict:
                raise KeyError(f"weight {name!r} missing from the checkpoint")
            return state_dict.pop(name) if consume and not keep else state_dict[name]

        def put(dst: torch.Tensor, *srcs: torch.Tensor) -> None:
            # fused parts go straight into their rows, cast by copy_: no concatenated or cast copy on the way
            shape = (sum(s.shape[0] for s in srcs), *srcs[0].shape[1:])
            if any(s.shape[1:] != srcs[0].shape[1:] for s in srcs) or shape != tuple(dst.shape):
                got = tuple(srcs[0].shape) if len(srcs) == 1 else " + ".join(str(tuple(s.shape)) for s in srcs)
                raise ValueError(f"shape mismatch: checkpoint {got} vs model {tuple(dst.shape)}")
            row = 0
            for src in srcs:
                rows = dst[row:row + src.shape[0]]
                if not _same_memory(rows, src):
                    rows.copy_(src)
                row += src.shape[0]

        slots = self.weight_slots()
        if not self.config.tie_word_embeddings:  # first: without a tensor of its own it copies the embedding
            own = LM_HEAD_SOURCE[False] in state_dict
            put(slots.pop(0)[0], get(LM_HEAD_SOURCE[False]) if own else get("model.embed_tokens.weight", keep=True))
        for dst, names in slots:
            put(dst, *(get(name) for name in names))

    @torch.inference_mode()
    def init_random_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Random weights (norms at 1): for benchmarks of a model's shape without its checkpoint."""
        g = torch.Generator(device=self.embed_tokens.device).manual_seed(seed)
        for name, p in self.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=g)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The tokens' embeddings [T, hidden]."""
        return F.embedding(input_ids, self.embed_tokens)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        """Final hidden states [T, hidden] (normed) for the step's tokens."""
        hidden = self.embed(input_ids)
        residual = None
        for layer, kv in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv, attn, self.cos_sin_cache)
        hidden, _ = self.kernels.rms_norm(hidden, self.norm, self.config.rms_norm_eps, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [S, vocab] in float32 for the rows that sample (only the last position of each), written
        into ``out`` where it is a float32 tensor of that shape (the same bits either way).

        Into ``out`` a float32 LM head runs on pieces of LOGITS_ROWS_PER_CALL to twice that many rows: a whole
        step's float32 product ([256, 49152]: 50 MB) is past glibc's mmap threshold (32 MB), so each call's
        result was memory mapped anew and page-faulted in (a float32 LM head at 56% of the GEMM's speed);
        the pieces' results reuse heap memory. Every piece has enough rows that the packed GEMMs sum each row
        as in the whole product."""
        rows, vocab = hidden.shape[0], self.lm_head.weight.shape[0]
        if out is None or tuple(out.shape) != (rows, vocab) or out.dtype != torch.float32 or out.device != hidden.device:
            return self.lm_head(hidden).float()
        # (a bfloat16 product's result is half the size: under the threshold, one call)
        pieces = max(1, rows // LOGITS_ROWS_PER_CALL) if hidden.dtype == torch.float32 else 1
        for i in range(pieces):
            r0, r1 = i * rows // pieces, (i + 1) * rows // pieces
            out[r0:r1].copy_(self.lm_head(hidden[r0:r1]))
        return out


def matmul_slots(model: LlamaForCausalLM, layers: bool = True) -> list[tuple[nn.Module, str, tuple[str, ...]]]:
    """(owner, attribute, checkpoint tensors) of every matmul weight (a ``kernels.Linear``): the decoder
    layers' (unless ``layers`` is False), then the LM head's. An engine backend puts its forms of the
    products there with ``setattr(owner, attribute, form)``."""
    found: list[tuple[nn.Module, str, tuple[str, ...]]] = []
    for i, layer in enumerate(model.layers if layers else []):
        found += [(layer, name, tuple(f"model.layers.{i}.{s}" for s in srcs)) for name, srcs in MATMUL_SOURCES.items()]
    return found + [(model, "lm_head", (LM_HEAD_SOURCE[model.config.tie_word_embeddings],))]
