"""Executes a StepPlan: builds the flat input tensors, runs the model, returns logits of sampling rows.

A decode step takes a device's fast path where there is one: replayed CUDA graphs on a GPU
(cuda_graphs.py), the one-call C decode step on the CPU (cpu_backend.py); every other step runs the
model layer by layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from forge_batch.models.llama import AttentionMetadata, LlamaForCausalLM

from .scheduler import ScheduledSeq, StepPlan

if TYPE_CHECKING:
    from .cpu_backend import CpuBackend


def kv_bytes_per_token(model: LlamaForCausalLM, dtype: torch.dtype) -> int:
    c = model.config
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * elem


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        kv_dtype: torch.dtype,
        *,
        cuda_graph_max_batch: int = 0,
        max_model_len: int = 0,
        cpu_backend: CpuBackend | None = None,
    ) -> None:
        self.model = model
        self.device = device
        self._logits_buffer: torch.Tensor | None = None  # see _logits_out
        self.block_size = block_size
        c = model.config
        shape = (num_blocks, block_size, c.num_key_value_heads, c.head_dim)
        # Allocated uninitialised (zero-filling gigabytes costs seconds of start-up); each block is zeroed
        # when first handed out (zero_blocks), because masked slots of a gathered block must never hold
        # NaN: it would leak through the masked softmax as NaN * 0.
        self.kv_caches = [
            (torch.empty(shape, dtype=kv_dtype, device=device), torch.empty(shape, dtype=kv_dtype, device=device))
            for _ in range(c.num_hidden_layers)
        ]
        self.decode_graphs = None
        if device.type == "cuda" and cuda_graph_max_batch > 0:
            from .cuda_graphs import DecodeGraphs

            for k, v in self.kv_caches:  # graphs read whole blocks: they must hold finite values
                k.zero_()
                v.zero_()
            self.decode_graphs = DecodeGraphs(
                model, self.kv_caches, cuda_graph_max_batch, (max_model_len + block_size - 1) // block_size,
                max_model_len,
            )
            self.decode_graphs.capture()
        # None where it cannot run (weights not all in stored form, another kernel backend, not the CPU)
        self.cpu_decode = cpu_backend.decode_step(model, self.kv_caches) if cpu_backend is not None else None

    def zero_blocks(self, block_ids: list[int]) -> None:
        """Zero these blocks of every layer's cache. Fresh blocks come off the free list mostly in id
        order, so each run of consecutive ids is one slice fill (a memset), about 4x faster on the CPU
        than index_fill_ with the ids (~270 us per cache tensor per step of a W1 prefill)."""
        if not block_ids:
            return
        runs: list[list[int]] = []
        for b in sorted(block_ids):
            if runs and runs[-1][1] == b:
                runs[-1][1] = b + 1
            else:
                runs.append([b, b + 1])
        if len(runs) > 16:  # scattered ids: one indexed fill per cache tensor
            idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
            for k_cache, v_cache in self.kv_caches:
                k_cache.index_fill_(0, idx, 0)
                v_cache.index_fill_(0, idx, 0)
            return
        for k_cache, v_cache in self.kv_caches:
            for start, end in runs:
                k_cache[start:end].zero_()
                v_cache[start:end].zero_()

    def prepare(self, scheduled: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Flat input ids, positions, attention metadata, and the row of each sampling sequence's last token."""
        ids, pos_t, attn, sample_rows, _ = self._prepare(scheduled)
        return ids, pos_t, attn, sample_rows

    def _prepare(self, scheduled: list[ScheduledSeq],
                 ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int], list[tuple[int, int, int]]]:
        """``prepare`` plus the prompt positions to score: (index in ``scheduled``, first flat row, count)."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        context_lens: list[int] = []
        sample_rows: list[int] = []
        prompt_rows: list[tuple[int, int, int]] = []
        max_blocks = max(len(s.seq.block_table) for s in scheduled)
        tables = []
        for s in scheduled:
            seq, n = s.seq, s.num_new_tokens
            start = seq.num_computed_tokens
            table = seq.block_table
            if n == 1:  # decode: avoid building lists for one token
                pos = start
                input_ids.append(seq.token_at(pos))
                positions.append(pos)
                slots.append(table[pos // bs] * bs + pos % bs)
            else:
                tokens = seq.token_ids
                input_ids.extend(tokens[start : start + n])
                rng = range(start, start + n)
                positions.extend(rng)
                slots.extend(table[p // bs] * bs + p % bs for p in rng)
            if seq.params.prompt_logprobs is not None and seq.wants_prompt_logprobs:
                # position p's logits score prompt token p + 1: positions up to the prompt's next-to-last
                first = max(start, len(seq.prompt_logprobs))
                last = min(start + n, seq.num_prompt_tokens - 1)
                if first < last:
                    prompt_rows.append((len(starts) - 1, starts[-1] + first - start, last - first))
            starts.append(starts[-1] + n)
            context_lens.append(start + n)
            if s.samples:
                sample_rows.append(starts[-1] - 1)
            tables.append(table + [0] * (max_blocks - len(table)))
        dev = self.device
        attn = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.long, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.long, device=dev),
            context_lens=torch.tensor(context_lens, dtype=torch.long, device=dev),
            max_query_len=max(s.num_new_tokens for s in scheduled),
            max_context_len=max(context_lens),
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=dev)
        pos_t = torch.tensor(positions, dtype=torch.long, device=dev)
        return ids, pos_t, attn, sample_rows, prompt_rows

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> tuple[torch.Tensor | None, list[tuple[int, torch.Tensor]]]:
        """Run the plan's tokens. Returns float32 logits [S, V] for the sequences that sample (in plan
        order; None when none does) and, for sequences asking for prompt logprobs, (index in
        ``plan.scheduled``, final hidden states of the prompt positions this step ran that still need
        scoring). Hidden states, not logits: a long prompt's logits are [P, V] floats, so the caller turns
        them into logprobs a slice at a time."""
        ids, positions, attn, sample_rows, prompt_rows = self._prepare(plan.scheduled)
        hidden = self.forward(ids, positions, attn)
        logits = None
        if sample_rows:
            rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
            logits = self.model.compute_logits(hidden.index_select(0, rows), out=self._logits_out(len(sample_rows)))
        prompt_logits: list[tuple[int, torch.Tensor]] = []
        for index, first, count in prompt_rows:
            prompt_logits.append((index, hidden[first : first + count]))
        return logits, prompt_logits

    def _logits_out(self, rows: int) -> torch.Tensor | None:
        """Where a step's float32 logits go on the CPU: a buffer kept from step to step. A fresh tensor each
        step ([256, 49152] floats: 50 MB) is memory the allocator maps anew and the cast then page-faults in,
        ten times the cast's own cost. The logits live until the step has sampled; the next step overwrites
        them. None elsewhere (a GPU's caching allocator already reuses its memory)."""
        if self.device.type != "cpu":
            return None
        vocab = self.model.config.vocab_size
        if self._logits_buffer is None or self._logits_buffer.shape[0] < rows:
            self._logits_buffer = torch.empty(rows, vocab, dtype=torch.float32)
        return self._logits_buffer[:rows]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        """Final hidden states of the step's tokens, through a decode fast path where one applies."""
        if attn.max_query_len == 1:
            graphs = self.decode_graphs
            if graphs is not None and graphs.can_run(ids.shape[0], attn.block_tables.shape[1]):
                return graphs.run(ids, positions, attn)
            if self.cpu_decode is not None and self.cpu_decode.can_run(ids.shape[0], attn):
                return self.cpu_decode(ids, positions, attn)
        return self.model(ids, positions, self.kv_caches, attn)
