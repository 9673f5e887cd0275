"""What logprobs cost: the same greedy batch with logprobs off, ``logprobs=5``, and ``logprobs=5,
prompt_logprobs=5``, in interleaved rounds on one engine (tokens are identical; only the time differs).
Both wall time and the process's CPU time are reported: on a shared machine the CPU time is the steadier.

    python scripts/bench_logprobs.py [--model smollm2-135m-instruct] [--prompts 64] [--max-tokens 64] [--rounds 3]
    python scripts/bench_logprobs.py --micro    # the added work alone against an engine step (best of many)

``--micro`` times what logprobs add (the log-softmax and top-k of a decode step's rows; a prompt chunk's LM
head, log-softmax and top-k) against the fastest decode step and prefill step of the same engine: best-of
times, which a busy machine disturbs least.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from forge_batch import LLM, SamplingParams
from forge_batch.engine.request import GenerationRequest
from forge_batch.engine.sampler import position_logprobs


def best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@torch.inference_mode()
def micro(llm: LLM, rows: int, max_tokens: int, chunk: int = 256) -> None:
    """Best-of times: an engine's decode and prefill steps, and what logprobs add to them."""
    engine = llm.engine
    tok = llm.get_tokenizer()
    ids = tok.encode("Write a short note about the topic of batch generation, in detail. " * 12)[:chunk]
    decode: list[float] = []
    prefill: list[tuple[float, int]] = []
    for rep in range(3):
        for i in range(rows):
            engine.add_request(GenerationRequest(f"{rep}-{i}", prompt_token_ids=[*ids[:-1], 100 + i],
                                                 params=SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                       ignore_eos=True)))
        first = True
        while engine.has_unfinished():
            t0 = time.perf_counter()
            engine.step()
            (prefill.append((time.perf_counter() - t0, rows * len(ids))) if first
             else decode.append(time.perf_counter() - t0))
            first = False
        llm.reset_prefix_cache()
    step = min(decode)
    prefill_per_token = min(t / n for t, n in prefill)
    vocab = engine.model_config.vocab_size
    logits = torch.randn(rows, vocab)
    chosen = torch.randint(0, vocab, (rows,))
    sample_cost = best_of(lambda: position_logprobs(logits[list(range(rows))].log_softmax(dim=-1), chosen,
                                                    [5] * rows), 30)
    hidden = torch.randn(chunk, engine.model_config.hidden_size, dtype=llm.dtype)
    chosen_p = torch.randint(0, vocab, (chunk,))
    prompt_cost = best_of(lambda: position_logprobs(engine.model.compute_logits(hidden).log_softmax(dim=-1),
                                                    chosen_p, [5] * chunk), 10) / chunk
    print(f"{llm.engine_config.describe()}")
    print("| what (best of many) | time | per |")
    print("|---|---|---|")
    print(f"| decode step, {rows} rows | {step * 1e3:.2f} ms | |")
    print(f"| logprobs=5 for those rows (log-softmax + top-k) | {sample_cost * 1e3:.2f} ms | "
          f"{sample_cost / step:.1%} of the step |")
    print(f"| prefill, per prompt token ({rows} x {len(ids)} tokens in one step) | {prefill_per_token * 1e6:.1f} us | |")
    print(f"| prompt_logprobs=5, per prompt token (LM head + log-softmax + top-k, {chunk} rows at once) | "
          f"{prompt_cost * 1e6:.1f} us | {prompt_cost / prefill_per_token:.1%} of its prefill |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--micro", action="store_true", help="time the added work alone (see the module docstring)")
    args = ap.parse_args()

    llm = LLM(args.model, device=args.device, max_num_seqs=args.prompts, max_num_batched_tokens=8192)
    if args.micro:
        micro(llm, args.prompts, args.max_tokens)
        return
    chats = [[{"role": "user", "content": f"Write a short note about topic number {i}."}] for i in range(args.prompts)]
    base = dict(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    variants = {
        "off": SamplingParams(**base),
        "logprobs=5": SamplingParams(**base, logprobs=5),
        "logprobs=5 + prompt_logprobs=5": SamplingParams(**base, logprobs=5, prompt_logprobs=5),
    }
    llm.generate(chats[:4], variants["off"])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(args.rounds):
        for name, params in variants.items():
            llm.reset_prefix_cache()
            t0, c0 = time.perf_counter(), time.process_time()
            outs = llm.generate(chats, params)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            tokens[name] = [o.token_ids for o in outs]
            print(f"  {name}: {times[name][-1]:.2f} s wall, {cpu[name][-1]:.2f} s CPU", flush=True)
    assert all(t == tokens["off"] for t in tokens.values()), "logprobs changed the tokens"
    n_out = args.prompts * args.max_tokens
    off, off_cpu = statistics.median(times["off"]), statistics.median(cpu["off"])
    print(f"{llm.engine_config.describe()}")
    print(f"{args.prompts} prompts x {args.max_tokens} tokens, {args.rounds} interleaved rounds (median, range)")
    print("| variant | wall tok/s | wall vs off | CPU s | CPU vs off |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        med, med_cpu = statistics.median(ts), statistics.median(cpu[name])
        print(f"| {name} | {n_out / med:.0f} ({n_out / max(ts):.0f}-{n_out / min(ts):.0f}) | {med / off:.3f}x "
              f"| {med_cpu:.1f} ({min(cpu[name]):.1f}-{max(cpu[name]):.1f}) | {med_cpu / off_cpu:.3f}x |")


if __name__ == "__main__":
    main()
