"""Batch invariance: a row's numbers do not depend on how many rows share its step, nor on their order.

Op level: the matmul forms the CPU backend uses in batch-invariant mode give row i the same bits at every
row count and row position. Engine level: greedy token ids of each prompt are the same alone, all
together, in batches of 3, and with a small or large ``max_num_seqs``.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from tiny_models import make_tiny_model

from forge_batch.engine.llm import LLM
from forge_batch.engine.sampling_params import SamplingParams
from forge_batch.kernels import KernelBackend, Linear
from forge_batch.kernels.cpu import attention as cpu_attention
from forge_batch.kernels.cpu import build as cpu_build
from forge_batch.kernels.cpu import mkl_packed, onednn_packed
from forge_batch.kernels.cpu.linear import MklPackedLinear, OneDnnLinear, PaddedLinear

ROW_COUNTS = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64]
# (out, in): the tiny test model's matmuls, and the default model's (SmolLM2-135M: hidden 576,
# intermediate 1536; its LM head's 49152 rows are cut to 4096 to keep the test quick).
SHAPES = [(128, 64), (64, 64), (256, 64), (64, 128), (960, 576), (576, 576), (3072, 576), (576, 1536), (4096, 576)]


def _forms(dtype: torch.dtype) -> list[tuple[str, type]]:
    """The batch-invariant products the CPU backend may pick for a ``dtype`` weight."""
    forms: list[tuple[str, type]] = [("padded F.linear", PaddedLinear)]
    if dtype == torch.float32 and mkl_packed.available():
        forms.append(("MKL packed", MklPackedLinear))
    if (dtype == torch.bfloat16 and onednn_packed.available()) or (
            dtype == torch.float32 and onednn_packed.float32_preferred()):  # float32: on AMD CPUs
        forms.append(("oneDNN packed", OneDnnLinear))
    return forms


def _product(form: type, weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
    base = Linear(weight, bias)
    return form(base) if form is PaddedLinear else form(base, batch_invariant=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{o}x{i}" for o, i in SHAPES])
def test_matmul_row_bits_do_not_depend_on_the_row_count_or_order(dtype, shape):
    out_features, in_features = shape
    g = torch.Generator().manual_seed(out_features * 7 + in_features)
    weight = (torch.randn(out_features, in_features, generator=g) / in_features**0.5).to(dtype)
    bias = torch.randn(out_features, generator=g).to(dtype) if out_features == 128 else None
    # heavy-tailed activations, as a model's are: with plain normal ones oneDNN's one-row bfloat16 kernel
    # happened to agree with the others
    x = torch.randn(max(ROW_COUNTS), in_features, generator=g)
    x = (x * torch.exp(2 * torch.randn(x.shape, generator=g))).to(dtype)
    for name, form in _forms(dtype):
        linear = _product(form, weight, bias)
        full = linear(x)
        torch.testing.assert_close(full.float(), F.linear(x, weight, bias).float(), rtol=2e-2, atol=2e-2)
        for m in ROW_COUNTS:
            assert torch.equal(linear(x[:m]), full[:m]), f"{name}: {m} rows"
        perm = torch.randperm(x.shape[0], generator=g)
        assert torch.equal(linear(x[perm]), full[perm]), f"{name}: shuffled rows"
        for i in range(x.shape[0]):  # each row alone
            assert torch.equal(linear(x[i:i + 1]), full[i:i + 1]), f"{name}: row {i} alone"


# (query heads, KV heads, head size): the tiny test model's and the default model's (SmolLM2-135M)
ATTENTION_SHAPES = [(4, 2, 16), (9, 3, 64)]


def _attention_case(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int):
    """A paged KV cache of 16-token blocks holding 18 sequences of 1..130 tokens (the last 9 share their
    first 5 blocks, like a common system prompt), and one fixed query per token of each."""
    g = torch.Generator().manual_seed(num_heads * 10 + head_dim)
    block_size, shared = 16, 5
    lens = [1, 2, 15, 16, 17, 33, 64, 100, 130] + [shared * block_size + 1 + 5 * i for i in range(9)]
    widths = [-(-n // block_size) for n in lens]
    num_blocks = sum(widths) + 4
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    free = iter(torch.randperm(num_blocks - shared, generator=g).add(shared).tolist())
    tables = []
    for i, w in enumerate(widths):
        head = list(range(shared)) if i >= 9 else []
        tables.append(head + [next(free) for _ in range(w - len(head))])
    queries = [torch.randn(n, num_heads, head_dim, generator=g).to(dtype) for n in lens]
    return k_cache, v_cache, tables, lens, queries


def _attend(kernels: KernelBackend, k_cache, v_cache, tables, queries, parts: list[tuple[int, int, int]]):
    """One step's attention: each part (sequence, first query position, context length) contributes the
    queries from its first position up to its context length. Returns the output rows per part."""
    q = torch.cat([queries[s][first:ctx] for s, first, ctx in parts])
    width = max(len(tables[s]) for s, _, _ in parts)
    block_tables = torch.tensor([tables[s] + [0] * (width - len(tables[s])) for s, _, _ in parts])
    q_lens = [ctx - first for _, first, ctx in parts]
    loc = torch.tensor([0] + q_lens).cumsum(0)
    ctx = torch.tensor([c for _, _, c in parts])
    out = kernels.paged_attention(q, k_cache, v_cache, block_tables, loc, ctx, q.shape[-1] ** -0.5,
                                  max(q_lens), int(ctx.max()))
    return list(out.split(q_lens))


@pytest.mark.skipif(not cpu_build.available(), reason="no C compiler for the CPU kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=[f"{h}x{kv}x{d}" for h, kv, d in ATTENTION_SHAPES])
def test_attention_row_bits_do_not_depend_on_the_step(monkeypatch, dtype, shape):
    """A query row's attention output has the same bits as a decode row alone, inside a whole-prompt prefill,
    a chunk over a cached prefix, a step mixing prefills and decodes, a batch of 1..300 decode rows in any
    order, and a batch whose sequences share a cached prefix (where the fast path runs a cascade)."""
    monkeypatch.setattr(cpu_attention, "CASCADE_MIN_WORK", 1)  # the fast path would cascade these shared prefixes
    kernels = KernelBackend("auto", batch_invariant=True)
    k_cache, v_cache, tables, lens, queries = _attention_case(dtype, *shape)
    # the reference: every token as a decode row on its own
    alone = [torch.cat([_attend(kernels, k_cache, v_cache, tables, queries, [(s, p, p + 1)])[0]
                        for p in range(n)]) for s, n in enumerate(lens)]
    g = torch.Generator().manual_seed(1)

    def check(parts: list[tuple[int, int, int]]) -> None:
        for (s, first, ctx), out in zip(parts, _attend(kernels, k_cache, v_cache, tables, queries, parts)):
            assert torch.equal(out, alone[s][first:ctx]), f"sequence {s}, positions {first}..{ctx} in {len(parts)} parts"

    check([(s, 0, n) for s, n in enumerate(lens)])  # every prompt prefilled in one step
    check([(s, 0, n) for s, n in enumerate(lens) if s >= 9])  # prompts behind a shared prefix
    check([(s, n // 2, n) for s, n in enumerate(lens)])  # chunks over cached prefixes
    check([(s, n - 1, n) if s % 2 else (s, n // 3, n) for s, n in enumerate(lens)])  # decodes mixed with chunks
    check([(s, n - 1, n) for s, n in enumerate(lens) if s >= 9])  # decodes sharing a prefix: the cascade's case
    # decode rows, 1 to 300 in a step, in shuffled order (positions drawn at random, repeats allowed)
    rows = [(s, p) for s, n in enumerate(lens) for p in range(n)]
    for count in (1, 2, 3, 7, 16, 17, 64, 300):
        pick = torch.randint(len(rows), (count,), generator=g).tolist()
        check([(rows[i][0], rows[i][1], rows[i][1] + 1) for i in pick])


@pytest.fixture(scope="module")
def flat_model_dir(tmp_path_factory):
    """A tiny model with small weights: flat next-token distributions, so that a last-bit difference in a
    row's logits soon changes a greedy token (peaked distributions would hide it)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-flat"), "llama", init_std=0.02, seed=3)


# A shared system prompt (two full KV blocks and more) so that prefix caching serves later prompts' first
# blocks from the cache, and prompts longer than the chunked-prefill budget below.
SYSTEM = "You are a helpful assistant. Answer briefly and clearly. Summarise the following text, please. "
PROMPTS = [
    "The quick brown fox", SYSTEM + "Paged attention stores", "def add(a, b):", SYSTEM + "Numbers: 1 2 3",
    "hello world", SYSTEM + "A long time ago in a galaxy", "import torch", SYSTEM + "Once upon a time",
    "SELECT * FROM t", SYSTEM + "x = [1, 2", "The weather today", SYSTEM + "Attention is all",
]
MAX_TOKENS = 20
CHUNK_TOKENS = 5  # a prefill budget smaller than every prompt: each prefills in chunks, mixed with decodes
FEW_BLOCKS = 12  # KV blocks of 16 tokens: the longest prompt and its tokens need 4, so the batch preempts


class Run(NamedTuple):
    tokens: list[int]
    logits_digests: list[int]


def _engine(model_dir, dtype: str, **options) -> LLM:
    options = {"max_num_seqs": 64, "enable_prefix_caching": False, **options}
    return LLM(str(model_dir), device="cpu", dtype=dtype, **options)


def generate_runs(llm: LLM, prompts: list, max_tokens: int, temperature: float = 0.0, first: int = 0,
                  seeds: Sequence[int] | None = None) -> list[Run]:
    """Per prompt: its token ids and a digest of the bits of its logits at each generated position (a
    last-bit difference shows there even where it does not change a token). Sampled prompts get a seed
    from their index in the whole prompt list (``first`` + i), or ``seeds[first + i]`` when given."""
    digests: list[list[int]] = [[] for _ in prompts]

    def recorder(i: int):
        def record(_output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            digests[i].append(zlib.crc32(logits.cpu().numpy().data))  # a quarter of blake2b's time per position
            return logits
        return record

    def seed(i: int) -> int | None:
        return None if temperature == 0 else seeds[first + i] if seeds else 1000 + first + i

    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, ignore_eos=True, seed=seed(i),
                             logits_processors=[recorder(i)])
              for i in range(len(prompts))]
    tokens = [list(o.token_ids) for o in llm.generate(prompts, params)]
    return [Run(t, d) for t, d in zip(tokens, digests)]


def _generate(llm: LLM, prompts: list[str], temperature: float = 0.0, first: int = 0) -> list[Run]:
    return generate_runs(llm, prompts, MAX_TOKENS, temperature, first)


def _in_groups(llm: LLM, size: int, temperature: float = 0.0) -> list[Run]:
    return [t for i in range(0, len(PROMPTS), size)
            for t in _generate(llm, PROMPTS[i:i + size], temperature, first=i)]


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tokens_do_not_depend_on_the_batch_the_step_or_the_cache(flat_model_dir, dtype, temperature):
    """Each prompt alone is the reference; all together, in threes, with 4 sequences at most, with the prefix
    cache, with chunked prefill and with preemption (recomputed rows) must give the same token ids."""
    wide = _engine(flat_model_dir, dtype)
    assert wide.engine_info["batch_invariant"] is True and wide.stored_weights == 0
    alone = _in_groups(wide, 1, temperature)
    assert len({tuple(r.tokens) for r in alone}) == len(PROMPTS)  # the prompts lead to different continuations
    assert _generate(wide, PROMPTS, temperature) == alone
    assert _in_groups(wide, 3, temperature) == alone
    assert _generate(_engine(flat_model_dir, dtype, max_num_seqs=4), PROMPTS, temperature) == alone

    cached = _engine(flat_model_dir, dtype, enable_prefix_caching=True)
    assert _generate(cached, PROMPTS, temperature) == alone
    assert cached.block_manager.prefix_hits > 0
    assert _in_groups(cached, 3, temperature) == alone  # the system prompt's blocks cached by earlier calls

    chunked = _engine(flat_model_dir, dtype, max_num_batched_tokens=CHUNK_TOKENS)
    assert min(len(chunked.tokenizer.encode(p)) for p in PROMPTS) > CHUNK_TOKENS
    assert _generate(chunked, PROMPTS, temperature) == alone

    cramped = _engine(flat_model_dir, dtype, num_blocks=FEW_BLOCKS, enable_prefix_caching=True)
    assert _generate(cramped, PROMPTS, temperature) == alone
    assert cramped.scheduler.num_preemptions > 0
