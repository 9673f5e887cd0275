"""Which device and dtype an engine runs in, and what they allow: the one place that decides.

``LLM`` resolves its options here, and the job checks (``forge-batch validate`` and ``run`` before the model
loads) ask the same functions, so a job is refused for exactly the reasons the engine would refuse it.
torch is imported only by the functions that need it: the option names are read without it.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICE_OPTIONS = ("auto", "cpu", "cuda", "cuda:N")
# Accepted dtype spellings -> the torch dtype's name.
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16", "half": "float16"}  # (vLLM's "float" and "half" too)
DTYPE_OPTIONS = ("auto", *DTYPE_NAMES)

_DEVICE_RE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def device_option_problem(device: str) -> str | None:
    """Why ``device`` is not a device option (None when it is one)."""
    if _DEVICE_RE.fullmatch(device):
        return None
    return f"device must be one of {', '.join(DEVICE_OPTIONS)}; got {device!r}"


def dtype_option_problem(dtype: str) -> str | None:
    """Why ``dtype`` is not a dtype option (None when it is one)."""
    if dtype in DTYPE_OPTIONS:
        return None
    return f"dtype must be one of {', '.join(DTYPE_OPTIONS)}; got {dtype!r}"


def resolve_device(device: str) -> torch.device:
    import torch

    problem = device_option_problem(device)
    if problem is not None:
        raise ValueError(problem)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but torch sees no CUDA device")
    return torch.device(device)


def _cpu_flags() -> set[str]:
    """The CPU's instruction-set flags (/proc/cpuinfo; none where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bfloat16 matmul (AVX512-BF16 or AMX), where bf16 is the faster dtype.

    oneDNN also "supports" bf16 on plain AVX-512 by emulation, at a third of float32's speed (measured
    here: ~45 vs ~140 GFLOP/s), so its own check is not enough: the instruction-set flags decide.
    """
    import torch

    flags = _cpu_flags()
    return ("avx512_bf16" in flags or "amx_bf16" in flags) and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def matmul_isa(device: torch.device) -> str:
    """What a device's matmuls run on, as far as it decides the order of their sums: a CUDA device's compute
    capability ("sm_90"); on the CPU the widest extension torch's GEMM libraries pick from ("amx",
    "avx512_bf16", "avx512", "avx2" or "baseline"), and a cap put on oneDNN's (ONEDNN_MAX_CPU_ISA) when set."""
    import torch

    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm_{major}{minor}"
    flags = _cpu_flags()
    isa = next((name for name, flag in (("amx", "amx_bf16"), ("avx512_bf16", "avx512_bf16"), ("avx512", "avx512f"),
                                        ("avx2", "avx2")) if flag in flags), "baseline")
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return f"{isa}, ONEDNN_MAX_CPU_ISA={cap}" if cap else isa


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    problem = dtype_option_problem(dtype)
    if problem is not None:
        raise ValueError(problem)
    return getattr(torch, DTYPE_NAMES[dtype])


def triton_problem(kernel_name: str, device: torch.device) -> str | None:
    """Why ``kernel_backend='triton'`` cannot run on ``device`` (None when it can): Triton compiles for a GPU;
    on the CPU only its interpreter (TRITON_INTERPRET=1, which the tests use) runs its kernels."""
    if kernel_name == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return ("kernel_backend 'triton' needs a CUDA device (on the CPU only Triton's interpreter runs it: "
                "TRITON_INTERPRET=1, for tests); use 'auto' (the CPU's compiled kernels) or 'reference'")
    return None


def gpu_memory_problem(utilization: float | None, device: torch.device) -> str | None:
    """Why ``gpu_memory_utilization`` means nothing on ``device`` (None when it is unset or a GPU's)."""
    if utilization is not None and device.type != "cuda":
        return ("gpu_memory_utilization is a GPU's memory share; on the CPU size the KV cache with num_blocks= "
                "(or max_model_len= and max_num_seqs=)")
    return None


def int8_problem(device_option: str, dtype_option: str | torch.dtype, device: torch.device, dtype: torch.dtype,
                 *, job_options: bool = False) -> str | None:
    """Why ``quantization='int8'`` cannot run on the resolved ``device`` / ``dtype`` (None when it can).

    The hint names what the options resolved to on this machine (``auto`` picks bfloat16 on CPUs with
    native bf16), and spells options as a job file (``engine.dtype: float32``) when ``job_options``."""
    import torch

    def option(name: str, value: str) -> str:
        return f"engine.{name}: {value}" if job_options else f"{name}={value!r}"

    def named(name: str) -> str:
        return f"engine.{name}" if job_options else name

    if device.type != "cpu":
        how = f"{named('device')} auto resolves to {device.type} here" if device_option == "auto" else (
            f"{named('device')} is {device_option}")
        return f"int8 quantization runs on the CPU only; {how}; set {option('device', 'cpu')} to use int8"
    if dtype != torch.float32:
        resolved = str(dtype).replace("torch.", "")
        how = f"{named('dtype')} auto resolves to {resolved} on this CPU" if dtype_option == "auto" else (
            f"{named('dtype')} is {str(dtype_option).replace('torch.', '')}")
        return f"int8 quantization runs in float32; {how}; set {option('dtype', 'float32')} to use int8"
    return None
