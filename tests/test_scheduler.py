"""Scheduling policy without a model: admission, token budget, chunking, preemption, rejection."""

from __future__ import annotations

from forge_batch.engine.block_manager import BlockManager
from forge_batch.engine.sampling_params import SamplingParams
from forge_batch.engine.scheduler import Scheduler, SchedulerConfig, StepPlan
from forge_batch.engine.sequence import Sequence, SequenceStatus

_ids = iter(range(10**6))


def make(num_blocks=64, block_size=4, **cfg) -> Scheduler:
    return Scheduler(SchedulerConfig(**cfg), BlockManager(num_blocks, block_size))


def seq(n: int, start: int = 0) -> Sequence:
    return Sequence(next(_ids), f"r{start}", 0, list(range(start, start + n)), SamplingParams(), seed=0)


def execute(s: Scheduler, plan: StepPlan, token: int = 1) -> None:
    """What the engine does after a forward: advance computed counts, append a sampled token."""
    for item in plan.scheduled:
        samples = item.samples
        item.seq.num_computed_tokens += item.num_new_tokens
        s.block_manager.commit_computed(item.seq)
        if samples:
            item.seq.output_token_ids.append(token)


def test_admits_fcfs_within_seq_limit():
    s = make(max_num_seqs=2, max_num_batched_tokens=100)
    a, b, c = seq(5), seq(5, start=10), seq(5, start=20)
    for x in (a, b, c):
        s.add(x)
    plan = s.schedule()
    assert [i.seq for i in plan.scheduled] == [a, b]
    assert all(i.samples for i in plan.scheduled)
    assert c.status == SequenceStatus.WAITING and len(s.running) == 2


def test_token_budget_chunks_a_long_prompt():
    s = make(max_num_batched_tokens=8)
    a = seq(20)
    s.add(a)
    plans = []
    while not a.output_token_ids:
        plan = s.schedule()
        plans.append([(i.seq, i.num_new_tokens, i.samples) for i in plan.scheduled])
        execute(s, plan)
    assert plans == [[(a, 8, False)], [(a, 8, False)], [(a, 4, True)]]


def test_decodes_first_then_prefill_chunk_fills_the_budget():
    s = make(max_num_batched_tokens=10)
    a = seq(3)
    s.add(a)
    execute(s, s.schedule())  # a prefilled, now decoding
    b = seq(30, start=100)
    s.add(b)
    plan = s.schedule()
    assert [(i.seq, i.num_new_tokens) for i in plan.scheduled] == [(a, 1), (b, 9)]
    assert plan.num_batched_tokens == 10
    assert plan.scheduled[0].samples and not plan.scheduled[1].samples


def test_preempts_newest_when_blocks_run_out_and_recomputes_later():
    # 4 blocks of 4 tokens; two sequences of 7 tokens take 2 blocks each and then need a third.
    s = make(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    old, new = seq(7), seq(7, start=50)
    s.add(old)
    s.add(new)
    execute(s, s.schedule())  # both prefilled: 7 computed + 1 sampled each = 8 tokens, 2 blocks each
    execute(s, s.schedule())  # decode position 7 still fits the 2nd block; now 9 tokens each
    plan = s.schedule()  # both need a 3rd block; none free: the newest is preempted
    assert plan.preempted == [new]
    assert [i.seq for i in plan.scheduled] == [old]
    assert new.status == SequenceStatus.WAITING and new.num_computed_tokens == 0
    assert s.waiting[0] is new and new.num_preemptions == 1
    assert new.output_token_ids == [1, 1]  # its output is kept: recompute replays it as prompt


def test_preempted_sequence_resumes_when_blocks_free():
    s = make(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    old, new = seq(7), seq(7, start=50)
    s.add(old)
    s.add(new)
    execute(s, s.schedule())
    execute(s, s.schedule())
    execute(s, s.schedule())  # preempts `new`
    s.finish(old)
    plan = s.schedule()
    # Its head block survived in the prefix cache (LRU evicted its tail for `old`'s growth), so only
    # the rest is recomputed: prompt and generated tokens alike.
    assert new.num_cached_tokens == 4
    assert [(i.seq, i.num_new_tokens) for i in plan.scheduled] == [(new, new.num_tokens - 4)]
    assert plan.scheduled[0].samples


def test_no_admission_in_a_step_that_preempted():
    s = make(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    a, b = seq(7), seq(7, start=50)
    s.add(a)
    s.add(b)
    execute(s, s.schedule())
    execute(s, s.schedule())
    s.add(seq(1, start=90))
    plan = s.schedule()
    assert plan.preempted and all(i.seq is a for i in plan.scheduled)


def test_rejects_prompt_longer_than_context():
    s = make(max_model_len=16)
    bad, good = seq(16), seq(4, start=30)
    s.add(bad)
    s.add(good)
    plan = s.schedule()
    assert plan.rejected == [bad]
    assert "prompt too long" in bad.error and "16" in bad.error
    assert [i.seq for i in plan.scheduled] == [good]


def test_rejects_prompt_larger_than_the_whole_cache():
    s = make(num_blocks=3, block_size=4, max_model_len=1000)
    bad = seq(12)  # needs 4 blocks with room for one output token
    s.add(bad)
    plan = s.schedule()
    assert plan.rejected == [bad] and "KV cache" in bad.error
    assert not s.has_unfinished()


def test_rejects_empty_prompt():
    s = make()
    empty = seq(0)
    s.add(empty)
    assert s.schedule().rejected == [empty] and "empty" in empty.error


def test_prefix_cache_hit_reduces_scheduled_tokens():
    s = make(block_size=4, max_num_batched_tokens=100)
    a = seq(10)
    s.add(a)
    execute(s, s.schedule())
    b = Sequence(next(_ids), "b", 0, list(range(8)) + [77, 78], SamplingParams(), seed=0)
    s.add(b)
    plan = s.schedule()
    item = [i for i in plan.scheduled if i.seq is b][0]
    assert b.num_cached_tokens == 8 and item.num_new_tokens == 2


def test_waiting_prompt_that_does_not_fit_waits_instead_of_failing():
    s = make(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    a = seq(12)
    s.add(a)
    execute(s, s.schedule())  # a holds 3 blocks (12 tokens), wrote its first output into a 4th? no: 13 tokens
    b = seq(8, start=40)
    s.add(b)
    plan = s.schedule()
    assert b not in [i.seq for i in plan.scheduled] and not plan.rejected
    assert b.status == SequenceStatus.WAITING


def test_prompt_sharing_a_prefix_in_flight_waits_one_step_then_hits():
    s = make(block_size=4, max_num_batched_tokens=100)
    system = list(range(100, 112))  # 3 full shared blocks
    a = Sequence(next(_ids), "a", 0, system + [1, 2], SamplingParams(), seed=0)
    b = Sequence(next(_ids), "b", 0, system + [3, 4], SamplingParams(), seed=0)
    other = seq(5, start=500)
    for x in (a, b, other):
        s.add(x)
    plan = s.schedule()
    # b would recompute a's system prompt in the same step: it waits; `other` shares nothing and runs.
    assert [i.seq for i in plan.scheduled] == [a, other]
    assert list(s.waiting) == [b]
    execute(s, plan)
    plan = s.schedule()
    item = [i for i in plan.scheduled if i.seq is b][0]
    assert b.num_cached_tokens == 12 and item.num_new_tokens == 2


def test_deferral_ends_when_the_owner_is_preempted_or_finishes():
    s = make(block_size=4, max_num_batched_tokens=8)
    system = list(range(100, 116))  # 4 blocks: a's prefill takes two chunked steps
    a = Sequence(next(_ids), "a", 0, system + [1], SamplingParams(), seed=0)
    b = Sequence(next(_ids), "b", 0, system + [2], SamplingParams(), seed=0)
    s.add(a)
    s.add(b)
    plan = s.schedule()
    assert [i.seq for i in plan.scheduled] == [a]
    s.finish(a)  # e.g. a failed: its pending blocks are released, b must not wait forever
    plan = s.schedule()
    assert [i.seq for i in plan.scheduled] == [b]
