"""A whole decode step of a Llama-family model in one C call (csrc/decode_step.c), over weights kept in
their stored format (stored.py), or, for a batch-invariant float32 model, as panels with the GEMM library's
bits (panel_product.py). Built by the engine's CPU backend for one model and KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .build import lib, ptr
from .panel_product import PANEL_MAX_ROWS, PanelWeight, available_here
from .stored import WEIGHT_GEMV_MAX_ROWS, StoredWeight, weight_gemv_fast


@dataclass
class DecodeLayerWeights:
    """What decode_step needs of one decoder layer: float32 CPU norms and bias, matmuls as StoredWeight (or
    all as PanelWeight, without a bias), the KV cache float32 or bfloat16 (a bfloat16 model's; the step's
    arithmetic is float32 either way)."""

    input_norm: torch.Tensor
    post_attn_norm: torch.Tensor
    qkv_bias: torch.Tensor | None
    qkv: StoredWeight | PanelWeight
    o: StoredWeight | PanelWeight
    gate_up: StoredWeight | PanelWeight
    down: StoredWeight | PanelWeight
    k_cache: torch.Tensor
    v_cache: torch.Tensor


class DecodeStep:
    """A whole decode step of a Llama-family model in one C call (csrc/decode_step.c) for up to ``max_rows``
    sequences with one new token each: the layer-by-layer path with stored weights (weight_gemv, rms_norm,
    rotary_store_kv, paged decode attention, silu_and_mul), or with panel weights (panel products with the
    GEMM library's bits: a batch-invariant float32 model's few-row path), without its ~300 Python-level kernel calls. Built
    once per model and KV cache: the pointer table below holds the addresses of the weights and caches,
    which never move."""

    def __init__(self, layers: list[DecodeLayerWeights], final_norm: torch.Tensor, eps: float,
                 cos_sin_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                 intermediate_size: int, block_size: int, scale: float) -> None:
        self._layers = layers  # keeps every tensor the table points at alive
        self.final_norm, self.eps, self.cos_sin_cache = final_norm.contiguous(), float(eps), cos_sin_cache.contiguous()
        self.hidden_size = final_norm.shape[0]
        self.shape = (num_heads, num_kv_heads, head_dim, intermediate_size, block_size)
        self.scale = float(scale)
        self.panels = isinstance(layers[0].qkv, PanelWeight)
        self.max_rows = PANEL_MAX_ROWS if self.panels else WEIGHT_GEMV_MAX_ROWS
        rows = []
        for lw in layers:
            row = [lw.input_norm.data_ptr(), lw.post_attn_norm.data_ptr(), ptr(lw.qkv_bias)]
            for w in (lw.qkv, lw.o, lw.gate_up, lw.down):
                if isinstance(w, PanelWeight) != self.panels:
                    raise ValueError("decode_step needs every matmul stored or every matmul in panels")
                # the fields of decode_step.c's stored_weight (or a panel's in the same slots), in its order
                row += w.c_fields() if isinstance(w, PanelWeight) else list(w._c_args)
            row += [lw.k_cache.data_ptr(), lw.v_cache.data_ptr()]
            rows.append(row)
        self.table = torch.tensor(rows, dtype=torch.int64)
        self.kv_bf16 = layers[0].k_cache.dtype == torch.bfloat16
        if any((lw.k_cache.dtype == torch.bfloat16) != self.kv_bf16 for lw in layers):
            raise ValueError("decode_step needs every layer's KV cache in one dtype")
        assert self.table.shape[1] == lib().decode_layer_fields()

    @staticmethod
    def supports(layer: DecodeLayerWeights) -> bool:
        """Whether decode_step can run this layer: float32 contiguous norms and bias, a contiguous float32
        or bfloat16 KV cache, head_dim a multiple of 16 (the attention kernel's vectors), matmuls the SIMD
        weight_gemv reads (or all panels, no bias, with the float32 panel product compiled here)."""
        tensors = [layer.input_norm, layer.post_attn_norm] + ([layer.qkv_bias] if layer.qkv_bias is not None else [])
        caches = [layer.k_cache, layer.v_cache]
        matmuls = (layer.qkv, layer.o, layer.gate_up, layer.down)
        if all(isinstance(w, PanelWeight) for w in matmuls):
            fast = layer.qkv_bias is None and available_here(torch.float32)
        else:
            fast = weight_gemv_fast() and all(isinstance(w, StoredWeight) for w in matmuls)
        return (
            fast and layer.k_cache.shape[-1] % 16 == 0
            and layer.k_cache.dtype in (torch.float32, torch.bfloat16) and layer.v_cache.dtype == layer.k_cache.dtype
            and all(t.dtype == torch.float32 for t in tensors)
            and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors + caches)
        )

    def __call__(self, hidden: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        """hidden: the tokens' embeddings [M, hidden] float32 (overwritten) -> final normed hidden [M, hidden]."""
        m = hidden.shape[0]
        if m > self.max_rows or not hidden.is_contiguous() or hidden.dtype != torch.float32:
            raise ValueError(f"decode_step takes contiguous float32 [<= {self.max_rows}, hidden], got "
                             f"{hidden.dtype} {list(hidden.shape)}")
        index = (positions, slot_mapping, context_lens)
        if any(t.dtype != torch.int64 or not t.is_contiguous() or t.shape[0] != m for t in index) or (
            block_tables.dtype != torch.int64 or block_tables.shape[0] != m
        ):
            raise ValueError("decode_step takes int64 positions, slots, context lengths and block tables, one per row")
        out = torch.empty_like(hidden)
        block_tables = block_tables.contiguous()
        heads, kv_heads, head_dim, inter, block_size = self.shape
        lib().decode_step_f32(
            self.table.data_ptr(), self.table.shape[0], self.final_norm.data_ptr(), self.eps, hidden.data_ptr(),
            out.data_ptr(), m, positions.data_ptr(), slot_mapping.data_ptr(), block_tables.data_ptr(),
            block_tables.shape[1], context_lens.data_ptr(), self.cos_sin_cache.data_ptr(), self.hidden_size, heads,
            kv_heads, head_dim, inter, block_size, self.scale, int(self.kv_bf16), int(self.panels),
            torch.get_num_threads(),
        )
        return out
