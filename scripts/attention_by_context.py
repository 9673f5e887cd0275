"""Where a whole bench workload's decode attention time goes: every call of the CPU attention kernel in one
W1 and one W2 run (the bench's 256 chats x 128 tokens, greedy, EOS ignored) timed, grouped by step kind
(prefill rows or decode) and the batch's mean context (in hundreds of tokens), beside the run's wall time.

    python scripts/attention_by_context.py            # W1 then W2
    python scripts/attention_by_context.py W2 --max-tokens 64

The matmuls cost W1 and W2 the same; this shows how much more attention W2's shared prefix costs and in
which steps. Timers wrap each call (synchronous on the CPU).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

from forge_batch import LLM, SamplingParams
from forge_batch.bench import SYSTEM_PROMPT, chat_prompts
from forge_batch.kernels.cpu import attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workloads", nargs="*", default=["W1", "W2"], help="W1 and/or W2")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    if not set(args.workloads) <= {"W1", "W2"}:
        ap.error(f"workloads are W1 and W2, not {' '.join(args.workloads)}")

    calls: dict[tuple[str, int], list[float]] = defaultdict(lambda: [0, 0.0])
    kernel = attention.paged_decode_attention

    def timed(q, k_cache, v_cache, block_tables, context_lens, scale, cascade=True):  # noqa: ANN001, ANN202
        t0 = time.perf_counter()
        out = kernel(q, k_cache, v_cache, block_tables, context_lens, scale, cascade)
        # prefill rows come as one decode row per token (paged_attention_per_row, cascade off)
        kind = "prefill" if not cascade and q.shape[0] > args.num_prompts else "decode"
        entry = calls[(kind, int(context_lens.float().mean()) // 100 * 100)]
        entry[0] += 1
        entry[1] += time.perf_counter() - t0
        return out

    attention.paged_decode_attention = timed  # paged_attention_per_row looks it up in the module
    llm = LLM("smollm2-135m-instruct")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(chat_prompts(4), SamplingParams(max_tokens=4))  # warm-up: the kernels' first calls
    print(f"| workload | wall s | attention s | step kind | mean context | calls | s | ms a call |\n|{'---|' * 8}")
    for name in args.workloads:
        prompts = chat_prompts(args.num_prompts, SYSTEM_PROMPT if name == "W2" else None)
        llm.reset_prefix_cache()
        calls.clear()
        t0 = time.monotonic()
        llm.generate(prompts, params)
        wall = time.monotonic() - t0
        total = sum(s for _, s in calls.values())
        for (kind, ctx), (n, s) in sorted(calls.items()):
            print(f"| {name} | {wall:.2f} | {total:.2f} | {kind} | {ctx}-{ctx + 99} | {n} | {s:.3f} | {1000 * s / n:.3f} |")


if __name__ == "__main__":
    main()
