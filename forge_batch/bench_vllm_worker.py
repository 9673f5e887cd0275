"""Runs the bench workloads on vLLM inside vLLM's own Python environment.

vLLM's CPU build pins its own torch and transformers, so it cannot be imported next to forge-batch:
`forge-batch bench --against vllm --vllm-python PATH` runs this file with that interpreter. It imports
nothing from forge-batch; it reads a plan (JSON) and writes one result per workload (JSON).

    PATH/python bench_vllm_worker.py PLAN.json RESULTS.json
"""

from __future__ import annotations

import json
import sys
import time


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def _first_token_times(outputs, started: float) -> list[float]:
    """Per-request time to first token where vLLM records it (its v1 metrics carry the first-token
    timestamp); empty when this vLLM keeps no per-request metrics."""
    ttfts = []
    for o in outputs:
        metrics = getattr(o, "metrics", None)
        first = getattr(metrics, "first_token_ts", None) or getattr(metrics, "first_token_time", None)
        if first:
            ttfts.append(max(0.0, first - started))
    return ttfts


def main(plan_path: str, results_path: str) -> int:
    plan = json.loads(open(plan_path).read())
    t0 = time.monotonic()
    from vllm import LLM, SamplingParams

    llm = LLM(model=plan["model"], dtype=plan["dtype"], max_model_len=plan["max_model_len"],
              max_num_seqs=plan["max_num_seqs"], seed=0)
    llm.chat([[{"role": "user", "content": "Hello"}]], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    load_to_first = time.monotonic() - t0
    results = []
    for job in plan["workloads"]:
        params = SamplingParams(max_tokens=job["max_tokens"], min_tokens=job["max_tokens"], temperature=0.0,
                                ignore_eos=True)
        started_wall = time.time()
        started = time.monotonic()
        outputs = llm.chat(job["prompts"], params, use_tqdm=False)
        wall = time.monotonic() - started
        out_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        prompt_tokens = sum(len(o.prompt_token_ids or []) for o in outputs)
        ttfts = _first_token_times(outputs, started_wall)
        results.append({
            "workload": job["workload"], "output_tokens": out_tokens, "prompt_tokens": prompt_tokens,
            "wall_s": wall, "ttft_p50": _pct(ttfts, 0.5), "ttft_p99": _pct(ttfts, 0.99),
            "load_to_first_s": load_to_first,
        })
        print(f"vllm {job['workload']}: {out_tokens / wall:.1f} output tok/s", file=sys.stderr, flush=True)
    with open(results_path, "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which re-imports this file
    raise SystemExit(main(sys.argv[1], sys.argv[2]))
