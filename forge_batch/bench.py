"""`forge-batch bench`: fixed, seeded workloads on the default model, ours against a reference in one run.

Workloads (every engine does the same work: greedy, EOS ignored, fixed output length):
  W0  one stream, 256 output tokens
  W1  256 chat prompts x 128 output tokens
  W2  the W1 prompts behind one shared ~400-token system prompt
  W3  W1 under a JSON schema (needs the structured-output constraint plugin)

Absolute numbers drift on a shared machine, so compare ratios taken in the same run
(``--against transformers`` runs HF transformers' ``generate`` with static batches on the same prompts).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

TOPICS = [
    "photosynthesis", "the French revolution", "black holes", "compound interest", "the water cycle",
    "neural networks", "the Roman empire", "volcanoes", "vaccines", "the stock market", "plate tectonics",
    "the printing press", "quantum computing", "climate change", "the human heart", "jazz music",
]
TASKS = [
    "Explain {t} to a ten-year-old.", "Write a short poem about {t}.", "List three facts about {t}.",
    "Summarise the history of {t} in a paragraph.", "What are common misconceptions about {t}?",
    "Give an analogy that explains {t}.", "Write a quiz question about {t} with its answer.",
    "Describe {t} in exactly five sentences.", "Why does {t} matter today?",
    "Compare {t} with something from everyday life.", "Write a tweet about {t}.",
    "What would a scientist say about {t}?", "Teach {t} step by step.", "Debate the pros and cons of {t}.",
    "Write a haiku about {t}.", "Tell a short story involving {t}.",
]
# W0: one stream of 256 tokens; W1: the chats; W2: behind a shared system prompt; W3: under a JSON schema
WORKLOADS = ("W0", "W1", "W2", "W3")

SYSTEM_PROMPT = (
    "You are a meticulous research assistant working for a team that produces educational material. "
    "Follow these rules in every answer. First, be accurate: if you are not sure of a fact, say so "
    "plainly instead of guessing, and never invent citations, numbers or quotations. Second, be clear: "
    "prefer short sentences and common words, define every technical term the first time you use it, "
    "and give one concrete example for each abstract idea. Third, be structured: start with a one "
    "sentence answer, then give the supporting explanation, then a short summary. Fourth, be fair: "
    "when a question touches a topic on which reasonable people disagree, present the main positions "
    "and the evidence behind each without taking sides. Fifth, be safe: refuse requests for dangerous "
    "instructions and explain briefly why. Sixth, adapt to the reader: when the question mentions an "
    "age or a level, match your vocabulary and depth to it; otherwise assume a curious adult with no "
    "special training. Seventh, keep it concise: do not repeat the question, do not pad the answer, and "
    "stop when the question is answered. Eighth, format for reading on a phone: short paragraphs, "
    "bullet lists where they help, no tables wider than three columns. Ninth, when asked for creative "
    "writing, keep it original, vivid and appropriate for a general audience. Tenth, when asked to "
    "compare or evaluate, name the criteria you use before you apply them, and weigh them openly. "
    "Finally, end every answer with a single line that begins with 'Key idea:' and states the most "
    "important takeaway in plain words, so that a reader who skims can still learn something useful."
)
BENCH_SCHEMA = {
    "type": "object",
    "properties": {
        "topic": {"type": "string"},
        "facts": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        "difficulty": {"enum": ["easy", "medium", "hard"]},
    },
    "required": ["topic", "facts", "difficulty"],
}


def chat_prompts(n: int, system: str | None = None) -> list[list[dict[str, str]]]:
    out = []
    for i in range(n):
        text = TASKS[i % len(TASKS)].format(t=TOPICS[(i // len(TASKS) + i) % len(TOPICS)])
        msgs = [{"role": "system", "content": system}] if system else []
        out.append(msgs + [{"role": "user", "content": text}])
    return out


@dataclass
class Result:
    engine: str
    workload: str
    output_tok_s: float
    total_tok_s: float
    ttft_p50: float | None
    ttft_p99: float | None
    itl_p50: float | None
    wall_s: float
    peak_rss_mb: float
    extra: dict[str, Any]


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _per_step(before: dict, after: dict, key: str) -> float | None:
    steps = after["steps"] - before["steps"]
    spent = after[key] - before[key]
    return round(1000 * spent / steps, 3) if steps and spent else None


def _delta_rate(before: dict, after: dict) -> float:
    queries = after["prefix_cache_queries"] - before["prefix_cache_queries"]
    return (after["prefix_cache_hits"] - before["prefix_cache_hits"]) / queries if queries else 0.0


def run_ours(llm, workload: str, prompts, max_tokens: int, constraint: dict | None = None) -> Result:
    from forge_batch import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **(constraint or {}))
    llm.reset_prefix_cache()  # each workload starts cold: W3 must not reuse W1's prompt blocks
    before = llm.stats()
    t0 = time.monotonic()
    outs = llm.generate(prompts, params)
    wall = time.monotonic() - t0
    after = llm.stats()
    errors = [o.error for o in outs if o.error]
    if errors:
        raise RuntimeError(f"{workload}: {len(errors)} requests failed, first: {errors[0]}")
    out_tokens = sum(len(o.token_ids) for o in outs)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
    ttft = [o.metrics["first_token_time"] - t0 for o in outs]
    itl = [
        (o.metrics["finished_time"] - o.metrics["first_token_time"]) / (len(o.token_ids) - 1)
        for o in outs
        if len(o.token_ids) > 1
    ]
    step_s = after["step_seconds"] - before["step_seconds"]
    fwd_s = after["forward_seconds"] - before["forward_seconds"]
    return Result(
        engine="forge-batch",
        workload=workload,
        output_tok_s=out_tokens / wall,
        total_tok_s=(out_tokens + prompt_tokens) / wall,
        ttft_p50=_pct(ttft, 0.5),
        ttft_p99=_pct(ttft, 0.99),
        itl_p50=_pct(itl, 0.5),
        wall_s=wall,
        peak_rss_mb=_rss_mb(),
        extra={
            # this workload's own hit rate (the engine's counters run over its lifetime)
            "prefix_cache_hit_rate": round(_delta_rate(before, after), 3),
            "engine_overhead": round(1 - fwd_s / step_s, 3) if step_s else None,
            "preemptions": after["preemptions"] - before["preemptions"],
            "output_tokens": out_tokens,
            # Structured output: mask computation per step (on a worker thread during the forward pass)
            # and the part of it the step had to wait for after the forward.
            "mask_ms_per_step": _per_step(before, after, "mask_seconds"),
            "mask_wait_ms_per_step": _per_step(before, after, "mask_wait_seconds"),
        },
    )


def run_transformers(model_path: Path, workload: str, prompts, max_tokens: int, dtype: str,
                     batch_sizes: list[int], gguf_weights: str = "dense") -> Result:
    """HF transformers' generate with static, left-padded batches; the best batch size is reported.

    A .gguf file loads through transformers' GGUF reader. ``gguf_weights="dense"`` (the default) unpacks
    its weights into a plain model of ``dtype``, as transformers 5.23 loaded it for the reference
    figures the performance targets are stated against; from 5.24 transformers can instead keep the 4-bit blocks and run its own
    quantized matmuls ("packed"), a different, quantized engine that is reported as such."""
    import torch

    from forge_batch.bench_hf import load_transformers

    t_load = time.monotonic()
    tok, model, weights = load_transformers(model_path, dtype, gguf_weights)
    load_s = time.monotonic() - t_load
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    best: Result | None = None
    for bs in batch_sizes:
        t0 = time.monotonic()
        out_tokens = prompt_tokens = 0
        ttfts: list[float] = []
        with torch.inference_mode():
            for i in range(0, len(texts), bs):
                enc = tok(texts[i : i + bs], return_tensors="pt", padding=True, add_special_tokens=False)
                gen = model.generate(
                    **enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )
                out_tokens += (gen.shape[1] - enc["input_ids"].shape[1]) * gen.shape[0]
                prompt_tokens += int(enc["attention_mask"].sum())
                ttfts.extend([time.monotonic() - t0] * gen.shape[0])  # a static batch finishes together
        wall = time.monotonic() - t0
        r = Result("transformers", workload, out_tokens / wall, (out_tokens + prompt_tokens) / wall,
                   None, None, None, wall, _rss_mb(),
                   {"batch_size": bs, "dtype": dtype, "load_s": round(load_s, 2),
                    "weights": weights})
        if best is None or r.output_tok_s > best.output_tok_s:
            best = r
    assert best is not None
    return best


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def table(results: list[Result]) -> str:
    head = "| engine | workload | output tok/s | total tok/s | TTFT p50 s | TTFT p99 s | ITL p50 ms | wall s | peak RSS MB | notes |"
    lines = [head, "|" + "---|" * 10]
    for r in results:
        notes = ", ".join(f"{k}={v}" for k, v in r.extra.items() if v is not None)
        lines.append(
            f"| {r.engine} | {r.workload} | {r.output_tok_s:.1f} | {r.total_tok_s:.1f} | {_fmt(r.ttft_p50, '.2f')} | "
            f"{_fmt(r.ttft_p99, '.2f')} | {_fmt(r.itl_p50 and r.itl_p50 * 1000, '.1f')} | {r.wall_s:.1f} | "
            f"{r.peak_rss_mb:.0f} | {notes} |"
        )
    return "\n".join(lines)


REFERENCES = ("transformers", "vllm")
W2_NO_PREFIX_CACHING = "W2 (prefix caching off)"


def median_round(rounds: list[list[Result]], key: tuple[str, str]) -> Result:
    """The round whose output tok/s is the median for this (engine, workload); with several rounds its
    notes list every round's figure."""
    runs = sorted((r for results in rounds for r in results if (r.engine, r.workload) == key),
                  key=lambda r: r.output_tok_s)
    mid = runs[(len(runs) - 1) // 2]
    if len(rounds) > 1:
        every = [r for results in rounds for r in results if (r.engine, r.workload) == key]
        mid = Result(**{**asdict(mid), "extra": {**mid.extra, "rounds_tok_s": "/".join(f"{r.output_tok_s:.0f}" for r in every)}})
    return mid


def _ratio(rounds: list[list[Result]], num: tuple[str, str], den: tuple[str, str]) -> str | None:
    """num / den output tok/s per round (both taken in the same round): the value, or with several
    rounds the median and the range."""
    values = []
    for results in rounds:
        a = next((r for r in results if (r.engine, r.workload) == num), None)
        b = next((r for r in results if (r.engine, r.workload) == den), None)
        if a and b and b.output_tok_s > 0:
            values.append(a.output_tok_s / b.output_tok_s)
    if not values:
        return None
    values.sort()
    mid = values[(len(values) - 1) // 2]
    if len(values) == 1:
        return f"{mid:.2f}x"
    return f"{mid:.2f}x (median of {len(values)} rounds, {values[0]:.2f}-{values[-1]:.2f})"


def ratio_lines(rounds: list[list[Result]], workloads: list[str], dtype_name: str) -> list[str]:
    """The ratios the performance targets are stated in: ours against the reference per workload, and ours against ours (W2 and W3
    against W1, W2 against W2 without prefix caching)."""
    lines = []
    for reference in REFERENCES:
        for w in workloads:
            ref = next((r for results in rounds for r in results if (r.engine, r.workload) == (reference, w)), None)
            value = _ratio(rounds, ("forge-batch", w), (reference, w))
            if ref and value:
                lines.append(f"{w}: forge-batch / {reference} = {value} ({dtype_name} vs {ref.extra['dtype']})")
    ours = [("W2", "W1"), ("W2", W2_NO_PREFIX_CACHING), ("W3", "W1")]
    for num, den in ours:
        value = _ratio(rounds, ("forge-batch", num), ("forge-batch", den))
        if value:
            lines.append(f"forge-batch {num} / {den} = {value}")
    return lines


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except Exception:
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="forge-batch bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--workloads", default="W0,W1,W2,W3", help="comma-separated subset of W0,W1,W2,W3")
    ap.add_argument("--num-prompts", type=int, default=256, help="chats in W1-W3 (W0 is one stream)")
    ap.add_argument("--max-tokens", type=int, default=128,
                    help="output tokens per chat in W1-W3 (W0 is one stream of 256 tokens)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--against", choices=["transformers", "vllm"], default=None,
                    help="the reference engine run on the same work in the same rounds (docs/benchmarks.md)")
    ap.add_argument("--vllm-python", default=os.environ.get("FORGE_BATCH_VLLM_PYTHON"), metavar="PATH",
                    help="for --against vllm: the python of an environment with vLLM's CPU build "
                         "(default $FORGE_BATCH_VLLM_PYTHON)")
    ap.add_argument("--vllm-max-num-seqs", type=int, default=256, help="vLLM's max_num_seqs (ours: the engine's)")
    ap.add_argument("--hf-batch-sizes", default="64", help="static batch sizes to try for transformers")
    ap.add_argument("--hf-dtype", choices=["same", "float32", "bfloat16"], default="same",
                    help="the reference's dtype (transformers or vLLM): 'same' as ours (default), or e.g. "
                         "bfloat16 for the targets' reference on a CPU where our default is float32")
    ap.add_argument("--hf-gguf-weights", choices=["dense", "packed"], default="dense",
                    help="a GGUF model in transformers: unpacked into dense weights of --hf-dtype (default; the "
                         "targets' reference) or, on transformers >= 5.24, kept in its quantized blocks")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="run every engine and workload N times, interleaved, and report each one's median round "
                         "and the median of each round's ratios (the machine drifts over a long run)")
    ap.add_argument("--no-prefix-caching-baseline", action="store_true",
                    help="skip the W2 run with prefix caching off")
    ap.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="extra LLM keyword argument (JSON value), repeatable")
    ap.add_argument("--append-to", type=Path, default=None, help="append the table to this BENCHMARKS.md")
    ap.add_argument("--json", type=Path, default=None, help="also write results as JSON here")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.against == "vllm" and not args.vllm_python:
        ap.error("--against vllm needs --vllm-python PATH (or FORGE_BATCH_VLLM_PYTHON): vLLM runs from its own "
                 "environment, see docs/benchmarks.md")
    for name in ("num_prompts", "max_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("json", "append_to"):  # found out before the workloads run, not after
        path = getattr(args, name)
        if path is not None and not path.parent.is_dir():
            ap.error(f"--{name.replace('_', '-')}: {path.parent} is not a folder")
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown or not workloads:
        ap.error(f"--workloads takes a comma-separated subset of {','.join(WORKLOADS)}, got {args.workloads!r}")
    try:
        if any(int(x) < 1 for x in args.hf_batch_sizes.split(",")):
            raise ValueError
    except ValueError:
        ap.error(f"--hf-batch-sizes takes comma-separated batch sizes (ints >= 1), got {args.hf_batch_sizes!r}")
    engine_kwargs: dict[str, Any] = {}
    for kv in args.engine_arg:
        k, eq, v = kv.partition("=")
        if not eq or not k:
            ap.error(f"--engine-arg takes KEY=VALUE, got {kv!r}")
        try:
            engine_kwargs[k] = json.loads(v)
        except json.JSONDecodeError:
            engine_kwargs[k] = v

    from forge_batch import LLM, SamplingParams

    kernels_s = prepare_cpu_kernels(args.device)
    t0 = time.monotonic()
    try:
        llm: Any = LLM(args.model, device=args.device, dtype=args.dtype, **engine_kwargs)
    except (TypeError, ValueError) as e:  # an --engine-arg the engine does not take, or a bad value
        ap.error(f"the engine refused its options: {e}")
    first = llm.generate(["Hello"], SamplingParams(max_tokens=1, temperature=0.0))[0]
    load_to_first = time.monotonic() - t0
    assert first.error is None, first.error
    dtype_name = str(llm.dtype).replace("torch.", "")
    compiled = f"; CPU kernels compiled first, in {kernels_s:.1f} s" if kernels_s >= KERNELS_COMPILED_S else ""
    print(f"model {args.model}: load {llm.load_seconds:.2f}s, load to first token {load_to_first:.2f}s, "
          f"device {llm.device}, dtype {dtype_name}{compiled}", file=sys.stderr)

    # The rounds drop and rebuild engines to free their KV caches: main must not keep a reference.
    loaded = [llm]
    del llm
    rounds = _run_rounds(args, loaded, engine_kwargs, workloads, dtype_name)
    results = [median_round(rounds, key) for key in dict.fromkeys((r.engine, r.workload) for r in rounds[0])]
    out = table(results)
    ratios = ratio_lines(rounds, workloads, dtype_name)
    header = (
        f"### {date.today().isoformat()} · commit {_git_commit()} · {platform.machine()} "
        f"{platform.processor() or ''} · {llm_device_desc(args.device)}\n\n"
        f"`forge-batch bench {' '.join(argv if argv is not None else sys.argv[1:])}` "
        f"(model {args.model}, dtype {dtype_name}, load to first token {load_to_first:.2f} s{compiled})\n"
    )
    report = header + "\n" + out + ("\n\n" + "\n".join(f"- {r}" for r in ratios) if ratios else "") + "\n"
    print(report)
    if args.append_to:
        with args.append_to.open("a") as f:
            f.write("\n" + report)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


def _run_rounds(
    args: argparse.Namespace, loaded: list[Any], engine_kwargs: dict[str, Any], workloads: list[str], dtype_name: str
) -> list[list[Result]]:
    """Every engine and workload once per round, in the same order, so that the machine's drift over a
    long run (+-40% on a shared 2-core VM) lands on both sides of each ratio alike. ``loaded`` holds the
    engine already loaded; it is taken out of the list so that this function holds the only reference."""
    from forge_batch import LLM

    llm: Any = loaded.pop()

    w1_prompts = chat_prompts(args.num_prompts)
    plan = {
        "W0": ("W0", chat_prompts(1), 256, None),
        "W1": ("W1", w1_prompts, args.max_tokens, None),
        "W2": ("W2", chat_prompts(args.num_prompts, SYSTEM_PROMPT), args.max_tokens, None),
        "W3": ("W3", w1_prompts, args.max_tokens, {"json_schema": BENCH_SCHEMA}),
    }
    hf_dtype = args.hf_dtype
    if hf_dtype == "same":
        hf_dtype = dtype_name if dtype_name in ("bfloat16", "float32") else "float32"
    hf_sizes = [int(x) for x in args.hf_batch_sizes.split(",")]
    rounds: list[list[Result]] = []
    for rnd in range(args.repeat):
        if args.repeat > 1:
            print(f"round {rnd + 1} of {args.repeat}", file=sys.stderr)
        results: list[Result] = []
        if llm is None:
            llm = LLM(args.model, device=args.device, dtype=args.dtype, **engine_kwargs)
        for w in workloads:
            name, prompts, max_tokens, constraint = plan[w]
            print(f"running {name} on forge-batch ...", file=sys.stderr)
            try:
                results.append(run_ours(llm, name, prompts, max_tokens, constraint))
            except Exception as exc:  # a workload that cannot run is reported and skipped, not fatal
                print(f"  {name} failed: {exc}", file=sys.stderr)
                continue
            if w == "W2" and not args.no_prefix_caching_baseline:
                del llm
                gc.collect()
                off = LLM(args.model, device=args.device, dtype=args.dtype,
                          **{**engine_kwargs, "enable_prefix_caching": False})
                results.append(run_ours(off, W2_NO_PREFIX_CACHING, prompts, max_tokens))
                del off
                gc.collect()
                llm = LLM(args.model, device=args.device, dtype=args.dtype, **engine_kwargs)
        if args.against:
            llm = None  # its KV cache: free the memory for the reference
            gc.collect()
            results.extend(_run_reference(args, plan, workloads, hf_dtype, hf_sizes))
        rounds.append(results)
    return rounds


def _run_reference(args: argparse.Namespace, plan: dict[str, tuple], workloads: list[str], dtype: str,
                   hf_sizes: list[int]) -> list[Result]:
    """One round of the reference engine on the same workloads (W3 is ours only: neither reference is
    given the JSON schema)."""
    from forge_batch.models.registry import resolve_model_path

    model_path = resolve_model_path(args.model)
    runnable = [w for w in workloads if w != "W3"]
    if args.against == "transformers":
        results = []
        for w in runnable:
            name, prompts, max_tokens, _ = plan[w]
            print(f"running {name} on transformers ...", file=sys.stderr)
            results.append(run_transformers(model_path, name, prompts, max_tokens, dtype,
                                            [1] if w == "W0" else hf_sizes, args.hf_gguf_weights))
        return results
    from forge_batch.bench_vllm import hf_checkpoint, run_vllm

    checkpoint = hf_checkpoint(model_path, dtype)
    jobs = [{"workload": plan[w][0], "prompts": plan[w][1], "max_tokens": plan[w][2]} for w in runnable]
    print(f"running {', '.join(runnable)} on vLLM ({args.vllm_python}) ...", file=sys.stderr)
    return [
        Result("vllm", r["workload"], r["output_tokens"] / r["wall_s"],
               (r["output_tokens"] + r["prompt_tokens"]) / r["wall_s"], r["ttft_p50"], r["ttft_p99"], None,
               r["wall_s"], r["peak_rss_mb"], {"dtype": dtype, "load_to_first_s": round(r["load_to_first_s"], 2)})
        for r in run_vllm(args.vllm_python, checkpoint, dtype, jobs, max_num_seqs=args.vllm_max_num_seqs)
    ]


# Above this, prepare_cpu_kernels compiled (loading a compiled library takes milliseconds).
KERNELS_COMPILED_S = 0.5


def prepare_cpu_kernels(device: str) -> float:
    """Compile (or load) the CPU kernels before the load is timed, and return the seconds that took.

    A first run on a machine, or of a new kernel version, compiles them once (4-5 s on 2 cores, and the
    compilers slow the weights' load they overlap): a per-machine install step, not the engine's load, so
    the bench reports it beside "load to first token" instead of inside it. 0.0 off the CPU."""
    import torch

    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return 0.0
    from forge_batch.kernels.cpu import build

    t0 = time.monotonic()
    build.available()
    return time.monotonic() - t0


def llm_device_desc(device: str) -> str:
    import os

    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU x{os.cpu_count()}, torch {torch.__version__}"


if __name__ == "__main__":
    raise SystemExit(main())
