"""Engine behaviour on a tiny random-weight model: sampling options, seeds, errors, streaming."""

from __future__ import annotations

import pytest

from forge_batch import LLM, SamplingParams
from forge_batch.engine.request import GenerationRequest


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    return LLM(str(tiny_model_dir), device="cpu", dtype="float32", max_num_seqs=8)


PROMPTS = ["The quick brown fox", "Paged attention stores", "def add(a, b):", "Numbers: 1 2 3"]


def test_results_in_input_order_with_prompt_ids(llm):
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    assert [o.index for o in outs] == [0, 1, 2, 3]
    for prompt, o in zip(PROMPTS, outs):
        assert o.prompt_token_ids == llm.tokenizer.encode(prompt)
        assert len(o.token_ids) == 5 and o.finish_reason == "length" and o.error is None
        assert o.text == llm.tokenizer.decode(o.token_ids)


def test_chat_prompt_uses_the_chat_template(llm):
    chat = [{"role": "user", "content": "hello"}]
    out = llm.generate([chat], SamplingParams(max_tokens=2, temperature=0.0))[0]
    rendered = llm.tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert out.prompt_token_ids == llm.tokenizer.encode(rendered, add_special_tokens=False)


def test_chat_takes_one_conversation_or_many(llm):
    """vLLM's LLM.chat: the same ids as generate() on the same conversations, in input order."""
    p = SamplingParams(max_tokens=5, temperature=0)
    convs = [[{"role": "user", "content": "hi"}], [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why?"}]]
    many = llm.chat(convs, p)
    assert [o.prompt_token_ids for o in many] == [o.prompt_token_ids for o in llm.generate(convs, p)]
    assert [o.outputs[0].token_ids for o in many] == [o.outputs[0].token_ids for o in llm.generate(convs, p)]
    one = llm.chat(convs[1], p)
    assert len(one) == 1 and one[0].outputs[0].token_ids == many[1].outputs[0].token_ids
    with pytest.raises(TypeError, match="conversation"):
        llm.chat(["not a conversation"], p)


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny_model_dir):
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=42, ignore_eos=True)
    alone = LLM(str(tiny_model_dir), device="cpu", dtype="float32").generate([PROMPTS[0]], p)[0]
    other = SamplingParams(max_tokens=20, temperature=1.5, ignore_eos=True)
    crowd = LLM(str(tiny_model_dir), device="cpu", dtype="float32", max_num_seqs=3, max_num_batched_tokens=8)
    outs = crowd.generate(PROMPTS[1:3] + [PROMPTS[0]] + PROMPTS[2:], [other, other, p, other, other])
    assert outs[2].token_ids == alone.token_ids
    # And different seeds give different samples (with overwhelming probability at temperature 1).
    p2 = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=43, ignore_eos=True)
    assert crowd.generate([PROMPTS[0]], p2)[0].token_ids != alone.token_ids


def test_n_samples_share_prompt_and_differ(llm):
    out = llm.generate([PROMPTS[1]], SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=3, ignore_eos=True))[0]
    assert [s.index for s in out.samples] == [0, 1, 2, 3]
    assert len({tuple(s.token_ids) for s in out.samples}) > 1
    assert out.outputs is out.samples and out.text == out.samples[0].text


def test_stop_string_is_cut_from_text(llm):
    base = llm.generate([PROMPTS[2]], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0]
    assert len(base.text) > 4
    stop = base.text[2:4]
    out = llm.generate([PROMPTS[2]], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.samples[0].stop_reason == stop
    assert out.text == base.text[: base.text.find(stop)]
    assert stop not in out.text


def test_stop_token_ids_and_eos(llm):
    base = llm.generate([PROMPTS[3]], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0]
    target = base.token_ids[3]
    out = llm.generate([PROMPTS[3]], SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[target]))[0]
    first = base.token_ids.index(target)
    assert out.finish_reason == "stop" and out.token_ids == base.token_ids[: first + 1]
    # min_tokens bans the stop token until then, so generation runs past it.
    later = llm.generate([PROMPTS[3]], SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[target],
                                                      min_tokens=first + 2))[0]
    assert len(later.token_ids) >= first + 2


def test_eos_ends_generation_unless_ignored(llm):
    eos = next(iter(llm.tokenizer.eos_token_ids))
    forced = SamplingParams(max_tokens=10, temperature=0.0, logit_bias={eos: 100.0})
    out = llm.generate([PROMPTS[0]], forced)[0]
    assert out.token_ids == [eos] and out.finish_reason == "stop" and out.text == ""
    out = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=10, temperature=0.0, logit_bias={eos: 100.0},
                                                     ignore_eos=True))[0]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"


def test_token_id_prompts_as_vllm_tokens_prompt(llm):
    text = llm.generate(PROMPTS[:2], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    ids = [{"prompt_token_ids": o.prompt_token_ids} for o in text]
    by_ids = llm.generate(ids, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in by_ids] == [o.outputs[0].token_ids for o in text]
    single = llm.generate(ids[0], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert len(single) == 1 and single[0].outputs[0].token_ids == text[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="list of ints"):  # the offline API refuses it before running any
        llm.generate([{"prompt_token_ids": ["a"]}], SamplingParams(max_tokens=2))
    bad = next(llm.generate_stream([{"prompt_token_ids": ["a"]}], SamplingParams(max_tokens=2)))
    assert bad.finish_reason == "error" and "list of ints" in bad.error  # a stream (a job's rows): its row


def test_bad_requests_fail_alone(llm):
    long_prompt = "word " * (llm.max_model_len + 10)
    prompts = ["", long_prompt, PROMPTS[0], [{"role": "user"}]]
    outs = sorted(llm.generate_stream(prompts, SamplingParams(max_tokens=3)), key=lambda o: o.index)
    assert outs[0].finish_reason == "error" and "empty" in outs[0].error
    assert outs[1].finish_reason == "error" and "too long" in outs[1].error
    assert outs[2].error is None and outs[2].finish_reason in ("stop", "length")
    assert outs[3].finish_reason == "error" and "content" in outs[3].error
    # generate() fails what only the engine can judge alone, and refuses a malformed prompt outright
    outs = llm.generate(prompts[:3], SamplingParams(max_tokens=3))
    assert [o.finish_reason == "error" for o in outs] == [True, True, False]
    with pytest.raises(ValueError, match="content"):
        llm.generate(prompts, SamplingParams(max_tokens=3))


def test_stream_yields_in_finish_order_and_pulls_lazily(llm):
    pulled = []

    def requests():
        for i, n in enumerate([12, 2, 6, 1]):
            pulled.append(i)
            yield GenerationRequest(f"r{i}", PROMPTS[i], SamplingParams(max_tokens=n, temperature=0.0,
                                                                         ignore_eos=True))

    stream = llm.generate_stream(requests(), max_in_flight=2)
    first = next(stream)
    assert first.request_id == "r1"  # shortest of the first two admitted
    assert len(pulled) <= 3
    rest = [o.request_id for o in stream]
    assert sorted(rest + [first.request_id]) == ["r0", "r1", "r2", "r3"]


def test_request_with_error_passes_through(llm):
    outs = list(llm.generate_stream([GenerationRequest("bad", error="malformed JSON on line 3")]))
    assert outs[0].error == "malformed JSON on line 3" and outs[0].finish_reason == "error"


def test_params_validation():
    with pytest.raises(ValueError, match="mutually exclusive"):
        SamplingParams(json_schema={"type": "string"}, regex="a+")
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="empty string"):  # as vLLM: it would end every output at once
        SamplingParams(stop=["end", ""])
    with pytest.raises(ValueError, match="stop_token_ids must be a list, got 5"):
        SamplingParams(stop_token_ids=5)
    with pytest.raises(ValueError, match="ignore_eos must be true or false"):
        SamplingParams(ignore_eos="yes")
    assert SamplingParams(stop=("a", "b"), stop_token_ids=(3,)).stop == ["a", "b"]
    assert SamplingParams(ignore_eos=1).ignore_eos is True  # as Python (and vLLM) take 1


def test_one_params_per_prompt_is_checked(llm):
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate(PROMPTS, [SamplingParams()] * 2)


def test_logits_are_computed_only_for_each_sequences_last_position(llm, monkeypatch):
    """A prefill of several prompts runs every prompt token through the model but the LM head (a
    vocab-wide matmul per row) only over one row per sampling sequence."""
    heads = []
    real = llm.model.compute_logits
    monkeypatch.setattr(llm.model, "compute_logits", lambda hidden, out=None: heads.append(hidden.shape[0]) or real(hidden, out=out))
    llm.generate(PROMPTS, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    prompt_tokens = sum(len(llm.tokenizer.encode(p)) for p in PROMPTS)
    assert heads and max(heads) <= len(PROMPTS) < prompt_tokens
    assert sum(heads) == 3 * len(PROMPTS)  # one row per generated token, nothing for the other prompt tokens


def test_dtype_auto_is_bfloat16_only_where_the_cpu_has_native_bf16(monkeypatch):
    import torch

    from forge_batch.engine import device

    cpu = torch.device("cpu")
    monkeypatch.setattr(device, "cpu_supports_bf16", lambda: True)
    assert device.resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(device, "cpu_supports_bf16", lambda: False)
    assert device.resolve_dtype("auto", cpu) == torch.float32
    assert device.resolve_dtype("bf16", cpu) == torch.bfloat16  # asked for explicitly: always honoured


def test_cpu_supports_bf16_reads_the_instruction_set_flags(monkeypatch, tmp_path):
    import builtins

    import torch

    from forge_batch.engine import device

    real_open = builtins.open

    def fake_cpuinfo(flags: str):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor : 0\nflags\t\t: fpu sse avx512f {flags}\n")
        return lambda path, *a, **k: real_open(info if path == "/proc/cpuinfo" else path, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_cpuinfo(""))
    assert not device.cpu_supports_bf16()  # AVX-512 alone: oneDNN would emulate bf16, slower than float32
    monkeypatch.setattr(builtins, "open", fake_cpuinfo("avx512_bf16"))
    assert device.cpu_supports_bf16() == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@pytest.mark.parametrize("ids", [[5, 6, 7, 9, 2, 3], list(range(40, 80, 2))])  # a few runs; scattered ids
def test_zero_blocks_zeroes_exactly_the_given_blocks_of_every_layer(tiny_model_dir, ids):
    """Fresh KV blocks are zeroed before first use (a gathered block's masked slots must not hold NaN);
    consecutive ids are filled as slices, scattered ones by index: both touch those blocks only."""
    import torch

    runner = LLM(str(tiny_model_dir), device="cpu", dtype="float32", num_blocks=96).runner
    for k_cache, v_cache in runner.kv_caches:
        k_cache.fill_(float("nan"))
        v_cache.fill_(float("nan"))
    runner.zero_blocks(ids)
    chosen = torch.zeros(96, dtype=torch.bool)
    chosen[ids] = True
    for cache in (c for pair in runner.kv_caches for c in pair):
        assert (cache[chosen] == 0).all()
        assert cache[~chosen].isnan().all()


def test_default_batch_size_follows_device_and_dtype(tiny_model_dir):
    """No max_num_seqs given: 256 rows for a bfloat16 CPU model (its AMX / AVX512-BF16 matmuls keep
    gaining to there), 128 otherwise; an explicit value always wins."""
    assert LLM(str(tiny_model_dir), device="cpu", dtype="bfloat16").scheduler.config.max_num_seqs == 256
    assert LLM(str(tiny_model_dir), device="cpu", dtype="float32").scheduler.config.max_num_seqs == 128
    assert LLM(str(tiny_model_dir), device="cpu", dtype="bfloat16", max_num_seqs=7).scheduler.config.max_num_seqs == 7


def test_a_raising_logits_processor_fails_only_its_own_sequence(llm):
    """A per-request logits processor that raises mid-generation finishes that sequence with an error
    naming the exception and frees its KV blocks; the other rows of the same steps keep their tokens."""
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)

    def explode_on_third_token(tokens, logits):
        if len(tokens) == 2:
            raise RuntimeError("processor exploded")
        return logits

    failing = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logits_processors=[explode_on_third_token])
    baseline = llm.generate(PROMPTS, greedy)
    outs = llm.generate(PROMPTS, [greedy, failing, greedy, greedy])
    bad = outs[1]
    assert bad.finish_reason == "error" and bad.error is not None
    assert "RuntimeError: processor exploded" in bad.error and bad.error.startswith("logits processor")
    assert bad.token_ids == baseline[1].token_ids[:2]  # the tokens before the failure, none after
    for i in (0, 2, 3):
        assert outs[i].error is None and outs[i].token_ids == baseline[i].token_ids
    assert llm.block_manager.num_used_blocks == 0 and not llm.has_unfinished()


def test_default_num_blocks_holds_max_num_seqs_full_sequences_besides_the_watermark():
    from forge_batch.engine.config import default_num_blocks

    for seqs in (1, 3, 64, 256):
        for max_model_len in (1, 15, 16, 17, 2048, 8192):
            n = default_num_blocks(max_num_seqs=seqs, max_model_len=max_model_len, block_size=16, bytes_per_block=1,
                                   available_bytes=1 << 40)
            full = seqs * -(-max_model_len // 16)
            assert full <= n - max(1, n // 100) and n <= full + full // 50 + 1  # room, and only a little more
    capped = dict(max_num_seqs=64, max_model_len=8192, block_size=16, bytes_per_block=1000)
    assert default_num_blocks(**capped, available_bytes=2_000_500) == 2000  # the memory cap wins
    assert default_num_blocks(**capped, available_bytes=10) == 1


def test_a_cpu_engine_writes_only_the_kv_blocks_it_holds_at_once(tiny_model_dir):
    """Sequences one after another reuse freed KV blocks instead of touching the rest of a large cache,
    so a long job's memory stays at its working set; the tokens are those of a cache that never reuses."""
    llm = LLM(str(tiny_model_dir), device="cpu", dtype="float32", max_num_seqs=2, num_blocks=512)
    prompts = [f"Item {i}: the quick brown fox jumps over the lazy dog" for i in range(16)]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, params)
    longest = max(len(o.prompt_token_ids) for o in outs) + 4
    assert llm.block_manager.num_blocks_ever_used <= 2 * -(-longest // llm.engine_config.block_size) + 2
    roomy = LLM(str(tiny_model_dir), device="cpu", dtype="float32", max_num_seqs=2, num_blocks=512)
    roomy.block_manager.reuse_freed_first = False
    ref = roomy.generate(prompts, params)
    assert roomy.block_manager.num_blocks_ever_used > 16
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]


def test_a_cache_smaller_than_the_context_caps_it_so_a_long_generation_ends_at_length(tiny_model_dir, caplog):
    """Four blocks of 16 tokens hold 64: a sequence that would grow past them (alone, it could only preempt
    itself) ends at 64 tokens with "length"; a prompt longer than that is its own error; the others run."""
    small = LLM(str(tiny_model_dir), device="cpu", dtype="float32", num_blocks=4, block_size=16, max_num_seqs=4)
    assert small.max_model_len == 64 and "max_model_len lowered" in caplog.text
    params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    grows, short, too_long = small.generate([{"prompt_token_ids": list(range(5, 50))},
                                             {"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": list(range(5, 75))}],
                                            [params, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), params])
    assert grows.finish_reason == "length" and len(grows.token_ids) == 64 - 45
    assert short.error is None and len(short.token_ids) == 4
    assert too_long.error_kind == "prompt_too_long"
