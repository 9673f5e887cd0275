"""The engine's configuration, resolved once: what the caller asked for (``EngineArgs``, where "auto" and
None leave the choice to the engine) becomes what runs (``EngineConfig``), logged once at load and
exposed as ``LLM.engine_config`` (``to_dict()`` for a run's metadata)."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass

import torch

from forge_batch.kernels import BACKENDS
from forge_batch.models.config import ModelConfig

from .device import int8_problem, resolve_device, resolve_dtype, triton_problem

log = logging.getLogger(__name__)

KV_CACHE_KINDS = ("paged", "naive")
def default_max_num_seqs(device: torch.device, dtype: torch.dtype) -> int:
    """Decode batch size when the caller gives none. A bfloat16 CPU model (AMX or AVX512-BF16 matmuls)
    keeps gaining up to 256 rows: W1 on a 2-vCPU Sapphire Rapids 1237 tok/s at 128, 1421 at 256
    (BENCHMARKS.md); float32 on the CPU and GPUs keep 128."""
    return 256 if device.type == "cpu" and dtype == torch.bfloat16 else 128


def _available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.85)
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES")
        return int(pages * os.sysconf("SC_PAGE_SIZE") * 0.25)
    except (ValueError, OSError, AttributeError):
        return 2 << 30


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


@dataclass(frozen=True)
class EngineArgs:
    """The engine's options as the caller gives them to ``LLM`` ("auto" and None: the engine decides)."""

    device: str = "auto"
    dtype: str | torch.dtype = "auto"
    block_size: int = 16
    num_blocks: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    kv_cache: str = "paged"
    kernel_backend: str | None = None  # None: FORGE_BATCH_KERNELS, else "auto"
    enforce_eager: bool = False
    load_format: str = "auto"
    quantization: str | None = None
    seed: int = 0
    # A row's tokens independent of what else shares its steps (one matmul path per weight whatever the row
    # count, one attention reduction order per query row whatever the step); False keeps the faster paths
    # whose numbers depend on the step (few-row matmuls, dense prefill attention, the shared-prefix cascade;
    # on a GPU cuBLAS and split-KV decode attention).
    batch_invariant: bool = True

    def __post_init__(self) -> None:
        for name in ("block_size", "num_blocks", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.kv_cache not in KV_CACHE_KINDS:
            raise ValueError(f"kv_cache must be 'paged' or 'naive', got {self.kv_cache!r}")
        if self.quantization not in (None, "none", "int8"):
            raise ValueError(f"quantization must be None or 'int8', got {self.quantization!r}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.kernel_name not in BACKENDS:
            raise ValueError(f"kernel backend must be one of {BACKENDS}, got {self.kernel_name!r}")

    @property
    def kernel_name(self) -> str:
        return self.kernel_backend or os.environ.get("FORGE_BATCH_KERNELS", "auto")

    def placement(self) -> tuple[torch.device, torch.dtype]:
        """Device and dtype: what the model is built for, known before it loads (ValueError for options that
        cannot run there: int8 off CPU float32, the Triton backend without a GPU)."""
        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype, device)
        problem = triton_problem(self.kernel_name, device)
        if problem is None and self.quantization == "int8":
            problem = int8_problem(self.device, self.dtype, device, dtype)
        if problem is not None:
            raise ValueError(problem)
        return device, dtype


@dataclass(frozen=True)
class EngineConfig:
    """What an engine runs with, every "auto" resolved. ``kernel_path`` says what computes on the device:
    'cpu-c' (the compiled CPU kernels), 'triton' or 'torch' (the reference)."""

    model: str
    device: torch.device
    dtype: torch.dtype
    kernel_backend: str
    kernel_path: str
    quantization: str | None
    block_size: int
    num_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_prefix_caching: bool
    kv_cache: str
    cuda_graphs: bool
    seed: int
    batch_invariant: bool

    @classmethod
    def resolve(cls, args: EngineArgs, model: str, model_config: ModelConfig, device: torch.device,
                dtype: torch.dtype, kernel_path: str, kv_bytes_per_token: int, *,
                triton_matmuls: bool = False) -> EngineConfig:
        """Sizes from the model's shape and the device's free memory (call once the weights are in place).
        ``triton_matmuls``: every matmul weight is the Triton path's fixed-tile GEMM (triton_backend.py)."""
        max_model_len = min(args.max_model_len or model_config.max_position_embeddings,
                            model_config.max_position_embeddings)
        if args.max_model_len and args.max_model_len > max_model_len:
            log.warning("max_model_len lowered from %d to %d: the model's context (max_position_embeddings) is no longer",
                        args.max_model_len, max_model_len)
        max_num_seqs = args.max_num_seqs if args.max_num_seqs is not None else default_max_num_seqs(device, dtype)
        block_size, num_blocks, prefix_caching = args.block_size, args.num_blocks, args.enable_prefix_caching
        if args.kv_cache == "naive":
            # The baseline: one contiguous max_model_len slab per sequence slot, no sharing.
            block_size, num_blocks, prefix_caching = max_model_len, max_num_seqs, False
        elif num_blocks is None:
            num_blocks = default_num_blocks(
                max_num_seqs=max_num_seqs, max_model_len=max_model_len, block_size=block_size,
                bytes_per_block=kv_bytes_per_token * block_size, available_bytes=_available_memory_bytes(device),
            )
        if num_blocks * block_size < max_model_len:
            # a sequence alone may never outgrow the cache: past it, it would preempt itself for ever; capped, it
            # ends at max_model_len ("length") and a prompt too long for it is that row's error
            log.warning("max_model_len lowered from %d to %d: the KV cache (%d blocks of %d tokens) holds no more",
                        max_model_len, num_blocks * block_size, num_blocks, block_size)
            max_model_len = num_blocks * block_size
        return cls(
            model=model, device=device, dtype=dtype, kernel_backend=args.kernel_name, kernel_path=kernel_path,
            quantization=args.quantization if args.quantization != "none" else None,
            block_size=block_size, num_blocks=num_blocks, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max(args.max_num_batched_tokens, 1), max_model_len=max_model_len,
            enable_prefix_caching=prefix_caching, kv_cache=args.kv_cache,
            # CUDA graphs for decode steps on a GPU (enforce_eager=True turns them off, e.g. to debug)
            cuda_graphs=device.type == "cuda" and not args.enforce_eager, seed=args.seed,
            # what was asked and can be kept: on the CPU's compiled path (its per-row kernels), and on the
            # Triton path with its fixed-tile GEMM in every matmul's place; not on the torch reference
            # (it pads a step's rows together; cuBLAS picks its kernel by shape)
            batch_invariant=args.batch_invariant and (
                (device.type == "cpu" and kernel_path == "cpu-c") or (kernel_path == "triton" and triton_matmuls)),
        )

    def to_dict(self) -> dict[str, object]:
        """Plain values (strings, numbers, booleans), e.g. for a run's metadata."""
        d = asdict(self)
        d["device"], d["dtype"] = str(self.device), str(self.dtype).replace("torch.", "")
        return d

    def describe(self) -> str:
        """One line for the log."""
        d = self.to_dict()
        return (
            f"{d['device']} {d['dtype']}, kernels {self.kernel_backend} ({self.kernel_path}), "
            f"quantization {self.quantization or 'none'}; KV cache {self.num_blocks} blocks x {self.block_size} "
            f"tokens ({self.kv_cache}, prefix caching {'on' if self.enable_prefix_caching else 'off'}); "
            f"batch {self.max_num_seqs} seqs / {self.max_num_batched_tokens} tokens; max_model_len "
            f"{self.max_model_len}; CUDA graphs {'on' if self.cuda_graphs else 'off'}; batch-invariant "
            f"{'on' if self.batch_invariant else 'off'}"
        )
