"""GPU benchmark: 256 prompts x 128 output tokens on a random-weight model of Llama-3.1-8B's shape in
bfloat16, forge-batch against transformers' ``generate`` (static batches) and, when present, its
continuous-batching ``generate_batch``, on the same GPU in the same run; plus the fraction of HBM bandwidth
achieved in decode (bytes a decode step must read, weights + KV, over the step's wall time).

    python -m forge_batch.bench_gpu [--num-prompts 256] [--max-tokens 128] [--append-to BENCHMARKS.md]
        [--json results.json] [--profile profile.txt]

``--profile`` writes a torch-profiler summary of one decode step at the largest batch (CUDA graph replay,
then the same step eager): the top ops by device and by host time, and the step's GPU time by kind of
kernel (attention, matmuls, ...), plus a Chrome trace beside it (``profile_trace.json``).
``--json`` writes every figure as it is measured, so a run cut short still leaves what it got.
``--batch-invariant off`` measures the engine with ``batch_invariant=False`` (cuBLAS and the step-dependent
attention tiling) instead of its default.

Needs a CUDA device; elsewhere it says so and exits 0 (nothing to measure). ``--device cpu --shape tiny``
runs the same code on a tiny model on the CPU (to check the script, not to measure anything).
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import time
import traceback
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

# Peak HBM bandwidth by device name (bytes/s), for the achieved-fraction column.
PEAK_BW = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H100": 3.35e12,
           "A100": 2.0e12}

LLAMA_31_8B = dict(
    architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    max_position_embeddings=4096, tie_word_embeddings=False, eos_token_ids=[128001],
)
# The same code path at a size a CPU runs in seconds (tests of this script).
TINY = dict(
    architecture="llama", vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
    max_position_embeddings=1024, tie_word_embeddings=False, eos_token_ids=[1],
)
SHAPES = {"llama-3.1-8b": LLAMA_31_8B, "tiny": TINY}

# GPU kernel name -> kind, first match wins (Triton kernels by our names, cuBLAS/CUTLASS by theirs).
KERNEL_KINDS = [
    ("attention", re.compile(r"paged_attention|merge_segments|attn|flash|sdpa", re.I)),
    ("kv store + rotary", re.compile(r"store_kv|rotary", re.I)),
    ("matmul", re.compile(r"gemm|gemv|nvjet|cutlass|xmma|matmul|cublas|splitk|\bmm\b", re.I)),
    ("rms_norm + silu", re.compile(r"rms_norm|silu", re.I)),
    ("copies", re.compile(r"memcpy|memset", re.I)),
]


def kernel_kind(name: str) -> str:
    """The kind of work a GPU kernel does, from its name; 'other' (sampling, casts, indexing) otherwise."""
    for kind, pattern in KERNEL_KINDS:
        if pattern.search(name):
            return kind
    return "other"


def peak_bandwidth(name: str) -> float | None:
    for key, bw in PEAK_BW.items():
        if key in name:
            return bw
    return None


def kv_bytes_per_token(cfg: dict, elem_bytes: int) -> int:
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * elem_bytes


def decode_bytes(weight_bytes: int, context_tokens: int, kv_per_token: int) -> int:
    """Bytes one decode step must read at least: every weight once and every cached token's K and V."""
    return weight_bytes + context_tokens * kv_per_token


def prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(32, 257, (n,), generator=g).tolist()
    return [torch.randint(1000, vocab - 1000, (length,), generator=g).tolist() for length in lengths]


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Results:
    """The run's figures, rewritten to ``path`` (when given) after each one, so a cut run keeps them."""

    def __init__(self, path: str | None, **fields: Any) -> None:
        self.path = path
        self.data: dict[str, Any] = dict(fields)
        self.save()

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.save()

    def save(self) -> None:
        if self.path:
            Path(self.path).write_text(json.dumps(self.data, indent=2, default=str) + "\n")


def _decode_ready(llm: Any, batch: int) -> bool:
    """Every sequence admitted and past its prompt: the next step is decode only (one token each)."""
    sched = llm.scheduler
    return not sched.waiting and len(sched.running) == batch and all(
        s.num_uncomputed_tokens == 1 for s in sched.running)


def _start_decode(llm: Any, work: list[list[int]], max_tokens: int) -> None:
    """Queue ``work`` and step until every prompt is prefilled: from here on, steps are decode only."""
    from forge_batch import SamplingParams
    from forge_batch.engine.request import GenerationRequest

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    tag = f"decode{len(work)}-{time.monotonic_ns()}"
    for i, p in enumerate(work):
        failed = llm.add_request(GenerationRequest(f"{tag}-{i}", prompt_token_ids=p, params=params))
        if failed is not None:
            raise RuntimeError(f"decode request failed: {failed}")
    for _ in range(10_000):
        if _decode_ready(llm, len(work)):
            return
        llm.step()
    raise RuntimeError("prefill did not finish")


def _drain(llm: Any) -> None:
    while llm.has_unfinished():
        llm.step()


def measure_decode(llm: Any, work: list[list[int]], steps: int, device: str) -> dict:
    """Wall time of ``steps`` pure-decode steps over ``len(work)`` sequences (prefill done first, outside
    the timing), and the cached tokens a step reads on average."""
    batch = len(work)
    _start_decode(llm, work, steps + 2)
    llm.step()  # one decode step untimed (first replay of this bucket)
    ctx_before = sum(s.num_tokens for s in llm.scheduler.running)
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        llm.step()
    sync(device)
    wall = time.perf_counter() - t
    _drain(llm)
    # a sequence of n tokens reads n cached tokens in its step (its newest one written first); the timed
    # steps start at ctx_before and add one token per sequence each
    return {"batch": batch, "steps": steps, "step_s": wall / steps,
            "context_tokens": ctx_before + batch * (steps - 1) // 2}


def profile_decode_step(llm: Any, work: list[list[int]], device: str, path: str) -> dict:
    """torch profiler over one decode step of ``len(work)`` sequences as the engine runs it (CUDA graph
    replay on a GPU) and one with the graphs set aside (eager: every kernel launched from Python). Writes
    the tables to ``path`` and the first step's Chrome trace beside it; returns the GPU time by kernel kind."""
    from torch.profiler import ProfilerActivity, profile

    _start_decode(llm, work, 6)
    llm.step()  # warm: first replay of this bucket

    activities = [ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    sections: list[str] = []
    summary: dict[str, Any] = {}
    runner = llm.runner
    saved_graphs = runner.decode_graphs
    trace = str(Path(path).with_name(Path(path).stem + "_trace.json"))
    for label in ("graphs", "eager"):
        if label == "graphs" and saved_graphs is None:
            continue
        runner.decode_graphs = saved_graphs if label == "graphs" else None
        try:
            sync(device)
            with profile(activities=activities) as prof:
                t = time.perf_counter()
                llm.step()
                sync(device)
                wall = time.perf_counter() - t
        finally:
            runner.decode_graphs = saved_graphs
        if label == "graphs" or saved_graphs is None:
            prof.export_chrome_trace(trace)
        kinds, gpu_total = gpu_time_by_kind(prof.events())
        summary[label] = {"step_s": wall, "gpu_s": gpu_total, "gpu_by_kind_s": kinds}
        averages = prof.key_averages()
        lines = [f"## one decode step, {label}: wall {wall * 1e3:.3f} ms, GPU kernels {gpu_total * 1e3:.3f} ms "
                 f"(host time not hidden behind the GPU: about {max(wall - gpu_total, 0) * 1e3:.3f} ms)", "",
                 "GPU time by kind of kernel:"]
        for kind, secs in sorted(kinds.items(), key=lambda kv: -kv[1]):
            share = secs / gpu_total if gpu_total else 0.0
            lines.append(f"  {kind:<20} {secs * 1e3:9.3f} ms  {share:6.1%}")
        lines += ["", "top ops by device time:", averages.table(sort_by=_device_sort_key(), row_limit=25), "",
                  "top ops by host (CPU) time:", averages.table(sort_by="self_cpu_time_total", row_limit=25), ""]
        sections.append("\n".join(lines))
    Path(path).write_text(f"# torch profiler, one decode step of batch {len(work)}\n\n" + "\n".join(sections))
    _drain(llm)
    return summary


def _device_sort_key() -> str:
    """torch renamed the CUDA columns to device columns; take whichever this version has."""
    from torch.autograd.profiler_util import FunctionEventAvg

    return "self_device_time_total" if hasattr(FunctionEventAvg, "self_device_time_total") \
        else "self_cuda_time_total"


def gpu_time_by_kind(events: Any) -> tuple[dict[str, float], float]:
    """Seconds of GPU kernel time per kernel kind, and their sum, from a profiler's events."""
    kinds: dict[str, float] = {}
    for ev in events:
        if str(getattr(ev, "device_type", "")).split(".")[-1] != "CUDA":
            continue
        us = ev.time_range.elapsed_us()
        kind = kernel_kind(ev.name)
        kinds[kind] = kinds.get(kind, 0.0) + us * 1e-6
    return kinds, sum(kinds.values())


def run_ours(cfg: dict, work: list[list[int]], max_tokens: int, max_num_seqs: int, device: str, dtype: str,
             decode_steps: int, profile_path: str | None, results: Results, batch_invariant: bool = True) -> dict:
    import torch

    from forge_batch import LLM, SamplingParams
    from forge_batch.engine.request import GenerationRequest
    from forge_batch.models.config import ModelConfig

    t0 = time.monotonic()
    llm = LLM(ModelConfig(**cfg), load_format="dummy", device=device, dtype=dtype,
              max_num_seqs=max_num_seqs, max_num_batched_tokens=8192, batch_invariant=batch_invariant)
    load = time.monotonic() - t0
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    def go(llm: LLM, items: list[list[int]]) -> tuple[list, float]:
        reqs = [GenerationRequest(str(i), prompt_token_ids=p, params=params) for i, p in enumerate(items)]
        sync(device)
        t = time.monotonic()
        outs = list(llm.generate_stream(reqs, max_in_flight=len(reqs)))
        sync(device)
        return outs, time.monotonic() - t

    go(llm, work[:8])  # warm-up (Triton compile outside the timed run)
    outs, wall = go(llm, work)
    tokens = sum(len(o.token_ids) for o in outs)
    # a decode step reads every weight once, except the embedding table (a row per sequence; when tied,
    # its reading as the LM head counts)
    model = llm.model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.lm_head is not model.embed_tokens:
        weight_bytes -= model.embed_tokens.numel() * model.embed_tokens.element_size()
    ours: dict[str, Any] = {
        "tok_s": tokens / wall, "wall_s": wall, "output_tokens": tokens, "load_s": load,
        "cuda_graphs": llm.runner.decode_graphs is not None, "kernel_path": llm.engine_info["kernel_path"],
        "batch_invariant": llm.engine_info["batch_invariant"],
        "triton_fallback": llm.model.kernels.triton_disabled_reason(), "weight_bytes": weight_bytes,
        "kv_bytes_per_token": kv_bytes_per_token(cfg, torch.empty((), dtype=llm.dtype).element_size()),
        "decode": [],
    }
    results["ours"] = ours
    # Decode-only steps at batch 1 and at the full batch, for the bandwidth fraction.
    full = min(max_num_seqs, len(work))
    for bs in sorted({1, full}):
        ours["decode"].append(measure_decode(llm, work[:bs], decode_steps, device))
        results["ours"] = ours
    if profile_path:  # last, and saved before: a profiler failure loses none of the figures
        try:
            ours["profile"] = profile_decode_step(llm, work[:full], device, profile_path)
        except Exception as exc:
            ours["profile_error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
    ours["triton_fallback"] = llm.model.kernels.triton_disabled_reason()  # a kernel may fail only at a later shape
    results["ours"] = ours
    del llm
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return ours


def run_transformers(cfg: dict, work: list[list[int]], max_tokens: int, batch_sizes: list[int], device: str,
                     dtype: str, continuous: bool, theirs: dict, publish: Callable[[], None]) -> dict:
    """transformers' figures into ``theirs`` (its version first), calling ``publish`` after each one."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"], head_dim=cfg["head_dim"], rope_theta=cfg["rope_theta"],
        rope_scaling=cfg.get("rope_scaling"), max_position_embeddings=cfg["max_position_embeddings"],
        pad_token_id=0, eos_token_id=None, bos_token_id=None,
    )
    torch_dtype = getattr(torch, dtype)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(torch_dtype).eval()
    theirs["transformers"] = transformers.__version__
    publish()
    for bs in batch_sizes:
        try:
            sync(device)
            t = time.monotonic()
            tokens = 0
            with torch.inference_mode():
                for i in range(0, len(work), bs):
                    batch = work[i : i + bs]
                    width = max(len(p) for p in batch)
                    ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)
                    mask = torch.zeros_like(ids)
                    for j, p in enumerate(batch):  # left padding
                        ids[j, width - len(p):] = torch.tensor(p)
                        mask[j, width - len(p):] = 1
                    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                         min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
                    tokens += (out.shape[1] - width) * out.shape[0]
            sync(device)
            theirs[f"generate bs={bs}"] = tokens / (time.monotonic() - t)
        except Exception as exc:  # one batch size failing (out of memory, say) must not lose the others
            theirs[f"generate bs={bs}"] = None
            theirs.setdefault("errors", {})[f"generate bs={bs}"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        publish()
    if continuous and hasattr(model, "generate_batch"):  # continuous batching, where this version has it
        try:
            gen_cfg = transformers.GenerationConfig(max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                                    do_sample=False, eos_token_id=None, pad_token_id=0)
            sync(device)
            t = time.monotonic()
            out = model.generate_batch(inputs=work, generation_config=gen_cfg)
            sync(device)
            tokens = sum(len(r.generated_tokens) for r in out.values())
            theirs["generate_batch (continuous)"] = tokens / (time.monotonic() - t)
        except Exception as exc:  # an API that moved between versions: report, don't fail the run
            theirs["generate_batch (continuous)"] = None
            theirs.setdefault("errors", {})["generate_batch"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        publish()
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return theirs


def report(args: argparse.Namespace, argv: list[str], name: str, torch_version: str, ours: dict,
           theirs: dict) -> str:
    peak = peak_bandwidth(name)
    path = ours["kernel_path"] + (", CUDA graphs" if ours["cuda_graphs"] else "")
    path += ", batch-invariant" if ours.get("batch_invariant") else ", not batch-invariant"
    if ours["triton_fallback"]:
        path += f"; Triton fell back to the reference: {ours['triton_fallback']}"
    lines = [f"### {date.today().isoformat()} · {name} · torch {torch_version}", "",
             f"`python -m forge_batch.bench_gpu {' '.join(argv)}` — "
             f"random-weight {args.shape} shape, {args.dtype}, {args.num_prompts} prompts (32-256 tokens) x "
             f"{args.max_tokens} output tokens; load {ours['load_s']:.1f} s", "",
             "| engine | output tok/s | ours / it |", "|---|---|---|",
             f"| forge-batch ({path}) | {ours['tok_s']:.0f} | 1.00 |"]
    for k, v in theirs.items():
        if k in ("transformers", "errors"):
            continue
        shown = f"| transformers {theirs['transformers']} {k} | "
        lines.append(shown + (f"{v:.0f} | {ours['tok_s'] / v:.2f}x |" if v else "failed | — |"))
    for k, err in theirs.get("errors", {}).items():
        lines.append(f"\n{k} failed: {err}")
    lines += ["", "| decode batch | step ms (wall) | cached tokens read | bytes read per step | achieved bandwidth "
              "| fraction of peak |", "|---|---|---|---|---|---|"]
    for d in ours["decode"]:
        nbytes = decode_bytes(ours["weight_bytes"], d["context_tokens"], ours["kv_bytes_per_token"])
        bw = nbytes / d["step_s"]
        frac = f"{bw / peak:.0%}" if peak else "unknown peak"
        lines.append(f"| {d['batch']} | {d['step_s'] * 1000:.2f} | {d['context_tokens']} | {nbytes / 1e9:.2f} GB "
                     f"| {bw / 1e12:.2f} TB/s | {frac} |")
        d["bytes_per_step"], d["bandwidth"] = nbytes, bw
        d["fraction_of_peak"] = bw / peak if peak else None
    prof = ours.get("profile")
    if prof:
        lines += ["", "One decode step at the full batch (torch profiler; GPU kernel time by kind):", "",
                  "| run | step ms (wall) | GPU ms | " + " | ".join(k for k, _ in KERNEL_KINDS) + " | other |",
                  "|---|---|---|" + "---|" * (len(KERNEL_KINDS) + 1)]
        for label, p in prof.items():
            cells = [f"{p['gpu_by_kind_s'].get(k, 0.0) * 1e3:.3f}" for k, _ in KERNEL_KINDS]
            cells.append(f"{p['gpu_by_kind_s'].get('other', 0.0) * 1e3:.3f}")
            lines.append(f"| {label} | {p['step_s'] * 1e3:.3f} | {p['gpu_s'] * 1e3:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m forge_batch.bench_gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--hf-batch-sizes", default="64,256")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-generate-batch", action="store_true",
                    help="leave out transformers' continuous-batching generate_batch")
    ap.add_argument("--decode-steps", type=int, default=32, help="timed pure-decode steps per batch size")
    ap.add_argument("--append-to", default=None, help="append the markdown report to this file")
    ap.add_argument("--json", default=None, help="write every figure to this JSON file as it is measured")
    ap.add_argument("--profile", default=None,
                    help="write a torch-profiler summary of one full-batch decode step to this file")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu to check the script on a tiny shape")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--batch-invariant", choices=["on", "off"], default="on",
                    help="the engine's batch_invariant (on, its default: the fixed-tile Triton GEMM; off: cuBLAS)")
    args = ap.parse_args(argv)
    argv = list(argv if argv is not None else sys.argv[1:])

    for path in (args.json, args.profile, args.append_to):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    import torch

    results = Results(args.json, args=vars(args), torch=torch.__version__, status="running")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: the GPU figures stay unmeasured on this machine", file=sys.stderr)
        results["status"] = "no CUDA device"
        return 0
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    try:
        import triton

        results["triton"] = triton.__version__
    except ImportError:
        results["triton"] = None
    results["device_name"] = name
    cfg = SHAPES[args.shape]
    work = prompts(args.num_prompts, cfg["vocab_size"])
    ours = run_ours(cfg, work, args.max_tokens, args.max_num_seqs, args.device, args.dtype, args.decode_steps,
                    args.profile, results, batch_invariant=args.batch_invariant == "on")
    theirs: dict[str, Any] = {}

    def publish() -> None:
        """The report so far into the JSON: a run cut short (a timeout) still has its markdown."""
        results.data["report"] = report(args, argv, name, torch.__version__, ours, theirs)
        results.data["transformers"] = theirs
        results["ours"] = ours  # with the bandwidth figures report() adds

    publish()
    if not args.skip_transformers:
        run_transformers(cfg, work, args.max_tokens, [int(x) for x in args.hf_batch_sizes.split(",")], args.device,
                         args.dtype, not args.skip_generate_batch, theirs, publish)
    publish()
    text = results.data["report"]
    results["status"] = "done"
    print(text)
    if args.append_to:
        with open(args.append_to, "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    from forge_batch.checkout_path import drop_checkout_root

    drop_checkout_root()  # before anything imports transformers
    raise SystemExit(main())
