"""CPU kernels in plain C, compiled at first use and called through ctypes.

Why C and not a torch C++ extension: it compiles in about two seconds with the system's C compiler, once
per machine and source version (a torch extension takes tens of seconds), needs no torch headers, and
ctypes releases the GIL during the call. Each kernel has a torch reference in ``reference.py`` that the
tests compare it with. When no compiler is available (or FORGE_BATCH_CPU_KERNELS=0), ``available()`` is
False and the dispatcher keeps the reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from . import reference

log = logging.getLogger("forge_batch.kernels")
_SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.c"))
_HEADERS = sorted((Path(__file__).parent / "csrc").glob("*.h"))
_lib: ctypes.CDLL | None = None
_tried = False
_build_lock = threading.Lock()
_build_thread: threading.Thread | None = None


def _ptr(t: torch.Tensor | None) -> int:
    """A tensor's address for a C pointer argument; 0 (NULL) for None."""
    return 0 if t is None else t.data_ptr()


def _cache_dir() -> Path:
    base = os.environ.get("FORGE_BATCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "forge-batch"
    )
    return Path(base) / "kernels"


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) found")
    src = b"".join(p.read_bytes() for p in (*_SOURCES, *_HEADERS))
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-ffp-contract=fast"]
    per_file: dict[str, list[str]] = {}
    if os.uname().machine in ("x86_64", "amd64"):
        # GCC vectorises plain loops 256 bits wide by default even on AVX-512 CPUs; at 512 the bfloat16
        # silu_and_mul and rms_norm take 25% less time (weight_gemv's one-stream steps 3% more: not there)
        per_file["elementwise.c"] = ["-mprefer-vector-width=512"]
    tag = hashlib.sha256(src + " ".join(flags).encode() + repr(per_file).encode() + os.uname().machine.encode())
    tag = tag.hexdigest()[:16]
    out = _cache_dir() / f"forge_batch_cpu-{tag}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            tmp_so = Path(tmp) / out.name
            # one compiler per file, all at once (the two largest take about 1.7 s each at -O3), then link
            objects, procs = [], []
            for src_file in sorted(_SOURCES, key=lambda p: -p.stat().st_size):
                obj = Path(tmp) / (src_file.stem + ".o")
                procs.append(subprocess.Popen([cc, *flags, *per_file.get(src_file.name, []), "-c", str(src_file),
                                               "-o", str(obj)],
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE))
                objects.append(str(obj))
            for proc in procs:
                _, err = proc.communicate()
                if proc.returncode:
                    raise RuntimeError(f"{' '.join(map(str, proc.args))} failed: {err.decode()[-2000:]}")
            subprocess.run([cc, *flags, *objects, "-o", str(tmp_so), "-lm"], check=True, capture_output=True)
            os.replace(tmp_so, out)  # atomic: concurrent builders never load half a file
    lib = ctypes.CDLL(str(out))
    i64, f32, vp = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    for name in ("paged_decode_attention_f32", "paged_decode_attention_bf16"):
        fn = getattr(lib, name)
        fn.argtypes = [vp, vp, vp, vp, vp, vp, vp, vp, i64, i64, i64, i64, i64, i64, i64, f32, ctypes.c_int]
        fn.restype = None
    lib.quantize_rows_s8.argtypes = [vp, vp, vp, i64, i64, ctypes.c_int]
    lib.dequantize_rows.argtypes = [vp, vp, vp, vp, vp, i64, i64, ctypes.c_int]
    lib.quantize_rows_s8.restype = lib.dequantize_rows.restype = None
    for dt in ("f32", "bf16"):
        getattr(lib, f"rms_norm_{dt}").argtypes = [vp, vp, vp, f32, vp, vp, i64, i64, ctypes.c_int]
        getattr(lib, f"silu_and_mul_{dt}").argtypes = [vp, vp, i64, i64, ctypes.c_int]
        getattr(lib, f"rotary_store_kv_{dt}").argtypes = [vp, vp, vp, i64, vp, vp, i64, i64, i64, i64, vp, vp, vp,
                                                          ctypes.c_int]
        for name in ("rms_norm", "silu_and_mul", "rotary_store_kv"):
            getattr(lib, f"{name}_{dt}").restype = None
    lib.weight_gemv_f32.argtypes = [vp, vp, vp, ctypes.c_int, i64, i64, i64, vp, i64, vp, vp, ctypes.c_int]
    lib.weight_decode_f32.argtypes = [vp, vp, vp, ctypes.c_int, i64, i64, i64, vp]
    lib.weight_gemv_f32.restype = lib.weight_decode_f32.restype = None
    lib.weight_gemv_simd.restype = ctypes.c_int
    lib.decode_step_f32.argtypes = [vp, i64, vp, f32, vp, vp, i64, vp, vp, vp, i64, vp, vp, i64, i64, i64, i64, i64,
                                    i64, f32, ctypes.c_int, ctypes.c_int]
    lib.decode_step_f32.restype = None
    lib.decode_layer_fields.restype = i64
    lib.ban_masked_f32.argtypes = [vp, vp, i64, i64, i64, f32, ctypes.c_int]
    lib.ban_masked_f32.restype = None
    return lib


def available() -> bool:
    """Whether the compiled CPU kernels can be used (built on first call, or waits for the build that
    build_in_background started)."""
    global _lib, _tried
    if _tried:
        return _lib is not None
    with _build_lock:
        if not _tried:
            if os.environ.get("FORGE_BATCH_CPU_KERNELS", "1") != "0":
                try:
                    _lib = _build()
                except Exception as exc:  # no compiler, compile error: keep the torch reference
                    log.warning("CPU kernels unavailable (%s); using the torch reference", exc)
                    _lib = None
            _tried = True
    return _lib is not None


def build_in_background() -> None:
    """Start building (or loading) the kernels on a thread, so that a first run on a machine compiles
    while the model's weights load; ``available()`` waits for it."""
    global _build_thread
    if not _tried and _build_thread is None:
        _build_thread = threading.Thread(target=available, name="forge-batch-kernel-build", daemon=True)
        _build_thread.start()


# Attention over a prefix that every sequence of the batch shares (a common system prompt) is one
# dense attention of all B x G query rows of a KV head against the same keys: a matrix product that
# torch's fused CPU attention runs several times faster than B separate passes over the same blocks.
# The kernel then continues the softmax from that result over each sequence's own blocks. Below these
# sizes the extra calls cost more than they save.
CASCADE_MIN_SEQS = 8
CASCADE_MIN_WORK = 8192  # sequences x shared tokens
_shared_prefix = reference._PerStep()


def shared_prefix_blocks(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int) -> int:
    """How many leading block-table columns hold the same physical block for every sequence, all of them
    full before ``context_lens`` for every sequence (decode: its context length; prefill: its first
    query's position). Computed once per step: each layer passes the same tables tensor."""
    cached = _shared_prefix.get(block_tables, context_lens.data_ptr())
    if cached is not None:
        return cached
    n = 0
    if block_tables.shape[0] > 1 and block_tables.shape[1] > 0:
        same = (block_tables == block_tables[:1]).all(0)
        n = int(same.cumprod(0).sum())
        n = min(n, int(context_lens.min()) // block_size)
    return _shared_prefix.put(block_tables, n, context_lens.data_ptr())


def _attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        bias: torch.Tensor | None = None):
    """q [N, Hkv, R, D], k/v [N, Hkv, L, D], optional additive mask ``bias`` [N, 1, R, L] (0 or -inf)
    -> (out [N, Hkv, R, D], logsumexp [N, Hkv, R] float32)."""
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if flash is not None:
        out, lse = flash(q, k, v, 0.0, False, attn_mask=bias, scale=scale)
        return out, lse.float()
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.float()
    lse = torch.logsumexp(scores, -1)
    return torch.matmul(torch.exp(scores - lse[..., None]), v.float()).to(q.dtype), lse


def _shared_prefix_product(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ids: torch.Tensor,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query row of q [T, H, D] against the K/V of the shared blocks ``ids`` (all visible), as one
    dense product per KV head: (out [Hkv, T * G, D], lse [Hkv, T * G]), row t * G + g for query head
    kh * G + g of token t."""
    t, h, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    prefix = ids.numel() * block_size
    k_pre = k_cache.index_select(0, ids).view(1, prefix, hkv, d).transpose(1, 2)
    v_pre = v_cache.index_select(0, ids).view(1, prefix, hkv, d).transpose(1, 2)
    q_rows = q.reshape(t, hkv, h // hkv, d).transpose(0, 1).reshape(1, hkv, t * (h // hkv), d)
    out, lse = _attention_with_lse(q_rows, k_pre, v_pre, scale)
    return out[0], lse[0]


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_query_len: int | None = None,
    max_context_len: int | None = None,
) -> torch.Tensor:
    """reference._prefill_attention (q [T, H, D], every sequence with at least one query) with the cascade
    of paged_decode_attention: when the sequences' leading blocks are one shared, already-cached prefix (a
    common system prompt) that every query comes after, all T x H query rows attend to it in one dense
    product and each sequence's own blocks are attended separately; the two are merged by their
    log-sum-exps. The reference instead gathers every sequence's whole context into a padded tensor
    (W2's prefill: ~58 copies of the same 20 blocks per layer and step)."""
    t, h, d = q.shape
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    # blocks every sequence holds in full before its first query
    shared = shared_prefix_blocks(block_tables, context_lens - q_lens, block_size)
    if shared == 0 or t * shared * block_size < CASCADE_MIN_WORK:
        return reference._prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale,
                                            max_query_len, max_context_len)
    group = h // hkv
    prefix = shared * block_size
    out_pre, lse_pre = _shared_prefix_product(q, k_cache, v_cache, block_tables[0, :shared].long(), scale)
    out_pre = out_pre.view(hkv, t, group, d).transpose(0, 1).reshape(t, h, d)
    lse_pre = lse_pre.view(hkv, t, group).transpose(0, 1).reshape(t, h)
    # each sequence's own blocks, causal, positions counted from the prefix's end
    out_own, lse_own = _prefill_with_lse(q, k_cache, v_cache, block_tables[:, shared:], query_start_loc,
                                         context_lens - prefix, q_lens, scale)
    top = torch.maximum(lse_pre, lse_own)
    w_pre, w_own = torch.exp(lse_pre - top), torch.exp(lse_own - top)
    merged = (out_pre.float() * w_pre[..., None] + out_own.float() * w_own[..., None]) / (w_pre + w_own)[..., None]
    return merged.to(q.dtype)


def _prefill_with_lse(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      query_start_loc: torch.Tensor, context_lens: torch.Tensor, q_lens: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of each sequence's queries over its paged K/V, as reference._prefill_attention, also
    returning each row's log-sum-exp: (out [T, H, D], lse [T, H] float32)."""
    h, d = q.shape[1], q.shape[2]
    b, hkv = block_tables.shape[0], k_cache.shape[2]
    group = h // hkv
    max_q = int(q_lens.max())
    qp, k, v, valid_q, mask = reference.prefill_layout(q, k_cache, v_cache, block_tables, query_start_loc,
                                                       context_lens, q_lens, max_q, int(context_lens.max()))
    # rows of a KV head: (query, group member), so the G heads sharing it are one batch of rows
    qp = qp.view(b, max_q, hkv, group, d).permute(0, 2, 1, 3, 4).reshape(b, hkv, max_q * group, d)
    mask = mask.repeat_interleave(group, dim=1)[:, None]  # [B, 1, Q * G, L]
    bias = torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, float("-inf"))
    out, lse = _attention_with_lse(qp, k.transpose(1, 2), v.transpose(1, 2), scale, bias)
    out = out.view(b, hkv, max_q, group, d).permute(0, 2, 1, 3, 4).reshape(b, max_q, h, d)[valid_q]
    lse = lse.view(b, hkv, max_q, group).permute(0, 2, 1, 3).reshape(b, max_q, h)[valid_q]
    return out, lse


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    cascade: bool = True,
) -> torch.Tensor:
    """q [B, H, D] (one token per sequence) -> [B, H, D]; same contract as reference._decode_attention.

    With ``cascade`` (the default), a prefix of blocks shared by the whole batch is attended once as a
    dense product (see CASCADE_MIN_*) and the kernel continues from there over each sequence's rest.
    """
    assert _lib is not None or available()
    if q.dtype == torch.float32:
        fn = _lib.paged_decode_attention_f32  # type: ignore[union-attr]
    elif q.dtype == torch.bfloat16:
        fn = _lib.paged_decode_attention_bf16  # type: ignore[union-attr]
    else:
        raise TypeError(f"CPU decode attention supports float32 and bfloat16, not {q.dtype}")
    assert k_cache.dtype == q.dtype and v_cache.dtype == q.dtype
    b, h, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    if d % 16:
        raise ValueError(f"CPU decode attention needs head_dim a multiple of 16, not {d}")
    q = q.contiguous()
    k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    tables = block_tables if block_tables.dtype == torch.int64 else block_tables.to(torch.int64)
    ctx = context_lens if context_lens.dtype == torch.int64 else context_lens.to(torch.int64)
    tables, ctx = tables.contiguous(), ctx.contiguous()
    shared = shared_prefix_blocks(block_tables, ctx, block_size) if cascade and b >= CASCADE_MIN_SEQS else 0
    init_out = init_lse = None
    if shared and b * shared * block_size >= CASCADE_MIN_WORK:
        init_out, init_lse = _shared_prefix_product(q, k_cache, v_cache, tables[0, :shared], scale)  # [Hkv, B*G, ...]
        init_out, init_lse = init_out.contiguous(), init_lse.contiguous()
    else:
        shared = 0
    out = torch.empty_like(q)
    fn(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), ctx.data_ptr(), out.data_ptr(),
       _ptr(init_out), _ptr(init_lse),
       b, h, hkv, d, block_size, tables.shape[1], shared, float(scale), torch.get_num_threads())
    return out


def ban_masked(logits: torch.Tensor, bitmask: torch.Tensor, penalty: float) -> None:
    """In place: logits [S, V] float32 -= penalty where bitmask [S, ceil(V/32)] int32 has the token's bit
    clear (constraints.apply_bitmask's CPU path, same result as its numpy version)."""
    assert _lib is not None or available()
    rows, vocab = logits.shape
    _lib.ban_masked_f32(  # type: ignore[union-attr]
        logits.data_ptr(), bitmask.data_ptr(), rows, vocab, bitmask.shape[1], float(penalty), torch.get_num_threads()
    )


def ban_masked_ok(logits: torch.Tensor, bitmask: torch.Tensor) -> bool:
    """Whether ban_masked takes these: contiguous CPU float32 logits [S, V], int32 bitmask [S, >= V/32]."""
    return (
        logits.dtype == torch.float32 and logits.device.type == "cpu" and logits.is_contiguous()
        and bitmask.dtype == torch.int32 and bitmask.device.type == "cpu" and bitmask.is_contiguous()
        and bitmask.shape[0] == logits.shape[0] and bitmask.shape[1] * 32 >= logits.shape[1] and available()
    )


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.rms_norm for contiguous float32 or bfloat16 [T, hidden] (weight and residual of the same
    dtype) in one pass (two with a residual)."""
    assert _lib is not None or available()
    rows, cols = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    fn = _lib.rms_norm_bf16 if x.dtype == torch.bfloat16 else _lib.rms_norm_f32  # type: ignore[union-attr]
    fn(
        x.data_ptr(), _ptr(residual), weight.data_ptr(), float(eps),
        out.data_ptr(), None if residual is None else res_out.data_ptr(), rows, cols, torch.get_num_threads(),
    )
    return out, res_out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """reference.silu_and_mul for contiguous float32 or bfloat16 [T, 2 * inter]."""
    assert _lib is not None or available()
    rows, cols = x.shape[0], x.shape[1] // 2
    out = torch.empty((rows, cols), dtype=x.dtype)
    fn = _lib.silu_and_mul_bf16 if x.dtype == torch.bfloat16 else _lib.silu_and_mul_f32  # type: ignore[union-attr]
    fn(x.data_ptr(), out.data_ptr(), rows, cols, torch.get_num_threads())
    return out


def rotary_store_kv(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.rotary_embedding then reference.store_kv, float32 or bfloat16, in one pass: q and k are
    rotated in place (views of one buffer with a shared row stride, see rotary_store_kv_ok) and returned."""
    t, h, d = q.shape
    fn = _lib.rotary_store_kv_bf16 if q.dtype == torch.bfloat16 else _lib.rotary_store_kv_f32  # type: ignore[union-attr]
    fn(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(0), positions.data_ptr(), cos_sin_cache.data_ptr(),
        t, h, k.shape[1], d, k_cache.data_ptr(), v_cache.data_ptr(), slot_mapping.data_ptr(),
        torch.get_num_threads(),
    )
    return q, k


def rotary_store_kv_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_sin_cache: torch.Tensor,
                       k_cache: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor) -> bool:
    """Whether rotary_store_kv takes these: CPU float32 or bfloat16 rows of one stride (the cache of the
    same dtype, the cos/sin table float32), contiguous heads and cache."""
    stride = q.stride(0)  # a single row's stride is arbitrary (never used)
    return (
        q.dtype == k.dtype == v.dtype == k_cache.dtype and q.dtype in (torch.float32, torch.bfloat16)
        and cos_sin_cache.dtype == torch.float32
        and q.device.type == "cpu" and (q.shape[0] <= 1 or k.stride(0) == v.stride(0) == stride)
        and q.stride(1) == k.stride(1) == v.stride(1) == q.shape[2] and q.stride(2) == k.stride(2) == v.stride(2) == 1
        and k_cache.is_contiguous() and cos_sin_cache.is_contiguous()
        and positions.dtype == slot_mapping.dtype == torch.int64 and positions.is_contiguous()
        and slot_mapping.is_contiguous() and available()
    )


@dataclass
class Int8Weight:
    """A linear layer's weight for int8_linear: int8 [in, out] (column-major view, the layout
    torch._int_mm runs fastest with) and one float32 scale per output channel."""

    qweight: torch.Tensor
    scale: torch.Tensor


def quantize_weight_int8(weight: torch.Tensor) -> Int8Weight:
    """Symmetric per-output-channel int8 of a float weight [out, in]."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Weight(qweight=q.t(), scale=scale.contiguous())  # .t() of a contiguous [out, in]: column-major


def int8_linear(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, in] float32 -> [M, out] float32: x quantized per row (symmetric int8), one int8 matmul with
    int32 accumulation, scaled back. Exact integer arithmetic, so a row's result is the same whatever
    the other rows are."""
    assert _lib is not None or available()
    x = x.contiguous()
    m, k = x.shape
    n = weight.scale.shape[0]
    threads = torch.get_num_threads()
    xq = torch.empty((m, k), dtype=torch.int8)
    x_scale = torch.empty(m, dtype=torch.float32)
    _lib.quantize_rows_s8(x.data_ptr(), xq.data_ptr(), x_scale.data_ptr(), m, k, threads)  # type: ignore[union-attr]
    acc = torch._int_mm(xq, weight.qweight)  # any M on the CPU (the M > 16 rule is CUDA's)
    out = torch.empty((m, n), dtype=torch.float32)
    b = None if bias is None else bias.float().contiguous()
    _lib.dequantize_rows(  # type: ignore[union-attr]
        acc.data_ptr(), x_scale.data_ptr(), weight.scale.data_ptr(), _ptr(b),
        out.data_ptr(), m, n, threads,
    )
    return out


def int8_linear_reference(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """int8_linear in plain torch ops (the specification the compiled path is tested against)."""
    x_scale = (x.abs().amax(dim=1) / 127.0)
    x_scale = torch.where(x_scale > 0, x_scale, torch.ones_like(x_scale))
    xq = torch.round(x / x_scale[:, None]).to(torch.int64)
    acc = xq @ weight.qweight.to(torch.int64)
    out = acc.float() * x_scale[:, None] * weight.scale[None, :]
    return out if bias is None else out + bias


# ggml type ids of the storage formats weight_gemv reads (ggml.h), with bytes per block of 32 weights
# in the file: an fp16 scale (Q4_1: and an fp16 minimum) before the quantised values.
WEIGHT_FORMATS = {"F16": (1, 64), "Q4_0": (2, 18), "Q4_1": (3, 20), "Q8_0": (8, 34), "BF16": (30, 64)}
_HEADER_BYTES = {"Q4_0": 2, "Q4_1": 4, "Q8_0": 2}
# Up to this many rows weight_gemv reads the stored weights once for all rows (its kernel's MAX_ROWS).
WEIGHT_GEMV_MAX_ROWS = 8


@dataclass
class StoredWeight:
    """A linear layer's weight [rows, cols] in its checkpoint's storage format, for weight_gemv.

    ``values`` is uint8 [rows, row_bytes]: per block of 32 weights the quantised values (16 bytes of
    nibbles for Q4_0/Q4_1, 32 int8 for Q8_0) or the 32 float16/bfloat16 values. The blocks' fp16
    scales (and Q4_1's minimums) sit in float32 [rows, cols / 32] (exact: fp16 converts to float32
    without rounding), which the kernel reads with plain loads."""

    fmt: str
    values: torch.Tensor
    scales: torch.Tensor | None
    mins: torch.Tensor | None
    rows: int
    cols: int

    @staticmethod
    def fits(shape: tuple[int, ...] | torch.Size) -> bool:
        """Whether a tensor of this shape can be kept: a matrix of whole 32-column blocks."""
        return len(shape) == 2 and shape[1] % 32 == 0

    @classmethod
    def from_blocks(cls, fmt: str, data: torch.Tensor, rows: int, cols: int) -> StoredWeight:
        """From a tensor's bytes as a GGUF file stores them (ggml blocks, row after row)."""
        if fmt not in WEIGHT_FORMATS:
            raise ValueError(f"unsupported weight format {fmt!r} (supported: {', '.join(WEIGHT_FORMATS)})")
        if cols % 32:
            raise ValueError(f"weight_gemv needs a multiple of 32 columns, got {cols}")
        block = WEIGHT_FORMATS[fmt][1]
        if data.dtype != torch.uint8 or data.numel() != rows * cols // 32 * block:
            raise ValueError(f"{fmt} weight [{rows}, {cols}] needs {rows * cols // 32 * block} bytes, got {data.numel()}")
        head = _HEADER_BYTES.get(fmt, 0)
        blocks = data.reshape(rows, cols // 32, block)
        scales = mins = None
        if head:
            scales = blocks[:, :, 0:2].contiguous().view(torch.float16).float().reshape(rows, -1)
            if fmt == "Q4_1":
                mins = blocks[:, :, 2:4].contiguous().view(torch.float16).float().reshape(rows, -1)
        return cls(fmt, blocks[:, :, head:].reshape(rows, -1).contiguous(), scales, mins, rows, cols)

    @classmethod
    def from_tensor(cls, weight: torch.Tensor) -> StoredWeight:
        """A float16 or bfloat16 tensor as it is (no rounding: its values are the checkpoint's)."""
        fmt = {torch.float16: "F16", torch.bfloat16: "BF16"}.get(weight.dtype)
        if fmt is None:
            raise ValueError(f"only float16/bfloat16 tensors are stored as they are, got {weight.dtype}")
        rows, cols = weight.shape
        return cls.from_blocks(fmt, weight.contiguous().view(torch.uint8).reshape(-1), rows, cols)

    @staticmethod
    def concat(parts: list[StoredWeight]) -> StoredWeight | None:
        """Row-wise concatenation (fused Q/K/V, gate/up), or None when the parts' formats differ."""
        if len({(p.fmt, p.cols) for p in parts}) != 1:
            return None

        def cat(ts: list[torch.Tensor | None]) -> torch.Tensor | None:
            return None if ts[0] is None else torch.cat(ts)  # type: ignore[arg-type]

        return StoredWeight(parts[0].fmt, torch.cat([p.values for p in parts]), cat([p.scales for p in parts]),
                            cat([p.mins for p in parts]), sum(p.rows for p in parts), parts[0].cols)

    def __post_init__(self) -> None:
        # the kernel's leading arguments, once (the tensors never move): a decode step makes 121 calls
        self._c_args = (self.values.data_ptr(), _ptr(self.scales), _ptr(self.mins), WEIGHT_FORMATS[self.fmt][0],
                        self.rows, self.cols, self.values.shape[1])

    def decode(self) -> torch.Tensor:
        """The weight as float32 [rows, cols], decoded by the kernel's portable path."""
        assert _lib is not None or available()
        out = torch.empty((self.rows, self.cols), dtype=torch.float32)
        _lib.weight_decode_f32(*self._c_args, out.data_ptr())  # type: ignore[union-attr]
        return out


def weight_gemv_fast() -> bool:
    """Whether weight_gemv has its SIMD path here (without it, F.linear on float32 weights is faster)."""
    return available() and bool(_lib.weight_gemv_simd())  # type: ignore[union-attr]


def weight_gemv(x: torch.Tensor, weight: StoredWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight) for float32 x [M <= WEIGHT_GEMV_MAX_ROWS, cols], reading the stored format."""
    assert _lib is not None or available()
    x = x.contiguous()
    m = x.shape[0]
    if m > WEIGHT_GEMV_MAX_ROWS or x.dtype != torch.float32 or x.shape[1] != weight.cols or x.device.type != "cpu":
        raise ValueError(f"weight_gemv takes float32 [<= {WEIGHT_GEMV_MAX_ROWS}, {weight.cols}], got "
                         f"{x.dtype} {list(x.shape)}")
    out = torch.empty((m, weight.rows), dtype=torch.float32)
    b = None if bias is None else bias.float().contiguous()
    _lib.weight_gemv_f32(  # type: ignore[union-attr]
        *weight._c_args, x.data_ptr(), m, _ptr(b), out.data_ptr(), torch.get_num_threads()
    )
    return out


@dataclass
class DecodeLayerWeights:
    """What decode_step needs of one decoder layer: float32 CPU norms and bias, matmuls as StoredWeight,
    the KV cache float32 or bfloat16 (a bfloat16 model's; the step's arithmetic is float32 either way)."""

    input_norm: torch.Tensor
    post_attn_norm: torch.Tensor
    qkv_bias: torch.Tensor | None
    qkv: StoredWeight
    o: StoredWeight
    gate_up: StoredWeight
    down: StoredWeight
    k_cache: torch.Tensor
    v_cache: torch.Tensor


class DecodeStep:
    """A whole decode step of a Llama-family model in one C call (csrc/decode_step.c) for up to
    WEIGHT_GEMV_MAX_ROWS sequences with one new token each: the layer-by-layer path with stored weights
    (weight_gemv, rms_norm, rotary_store_kv, paged decode attention, silu_and_mul), without its ~300
    Python-level kernel calls. Built once per model and KV cache: the pointer table below holds the
    addresses of the weights and caches, which never move."""

    def __init__(self, layers: list[DecodeLayerWeights], final_norm: torch.Tensor, eps: float,
                 cos_sin_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                 intermediate_size: int, block_size: int, scale: float) -> None:
        assert _lib is not None or available()
        self._layers = layers  # keeps every tensor the table points at alive
        self.final_norm, self.eps, self.cos_sin_cache = final_norm.contiguous(), float(eps), cos_sin_cache.contiguous()
        self.hidden_size = final_norm.shape[0]
        self.shape = (num_heads, num_kv_heads, head_dim, intermediate_size, block_size)
        self.scale = float(scale)
        rows = []
        for lw in layers:
            row = [lw.input_norm.data_ptr(), lw.post_attn_norm.data_ptr(), _ptr(lw.qkv_bias)]
            for w in (lw.qkv, lw.o, lw.gate_up, lw.down):
                row += w._c_args  # the fields of decode_step.c's stored_weight, in its order
            row += [lw.k_cache.data_ptr(), lw.v_cache.data_ptr()]
            rows.append(row)
        self.table = torch.tensor(rows, dtype=torch.int64)
        self.kv_bf16 = layers[0].k_cache.dtype == torch.bfloat16
        if any((lw.k_cache.dtype == torch.bfloat16) != self.kv_bf16 for lw in layers):
            raise ValueError("decode_step needs every layer's KV cache in one dtype")
        assert self.table.shape[1] == _lib.decode_layer_fields()  # type: ignore[union-attr]

    @staticmethod
    def supports(layer: DecodeLayerWeights) -> bool:
        """Whether decode_step can run this layer: float32 contiguous norms and bias, a contiguous float32
        or bfloat16 KV cache, head_dim a multiple of 16 (the attention kernel's vectors), matmuls the SIMD
        weight_gemv reads."""
        tensors = [layer.input_norm, layer.post_attn_norm] + ([layer.qkv_bias] if layer.qkv_bias is not None else [])
        caches = [layer.k_cache, layer.v_cache]
        return (
            weight_gemv_fast() and layer.k_cache.shape[-1] % 16 == 0
            and layer.k_cache.dtype in (torch.float32, torch.bfloat16) and layer.v_cache.dtype == layer.k_cache.dtype
            and all(t.dtype == torch.float32 for t in tensors)
            and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors + caches)
        )

    def __call__(self, hidden: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        """hidden: the tokens' embeddings [M, hidden] float32 (overwritten) -> final normed hidden [M, hidden]."""
        m = hidden.shape[0]
        if m > WEIGHT_GEMV_MAX_ROWS or not hidden.is_contiguous() or hidden.dtype != torch.float32:
            raise ValueError(f"decode_step takes contiguous float32 [<= {WEIGHT_GEMV_MAX_ROWS}, hidden], got "
                             f"{hidden.dtype} {list(hidden.shape)}")
        index = (positions, slot_mapping, context_lens)
        if any(t.dtype != torch.int64 or not t.is_contiguous() or t.shape[0] != m for t in index) or (
            block_tables.dtype != torch.int64 or block_tables.shape[0] != m
        ):
            raise ValueError("decode_step takes int64 positions, slots, context lengths and block tables, one per row")
        out = torch.empty_like(hidden)
        block_tables = block_tables.contiguous()
        heads, kv_heads, head_dim, inter, block_size = self.shape
        _lib.decode_step_f32(  # type: ignore[union-attr]
            self.table.data_ptr(), self.table.shape[0], self.final_norm.data_ptr(), self.eps, hidden.data_ptr(),
            out.data_ptr(), m, positions.data_ptr(), slot_mapping.data_ptr(), block_tables.data_ptr(),
            block_tables.shape[1], context_lens.data_ptr(), self.cos_sin_cache.data_ptr(), self.hidden_size, heads,
            kv_heads, head_dim, inter, block_size, self.scale, int(self.kv_bf16), torch.get_num_threads(),
        )
        return out
