"""What the CPU decode attention kernel costs a layer at the bench's batched shapes, at this checkout and, with
``--against REV``, with an earlier commit's kernel (its csrc/paged_decode_attention.c and header, compiled with
the build's flags), in one process, the two kernels alternating round by round.

    python scripts/attention_cost.py --against e3bd565
    python scripts/attention_cost.py --dtype float32

Shapes (256 sequences, 9 query / 3 KV heads of 64, blocks of 16; one row per sequence, as in batch-invariant
mode): W1's decode (contexts 100-168, the second half of W1's 128 tokens, each sequence's blocks allocated
the way decode growth interleaves them, so a sequence's blocks are far apart) and W2's (a 25-block shared
prefix, the system prompt, then 20-64 own positions). Eight layers' caches are cycled, so that W1's K/V come
from memory as in a real step (one layer's is ~27 MB; eight are past the 32 MB L3).
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from forge_batch.kernels.cpu import attention
from forge_batch.kernels.cpu.build import CFLAGS, lib

REPO = Path(__file__).resolve().parent.parent
CSRC = "kernels/cpu/csrc"
HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16
LAYERS = 8


def _kernel_at(rev: str, folder: Path) -> ctypes.CDLL:
    """The decode attention kernel of commit ``rev``, compiled alone with the build's flags."""
    for name in ("paged_decode_attention.c", "cpu_kernels.h"):
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{CSRC}/{name}"], check=True,
                                capture_output=True).stdout
        (folder / name).write_bytes(source)
    cc = shutil.which("cc") or shutil.which("gcc")
    out = folder / "attention_at_rev.so"
    subprocess.run([cc, *CFLAGS, str(folder / "paged_decode_attention.c"), "-o", str(out)], check=True)
    return ctypes.CDLL(str(out))


def _shapes(dtype: torch.dtype) -> dict[str, tuple]:
    torch.manual_seed(0)
    seqs = 256
    shapes = {}
    # W1: own blocks only; block j of every sequence allocated together (as decode growth hands them out)
    per_seq = 11
    tables = torch.arange(seqs * per_seq).view(per_seq, seqs).t().contiguous()
    shapes["W1 decode"] = (tables, torch.randint(100, 169, (seqs,)), seqs * per_seq)
    # W2: 25 shared blocks, then 4 of each sequence's own
    shared, own = 25, 4
    tables = torch.zeros(seqs, shared + own, dtype=torch.int64)
    tables[:, :shared] = torch.arange(shared)
    tables[:, shared:] = shared + torch.arange(seqs * own).view(own, seqs).t()
    shapes["W2 decode"] = (tables, shared * BLOCK + torch.randint(20, own * BLOCK + 1, (seqs,)), shared + seqs * own)
    out = {}
    for name, (tables, ctx, blocks) in shapes.items():
        caches = [(torch.randn(blocks, BLOCK, KV_HEADS, HEAD_DIM).to(dtype),
                   torch.randn(blocks, BLOCK, KV_HEADS, HEAD_DIM).to(dtype)) for _ in range(LAYERS)]
        q = torch.randn(seqs, HEADS, HEAD_DIM).to(dtype)
        out[name] = (q, caches, tables, ctx)
    return out


def _layer_seconds(fn, q, caches, tables, ctx) -> float:
    """Median over a few sweeps of the cycled layers, per layer."""
    outs = torch.empty_like(q)
    args = [q.data_ptr(), None, None, tables.data_ptr(), ctx.data_ptr(), outs.data_ptr(), None, None,
            q.shape[0], HEADS, KV_HEADS, HEAD_DIM, BLOCK, tables.shape[1], 0, HEAD_DIM ** -0.5,
            torch.get_num_threads()]
    times = []
    for _ in range(12):
        t = time.perf_counter()
        for k, v in caches:
            args[1], args[2] = k.data_ptr(), v.data_ptr()
            fn(*args)
        times.append((time.perf_counter() - t) / len(caches))
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", metavar="REV", help="also time the kernel at this commit")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    suffix = "bf16" if dtype == torch.bfloat16 else "f32"
    kernels = {"this checkout": getattr(lib(), f"paged_decode_attention_{suffix}")}
    with tempfile.TemporaryDirectory() as tmp:
        if args.against:
            other = getattr(_kernel_at(args.against, Path(tmp)), f"paged_decode_attention_{suffix}")
            other.restype = None
            other.argtypes = kernels["this checkout"].argtypes
            kernels[args.against] = other
        shapes = _shapes(dtype)
        for q, caches, tables, ctx in shapes.values():  # the kernel's own check of this call, once
            got = attention.paged_decode_attention(q, *caches[0], tables, ctx, HEAD_DIM ** -0.5, cascade=False)
            assert got.isfinite().all()
        results: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for shape, inputs in shapes.items():
                for name, fn in kernels.items():
                    results.setdefault((shape, name), []).append(_layer_seconds(fn, *inputs))
    print(f"decode attention, {args.dtype}, {torch.get_num_threads()} threads: ms a layer (median of "
          f"{args.rounds} rounds; rounds)\n")
    print("| shape | " + " | ".join(kernels) + " |")
    print("|---|" + "---|" * len(kernels))
    for shape in shapes:
        cells = []
        for name in kernels:
            ms = [1e3 * t for t in results[(shape, name)]]
            cells.append(f"{sorted(ms)[len(ms) // 2]:.3f} ({' / '.join(f'{m:.3f}' for m in ms)})")
        print(f"| {shape} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
