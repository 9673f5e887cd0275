"""GPU benchmark (issue 5): 256 prompts x 128 output tokens on a random-weight model of Llama-3.1-8B's shape
in bfloat16, forge-batch against transformers' ``generate`` (static batches) and, when present, its
continuous-batching ``generate_batch``, on the same GPU in the same run; plus the fraction of HBM bandwidth
achieved in decode (bytes a decode step must read, weights + KV, over the step's time).

    python -m forge_batch.bench_gpu [--num-prompts 256] [--max-tokens 128] [--append-to BENCHMARKS.md]

Needs a CUDA device; elsewhere it says so and exits 0 (nothing to measure).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from datetime import date

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


def peak_bandwidth(name: str) -> float | None:
    for key, bw in PEAK_BW.items():
        if key in name:
            return bw
    return None


def prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(32, 257, (n,), generator=g).tolist()
    return [torch.randint(1000, vocab - 1000, (length,), generator=g).tolist() for length in lengths]


def run_ours(work: list[list[int]], max_tokens: int, max_num_seqs: int) -> dict:
    import torch

    from forge_batch import LLM, SamplingParams
    from forge_batch.engine.request import GenerationRequest
    from forge_batch.models.config import ModelConfig

    t0 = time.monotonic()
    llm = LLM(ModelConfig(**LLAMA_31_8B), load_format="dummy", device="cuda", dtype="bfloat16",
              max_num_seqs=max_num_seqs, max_num_batched_tokens=8192)
    load = time.monotonic() - t0
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    def go(llm, items):
        reqs = [GenerationRequest(str(i), prompt_token_ids=p, params=params) for i, p in enumerate(items)]
        torch.cuda.synchronize()
        t = time.monotonic()
        outs = list(llm.generate_stream(reqs, max_in_flight=len(reqs)))
        torch.cuda.synchronize()
        return outs, time.monotonic() - t

    go(llm, work[:8])  # warm-up (Triton autotune/compile outside the timed run)
    outs, wall = go(llm, work)
    tokens = sum(len(o.token_ids) for o in outs)
    # Decode-only step time at batch 1 and at the full batch, for the bandwidth fraction.
    decode = {}
    for bs in (1, min(max_num_seqs, len(work))):
        before = llm.stats()
        go(llm, [p[:128] for p in work[:bs]])
        after = llm.stats()
        steps = after["steps"] - before["steps"]
        decode[bs] = (after["forward_seconds"] - before["forward_seconds"]) / max(steps, 1)
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.model.parameters())
    kv_per_token = 2 * 32 * 8 * 128 * 2
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return {"tok_s": tokens / wall, "wall": wall, "load": load, "decode_step": decode,
            "weight_bytes": weight_bytes, "kv_per_token": kv_per_token}


def run_transformers(work: list[list[int]], max_tokens: int, batch_sizes: list[int]) -> dict:
    import torch
    import transformers

    cfg = dict(LLAMA_31_8B)
    config = transformers.LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"], rope_theta=cfg["rope_theta"],
        rope_scaling=cfg["rope_scaling"], max_position_embeddings=cfg["max_position_embeddings"],
        pad_token_id=0, eos_token_id=None, bos_token_id=None,
    )
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    results = {}
    for bs in batch_sizes:
        t = time.monotonic()
        tokens = 0
        with torch.inference_mode():
            for i in range(0, len(work), bs):
                batch = work[i : i + bs]
                width = max(len(p) for p in batch)
                ids = torch.zeros(len(batch), width, dtype=torch.long, device="cuda")
                mask = torch.zeros_like(ids)
                for j, p in enumerate(batch):  # left padding
                    ids[j, width - len(p):] = torch.tensor(p)
                    mask[j, width - len(p):] = 1
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                     min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
                tokens += (out.shape[1] - width) * out.shape[0]
        torch.cuda.synchronize()
        results[f"generate bs={bs}"] = tokens / (time.monotonic() - t)
    if hasattr(model, "generate_batch"):  # transformers' continuous batching, where this version has it
        try:
            gen_cfg = transformers.GenerationConfig(max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                                    do_sample=False, eos_token_id=None, pad_token_id=0)
            t = time.monotonic()
            out = model.generate_batch(inputs=work, generation_config=gen_cfg)
            torch.cuda.synchronize()
            tokens = sum(len(r.generated_tokens) for r in out.values())
            results["generate_batch (continuous)"] = tokens / (time.monotonic() - t)
        except Exception as exc:  # an API that moved between versions: report, don't fail the run
            print(f"transformers generate_batch failed: {exc}", file=sys.stderr)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m forge_batch.bench_gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--hf-batch-sizes", default="64,256")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--append-to", default=None)
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: the GPU figures stay unmeasured on this machine", file=sys.stderr)
        return 0
    name = torch.cuda.get_device_name(0)
    work = prompts(args.num_prompts, LLAMA_31_8B["vocab_size"])
    ours = run_ours(work, args.max_tokens, args.max_num_seqs)
    theirs = {} if args.skip_transformers else run_transformers(
        work, args.max_tokens, [int(x) for x in args.hf_batch_sizes.split(",")])
    peak = peak_bandwidth(name)
    lines = [f"### {date.today().isoformat()} · {name} · torch {torch.__version__}", "",
             f"`python -m forge_batch.bench_gpu {' '.join(argv if argv is not None else sys.argv[1:])}` — "
             f"random-weight Llama-3.1-8B shape, bf16, {args.num_prompts} prompts (32-256 tokens) x "
             f"{args.max_tokens} output tokens", "",
             "| engine | output tok/s | ratio |", "|---|---|---|",
             f"| forge-batch (Triton kernels, CUDA graphs) | {ours['tok_s']:.0f} | 1.00 |"]
    for k, v in theirs.items():
        lines.append(f"| transformers {k} | {v:.0f} | {ours['tok_s'] / v:.2f}x |")
    lines += ["", "| decode batch | step ms | bytes read per step | achieved bandwidth | fraction of peak |",
              "|---|---|---|---|---|"]
    for bs, step in ours["decode_step"].items():
        ctx = 128 + 64  # prompts cut to 128 tokens, half the 128 outputs on average
        nbytes = ours["weight_bytes"] + bs * ctx * ours["kv_per_token"]
        bw = nbytes / step
        frac = f"{bw / peak:.0%}" if peak else "unknown peak"
        lines.append(f"| {bs} | {step * 1000:.2f} | {nbytes / 1e9:.1f} GB | {bw / 1e12:.2f} TB/s | {frac} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.append_to:
        with open(args.append_to, "a") as f:
            f.write("\n" + report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
