"""A whole decode step of a bfloat16 Llama-family model over panel weights in one C call
(csrc/panel_decode_step.c): the batch-invariant engine's one-call step for up to PANEL_MAX_ROWS sequences.
Built by the engine's CPU backend for one model and KV cache; its bits are the layer-by-layer path's."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .build import lib
from .panel_product import PANEL_MAX_ROWS, PanelWeight, available_here


@dataclass
class PanelLayerWeights:
    """One decoder layer for the step: bfloat16 norms, the four matmuls' panels, the bfloat16 KV cache."""

    input_norm: torch.Tensor
    post_attn_norm: torch.Tensor
    qkv: PanelWeight
    o: PanelWeight
    gate_up: PanelWeight
    down: PanelWeight
    k_cache: torch.Tensor
    v_cache: torch.Tensor


class PanelDecodeStep:
    """The layer-by-layer decode path of a bfloat16 model whose matmuls all have panels (rms_norm, panel
    products, rotary_store_kv, bfloat16 decode attention without a cascade, silu_and_mul), in one C call
    for up to PANEL_MAX_ROWS sequences with one new token each. The pointer table holds the addresses of
    weights and caches, which never move."""

    max_rows = PANEL_MAX_ROWS

    def __init__(self, layers: list[PanelLayerWeights], final_norm: torch.Tensor, eps: float,
                 cos_sin_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                 intermediate_size: int, block_size: int, scale: float) -> None:
        self._layers = layers  # keeps every tensor the table points at alive
        self.final_norm, self.eps = final_norm.contiguous(), float(eps)
        self.cos_sin_cache = cos_sin_cache.float().contiguous()
        self.hidden_size = final_norm.shape[0]
        self.shape = (num_heads, num_kv_heads, head_dim, intermediate_size, block_size)
        self.scale = float(scale)
        rows = []
        for lw in layers:
            row = [lw.input_norm.data_ptr(), lw.post_attn_norm.data_ptr()]
            for w in (lw.qkv, lw.o, lw.gate_up, lw.down):
                row += w.c_fields()
            rows.append(row + [lw.k_cache.data_ptr(), lw.v_cache.data_ptr()])
        self.table = torch.tensor(rows, dtype=torch.int64)
        assert self.table.shape[1] == lib().panel_layer_fields()

    @staticmethod
    def supports(layer: PanelLayerWeights) -> bool:
        """Whether the step can run this layer: contiguous bfloat16 norms and KV cache on the CPU, head_dim a
        multiple of 16 (the attention kernel's vectors), the panel product compiled here."""
        tensors = [layer.input_norm, layer.post_attn_norm, layer.k_cache, layer.v_cache]
        return (available_here() and layer.k_cache.shape[-1] % 16 == 0
                and all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous() for t in tensors))

    def __call__(self, hidden: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        """hidden: the tokens' embeddings [M, hidden] bfloat16 (overwritten) -> final normed hidden [M, hidden]."""
        m = hidden.shape[0]
        if m > PANEL_MAX_ROWS or not hidden.is_contiguous() or hidden.dtype != torch.bfloat16:
            raise ValueError(f"the panel decode step takes contiguous bfloat16 [<= {PANEL_MAX_ROWS}, hidden], got "
                             f"{hidden.dtype} {list(hidden.shape)}")
        index = (positions, slot_mapping, context_lens)
        if any(t.dtype != torch.int64 or not t.is_contiguous() or t.shape[0] != m for t in index) or (
            block_tables.dtype != torch.int64 or block_tables.shape[0] != m
        ):
            raise ValueError("the panel decode step takes int64 positions, slots, context lengths and block "
                             "tables, one per row")
        out = torch.empty_like(hidden)
        block_tables = block_tables.contiguous()
        heads, kv_heads, head_dim, inter, block_size = self.shape
        lib().panel_decode_step_bf16(
            self.table.data_ptr(), self.table.shape[0], self.final_norm.data_ptr(), self.eps, hidden.data_ptr(),
            out.data_ptr(), m, positions.data_ptr(), slot_mapping.data_ptr(), block_tables.data_ptr(),
            block_tables.shape[1], context_lens.data_ptr(), self.cos_sin_cache.data_ptr(), self.hidden_size, heads,
            kv_heads, head_dim, inter, block_size, self.scale, torch.get_num_threads(),
        )
        return out
