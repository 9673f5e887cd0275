"""Batch invariance on the default model (SmolLM2-135M-Instruct GGUF), in the dtype ``auto`` picks on this
machine and in float32: 48 chat prompts, 64 tokens each with EOS ignored, greedy and sampled at temperature
0.8 with a seed per row. Every way of running them gives each prompt the same token ids, and the same bits
of its logits at every generated position, as all 48 together in one call (``max_num_seqs`` 256, no prefix
cache): each prompt alone, in batches of 3, with ``max_num_seqs`` 4, in batches of 24 with the prefix
cache, with chunked prefill (a token budget smaller than every prompt: chunks mix with decodes), with
forced preemption (too few KV blocks: rows recomputed over their cached prefix), on one thread, and through
``forge-batch run`` killed after its first committed parts and resumed (its token ids, from the logprobs
column, equal the engine's; its ids and texts equal an uninterrupted run's). Apart from those 48, greedy in the
auto dtype: 48 chats behind the bench's ~400-token W2 system prompt, where decode attention visits the shared
blocks for a tile of sequences at once, alone and with the prefix cache.

Sized for a 2-core CI machine (4-8 minutes idle). The auto dtype runs every case on all 48 chats x 64
tokens, greedy and sampled. float32, where auto is not float32, is trimmed (its steps cost 3-5 times
bfloat16's here): greedy only, 12 chats x 32 tokens in every case but the job, 4 of them alone. Its kernels
(MKL's packed GEMM, float32 attention) are also checked op by op in test_batch_invariance.py; the job path
does not depend on the dtype. Where auto is float32 (a CPU without native bfloat16) every case runs in
float32 on all 48 chats x 64 tokens but "alone" takes the first 12 of them: the whole set alone took 12
minutes on a Zen 5 core pair, two thirds of it the 96 one-row runs, too much for CI's 30 minutes on a slower
CPU. Where the C kernels have no SIMD path for the one-row steps' weights (neither AVX-512 nor AVX2 with FMA and
F16C) every case, the job's too, takes the first 24 chats, 8 of them alone: on a Zen 2 core pair, before its AVX2
panel products, all 48 took 12 of the suite's 20 minutes (with them, 5 min 48 s).
"""

from __future__ import annotations

import functools
import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from conftest import requires_default_model
from runner_helpers import cli, cli_env, popen, read_output, write_job_file, write_jsonl
from test_batch_invariance import Run, generate_runs

from forge_batch import LLM
from forge_batch.bench import SYSTEM_PROMPT, chat_prompts
from forge_batch.engine.device import resolve_device, resolve_dtype
from forge_batch.io.output_dir import state_dir_for
from forge_batch.kernels.cpu import panel_product
from forge_batch.kernels.cpu.stored import weight_gemv_fast
from forge_batch.runner.requests import row_seed

pytestmark = [requires_default_model, pytest.mark.slow]

MODEL = "smollm2-135m-instruct"
MAX_TOKENS = 64
SEED = 7  # the job seed: a sampled chat's seed derives from it and its row id (at the engine level too)

# A shared system prompt of more than two 16-token KV blocks (with the template's header), so the prefix
# cache serves it; four chats have none (the template adds its own), four are three turns long and four
# carry a paragraph of notes (38 to 169 prompt tokens).
SYSTEM = ("You are a careful assistant for a small data team. Answer in plain English, briefly and "
          "exactly, and say so when you are not sure of something.")
TOPICS = ["the moon", "sourdough bread", "rivers", "chess openings", "volcanoes", "honey bees",
          "night trains", "jazz", "glass making", "old maps", "ocean tides", "owls"]
FORMS = [
    "What is {}?",
    "Write two short sentences about {} for a ten-year-old.",
    "Give me three surprising facts about {}, and for each one explain in a sentence or two why it matters "
    "to ordinary people today, what most people get wrong about it, and where I could read more.",
    "Compare {} with something from everyday life.",
]
NOTES = ("Here are my notes so far, which may contain mistakes: it is older than most people think; it "
         "changed a great deal in the last two hundred years; people in different countries describe it in "
         "quite different ways; children often find it more interesting than adults do; and there is a long "
         "argument among experts about where it first came from and why it matters. Please correct anything "
         "that is wrong before you answer.")


def _chat(i: int) -> list[dict[str, str]]:
    topic, form = TOPICS[i // len(FORMS)], FORMS[i % len(FORMS)]
    turns = [{"role": "user", "content": form.format(topic)}]
    if i % 12 == 5:  # three turns: a question, an answer, a follow-up
        turns = [{"role": "user", "content": f"Tell me about {topic}."},
                 {"role": "assistant", "content": f"Happy to. What would you like to know about {topic}?"},
                 {"role": "user", "content": form.format(topic)}]
    if i % 12 == 2:  # a long one
        turns[-1]["content"] += " " + NOTES
    return turns if i % 12 == 11 else [{"role": "system", "content": SYSTEM}, *turns]


CHATS = [_chat(i) for i in range(len(TOPICS) * len(FORMS))]
TEMPERATURES = {"greedy": 0.0, "sampled": 0.8}
# a sampled chat's seed is what a job with this seed and id_field gives its row (the job test's ids)
SEEDS = [row_seed(SEED, f"id:{i:02d}-sampled") for i in range(len(CHATS))]
CHUNK_TOKENS = 24  # smaller than every prompt, and not a block multiple: chunks end inside blocks


class Sizes(NamedTuple):
    tokens: int  # generated per chat
    chats: int  # the first this many chats run in every case
    alone: int  # the first this many of them also run alone
    cached_batch: int  # chats per call with the prefix cache
    few_blocks: int  # 16-token KV blocks of the preempting engine: fewer than the chats need at once


FULL = Sizes(tokens=MAX_TOKENS, chats=len(CHATS), alone=len(CHATS), cached_batch=24, few_blocks=96)
TRIMMED = Sizes(tokens=32, chats=12, alone=4, cached_batch=6, few_blocks=48)  # float32: see the module docstring
FLOAT32_ALONE = 12  # chats run alone where auto is float32: see the module docstring
NO_AVX512 = Sizes(tokens=MAX_TOKENS, chats=24, alone=8, cached_batch=12, few_blocks=64)  # see the module docstring


def _auto_dtype() -> str:
    return str(resolve_dtype("auto", resolve_device("cpu"))).removeprefix("torch.")


AUTO = _auto_dtype()
DTYPES = [AUTO] if AUTO == "float32" else [AUTO, "float32"]


@functools.cache
def _simd_weight_kernels() -> bool:
    """Whether the C kernels have a SIMD path for the one-row steps' weights here (AVX-512, or the float32
    panel products on AVX2); asked once, when a test first sizes its work (it builds the kernels), not at
    collection."""
    return weight_gemv_fast() or panel_product.available_here(torch.float32)


def _sizes(dtype: str) -> Sizes:
    if dtype != AUTO:
        return TRIMMED
    if not _simd_weight_kernels():
        return NO_AVX512
    return FULL._replace(alone=FLOAT32_ALONE) if AUTO == "float32" else FULL


def _options(dtype: str, name: str) -> dict:
    return {
        "wide": {},  # the reference's
        "four": {"max_num_seqs": 4},
        "cached": {"enable_prefix_caching": True},
        "chunked": {"max_num_batched_tokens": CHUNK_TOKENS},
        "cramped": {"num_blocks": _sizes(dtype).few_blocks, "enable_prefix_caching": True},
    }[name]


@pytest.fixture(scope="module")
def engine() -> Iterator[Callable[[str, str], LLM]]:
    """One LLM per (dtype, configuration), built on first use and shared by the tests of this module."""
    built: dict[tuple[str, str], LLM] = {}

    def get(dtype: str, name: str) -> LLM:
        if (dtype, name) not in built:
            options = {"max_num_seqs": 256, "enable_prefix_caching": False, **_options(dtype, name)}
            built[dtype, name] = LLM(MODEL, device="cpu", dtype=dtype, **options)
        return built[dtype, name]

    yield get
    built.clear()


def _runs(llm: LLM, temperature: float, sizes: Sizes, count: int | None = None, size: int | None = None,
          ) -> list[Run]:
    """The first ``count`` chats' runs (``sizes.chats`` by default), generated ``size`` chats per call (all
    in one by default)."""
    count = count or sizes.chats
    size = size or count
    return [r for i in range(0, count, size)
            for r in generate_runs(llm, CHATS[i:min(i + size, count)], sizes.tokens, temperature, first=i,
                                   seeds=SEEDS)]


@pytest.fixture(scope="module")
def reference(engine) -> Callable[[str, float], list[Run]]:
    """Per (dtype, temperature): the chats all in one call on an engine with max_num_seqs 256 and no prefix
    cache."""
    made: dict[tuple[str, float], list[Run]] = {}

    def get(dtype: str, temperature: float) -> list[Run]:
        if (dtype, temperature) not in made:
            wide = engine(dtype, "wide")
            assert wide.engine_info["batch_invariant"] is True
            sizes = _sizes(dtype)
            made[dtype, temperature] = runs = _runs(wide, temperature, sizes)
            # the chats lead to different continuations (a broken model repeating itself would prove little)
            assert len({tuple(r.tokens) for r in runs}) == len(runs)
            assert all(len(r.tokens) == sizes.tokens for r in runs)
        return made[dtype, temperature]

    return get


def _differing(runs: list[Run], expected: list[Run]) -> list[str]:
    """The chats whose logits (hence maybe tokens) differ, each with its first differing position."""
    assert 0 < len(runs) <= len(expected)
    out = []
    for i, (run, ref) in enumerate(zip(runs, expected)):
        if run != ref:
            at = next(p for p, (a, b) in enumerate(zip(run.logits_digests, ref.logits_digests)) if a != b)
            out.append(f"chat {i} from position {at} (tokens {'differ' if run.tokens != ref.tokens else 'equal'})")
    return out


def _params() -> list:
    """(dtype, temperature): the auto dtype greedy and sampled, float32 greedy."""
    return [pytest.param(dtype, t, id=f"{dtype}-{name}") for dtype in DTYPES for name, t in TEMPERATURES.items()
            if dtype == AUTO or name == "greedy"]


@pytest.mark.parametrize("dtype, temperature", _params())
def test_alone_and_in_batches_of_3(engine, reference, dtype, temperature):
    expected, wide, sizes = reference(dtype, temperature), engine(dtype, "wide"), _sizes(dtype)
    assert _differing(_runs(wide, temperature, sizes, size=3), expected) == []
    assert _differing(_runs(wide, temperature, sizes, sizes.alone, 1), expected) == []


@pytest.mark.parametrize("dtype, temperature", _params())
def test_max_num_seqs_prefix_cache_chunked_prefill_and_preemption(engine, reference, dtype, temperature):
    """With max_num_seqs 4; in batches with the prefix cache (the shared system prompt computed by one row
    and reused by the others, and by the next batch; in the sampled run, whole prompts cached by the
    greedy one); with chunked prefill; with preemption (rows recomputed, over their cached prefix)."""
    expected, sizes = reference(dtype, temperature), _sizes(dtype)
    assert _differing(_runs(engine(dtype, "four"), temperature, sizes), expected) == []

    cached = engine(dtype, "cached")
    hits = cached.block_manager.prefix_hits
    assert _differing(_runs(cached, temperature, sizes, size=sizes.cached_batch), expected) == []
    assert cached.block_manager.prefix_hits > hits

    chunked = engine(dtype, "chunked")
    assert min(len(chunked.tokenizer.encode_chat(c)) for c in CHATS) > CHUNK_TOKENS
    assert _differing(_runs(chunked, temperature, sizes), expected) == []

    cramped = engine(dtype, "cramped")
    preemptions, hits = cramped.scheduler.num_preemptions, cramped.block_manager.prefix_hits
    assert _differing(_runs(cramped, temperature, sizes), expected) == []
    assert cramped.scheduler.num_preemptions > preemptions and cramped.block_manager.prefix_hits > hits


W2_CHATS, W2_TOKENS, W2_ALONE = 48, 24, (0, 17, 47)  # the bench's W2: chats behind a ~400-token system prompt


def test_chats_behind_one_long_system_prompt_have_their_bits_alone(engine):
    """W2's shape, greedy in the auto dtype: every chat behind the same long system prompt, so decode attention
    visits those shared blocks for a tile of sequences at once (48 / 16 = 3 on two threads; phase by phase
    across the tile in bfloat16 where the CPU has AVX512-BF16). Each chat's logits, in one batch with the
    prefix cache and alone, equal those of the batch without it."""
    chats = chat_prompts(W2_CHATS, SYSTEM_PROMPT)
    expected = generate_runs(engine(AUTO, "wide"), chats, W2_TOKENS)
    assert _differing(generate_runs(engine(AUTO, "cached"), chats, W2_TOKENS), expected) == []
    for i in W2_ALONE:
        alone = generate_runs(engine(AUTO, "wide"), [chats[i]], W2_TOKENS, first=i)
        assert _differing(alone, [expected[i]]) == [], i


THREAD_CHATS = 12  # the first this many chats, greedy, on one thread


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_thread_gives_the_bits_of_several(engine, reference, dtype):
    """Where oneDNN computes the matmuls (bfloat16, and float32 on AMD CPUs), a row's logits do not depend on
    the thread count either (a Ray replica given one CPU computes what a local run on all of them does): the
    first chats on one thread equal the reference, run on the machine's threads (the GEMM library's order,
    the kernels' split of work, the panel products' thread shares). MKL's float32 GEMM (Intel) is not
    covered: MKL may split a product's sums by thread count."""
    expected, wide = reference(dtype, 0.0), engine(dtype, "wide")
    threads = torch.get_num_threads()
    if threads < 2:
        pytest.skip("the reference already ran on one thread")
    if not wide.engine_info["matmul"].startswith("onednn"):  # measured only where oneDNN computes the matmuls
        pytest.skip(f"matmuls by {wide.engine_info['matmul']}: its thread count is kept, not measured")
    sizes = _sizes(dtype)
    torch.set_num_threads(1)
    try:
        runs = _runs(wide, 0.0, sizes, min(THREAD_CHATS, sizes.chats))
    finally:
        torch.set_num_threads(threads)
    assert _differing(runs, expected) == []


def _wait_for_parts(out: Path, n: int, proc, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while len(list(out.glob("part-*.parquet"))) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out waiting for the first parts"
        time.sleep(0.05)


def _job_output(out: Path) -> dict[str, tuple[list[int], str]]:
    """Per id: the token ids (from the logprobs column) and the text a job wrote."""
    rows = read_output(out)
    assert len(rows) == len({r["id"] for r in rows}), "an id written twice"
    assert all(r["error"] is None for r in rows)
    return {r["id"]: ([p["token_id"] for p in r["logprobs"]], r["text"]) for r in rows}


def test_job_killed_after_its_first_parts_and_resumed(tmp_path, reference):
    """``forge-batch run`` on the chats greedy and sampled (two rows a chat; ``max_num_seqs`` 4, prefix cache on,
    parts of 4 rows) killed with SIGKILL after its first committed parts, then rerun: every row's token ids
    equal the engine-level reference's (the sampled rows' seeds derive from the job seed and their ids, as
    there), and ids and texts equal the same job's run uninterrupted (with max_num_seqs 256: cheaper, and
    batched differently)."""
    chats = CHATS[:_sizes(AUTO).chats]
    rows = [{"id": f"{i:02d}-{name}", "messages": chat, "sampling": {"temperature": t}}
            for name, t in TEMPERATURES.items() for i, chat in enumerate(chats)]
    write_jsonl(tmp_path / "in.jsonl", rows)
    spec = {
        "model": MODEL,
        "input": {"path": "in.jsonl", "id_field": "id", "messages_field": "messages", "sampling_field": "sampling"},
        "output": {"path": "out", "rows_per_file": 4, "flush_seconds": 0.5},
        "sampling": {"max_tokens": MAX_TOKENS, "ignore_eos": True, "seed": SEED, "logprobs": 0},
        "engine": {"max_num_seqs": 4, "enable_prefix_caching": True},
    }
    job = write_job_file(tmp_path / "job.yaml", spec)
    env = cli_env(fake=False)
    out = tmp_path / "out"
    proc = popen(["run", str(job), "--quiet"], env)
    _wait_for_parts(out, 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    committed = len(read_output(out))
    assert 0 < committed < len(rows)
    resumed = cli(["run", str(job), "--quiet"], env=env, timeout=1800)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((state_dir_for(out) / "summary.json").read_text())["resumed_rows"] == committed
    whole = cli(["run", str(job), "--quiet", "--set", "output.path=whole", "--set", "engine.max_num_seqs=256"],
                env=env, timeout=1800)
    assert whole.returncode == 0, whole.stderr

    got, uninterrupted = _job_output(out), _job_output(tmp_path / "whole")
    assert sorted(got) == sorted(r["id"] for r in rows)
    assert [i for i in got if got[i] != uninterrupted[i]] == []
    for name, t in TEMPERATURES.items():
        expected = [run.tokens for run in reference(AUTO, t)]
        assert [got[f"{i:02d}-{name}"][0] for i in range(len(chats))] == expected, name
