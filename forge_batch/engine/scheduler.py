"""Continuous batching policy: which sequences run in the next step, and with how many tokens.

``Scheduler.schedule()`` looks only at queue state and free blocks and returns a ``StepPlan``; it never
touches a model, so it is tested on its own. Policy, in order:

1. Running sequences, oldest first, each get their next tokens (1 when decoding, a chunk of the rest of
   the prompt when prefilling) while the step's token budget lasts. When a sequence needs a block and
   none is free, the newest running sequence is preempted by recompute (its blocks freed, back to the
   front of the queue) — possibly the sequence itself.
2. Then waiting sequences are admitted first-come first-served while there is budget, a free sequence
   slot and blocks, reusing cached prefix blocks; a prompt too long for the budget is chunked.
   A prompt whose next block another running sequence is computing right now waits a step, so it
   reuses that block instead of computing it again (prefix-aware admission).
   Nothing is admitted in a step that had to preempt (the cache is full; admitting would thrash).
3. A prompt that can never fit (longer than the context, or needing more blocks than the cache has) is
   rejected with a message on its sequence, not raised.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .outputs import EngineErrorKind
from .sequence import Sequence, SequenceStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    # Blocks kept free when admitting new sequences so running ones can grow without preemption.
    watermark_blocks: int = 0


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this step reaches the sequence's last known token, so a new token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class StepPlan:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    rejected: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: oldest first
        self.num_preemptions = 0
        self._arrivals = 0

    def add(self, seq: Sequence) -> None:
        seq.arrival = self._arrivals
        self._arrivals += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished sequence and release its blocks (they stay in the prefix cache)."""
        seq.status = SequenceStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        self.block_manager.free_seq(seq)

    def abort(self, seq: Sequence) -> None:
        """Remove an unfinished sequence whose request was aborted, and release its blocks."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.finish(seq)

    def _why_impossible(self, seq: Sequence) -> str | None:
        cfg, bm = self.config, self.block_manager
        if seq.num_prompt_tokens == 0:
            return "empty prompt: it has no tokens"
        if seq.num_tokens + 1 > cfg.max_model_len:
            return (
                f"prompt too long: {seq.num_tokens} tokens, but the context holds {cfg.max_model_len} "
                "(prompt plus at least one generated token)"
            )
        needed = bm.blocks_needed(seq.num_tokens + 1)
        if needed > bm.num_blocks:
            return (
                f"prompt too long for the KV cache: needs {needed} blocks of {bm.block_size} tokens, "
                f"the cache has {bm.num_blocks}"
            )
        return None

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self.running.remove(seq)
        self.block_manager.free_seq(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        plan.preempted.append(seq)

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        bm = self.block_manager
        budget = self.config.max_num_batched_tokens

        # 1. running sequences
        idx = 0
        while idx < len(self.running) and budget > 0:
            seq = self.running[idx]
            n = min(seq.num_uncomputed_tokens, budget)
            while not bm.can_grow(seq, n):
                victim = self.running[-1]
                self._preempt(victim, plan)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break  # it preempted itself: everything after it is gone too
            bm.grow(seq, n)
            plan.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
            idx += 1

        # 2. admissions
        if plan.preempted:
            return plan
        deferred: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            reason = self._why_impossible(seq)
            if reason is not None:
                self.waiting.popleft()
                seq.error = reason
                seq.error_kind = (
                    EngineErrorKind.EMPTY_PROMPT if seq.num_prompt_tokens == 0 else EngineErrorKind.PROMPT_TOO_LONG
                ).value
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = "error"
                plan.rejected.append(seq)
                continue
            hits = bm.match_prefix(seq)
            if bm.waits_for_pending(seq, len(hits)):
                # Its next prompt block is being computed by a running sequence: wait one step and
                # reuse it rather than compute it twice (shared system prompts, n > 1 samples).
                deferred.append(self.waiting.popleft())
                continue
            # A cached block that is free right now leaves the free list when reused.
            free_hits = sum(1 for b in hits if bm.blocks[b].ref_count == 0)
            cached_tokens = len(hits) * bm.block_size
            n = min(seq.num_tokens - cached_tokens, budget)
            need = bm.blocks_needed(cached_tokens + n) - len(hits)
            reserve = self.config.watermark_blocks if self.running else 0
            if need + free_hits + reserve > bm.num_free_blocks:
                break
            self.waiting.popleft()
            bm.allocate_prefix(seq, hits)
            bm.grow(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            plan.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        self.waiting.extendleft(reversed(deferred))  # back in front, in their original order
        return plan
