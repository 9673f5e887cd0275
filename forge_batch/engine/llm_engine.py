"""The engine: requests in (``add_request``), one scheduling step at a time (``step``), finished
results out. ``LLM`` (llm.py) is the offline API over it.

A step: the scheduler plans which sequences run and how many tokens each (scheduler.py); constrained
rows' allowed-token masks are computed on a worker thread meanwhile; the model runner executes the plan
(model_runner.py); the sampler picks each sampling row's token; finished sequences become results.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from forge_batch.models.config import ModelConfig
from forge_batch.models.llama import LlamaForCausalLM
from forge_batch.models.tokenizer import Tokenizer

from .block_manager import BlockManager
from .config import EngineConfig
from .constraints import (
    BANNED_PENALTY,
    ConstraintError,
    ConstraintFactory,
    apply_bitmask,
    bitmask_words,
    fill_bitmasks,
)
from .cpu_backend import CpuBackend
from .histogram import LogHistogram
from .model_runner import ModelRunner
from .outputs import CompletionOutput, EngineErrorKind, PositionLogprobs, RequestOutput
from .prompts import PromptError, check_token_ids, given_token_ids, prompt_token_ids
from .request import GenerationRequest
from .sampler import (
    BUILTIN_SAMPLERS,
    LogitsProcessor,
    Sampler,
    SamplingBatch,
    derive_seed,
    position_logprobs,
    uniform_for,
)
from .sampling_params import SamplingParams, check_params_for_engine
from .scheduler import Scheduler, SchedulerConfig
from .sequence import Sequence, SequenceStatus
from .stopping import check_stop, constraint_stop, cut_at_stop_string, settle_text


def _fail_processor_rows(seqs: list[Sequence], row_errors: dict[int, str]) -> None:
    """Mark the sequences whose logits processor raised as failed with its error: the step finishes them
    (freeing their KV blocks) without their sampled token, and the other rows go on unchanged."""
    for i, error in row_errors.items():
        seqs[i].finish_reason, seqs[i].error = "error", error
        seqs[i].error_kind = EngineErrorKind.PLUGIN_ERROR.value


def _fail_row(seq: Sequence, error: str, kind: EngineErrorKind = EngineErrorKind.PLUGIN_ERROR) -> None:
    """Mark a sequence failed (the step finishes it without its sampled token), unless it already is."""
    if seq.finish_reason != "error":
        seq.finish_reason, seq.error, seq.error_kind = "error", error, kind.value


def _run_samplers(samplers: dict[str, Sampler], logits: torch.Tensor, seqs: list[Sequence],
                  batch: SamplingBatch) -> torch.Tensor:
    """Each row's token from its sampler (the rows of one sampler in one call). A sampler that raises (a
    plugin's) fails its rows; the others go on."""
    params = batch.params
    tokens = torch.zeros(len(seqs), dtype=torch.long, device=logits.device)
    for name in {p.sampler or "default" for p in params}:
        rows = [i for i, p in enumerate(params) if (p.sampler or "default") == name]
        whole = len(rows) == len(seqs)
        sub_batch = batch if whole else SamplingBatch(
            params=[params[i] for i in rows], output_token_ids=[batch.output_token_ids[i] for i in rows],
            prompt_token_ids=[batch.prompt_token_ids[i] for i in rows], uniforms=batch.uniforms[rows],
            eos_token_ids=batch.eos_token_ids)
        try:
            picked = torch.as_tensor(samplers[name](logits if whole else logits[rows], sub_batch),
                                     device=logits.device).long()
        except Exception as e:  # noqa: BLE001 - its rows fail, with what it raised
            for i in rows:
                _fail_row(seqs[i], f"sampler {name!r} raised: {type(e).__name__}: {e}")
            continue
        if picked.shape != (len(rows),):
            for i in rows:
                _fail_row(seqs[i], f"sampler {name!r} returned {tuple(picked.shape)} token ids for {len(rows)} rows")
            continue
        # an id outside the vocabulary fails its row alone (it would fail the whole step further on)
        outside = ((picked < 0) | (picked >= logits.shape[1])).tolist()
        for i, token, bad in zip(rows, picked.tolist(), outside):
            if bad:
                _fail_row(seqs[i], f"sampler {name!r} returned token id {token}, outside the vocabulary "
                                   f"(0-{logits.shape[1] - 1})")
            else:
                tokens[i] = token
    return tokens


def _fail_rows_that_picked_a_banned_token(logits: torch.Tensor, tokens: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """The sampled tokens as ints. A token whose logit is -inf (or NaN) was never allowed: that row's options
    banned every token, so it fails (bad_sampling) rather than emit it."""
    picked = logits.gather(1, tokens.view(-1, 1)).view(-1)
    # (a structured-output mask on the CPU lowers a logit by BANNED_PENALTY rather than to -inf)
    banned = torch.isneginf(picked) | torch.isnan(picked) | (picked < -BANNED_PENALTY / 2)
    chosen, banned_rows = torch.stack([tokens, banned.long()]).tolist()
    for i in (i for i, b in enumerate(banned_rows) if b):
        _fail_row(seqs[i], "no token can be sampled: allowed_token_ids, bad_words, min_tokens, logit_bias and the "
                           "constraint together ban every token", EngineErrorKind.BAD_SAMPLING)
    return chosen


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    kv_blocks_peak: int = 0  # the most blocks in use at once since the engine was built
    prompt_tokens: int = 0
    output_tokens: int = 0
    steps: int = 0
    preemptions: int = 0
    prefix_cache_hit_rate: float = 0.0
    forward_seconds: float = 0.0
    step_seconds: float = 0.0
    mask_seconds: float = 0.0  # computing structured-output masks (overlapped with forward)
    mask_wait_seconds: float = 0.0  # of which the step had to wait for after the forward pass
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class _RequestState:
    request: GenerationRequest
    index: int
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    arrival_time: float
    first_token_time: float | None = None
    remaining: int = 0
    prompt_text: str | None = None

    def output(self, token_text: Callable[[int], str | None]) -> RequestOutput:
        """The finished request's result (every sample done); ``token_text`` names logprobs' tokens."""
        now = time.monotonic()
        params = self.request.params
        samples = [
            CompletionOutput(index=s.sample_index, text=s.text, token_ids=list(s.output_token_ids),
                             finish_reason=s.finish_reason or "error", error=s.error, stop_reason=s.stop_reason,
                             valid=s.valid,
                             error_kind=(s.error_kind or EngineErrorKind.ENGINE_ERROR.value) if s.error else None,
                             logprobs=None if params.logprobs is None
                             else [e.as_dict(token_text) for e in s.output_logprobs],
                             cumulative_logprob=None if params.logprobs is None
                             else float(sum(e.logprob for e in s.output_logprobs)),
                             position_logprobs=None if params.logprobs is None else list(s.output_logprobs))
            for s in self.seqs
        ]
        prompt_logprobs = scored = None
        if params.prompt_logprobs is not None:
            scored = list(max(self.seqs, key=lambda s: len(s.prompt_logprobs)).prompt_logprobs)
            prompt_logprobs = [None, *(e.as_dict(token_text) for e in scored)]
        failed = [s for s in self.seqs if s.error and s.finish_reason == "error"]
        return RequestOutput(
            request_id=self.request.request_id,
            index=self.index,
            prompt=self.prompt_text,
            prompt_token_ids=self.prompt_token_ids,
            samples=samples,
            error=failed[0].error if len(failed) == len(samples) else None,
            error_kind=samples[0].error_kind if len(failed) == len(samples) else None,
            metrics={
                "arrival_time": self.arrival_time,
                "first_token_time": self.first_token_time or now,
                "finished_time": now,
                "num_preemptions": float(sum(s.num_preemptions for s in self.seqs)),
                "num_cached_tokens": float(max(s.num_cached_tokens for s in self.seqs)),
            },
            metadata=self.request.metadata,
            prompt_logprobs=prompt_logprobs,
            prompt_position_logprobs=scored,
        )


def failed_output(request: GenerationRequest, index: int, error: str,
                  prompt_token_ids: list[int] | None = None,
                  kind: EngineErrorKind = EngineErrorKind.ENGINE_ERROR) -> RequestOutput:
    """The result of a request that could not run: every sample an error with this message and kind."""
    now = time.monotonic()
    n = request.params.n if isinstance(request.params, SamplingParams) else 1
    return RequestOutput(
        request_id=request.request_id,
        index=index,
        prompt=request.prompt if isinstance(request.prompt, str) else None,
        prompt_token_ids=prompt_token_ids or [],
        samples=[CompletionOutput(i, "", [], "error", error, error_kind=kind.value) for i in range(n)],
        error=error,
        error_kind=kind.value,
        metrics={"arrival_time": now, "first_token_time": now, "finished_time": now},
        metadata=request.metadata,
    )


class _MaskWorker:
    """Fills constrained rows' allowed-token bitmasks on a worker thread while the model runs."""

    def __init__(self, vocab_size: int, stats: EngineStats) -> None:
        self.words = bitmask_words(vocab_size)
        self.stats = stats
        self._pool: ThreadPoolExecutor | None = None

    def start(self, seqs: list[Sequence]) -> tuple[list[int], torch.Tensor, Future] | None:
        """Begin filling the masks of ``seqs``' constrained rows: (their rows, the bitmask, its future)."""
        rows = [i for i, s in enumerate(seqs) if s.constraint_state is not None]
        if not rows:
            return None
        bitmask = torch.full((len(rows), self.words), -1, dtype=torch.int32)
        states = [seqs[i].constraint_state for i in rows]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forge-batch-masks")

        def work() -> dict[int, str]:
            t0 = time.monotonic()
            # inference mode is per thread: the step's (where the bitmask was made) lets a plugin's state
            # write the bitmask in place with torch here too
            with torch.inference_mode():
                failed = fill_bitmasks(states, bitmask)  # type: ignore[arg-type]
            self.stats.mask_seconds += time.monotonic() - t0
            return failed

        return rows, bitmask, self._pool.submit(work)


class LLMEngine:
    """Continuous batching of requests over one model on one device (see the module docstring)."""

    def __init__(self, config: EngineConfig, model: LlamaForCausalLM, model_config: ModelConfig,
                 tokenizer: Tokenizer | None, *, cpu_backend: CpuBackend | None = None,
                 samplers: dict[str, Sampler] | None = None,
                 constraints: dict[str, ConstraintFactory] | None = None, max_logprobs: int = 20) -> None:
        self.config = config
        self.max_logprobs = max_logprobs
        self._token_texts: dict[int, str | None] = {}
        self.model = model
        self.model_config = model_config
        self.tokenizer = tokenizer
        # A CPU cache's memory is committed when first written: reuse freed blocks before new ones.
        self.block_manager = BlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching,
                                          reuse_freed_first=config.device.type == "cpu")
        watermark = max(1, config.num_blocks // 100) if config.kv_cache == "paged" else 0
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                            max_model_len=config.max_model_len, watermark_blocks=watermark),
            self.block_manager,
        )
        self.runner = ModelRunner(model, config.num_blocks, config.block_size, config.device, config.dtype,
                                  cuda_graph_max_batch=config.max_num_seqs if config.cuda_graphs else 0,
                                  max_model_len=config.max_model_len, cpu_backend=cpu_backend)
        eos = tokenizer.eos_token_ids if tokenizer is not None else model_config.eos_token_ids
        self.eos_token_ids = frozenset(eos)
        self.logits_processor = LogitsProcessor(self.eos_token_ids)
        self.samplers: dict[str, Sampler] = {**BUILTIN_SAMPLERS, **(samplers or {})}
        self.constraints: dict[str, ConstraintFactory] = dict(constraints or {})
        self._compiled: dict[str, Any] = {}
        self._requests: dict[str, _RequestState] = {}
        self._num_requests = 0
        self._next_seq_id = 0
        self._stats = EngineStats(kv_blocks_total=config.num_blocks)
        # Gaps between a sample's consecutive tokens (a preempted sample's gap includes its recompute).
        self.inter_token_latency = LogHistogram()
        self._masks = _MaskWorker(model_config.vocab_size, self._stats)

    # ---- requests in ----------------------------------------------------------------------------
    def next_index(self) -> int:
        """The index the next added request gets (its position in the engine's input)."""
        return self._num_requests

    def add_request(self, request: GenerationRequest) -> RequestOutput | None:
        """Queue a request. Returns a failed output at once when it cannot run, else None."""
        index = self._num_requests
        self._num_requests += 1
        if request.error is not None:
            return failed_output(request, index, request.error)
        if request.request_id in self._requests:
            return failed_output(request, index, f"duplicate request id {request.request_id!r} already in flight")
        params = request.params
        try:
            if not isinstance(params, SamplingParams):
                raise ValueError("params must be a SamplingParams")
            params.validate()
            if params.sampler is not None and params.sampler not in self.samplers:
                raise ValueError(f"unknown sampler {params.sampler!r}; known: {sorted(self.samplers)}")
            check_params_for_engine(params, self.max_logprobs, self.model_config.vocab_size,
                                    self.tokenizer.encode if self.tokenizer is not None else None)
        except Exception as exc:
            # the checks' own ValueErrors say what is wrong; anything else is named by its type
            said = str(exc) if isinstance(exc, (ValueError, TypeError)) else f"{type(exc).__name__}: {exc}"
            return failed_output(request, index, said, kind=EngineErrorKind.BAD_SAMPLING)
        try:
            if request.prompt_token_ids is not None:
                prompt_ids, prompt_text = given_token_ids(request.prompt_token_ids), None
            else:
                prompt_ids, prompt_text = prompt_token_ids(request.prompt, self.tokenizer)
            check_token_ids(prompt_ids, self.model_config.vocab_size)
            if params.truncate_prompt_tokens is not None:
                # -1: as many as the context holds with room for one generated token
                keep = self.config.max_model_len - 1 if params.truncate_prompt_tokens == -1 else params.truncate_prompt_tokens
                if len(prompt_ids) > keep:  # vLLM keeps the end of the prompt, nearest to what comes next
                    prompt_ids = prompt_ids[-keep:]  # (and the prompt as given, in the output)
        except PromptError as exc:
            return failed_output(request, index, str(exc), kind=EngineErrorKind(exc.kind))
        except Exception as exc:  # a bad request fails alone
            return failed_output(request, index, f"{type(exc).__name__}: {exc}")
        try:
            compiled = None if params.constraint_spec is None else self.compile_constraint(*params.constraint_spec)
        except Exception as exc:
            return failed_output(request, index, f"constraint error: {exc}", kind=EngineErrorKind.CONSTRAINT_ERROR)
        if not prompt_ids:
            return failed_output(request, index, "empty prompt: it has no tokens", kind=EngineErrorKind.EMPTY_PROMPT)
        base_seed = params.seed if params.seed is not None else derive_seed(self.config.seed, index)
        state = _RequestState(request, index, prompt_ids, [], time.monotonic(), prompt_text=prompt_text)
        for i in range(params.n):
            seq = Sequence(seq_id=self._next_seq_id, request_id=request.request_id, sample_index=i,
                           prompt_token_ids=list(prompt_ids), params=params, seed=derive_seed(base_seed, i))
            if compiled is not None:
                seq.constraint = compiled
                seq.constraint_state = compiled.new_state()
            self._next_seq_id += 1
            state.seqs.append(seq)
            self.scheduler.add(seq)
        state.remaining = params.n
        self._requests[request.request_id] = state
        self._stats.prompt_tokens += len(prompt_ids)
        return None

    def token_text(self, token_id: int) -> str | None:
        """One token's text, as logprobs name it (None without a tokenizer)."""
        if token_id not in self._token_texts:
            self._token_texts[token_id] = (None if self.tokenizer is None
                                           else self.tokenizer.decode([token_id], skip_special_tokens=False))
        return self._token_texts[token_id]

    def compile_constraint(self, kind: str, spec: Any) -> Any:
        """Compile (or fetch from the cache) a constraint; raises ConstraintError with the engine's message."""
        if kind not in self.constraints:
            raise ConstraintError(f"unknown constraint kind {kind!r}; known: {sorted(self.constraints)}")
        key = kind + ":" + json.dumps(spec, sort_keys=True, default=str)
        if key not in self._compiled:
            self._compiled[key] = self.constraints[kind](spec, self.tokenizer, self.model_config.vocab_size)
        return self._compiled[key]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def abort_request(self, request_id: str) -> None:
        """Drop an unfinished request (vLLM's ``abort_request``): its sequences leave the scheduler and their
        blocks go back, with no output. An id that is not in flight is ignored."""
        state = self._requests.pop(request_id, None)
        if state is not None:
            for seq in state.seqs:
                if seq.status != SequenceStatus.FINISHED:
                    self.scheduler.abort(seq)

    # ---- one step ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; return the requests that finished in it."""
        t_step = time.monotonic()
        plan = self.scheduler.schedule()
        # blocks in use peak right after scheduling (growth allocated, nothing freed yet this step)
        self._stats.kv_blocks_peak = max(self._stats.kv_blocks_peak, self.block_manager.num_used_blocks)
        done: list[RequestOutput] = []
        for seq in plan.rejected:
            self._finish(seq, done)
        if plan.is_empty:
            if not plan.rejected and self.scheduler.has_unfinished():
                raise RuntimeError("scheduler made no progress (no blocks and nothing running)")
            return done
        sampling = [s.seq for s in plan.scheduled if s.samples]
        masks = self._masks.start(sampling)
        t_fwd = time.monotonic()
        self.runner.zero_blocks(self.block_manager.pop_fresh())
        logits, prompt_hidden = self.runner.run(plan)
        if prompt_hidden:
            self._score_prompts(plan.scheduled, prompt_hidden)
        self._stats.forward_seconds += time.monotonic() - t_fwd
        if masks is not None:
            t_wait = time.monotonic()
            for j, error in masks[2].result().items():  # a constraint whose mask raised fails its row alone
                seq = sampling[masks[0][j]]
                spec = seq.params.constraint_spec
                _fail_row(seq, f"the {spec[0] if spec else ''!r} constraint raised computing its mask: {error}")
            self._stats.mask_wait_seconds += time.monotonic() - t_wait
        for s in plan.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
            self.block_manager.commit_computed(s.seq)
        if logits is not None:
            self._append_tokens(sampling, *self._sample(logits, sampling, masks), done)
        self._stats.steps += 1
        self._stats.step_seconds += time.monotonic() - t_step
        return done

    _PROMPT_SCORE_ROWS = 256  # prompt positions turned into logprobs at once ([rows, V] float32 each)

    def _score_prompts(self, scheduled: list, prompt_hidden: list[tuple[int, torch.Tensor]]) -> None:
        """Record the prompt logprobs of the positions this step ran (see ModelRunner.run)."""
        for index, hidden in prompt_hidden:
            seq = scheduled[index].seq
            k = seq.params.prompt_logprobs
            for off in range(0, hidden.shape[0], self._PROMPT_SCORE_ROWS):
                logprobs = self.model.compute_logits(hidden[off : off + self._PROMPT_SCORE_ROWS]).log_softmax(dim=-1)
                first = len(seq.prompt_logprobs) + 1  # the prompt token these logits score
                chosen = torch.tensor(seq.prompt_token_ids[first : first + logprobs.shape[0]])
                seq.prompt_logprobs.extend(position_logprobs(logprobs, chosen, [k] * logprobs.shape[0]))

    def _append_tokens(self, seqs: list[Sequence], tokens: list[int], logprobs: dict[int, PositionLogprobs],
                       done: list[RequestOutput]) -> None:
        now = time.monotonic()
        for i, (seq, tok) in enumerate(zip(seqs, tokens)):
            if seq.finish_reason == "error":  # its logits processor raised (see _fail_processor_rows)
                self._finish(seq, done)
                continue
            seq.output_token_ids.append(tok)
            if i in logprobs:
                seq.output_logprobs.append(logprobs[i])
            if seq.first_token_time is None:
                seq.first_token_time = now
            else:
                self.inter_token_latency.add(now - seq.last_token_time)  # type: ignore[operator]
            seq.last_token_time = now
            self._stats.output_tokens += 1
            ended = seq.constraint_state is not None and constraint_stop(seq, tok, self.eos_token_ids)
            if ended and seq.finish_reason == "stop" and seq.params.stop:
                cut_at_stop_string(seq, self._decode)  # the grammar's last token may hold a stop string too
            if ended or check_stop(seq, tok, self.eos_token_ids, self.config.max_model_len, self._decode):
                self._finish(seq, done)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence],
                masks: tuple[list[int], torch.Tensor, Future] | None = None,
                ) -> tuple[list[int], dict[int, PositionLogprobs]]:
        """Each row's next token, and the logprobs of the rows that ask for them (by row)."""
        params = [s.params for s in seqs]
        # logprobs are the model's raw distribution (vLLM's default): taken before anything below changes
        # the logits in place, and only for the rows that ask (no work at all when none does)
        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw_logprobs = logits[logprob_rows].log_softmax(dim=-1) if logprob_rows else None
        tokens = self._pick(logits, seqs, params, masks)
        if raw_logprobs is None:
            return tokens, {}
        chosen = torch.tensor([tokens[i] for i in logprob_rows])
        entries = position_logprobs(raw_logprobs, chosen, [params[i].logprobs for i in logprob_rows])
        return tokens, dict(zip(logprob_rows, entries))

    def _pick(self, logits: torch.Tensor, seqs: list[Sequence], params: list[SamplingParams],
              masks: tuple[list[int], torch.Tensor, Future] | None) -> list[int]:
        if any(not p.greedy for p in params) or any(p.sampler for p in params):
            uniforms = torch.tensor([uniform_for(s.seed, s.num_tokens) for s in seqs], dtype=torch.float64,
                                    device=logits.device)
        else:
            uniforms = torch.zeros(len(seqs), dtype=torch.float64, device=logits.device)
        batch = SamplingBatch(params=params, output_token_ids=[s.output_token_ids for s in seqs],
                              prompt_token_ids=[s.prompt_token_ids for s in seqs], uniforms=uniforms,
                              eos_token_ids=self.eos_token_ids)
        logits = self.logits_processor(logits, batch)
        _fail_processor_rows(seqs, batch.row_errors)
        if masks is not None:
            rows, bitmask, _ = masks
            bitmask = bitmask.to(logits.device, non_blocking=True)
            if len(rows) == len(seqs):
                apply_bitmask(logits, bitmask)
            else:
                sub = logits[rows]
                apply_bitmask(sub, bitmask)
                logits[rows] = sub
        tokens = _run_samplers(self.samplers, logits, seqs, batch)
        return _fail_rows_that_picked_a_banned_token(logits, tokens, seqs)

    # ---- finishing ----------------------------------------------------------------------------------
    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def _finish(self, seq: Sequence, done: list[RequestOutput]) -> None:
        self.scheduler.finish(seq)
        state = self._requests[seq.request_id]
        settle_text(seq, self._decode)
        if state.first_token_time is None or (
            seq.first_token_time is not None and seq.first_token_time < state.first_token_time
        ):
            state.first_token_time = seq.first_token_time
        state.remaining -= 1
        if state.remaining == 0:
            del self._requests[seq.request_id]
            done.append(state.output(self.token_text))

    # ---- state ----------------------------------------------------------------------------------------
    def reset_prefix_cache(self) -> None:
        """Drop cached prefix blocks not in use (e.g. between benchmark workloads that share prompts)."""
        self.block_manager.reset_prefix_cache()

    def stats(self) -> dict[str, Any]:
        s = self._stats
        bm = self.block_manager
        s.running = len(self.scheduler.running)
        s.waiting = len(self.scheduler.waiting)
        s.kv_blocks_used = bm.num_used_blocks
        s.preemptions = self.scheduler.num_preemptions
        s.prefix_cache_hit_rate = bm.prefix_hits / bm.prefix_queries if bm.prefix_queries else 0.0
        d = dict(s.__dict__)
        d["prefix_cache_hits"], d["prefix_cache_queries"] = bm.prefix_hits, bm.prefix_queries
        d.update(d.pop("extra"))
        return d

    def engine_metrics(self) -> dict[str, Any]:
        """What the engine measured since it was built, for a run's summary: peak KV-cache use, preemptions,
        prefix-cache hits over lookups (in blocks) and the inter-token latency (``LogHistogram.to_dict``)."""
        bm, s = self.block_manager, self._stats
        return {
            "kv_blocks_total": s.kv_blocks_total,
            "kv_blocks_peak": s.kv_blocks_peak,
            "kv_peak_ratio": round(s.kv_blocks_peak / s.kv_blocks_total, 4) if s.kv_blocks_total else None,
            "preemptions": self.scheduler.num_preemptions,
            "prefix_cache_hits": bm.prefix_hits,
            "prefix_cache_queries": bm.prefix_queries,
            "prefix_cache_hit_rate": round(bm.prefix_hits / bm.prefix_queries, 4) if bm.prefix_queries else None,
            "itl_s": self.inter_token_latency.to_dict(),
        }
