"""A roofline of one batched decode step on this machine: the default model, W1's chats, every full decode
step at ``--rows`` rows timed op class by op class, each class's achieved GFLOP/s and GB/s set against
the machine's measured peaks (bfloat16 / float32 GEMM at a large square shape, memory bandwidth).

    python scripts/roofline.py                  # 256 rows, 32 tokens each, the dtype `auto` picks
    python scripts/roofline.py --rows 128 --dtype float32
    python scripts/roofline.py --workload W2   # the chats behind W2's shared ~400-token system prompt

Op classes: the layers' matmuls (qkv, o, gate_up, down), the LM head (its matmul and the float32 logits),
decode attention (the C kernel reading the paged KV cache), element-wise (RMSNorm, rotary + KV store,
SiLU * up), and the rest of the step (embedding, scheduling, sampling, Python): step time minus the others.
Bytes are what an op must move at least (weights, activations, KV cache read once); FLOPs 2 per
multiply-add. A class is compute- or memory-bound by its FLOP/byte against the machine's ridge point.
Timers wrap each call (synchronous on the CPU); they add ~1 us per call.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from forge_batch import LLM, SamplingParams
from forge_batch.bench import SYSTEM_PROMPT, chat_prompts
from forge_batch.engine.device import resolve_device, resolve_dtype


def _best_seconds(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure_peaks(size: int = 2048) -> dict[str, float]:
    """GEMM GFLOP/s (bfloat16 and float32, size^3: the faster of torch's matmul and oneDNN's on a reordered
    weight, which in float32 differ by 2x on AMD CPUs, where MKL runs AVX2 code) and memory bandwidth in GB/s
    (a 1 GiB copy: read + write; a sum over 1 GiB: read only)."""
    from forge_batch.kernels.cpu import onednn_packed

    peaks = {}
    for dtype in (torch.bfloat16, torch.float32):
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        best = _best_seconds(lambda a=a, b=b: a @ b)
        if onednn_packed.available(dtype):
            packed = onednn_packed.pack(b.T.contiguous())
            best = min(best, _best_seconds(lambda a=a, packed=packed: onednn_packed.linear(a, packed)))
        peaks[f"gemm_{str(dtype).removeprefix('torch.')}_gflops"] = 2 * size ** 3 / best / 1e9
    src = torch.ones(2 ** 28)  # 1 GiB of float32
    dst = torch.empty_like(src)
    peaks["copy_gbps"] = 2 * src.nbytes / _best_seconds(lambda: dst.copy_(src)) / 1e9
    peaks["read_gbps"] = src.nbytes / _best_seconds(lambda: src.sum()) / 1e9
    return peaks


@dataclass
class OpClass:
    seconds: float = 0.0
    flops: float = 0.0
    bytes: float = 0.0
    calls: int = 0


@dataclass
class Recorder:
    """Per op class totals over the full decode steps (every row decoding, ``rows`` rows)."""

    rows: int
    classes: dict[str, OpClass] = field(default_factory=lambda: defaultdict(OpClass))
    recording: bool = False
    steps: int = 0
    step_seconds: float = 0.0

    def add(self, name: str, seconds: float, flops: float, nbytes: float) -> None:
        if self.recording:
            c = self.classes[name]
            c.seconds, c.flops, c.bytes, c.calls = c.seconds + seconds, c.flops + flops, c.bytes + nbytes, c.calls + 1


class TimedLinear:
    """A model matmul, timed: 2*M*N*K FLOPs; bytes: the weight as held plus the rows in and out."""

    def __init__(self, inner, name: str, rec: Recorder) -> None:
        self.inner, self.name, self.rec = inner, name, rec
        self.weight, self.bias = inner.weight, inner.bias
        w = inner.weight
        self.n, self.k, self.weight_bytes = w.shape[0], w.shape[1], w.numel() * w.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        y = self.inner(x)
        m = x.shape[0]
        self.rec.add(self.name, time.perf_counter() - t, 2.0 * m * self.n * self.k,
                     self.weight_bytes + (m * self.k + m * self.n) * x.element_size())
        return y


def instrument(llm: LLM, rec: Recorder) -> None:
    model = llm.model
    for layer in model.layers:
        for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            setattr(layer, name, TimedLinear(getattr(layer, name), "matmul (layers)", rec))
    model.lm_head = TimedLinear(model.lm_head, "LM head matmul", rec)
    kernels = model.kernels
    elem = kernels.rms_norm, kernels.silu_and_mul, kernels.rotary_and_store_kv
    attention = kernels.paged_attention

    def timed_elementwise(fn):
        def call(*args, **kw):
            t = time.perf_counter()
            out = fn(*args, **kw)
            first = args[0] if isinstance(args[0], torch.Tensor) and args[0].dim() > 1 else args[1]
            # read the input (and residual / k, v), write the output: ~3 passes over a [T, hidden] tensor
            rec.add("element-wise", time.perf_counter() - t, 0.0, 3.0 * first.numel() * first.element_size())
            return out
        return call

    def timed_attention(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, *rest):
        t = time.perf_counter()
        out = attention(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, *rest)
        heads, d = q.shape[1], q.shape[2]
        kv_heads = k_cache.shape[-2] if k_cache.dim() == 4 else heads
        tokens = float(context_lens.sum())
        rec.add("decode attention", time.perf_counter() - t, 4.0 * tokens * heads * d,
                2.0 * tokens * kv_heads * d * k_cache.element_size())
        return out

    kernels.rms_norm, kernels.silu_and_mul, kernels.rotary_and_store_kv = (timed_elementwise(f) for f in elem)
    kernels.paged_attention = timed_attention

    compute_logits = model.compute_logits

    def timed_logits(hidden, out=None):
        # the LM head's matmul is timed by its TimedLinear; the rest of compute_logits is the float32 cast
        before = rec.classes["LM head matmul"].seconds
        t = time.perf_counter()
        out = compute_logits(hidden, out=out)
        cast = time.perf_counter() - t - (rec.classes["LM head matmul"].seconds - before)
        rec.add("LM head float32 logits", cast, 0.0, out.numel() * (2 + 4.0))  # read bf16, write float32
        return out

    model.compute_logits = timed_logits
    forward = model.forward

    def decode_aware_forward(input_ids, positions, kv_caches, attn):
        rec.recording = attn.max_query_len == 1 and input_ids.shape[0] == rec.rows
        return forward(input_ids, positions, kv_caches, attn)

    model.forward = decode_aware_forward
    step = llm.engine.step

    def timed_step():
        rec.recording = False
        t = time.perf_counter()
        done = step()
        if rec.recording:
            rec.steps += 1
            rec.step_seconds += time.perf_counter() - t
        rec.recording = False
        return done

    llm.engine.step = timed_step


def table(rec: Recorder, peaks: dict[str, float], dtype: str) -> str:
    gemm_peak = peaks[f"gemm_{dtype}_gflops"]
    bw = peaks["read_gbps"]
    ridge = gemm_peak / bw
    step_ms = rec.step_seconds / rec.steps * 1e3
    classes = {k: v for k, v in rec.classes.items() if v.calls}
    accounted = sum(c.seconds for c in classes.values())
    classes["rest (sampling, scheduling, Python)"] = OpClass(rec.step_seconds - accounted, 0.0, 0.0, rec.steps)
    lines = ["| op class | ms / step | share | GFLOP/s | GB/s | FLOP/byte | bound | % of that peak |",
             "|---|---|---|---|---|---|---|---|"]
    for name, c in sorted(classes.items(), key=lambda kv: -kv[1].seconds):
        ms = c.seconds / rec.steps * 1e3
        gflops = c.flops / c.seconds / 1e9 if c.seconds > 0 else 0.0
        gbps = c.bytes / c.seconds / 1e9 if c.seconds > 0 else 0.0
        if c.flops and c.bytes:
            intensity = c.flops / c.bytes
            bound = "compute" if intensity > ridge else "memory"
            pct = 100 * (gflops / gemm_peak if bound == "compute" else gbps / bw)
            cells = f"{gflops:.0f} | {gbps:.1f} | {intensity:.1f} | {bound} | {pct:.0f}%"
        elif c.bytes:
            cells = f"- | {gbps:.1f} | 0 | memory | {100 * gbps / bw:.0f}%"
        else:
            cells = "- | - | - | - | -"
        lines.append(f"| {name} | {ms:.2f} | {100 * c.seconds / rec.step_seconds:.0f}% | {cells} |")
    lines.append(f"| **step** | {step_ms:.2f} | 100% | | | | | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--workload", choices=("W1", "W2"), default="W1",
                    help="W1's chats, or W2's: the same behind one shared system prompt (prefix cache on)")
    args = ap.parse_args()
    dtype = str(resolve_dtype(args.dtype, resolve_device("cpu"))).removeprefix("torch.")
    peaks = measure_peaks()
    print("peaks:", ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()), f"(threads {torch.get_num_threads()})")
    llm = LLM(args.model, device="cpu", dtype=dtype, max_num_seqs=args.rows)
    rec = Recorder(args.rows)
    instrument(llm, rec)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    t = time.perf_counter()
    llm.chat(chat_prompts(args.rows, SYSTEM_PROMPT if args.workload == "W2" else None), params, use_tqdm=False)
    wall = time.perf_counter() - t
    print(f"{args.workload}: {args.rows} rows x {args.max_tokens} tokens, {dtype}, batch_invariant "
          f"{llm.engine_info['batch_invariant']}: {rec.steps} full decode steps, "
          f"{rec.rows * rec.steps / rec.step_seconds:.0f} tok/s in them; wall {wall:.1f} s")
    print(table(rec, peaks, dtype))


if __name__ == "__main__":
    main()
