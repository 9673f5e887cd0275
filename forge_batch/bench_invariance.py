"""Batch invariance on a device, bit for bit, and its cost: a random-weight model with ``batch_invariant`` on
gives each prompt the same token ids and the same logits bits at every position alone as among all the
others (CUDA graphs, prefix cache on: half the prompts share a prefix) and in chunked steps of a few
sequences, sampled with a seed per prompt (``--temperature 0``: greedy); then the whole batch is timed
with ``batch_invariant`` on and off.

    python -m forge_batch.bench_invariance [--device cuda] [--shape smollm2-135m] [--dtype bfloat16]
        [--num-prompts 64] [--alone 8] [--max-tokens 32] [--temperature 0.8] [--json PATH]

Weights are random with std 0.02 (load_format="dummy"): flat next-token distributions, where a last-bit
difference in a row's logits soon changes a token. Prints one JSON object (also written to --json); exits 1
when a row differs or the engine does not say it is batch-invariant, else 0. Without a CUDA device it says
so and exits 0; ``--device cpu --shape tiny`` checks the script on the CPU.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from forge_batch.bench_gpu import SHAPES, sync

SMOLLM2_135M = dict(
    architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
    max_position_embeddings=8192, tie_word_embeddings=True, eos_token_ids=[2],
)
INVARIANCE_SHAPES = {"smollm2-135m": SMOLLM2_135M, **SHAPES}
SHARED_PREFIX = 48  # tokens the even-numbered prompts start with (prefix-cache hits inside the batch)


def make_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """n prompts of 8-200 random token ids; the even-numbered ones share their first SHARED_PREFIX tokens."""
    import torch

    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, vocab, (SHARED_PREFIX,), generator=g).tolist()
    out = []
    for i in range(n):
        length = int(torch.randint(8, 201, (1,), generator=g))
        tail = torch.randint(3, vocab, (length,), generator=g).tolist()
        out.append(shared + tail if i % 2 == 0 else tail)
    return out


def rows(llm: Any, work: list[list[int]], max_tokens: int, digests: bool, temperature: float = 0.0,
         first: int = 0) -> list[tuple[list[int], list[str]]]:
    """Per prompt (EOS ignored; sampled with seed 1000 + its index ``first`` + i in the whole list): its token
    ids and, with ``digests``, a digest of its logits' bits at each generated position."""
    from forge_batch import SamplingParams

    seen: list[list[str]] = [[] for _ in work]

    def recorder(i: int):
        def record(_output_ids: list[int], logits: Any) -> Any:
            seen[i].append(hashlib.blake2b(logits.float().cpu().numpy().tobytes(), digest_size=8).hexdigest())
            return logits
        return record

    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, ignore_eos=True,
                             seed=None if temperature == 0 else 1000 + first + i,
                             logits_processors=[recorder(i)] if digests else []) for i in range(len(work))]
    outs = llm.generate([{"prompt_token_ids": p} for p in work], params)
    return [(list(o.outputs[0].token_ids), d) for o, d in zip(outs, seen)]


def engine(cfg: dict, device: str, dtype: str, batch_invariant: bool, **options: Any) -> Any:
    from forge_batch import LLM
    from forge_batch.models.config import ModelConfig

    options = {"max_num_seqs": 256, "max_num_batched_tokens": 8192, "max_model_len": 1024, **options}
    return LLM(ModelConfig(**cfg), load_format="dummy", device=device, dtype=dtype,
               batch_invariant=batch_invariant, **options)


def release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def timed(llm: Any, work: list[list[int]], max_tokens: int, device: str, temperature: float) -> float:
    """Seconds for the whole batch (after one untimed run of it: compiles and graph buckets warm)."""
    rows(llm, work, max_tokens, False, temperature)
    sync(device)
    t = time.perf_counter()
    rows(llm, work, max_tokens, False, temperature)
    sync(device)
    return time.perf_counter() - t


def differing(alone: list[tuple[list[int], list[str]]], other: list[tuple[list[int], list[str]]]) -> dict[str, int]:
    """How many rows of ``other`` differ from ``alone`` in their token ids and in their logits' bits."""
    return {"tokens": sum(a[0] != b[0] for a, b in zip(alone, other)),
            "logits": sum(a[1] != b[1] for a, b in zip(alone, other))}


def check(args: argparse.Namespace) -> dict[str, Any]:
    """The figures: engine identity, rows that differ per arrangement, and the cost of invariance."""
    cfg = INVARIANCE_SHAPES[args.shape]
    work = make_prompts(args.num_prompts, cfg["vocab_size"])
    res: dict[str, Any] = {"shape": args.shape, "dtype": args.dtype, "prompts": len(work), "alone": args.alone,
                           "max_tokens": args.max_tokens, "temperature": args.temperature}
    temp = args.temperature
    llm = engine(cfg, args.device, args.dtype, True)
    res["engine"] = {k: llm.engine_info[k] for k in ("device", "dtype", "kernel_path", "batch_invariant")}
    res["cuda_graphs"] = llm.runner.decode_graphs is not None
    alone = [r for i, p in enumerate(work[: args.alone]) for r in rows(llm, [p], args.max_tokens, True, temp, i)]
    res["differ_in_batch"] = differing(alone, rows(llm, work, args.max_tokens, True, temp)[: args.alone])
    res["prefix_hits"] = llm.block_manager.prefix_hits
    on = timed(llm, work, args.max_tokens, args.device, temp)
    res["triton_fallback"] = llm.model.kernels.triton_disabled_reason()
    del llm
    release(args.device)
    chunked = engine(cfg, args.device, args.dtype, True, max_num_seqs=4, max_num_batched_tokens=64)
    res["differ_chunked_4_seqs"] = differing(alone, rows(chunked, work[: args.alone], args.max_tokens, True, temp))
    del chunked
    release(args.device)
    off_engine = engine(cfg, args.device, args.dtype, False)
    off = timed(off_engine, work, args.max_tokens, args.device, temp)
    del off_engine
    release(args.device)
    tokens = len(work) * args.max_tokens
    res["tok_s"] = {"batch_invariant": tokens / on, "not_invariant": tokens / off}
    res["invariant_over_not_time"] = on / off
    res["ok"] = bool(res["engine"]["batch_invariant"]) and not any(
        res[k][kind] for k in ("differ_in_batch", "differ_chunked_4_seqs") for kind in ("tokens", "logits"))
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m forge_batch.bench_invariance", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", choices=sorted(INVARIANCE_SHAPES), default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--alone", type=int, default=8, help="prompts also run one at a time (the reference)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        res: dict[str, Any] = {"status": "no CUDA device", "ok": True}
        print("no CUDA device: batch invariance stays unchecked on this machine", file=sys.stderr)
    else:
        res = {"status": "done", **check(args)}
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    from forge_batch.checkout_path import drop_checkout_root

    drop_checkout_root()  # before anything imports transformers
    raise SystemExit(main())
