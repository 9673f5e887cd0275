"""Batch invariance on the Triton path, under Triton's interpreter (on the CPU; tests/triton_interpreter.py):
a row's output bits do not depend on how many rows share the call, their order, or the kind of step.

Op level: the fixed-tile GEMM (also against a float64 reference), RMSNorm, and the batch-invariant paged
attention across whole prefills, chunks over a cached prefix, decode-only and mixed steps with any number of
sequences. Engine level: an engine on the Triton kernels (``kernel_backend="triton"``, every matmul the
fixed-tile GEMM) gives each prompt the same logits bits alone, all together, a few at a time, chunked, and
with the prefix cache on.

What the interpreter cannot show: its ``tl.dot`` is numpy's matmul, whose sum for one output element does
not change with the tile's shape, so the bit comparisons check which tiles, keys and splits a row's sums
cover and in what order (a split of the keys fails them), not that the GPU instruction a tile shape lowers
to (mma, wgmma) gives a row the same bits. For that, every launch of a call here is recorded: each kernel
must get one compile-time configuration (tile sizes, warps, stages) for every row count and step, which is
what makes the compiled GPU code the same for every row. test_kernels_gpu.py and test_engine_gpu.py check
the bits on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import pytest
import torch
from test_batch_invariance import generate_runs
from tiny_models import make_tiny_model

from forge_batch.engine.llm import LLM
from forge_batch.kernels import TritonLinear, dispatch
from forge_batch.kernels.cpu import build as cpu_build

ROW_COUNTS = [1, 2, 3, 5, 8, 17, 33, 64, 65, 100]
DTYPE_IDS = {torch.float32: "f32", torch.bfloat16: "bf16"}
# A relative bound per product for the comparison with float64: the output's rounding (bfloat16 rounds by
# truncation in the interpreter: one unit in the last place) and float32 accumulation over K.
OUTPUT_ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _heavy_tailed(rows: int, cols: int, g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Activations with a model's outliers (plain normal ones would hide order-dependent rounding)."""
    x = torch.randn(rows, cols, generator=g)
    return (x * torch.exp(1.5 * torch.randn(x.shape, generator=g))).to(dtype)


class _LaunchRecorder:
    """Stands in for a Triton kernel of ``ops``: records each launch's compile-time arguments (the keyword
    ones: constexprs, warps, stages), then launches the kernel."""

    def __init__(self, ops: ModuleType, name: str) -> None:
        self.ops, self.name, self.kernel = ops, name, getattr(ops, name)
        self.configs: set[tuple] = set()

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.configs.add(tuple(sorted(kwargs.items())))
            return launch(*args, **kwargs)
        return run

    def __enter__(self) -> _LaunchRecorder:
        setattr(self.ops, self.name, self)
        return self

    def __exit__(self, *exc: object) -> None:
        setattr(self.ops, self.name, self.kernel)


def _check_same_rows(fn, full: tuple[torch.Tensor, ...], g: torch.Generator, what: str,
                     counts: Sequence[int] = ROW_COUNTS) -> None:
    """``fn(rows)`` (the op on those rows of its inputs) gives those rows of ``full`` bit for bit: at every
    row count, shuffled, rows alone and in windows (a row at another position beside other neighbours)."""
    total = full[0].shape[0]

    def same(rows: torch.Tensor, label: str) -> None:
        rows = rows.to(full[0].device)
        got = fn(rows)
        for a, b in zip(got, full):
            assert torch.equal(a, b[rows]), f"{what}: {label}"

    for m in counts:
        same(torch.arange(m), f"{m} rows")
    same(torch.randperm(total, generator=g), "shuffled rows")
    for i in (0, 37, total - 1):
        same(torch.tensor([i]), f"row {i} alone")
    same(torch.arange(40, 57), "rows 40..56")
    same(torch.arange(63, 66), "rows 63..65 (across a row tile)")


def check_matmul_invariance(ops: ModuleType, dtype: torch.dtype, out_features: int, in_features: int, bias: bool,
                            device: str = "cpu", counts: Sequence[int] = ROW_COUNTS) -> None:
    """``ops.matmul`` against float64, and row bits across ``counts`` rows and orders, one launch config."""
    g = torch.Generator().manual_seed(out_features * 7 + in_features)
    weight = (torch.randn(out_features, in_features, generator=g) / in_features**0.5).to(dtype).to(device)
    b = torch.randn(out_features, generator=g).to(dtype).to(device) if bias else None
    x = _heavy_tailed(max(counts), in_features, g, dtype).to(device)
    full = ops.matmul(x, weight, b)
    assert full.dtype == dtype and full.shape == (x.shape[0], out_features)
    exact = x.double() @ weight.double().T + (0 if b is None else b.double())
    magnitude = x.double().abs() @ weight.double().abs().T + (0 if b is None else b.double().abs())
    bound = OUTPUT_ULP[dtype] * exact.abs() + in_features * 2.0**-23 * magnitude
    assert ((full.double() - exact).abs() <= bound).all(), "matmul vs float64"
    with _LaunchRecorder(ops, "_matmul_kernel") as launches:
        _check_same_rows(lambda rows: (ops.matmul(x[rows], weight, b),), (full,), g, "matmul", counts)
    assert len(launches.configs) == 1, launches.configs


# (dtype, out, in, bias): K at and across the 64-wide K chunk, N and K that are no multiple of the tile, and
# the default model's hidden size as K (9 chunks)
MATMUL_CASES = [(torch.float32, 128, 64, True), (torch.bfloat16, 128, 64, True), (torch.float32, 100, 200, False),
                (torch.bfloat16, 100, 200, False), (torch.bfloat16, 192, 576, False)]


@pytest.mark.parametrize(("dtype", "out_features", "in_features", "bias"), MATMUL_CASES,
                         ids=[f"{DTYPE_IDS[d]}-{o}x{i}{'-bias' if b else ''}" for d, o, i, b in MATMUL_CASES])
def test_matmul_row_bits_do_not_depend_on_the_row_count_or_order(interpreter, dtype, out_features, in_features, bias):
    interpreter(check_matmul_invariance, dtype, out_features, in_features, bias)


def check_rms_norm_invariance(ops: ModuleType, dtype: torch.dtype, hidden: int, device: str = "cpu",
                              counts: Sequence[int] = (1, 3, 17, 65)) -> None:
    """``ops.rms_norm`` (with a residual) row bits across ``counts`` rows and orders, one launch config (one
    program per row: fewer row counts than the matmul's keep the interpreter quick)."""
    g = torch.Generator().manual_seed(hidden)
    total = max(100, *counts)
    x = _heavy_tailed(total, hidden, g, dtype).to(device)
    residual = _heavy_tailed(total, hidden, g, dtype).to(device)
    weight = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype).to(device)
    full = ops.rms_norm(x, weight, 1e-5, residual)
    with _LaunchRecorder(ops, "_rms_norm_kernel") as launches:
        _check_same_rows(lambda rows: ops.rms_norm(x[rows], weight, 1e-5, residual[rows]), full, g, "rms_norm",
                         counts)
    assert len(launches.configs) == 1, launches.configs


@pytest.mark.parametrize(("dtype", "hidden"), [(torch.float32, 100), (torch.bfloat16, 576)], ids=["f32-100", "bf16-576"])
def test_rms_norm_row_bits_do_not_depend_on_the_row_count_or_order(interpreter, dtype, hidden):
    interpreter(check_rms_norm_invariance, dtype, hidden)


class _PagedCase:
    """A paged KV cache of 16-token blocks holding sequences of 1..70 tokens and ``longer`` ones after them
    (the last two share their first two blocks, like a common system prompt), and one fixed query per token
    of each."""

    block_size = 16

    def __init__(self, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int, device: str = "cpu",
                 longer: Sequence[int] = ()) -> None:
        g = torch.Generator().manual_seed(num_heads * 10 + head_dim)
        shared = 2
        self.lens = [1, 17, 40, 70, *longer] + [shared * self.block_size + 1 + 14 * i for i in range(2)]
        self.num_shared = 2
        widths = [-(-n // self.block_size) for n in self.lens]
        num_blocks = sum(widths) + 2
        shape = (num_blocks, self.block_size, num_kv_heads, head_dim)
        self.k_cache = torch.randn(*shape, generator=g).to(dtype).to(device)
        self.v_cache = torch.randn(*shape, generator=g).to(dtype).to(device)
        self.device = device
        free = iter(torch.randperm(num_blocks - shared, generator=g).add(shared).tolist())
        self.tables = []
        for i, w in enumerate(widths):
            head = list(range(shared)) if i >= len(self.lens) - self.num_shared else []
            self.tables.append(head + [next(free) for _ in range(w - len(head))])
        self.queries = [torch.randn(n, num_heads, head_dim, generator=g).to(dtype).to(device) for n in self.lens]

    def attend(self, ops: ModuleType, parts: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """One step: each part (sequence, first query position, context length) brings its queries from
        that position up to its context length. Returns each part's output rows."""
        q = torch.cat([self.queries[s][first:ctx] for s, first, ctx in parts])
        width = max(len(self.tables[s]) for s, _, _ in parts)
        block_tables = torch.tensor([self.tables[s] + [0] * (width - len(self.tables[s])) for s, _, _ in parts],
                                    device=self.device)
        q_lens = [ctx - first for _, first, ctx in parts]
        loc = torch.tensor([0] + q_lens, device=self.device).cumsum(0)
        ctx = torch.tensor([c for _, _, c in parts], device=self.device)
        out = ops.paged_attention_invariant(q, self.k_cache, self.v_cache, block_tables, loc, ctx,
                                            q.shape[-1] ** -0.5, max(q_lens), int(ctx.max()))
        return list(out.split(q_lens))


def check_attention_invariance(ops: ModuleType, dtype: torch.dtype, num_heads: int, num_kv_heads: int,
                               head_dim: int, device: str = "cpu", longer: Sequence[int] = ()) -> None:
    """``ops.paged_attention_invariant``: each query row's bits the same in every kind of step, one launch
    config, never a split of the keys (``longer``: contexts long enough that a split would pay on a GPU)."""
    with _LaunchRecorder(ops, "_paged_attention_kernel") as launches, \
            _LaunchRecorder(ops, "_merge_segments_kernel") as merges:
        _check_attention_steps(ops, _PagedCase(dtype, num_heads, num_kv_heads, head_dim, device, longer))
    assert len(launches.configs) == 1 and not merges.configs, (launches.configs, merges.configs)
    assert dict(next(iter(launches.configs)))["NUM_SEGMENTS"] == 1


def _check_attention_steps(ops: ModuleType, case: _PagedCase) -> None:
    lens = case.lens
    # the reference: every prompt prefilled in one step
    full = case.attend(ops, [(s, 0, n) for s, n in enumerate(lens)])
    g = torch.Generator().manual_seed(1)

    def check(parts: list[tuple[int, int, int]], what: str) -> None:
        for (s, first, ctx), out in zip(parts, case.attend(ops, parts)):
            assert torch.equal(out, full[s][first:ctx]), f"{what}: sequence {s}, positions {first}..{ctx}"

    for s, n in enumerate(lens):
        check([(s, 0, n)], "a prompt alone")
    check([(s, 0, n) for s, n in enumerate(lens) if s >= len(lens) - case.num_shared], "prompts behind a shared prefix")
    check([(s, n // 2, n) for s, n in enumerate(lens)], "chunks over cached prefixes")
    check([(s, n - 1, n) if s % 2 else (s, n // 3, n) for s, n in reversed(list(enumerate(lens)))],
          "decodes mixed with chunks")
    rows = [(s, p) for s, n in enumerate(lens) for p in range(n)]
    for count in (1, 2, 5, 17, 33):  # decode-only steps, sequences in shuffled order
        pick = torch.randint(len(rows), (count,), generator=g).tolist()
        check([(rows[i][0], rows[i][1], rows[i][1] + 1) for i in pick], f"{count} decode rows")


# (dtype, query heads, KV heads, head size): the tiny test model's, and the default model's (SmolLM2-135M:
# a GQA group of 3, so a 64-row tile holds 21 tokens and a padding row)
ATTENTION_CASES = [(torch.float32, 4, 2, 16), (torch.bfloat16, 9, 3, 64)]


@pytest.mark.parametrize(("dtype", "num_heads", "num_kv_heads", "head_dim"), ATTENTION_CASES,
                         ids=[f"{DTYPE_IDS[d]}-{h}x{kv}x{hd}" for d, h, kv, hd in ATTENTION_CASES])
def test_attention_row_bits_do_not_depend_on_the_step(interpreter, dtype, num_heads, num_kv_heads, head_dim):
    interpreter(check_attention_invariance, dtype, num_heads, num_kv_heads, head_dim)


# Two prompts share a first KV block (16 tokens) for the prefix cache; chunks of 7 tokens split every prompt.
# Few and short: the interpreter runs a program per token for several kernels.
SHARED = "You are a helpful assistant. Be brief. "
PROMPTS = [SHARED + "Paged attention stores", "def add(a, b):", SHARED + "Numbers: 1 2 3"]
MAX_TOKENS = 3


def check_engine_invariance(ops: ModuleType | None, tmp_path: Path, dtype: str, device: str = "cpu",
                            kernel_backend: str = "triton", temperature: float = 0.0) -> None:
    """An engine on the Triton kernels (``ops``: the module its backend uses, e.g. interpreted; None: the
    imported one) gives each prompt the same tokens and logits bits alone, together, chunked, cached
    (sampled with a seed per prompt when ``temperature`` > 0)."""
    previous = (dispatch._triton, dispatch._triton_checked)
    if ops is not None:
        dispatch._triton, dispatch._triton_checked = ops, True
    try:
        # small weights: flat next-token distributions, where a last-bit difference soon changes a token
        model_dir = make_tiny_model(tmp_path / "flat", "llama", num_layers=1, init_std=0.02, seed=3)

        def engine(**options: object) -> LLM:
            options = {"max_num_seqs": 8, "enable_prefix_caching": False, **options}
            return LLM(str(model_dir), device=device, dtype=dtype, kernel_backend=kernel_backend, **options)

        wide = engine()
        assert wide.engine_info["batch_invariant"] is True and wide.engine_info["kernel_path"] == "triton"
        assert isinstance(wide.model.lm_head, TritonLinear)
        def runs(llm: LLM) -> list:
            return generate_runs(llm, PROMPTS, MAX_TOKENS, temperature)

        alone = [run for i, p in enumerate(PROMPTS) for run in generate_runs(wide, [p], MAX_TOKENS, temperature, i)]
        assert len({tuple(r.tokens) for r in alone}) == len(PROMPTS)
        assert runs(wide) == alone, "all together"
        # two at a time, prefills in chunks of 7 tokens mixed with decodes
        chunked = engine(max_num_seqs=2, max_num_batched_tokens=7)
        assert runs(chunked) == alone, "chunked prefill"
        cached = engine(enable_prefix_caching=True)
        assert runs(cached) == alone, "prefix cache"
        assert cached.block_manager.prefix_hits > 0
        assert cached.model.kernels.triton_disabled_reason() is None
    finally:
        dispatch._triton, dispatch._triton_checked = previous


def test_engine_logits_do_not_depend_on_the_batch_on_triton(interpreter, tmp_path):
    """bfloat16, the dtype ``auto`` picks on a GPU (float32 rows are covered op by op above)."""
    interpreter(check_engine_invariance, tmp_path, "bfloat16")


def test_triton_path_without_batch_invariance_keeps_plain_matmuls(tiny_model_dir, monkeypatch):
    """batch_invariant=False on the Triton path: F.linear (cuBLAS on a GPU) stays, and the engine says so."""
    from forge_batch.engine import config as config_module
    from forge_batch.kernels import Linear

    monkeypatch.setattr(config_module, "triton_problem", lambda *a: None)  # built only, never run: no GPU needed
    llm = LLM(str(tiny_model_dir), device="cpu", dtype="float32", kernel_backend="triton", batch_invariant=False)
    assert type(llm.model.lm_head) is Linear and type(llm.model.layers[0].qkv_proj) is Linear
    assert llm.engine_info["batch_invariant"] is False and llm.engine_info["kernel_path"] == "triton"
    assert llm.model.kernels.batch_invariant is False


@pytest.mark.skipif(not cpu_build.available(), reason="no C compiler for the CPU kernels")
def test_a_triton_fallback_ends_batch_invariance(tiny_model_dir):
    """When an ``auto`` backend's Triton kernels fail and the torch reference takes over, engine_info stops
    claiming batch invariance (a resumed job then refuses to mix the two)."""
    llm = LLM(str(tiny_model_dir), device="cpu", dtype="float32")
    assert llm.engine_info["batch_invariant"] is True
    llm.model.kernels._disable("a kernel failed")
    assert llm.engine_info["batch_invariant"] is False
