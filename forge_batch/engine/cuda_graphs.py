"""CUDA graphs for decode steps: one captured forward per batch-size bucket, replayed with new inputs.

A decode step of a small model on a GPU is dominated by kernel launches (hundreds per step); replaying a
captured graph launches them all at once. Only pure-decode steps (one token per sequence) are graphed:
their shapes depend on the batch size alone, so a handful of buckets covers every step. The Triton
attention kernel finds each row's sequence on the device (no host sync), which is what makes it
capturable. Padding rows of a bucket write nowhere (slot -1) and read one valid cache slot.
"""

from __future__ import annotations

import torch

from forge_batch.models.llama import AttentionMetadata, LlamaForCausalLM


def bucket_sizes(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_batch + 1, 16))
    return sorted({s for s in sizes if s <= max_batch} | {max_batch})


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        max_batch: int,
        max_blocks_per_seq: int,
        max_context_len: int,
    ) -> None:
        dev = kv_caches[0][0].device
        self.model = model
        self.kv_caches = kv_caches
        self.max_batch = max_batch
        self.max_context_len = max_context_len
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((max_batch,), -1, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros(max_batch, max_blocks_per_seq, dtype=torch.long, device=dev)
        self.context_lens = torch.ones(max_batch, dtype=torch.long, device=dev)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.long, device=dev)
        self.hidden = torch.zeros(max_batch, model.config.hidden_size, dtype=model.dtype, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None

    def _attn(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            block_tables=self.block_tables[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            context_lens=self.context_lens[:bs],
            max_query_len=1,
            max_context_len=self.max_context_len,  # fixes the kernel's tiling for any length up to it
        )

    @torch.inference_mode()
    def capture(self) -> None:
        for bs in reversed(bucket_sizes(self.max_batch)):  # largest first: smaller ones reuse its pool
            attn = self._attn(bs)
            self.hidden[:bs] = self._forward(bs, attn)  # warm-up: compile Triton kernels, allocate workspaces
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, self.pool):
                self.hidden[:bs] = self._forward(bs, attn)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def _forward(self, bs: int, attn: AttentionMetadata) -> torch.Tensor:
        return self.model(self.input_ids[:bs], self.positions[:bs], self.kv_caches, attn)

    def can_run(self, batch: int, max_blocks: int) -> bool:
        return batch <= self.max_batch and max_blocks <= self.block_tables.shape[1] and bool(self.graphs)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        bs = input_ids.shape[0]
        bucket = next(s for s in sorted(self.graphs) if s >= bs)
        self.input_ids[:bs] = input_ids
        self.positions[:bs] = positions
        self.slot_mapping[:bs] = attn.slot_mapping
        self.slot_mapping[bs:bucket] = -1
        nb = attn.block_tables.shape[1]
        self.block_tables[:bs, :nb] = attn.block_tables
        self.context_lens[:bs] = attn.context_lens
        self.context_lens[bs:bucket] = 1
        self.graphs[bucket].replay()
        return self.hidden[:bs]
