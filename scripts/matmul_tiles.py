"""Time the batch-invariant matmul's candidate tiles on this GPU, at Llama-3.1-8B's shapes, against cuBLAS.

    python scripts/matmul_tiles.py --out DIR [--then-bench] [--then-pytest]

Every candidate is checked first: a row's bits must be the same at 1, 7, 256 and 2048 rows (what the tile
promises; a tile that lowers to another instruction at some row count would break it). Each is then timed
(triton.testing.do_bench, median) at 1, 64, 256 and 2048 rows on the model's five products, and the
sum a decode step makes of them (32 layers' four products and the LM head) is reported beside cuBLAS's
(``F.linear``, free to pick its algorithm per shape, so not batch-invariant).

The fastest invariant tile at 256 rows (the bench's decode batch) is then set for bfloat16 and float16 in
this process and, with ``--then-bench``, ``forge_batch.bench_gpu`` runs with it (batch-invariant, then off
for cuBLAS's figure); with ``--then-pytest`` the GPU tests of the matmul, the engine and CUDA graphs run
with it. DIR receives tiles.json, bench_best.json, bench_off.json and profile_best.txt; the log is stdout.
Needs a CUDA device; it is not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# (out, in) of Llama-3.1-8B's products: fused QKV, attention output, fused gate|up, down, LM head
SHAPES = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096),
          "down_proj": (4096, 14336), "lm_head": (128256, 4096)}
LAYERS = 32
DEVICE = "cuda"
ROWS = (1, 64, 256, 2048)
INVARIANCE_ROWS = (1, 7, 256)
# (block_m, block_n, block_k, num_warps, num_stages): each fits sm_90's shared memory in bfloat16
# (compiled for sm_90 on a CPU first). The first sixteen are the first sweep (64 x 64 x 64, 4 warps, 3 stages
# was the shipped tile then), the rest its refinements around the winner; BENCHMARKS.md has both.
CANDIDATES = [
    (64, 64, 64, 4, 3), (64, 64, 64, 4, 5), (64, 128, 64, 4, 3), (64, 128, 64, 4, 4), (64, 128, 128, 4, 3),
    (64, 128, 64, 8, 4), (64, 256, 64, 8, 3), (64, 256, 64, 4, 3), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4),
    (128, 128, 64, 4, 3), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3), (64, 32, 128, 4, 4), (128, 64, 64, 4, 4),
    (64, 64, 128, 4, 4),
    (64, 128, 64, 8, 5), (64, 128, 64, 4, 5), (64, 128, 128, 8, 3), (64, 128, 128, 8, 4), (64, 256, 64, 8, 4),
    (128, 128, 64, 8, 5), (128, 256, 64, 8, 4), (64, 64, 128, 8, 4), (64, 128, 64, 8, 6),
]


def step_ms(times: dict[str, float]) -> float:
    """A decode or prefill step's matmul time: every layer's four products, then the LM head."""
    return LAYERS * sum(t for name, t in times.items() if name != "lm_head") + times["lm_head"]


def bench(fn) -> float:
    """Median milliseconds of ``fn`` on the GPU."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=25, return_mode="median")


def sweep(candidates: list[tuple[int, ...]], deadline_s: float) -> dict:
    from forge_batch.kernels import triton_ops as T

    gen = torch.Generator(device=DEVICE).manual_seed(0)
    weights = {name: (torch.randn(n, k, device=DEVICE, generator=gen) * 0.02).to(torch.bfloat16)
               for name, (n, k) in SHAPES.items()}
    inputs = {k: torch.randn(max(ROWS), k, device=DEVICE, generator=gen).to(torch.bfloat16)
              for k in {k for _, k in SHAPES.values()}}

    cublas = {m: {name: bench(lambda w=w, x=inputs[w.shape[1]][:m]: F.linear(x, w)) for name, w in weights.items()}
              for m in ROWS}
    out = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE,
           "cublas": {m: {"by_shape_ms": t, "step_ms": step_ms(t)} for m, t in cublas.items()}, "tiles": []}
    t0 = time.monotonic()
    shipped = T.MATMUL_TILES[torch.bfloat16]
    for cand in candidates:
        if time.monotonic() - t0 > deadline_s:
            print(f"out of time for {cand} and after", flush=True)
            break
        tile = T.MatmulTile(*cand)
        T.MATMUL_TILES[torch.bfloat16] = tile
        row: dict = {"tile": cand}
        try:
            invariant = True
            for name in ("o_proj", "down_proj", "lm_head"):
                w = weights[name]
                x = inputs[w.shape[1]]
                full = T.matmul(x[:2048], w)
                invariant &= all(torch.equal(T.matmul(x[:m], w), full[:m]) for m in INVARIANCE_ROWS)
            w = weights["o_proj"]
            x = inputs[w.shape[1]][:64]
            row["max_abs_err_o_proj"] = (T.matmul(x, w).float() - F.linear(x.float(), w.float())).abs().max().item()
            row["invariant"] = invariant
            row["rows"] = {}
            for m in ROWS:
                times = {name: bench(lambda w=w, x=inputs[w.shape[1]][:m]: T.matmul(x, w)) for name, w in weights.items()}
                row["rows"][m] = {"by_shape_ms": times, "step_ms": step_ms(times),
                                  "over_cublas": step_ms(times) / out["cublas"][m]["step_ms"]}
        except Exception as exc:  # out of resources on this GPU, a compile error: report, try the next
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        out["tiles"].append(row)
        steps = "  ".join(f"M={m}: {r['step_ms']:.2f} ms ({r['over_cublas']:.2f}x cuBLAS)"
                          for m, r in row.get("rows", {}).items())
        print(f"{cand}: invariant={row.get('invariant')} err={row.get('max_abs_err_o_proj')} {steps}"
              f"{row.get('error', '')}", flush=True)
    T.MATMUL_TILES[torch.bfloat16] = shipped
    print("cuBLAS: " + "  ".join(f"M={m}: {c['step_ms']:.2f} ms" for m, c in out["cublas"].items()), flush=True)
    ok = [r for r in out["tiles"] if r.get("invariant") and "rows" in r and 256 in r["rows"]]
    if ok:
        best = min(ok, key=lambda r: r["rows"][256]["step_ms"])
        out["best"] = best["tile"]
        print(f"best at 256 rows: {best['tile']}, {best['rows'][256]['step_ms']:.2f} ms a step", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the results")
    ap.add_argument("--then-bench", action="store_true")
    ap.add_argument("--then-pytest", action="store_true")
    ap.add_argument("--sweep-s", type=float, default=150.0, help="stop starting new candidates after this")
    ap.add_argument("--tiles", default=None, help="the candidates instead of the list above: "
                    "'BLOCK_M,BLOCK_N,BLOCK_K,WARPS,STAGES;...'")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to time")
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    candidates = ([tuple(int(v) for v in t.split(",")) for t in args.tiles.split(";")] if args.tiles
                  else CANDIDATES)
    results = sweep(candidates, args.sweep_s)
    (out / "tiles.json").write_text(json.dumps(results, indent=1, default=str))
    if "best" not in results:
        return 1
    from forge_batch.kernels import triton_ops as T

    best = T.MatmulTile(*results["best"])
    T.MATMUL_TILES[torch.bfloat16] = T.MATMUL_TILES[torch.float16] = best
    rc = 0
    if args.then_bench:
        from forge_batch import bench_gpu

        common = ["--num-prompts", "256", "--max-tokens", "128", "--skip-transformers", "--decode-steps", "32"]
        rc |= bench_gpu.main([*common, "--json", str(out / "bench_best.json"), "--profile", str(out / "profile_best.txt")])
        (out / "profile_best_trace.json").unlink(missing_ok=True)  # the device tool brings back 8 files
        rc |= bench_gpu.main([*common, "--batch-invariant", "off", "--json", str(out / "bench_off.json")])
    if args.then_pytest:
        import pytest

        rc |= int(pytest.main(["-m", "gpu", "-p", "no:cacheprovider", "-q", "-rfE", "tests/test_engine_gpu.py",
                               "tests/test_kernels_gpu.py", "-k", "row_bits or dispatch or graph or engine",
                               f"--junitxml={os.devnull}"]))
    return rc


if __name__ == "__main__":
    sys.exit(main())
