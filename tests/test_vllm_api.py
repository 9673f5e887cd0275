"""vLLM's offline API where it makes sense: its LLM options honoured or refused by name, get_tokenizer,
the SamplingParams fields it has (include_stop_str_in_output, allowed_token_ids, bad_words,
truncate_prompt_tokens, clone), dict prompts, ValueError for a malformed prompt, use_tqdm."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_tokenizer

from forge_batch import LLM, SamplingParams
from forge_batch.engine.llm import VLLM_ONLY_OPTIONS, kv_budget_bytes
from forge_batch.engine.sampler import LogitsProcessor, SamplingBatch


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir), device="cpu", dtype="float32")


def greedy(max_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def test_get_tokenizer_is_the_engines(llm):
    tok = llm.get_tokenizer()
    out = llm.generate("Batch generation", greedy(2))[0]
    assert out.prompt_token_ids == tok.encode("Batch generation")


def test_random_weight_engine_has_no_tokenizer_to_get():
    from forge_batch.models.config import ModelConfig

    cfg = ModelConfig(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                      max_position_embeddings=64)
    with pytest.raises(ValueError, match="no tokenizer"):
        LLM(cfg, load_format="dummy", device="cpu", dtype="float32").get_tokenizer()


def test_tokenizer_option_replaces_the_models(tiny_model_dir, tmp_path):
    other = build_tokenizer(vocab_size=300)
    other.save(str(tmp_path / "tokenizer.json"))
    llm = LLM(str(tiny_model_dir), device="cpu", dtype="float32", tokenizer=str(tmp_path))
    assert llm.get_tokenizer().vocab_size == 300
    out = llm.generate("Numbers: 42", greedy(2))[0]
    assert out.prompt_token_ids == other.encode("Numbers: 42").ids


def test_gpu_memory_utilization_on_the_cpu_names_num_blocks(tiny_model_dir):
    with pytest.raises(ValueError, match="num_blocks"):
        LLM(str(tiny_model_dir), device="cpu", dtype="float32", gpu_memory_utilization=0.5)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        LLM(str(tiny_model_dir), device="cpu", dtype="float32", gpu_memory_utilization=1.5)


def test_kv_budget_is_the_share_of_total_memory_left_after_what_is_used():
    gib = 2**30
    # 80 GiB card, 10 GiB in use (weights): 0.5 -> 40 - 10 = 30 GiB for the KV cache
    assert kv_budget_bytes(80 * gib, 70 * gib, 0.5) == 30 * gib
    assert kv_budget_bytes(80 * gib, 70 * gib, 0.1) == 0


@pytest.mark.parametrize("name,value,hint", [
    ("tensor_parallel_size", 2, "ray"),
    ("swap_space", 8, "recompute"),
    ("enable_lora", True, "merge"),
    ("kv_cache_dtype", "fp8", "dtype="),
])
def test_vllm_only_options_are_refused_with_what_to_use(tiny_model_dir, name, value, hint):
    with pytest.raises(ValueError, match=hint) as err:
        LLM(str(tiny_model_dir), device="cpu", dtype="float32", **{name: value})
    assert name in str(err.value)


def test_vllm_only_options_at_their_default_ask_nothing(tiny_model_dir):
    defaults = {name: default for name, (default, _) in VLLM_ONLY_OPTIONS.items()}
    llm = LLM(str(tiny_model_dir), device="cpu", dtype="float32", trust_remote_code=True, **defaults)
    assert llm.generate({"prompt_token_ids": [5, 6]}, greedy(2))[0].error is None


def test_vllm_sampling_options_are_accepted_at_their_default_and_refused_by_name_otherwise():
    from forge_batch.engine.sampling_params import VLLM_ONLY_SAMPLING

    defaults = {name: default for name, (default, _) in VLLM_ONLY_SAMPLING.items()}
    assert SamplingParams(max_tokens=3, **defaults).max_tokens == 3
    assert SamplingParams(n=2, best_of=2).n == 2
    assert SamplingParams(extra_args={"tag": 1}).extra == {"tag": 1}
    for name, value, hint in [("best_of", 3, "cumulative_logprob"), ("detokenize", False, "always decoded"),
                              ("guided_decoding", {"json": {}}, "json_schema="), ("structured_outputs", {"regex": "a"}, "regex=")]:
        with pytest.raises(ValueError, match=hint) as err:
            SamplingParams(**{name: value})
        assert f"SamplingParams({name}=...)" in str(err.value)
    with pytest.raises(TypeError, match="no_such_option"):
        SamplingParams(no_such_option=1)


def test_generate_takes_vllms_options_at_their_default_and_llm_takes_task_generate(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), device="cpu", dtype="float32", task="generate")
    out = llm.generate({"prompt_token_ids": [5, 6]}, greedy(2), lora_request=None, priority=None)[0]
    assert out.error is None
    with pytest.raises(ValueError, match=r"generate\(lora_request=...\).*merge"):
        llm.generate({"prompt_token_ids": [5, 6]}, greedy(2), lora_request=object())
    with pytest.raises(TypeError, match="SamplingParams or a list of them, got dict"):
        llm.generate(["a"], {"max_tokens": 2})
    with pytest.raises(ValueError, match="seed must be None or an int"):
        LLM(str(tiny_model_dir), device="cpu", dtype="float32", seed="x")


def test_an_unknown_option_is_a_type_error(tiny_model_dir):
    with pytest.raises(TypeError, match="no_such_option"):
        LLM(str(tiny_model_dir), device="cpu", no_such_option=1)


def test_revision_needs_a_repo_id(tiny_model_dir):
    with pytest.raises(ValueError, match="repo id"):
        LLM(str(tiny_model_dir), device="cpu", revision="main")


def test_dict_prompts_are_vllms_text_and_tokens_prompts(llm):
    text, ids = llm.generate([{"prompt": "Hello"}, "Hello"], greedy(4))
    assert text.error is None and text.text and text.token_ids == ids.token_ids
    assert text.prompt == "Hello"
    tokens = llm.generate({"prompt_token_ids": text.prompt_token_ids}, greedy(4))[0]
    assert tokens.token_ids == text.token_ids


@pytest.mark.parametrize("prompt,message", [
    ({"text": "Hello"}, "keys"),
    (123, "int"),
    ({"prompt": 5}, "string"),
    ([{"content": "hi"}], "role"),
    ([{"role": "narrator", "content": "hi"}], "allowed roles: system, user, assistant, tool"),
    ([{"role": "user", "content": None}], "must be text or a list of text parts"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "not a text part"),
    ({"prompt": "hi", "multi_modal_data": {"image": "x"}}, "'multi_modal_data' not supported"),
    ({"prompt_token_ids": ["a"]}, "ints"),
    ({"prompt_token_ids": [1, 10_000]}, "outside the model's vocabulary"),
    ({"prompt_token_ids": [-1, 2]}, "outside the model's vocabulary"),
    ({"prompt_token_ids": [True, 2]}, "ints"),
    ([], "an empty list"),
])
def test_a_malformed_prompt_raises_value_error(llm, prompt, message):
    with pytest.raises(ValueError, match=message):
        llm.generate([prompt, "fine"], greedy(2))


def test_half_a_utf16_pair_in_a_prompt_fails_that_prompt_saying_where(llm):
    text, chat, fine = llm.generate(["ab\ud800c", [{"role": "user", "content": "x\ud800"}], "fine"], greedy(2))
    assert text.samples[0].error_kind == "bad_prompt" and "lone surrogate '\\ud800' at character 2 of the prompt" in text.error
    assert chat.samples[0].error_kind == "bad_prompt" and "at character 1 of message 0's content" in chat.error
    assert fine.error is None


def test_chat_takes_text_parts_and_refuses_vllm_options_it_cannot_honour(llm):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name a"}, {"type": "text", "text": "colour."}]}]
    plain = [{"role": "user", "content": "Name a\ncolour."}]
    a, b = llm.chat([parts, plain], greedy(4))
    assert a.prompt == b.prompt and a.token_ids == b.token_ids
    assert llm.chat(plain, greedy(2), add_generation_prompt=True, chat_template=None)[0].error is None
    with pytest.raises(ValueError, match="continue_final_message"):
        llm.chat(plain, greedy(2), continue_final_message=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'temperature'"):
        llm.chat(plain, greedy(2), temperature=0.5)


def test_an_out_of_vocabulary_id_fails_its_request_alone_and_the_engine_stays_usable(llm):
    vocab = llm.config.vocab_size
    ok, bias = llm.generate(["fine", "biased"], [greedy(3), greedy(3, logit_bias={vocab: 5.0})])
    assert ok.error is None and len(ok.token_ids) == 3
    assert bias.finish_reason == "error" and bias.error_kind == "bad_sampling" and "vocabulary" in bias.error
    # a plugin's (or a caller's) ids set on the request skip the prompt checks of generate()
    from forge_batch.engine.request import GenerationRequest

    out = list(llm.generate_stream([GenerationRequest("x", "", greedy(2), prompt_token_ids=[1, vocab + 7])]))[0]
    assert out.error_kind == "bad_prompt" and str(vocab + 7) in out.error
    again = llm.generate("fine", greedy(3))[0]
    assert again.error is None and again.token_ids == ok.token_ids


def test_logit_bias_takes_ids_as_text_and_refuses_what_is_not_an_id():
    assert SamplingParams(logit_bias={"12": 1.5, 3: -2}).logit_bias == {12: 1.5, 3: -2}
    for bias, message in (({-1: 1.0}, "ints >= 0"), ({"x": 1.0}, "ints >= 0"), ({True: 1.0}, "ints >= 0"),
                          ({4: float("nan")}, "finite"), ({4: "a"}, "finite"), ([1, 2], "map")):
        with pytest.raises(ValueError, match=message):
            SamplingParams(logit_bias=bias)


@pytest.mark.parametrize("field,value", [("max_tokens", None), ("n", 1.5), ("min_tokens", "2"),
                                         ("temperature", None), ("top_p", float("nan"))])
def test_an_option_of_the_wrong_type_is_a_value_error_naming_it(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_a_failed_step_leaves_no_request_in_flight(llm, monkeypatch):
    def broken(plan):
        raise RuntimeError("a step that failed")

    with monkeypatch.context() as m:
        m.setattr(llm.engine.runner, "run", broken)
        with pytest.raises(RuntimeError, match="a step that failed"):
            llm.generate(["one", "two"], greedy(3))
    assert not llm.has_unfinished() and llm.block_manager.num_used_blocks == 0
    outs = llm.generate(["one", "two"], greedy(3))  # the same request ids again
    assert [o.error for o in outs] == [None, None]


def test_a_stream_closed_early_aborts_what_it_added(llm):
    stream = llm.generate_stream(["a", "b", "c", "d"], greedy(4), max_in_flight=4)
    next(stream)  # (one finished; the rest in flight)
    stream.close()
    assert not llm.has_unfinished() and llm.block_manager.num_used_blocks == 0


def test_use_tqdm_shows_a_bar(llm, capsys):
    llm.generate(["a", "b", "c"], greedy(2), use_tqdm=True)
    err = capsys.readouterr().err
    assert "Processed prompts" in err and "3/3" in err
    llm.generate(["a"], greedy(2))
    assert "Processed prompts" not in capsys.readouterr().err


def test_include_stop_str_in_output(llm):
    full = llm.generate("Paged attention", greedy(16))[0].text
    start = next(i for i in range(2, len(full) - 2) if full[i : i + 2].isprintable() and full[i : i + 2].strip())
    stop = full[start : start + 2]
    cut = full.find(stop)
    without = llm.generate("Paged attention", greedy(16, stop=[stop]))[0]
    with_stop = llm.generate("Paged attention", greedy(16, stop=[stop], include_stop_str_in_output=True))[0]
    assert without.text == full[:cut] and without.outputs[0].stop_reason == stop
    assert with_stop.text == full[: cut + len(stop)]


def test_allowed_token_ids_are_the_only_tokens(llm):
    allowed = [17, 40, 41, 99, 200]
    out = llm.generate({"prompt_token_ids": [5, 6, 7]},
                       SamplingParams(max_tokens=20, temperature=1.5, seed=3, ignore_eos=True,
                                      allowed_token_ids=allowed))[0]
    assert out.error is None and len(out.token_ids) == 20
    assert set(out.token_ids) <= set(allowed)
    bad = llm.generate({"prompt_token_ids": [5]}, greedy(2, allowed_token_ids=[10_000]))[0]
    assert bad.error is not None and "vocabulary" in bad.error


def test_bad_words_ban_the_token_that_completes_them():
    processor = LogitsProcessor(frozenset())
    params = SamplingParams()
    params._bad_words_token_ids = [[5, 7], [9]]  # what the engine sets from the tokenizer
    for history, banned in (([1, 5], {7, 9}), ([5, 1], {9}), ([], {9})):
        logits = torch.zeros(1, 12)
        batch = SamplingBatch([params], [history], [[0]], torch.zeros(1, dtype=torch.float64), frozenset())
        processor(logits, batch)
        assert {i for i in range(12) if logits[0, i] == float("-inf")} == banned


def test_bad_words_end_to_end(llm):
    tok = llm.get_tokenizer()
    first = llm.generate("Summarise", greedy(8))[0].token_ids
    # a generated token that is a word on its own (its text encodes back to it)
    word_token = next(t for t in first if tok.decode([t]).strip() and tok.encode(tok.decode([t]), add_special_tokens=False) == [t])
    word = tok.decode([word_token])
    out = llm.generate("Summarise", greedy(8, bad_words=[word]))[0]
    assert out.error is None and word_token not in out.token_ids


def test_options_that_ban_every_token_fail_that_request_not_with_a_banned_token(llm):
    eos = min(llm.tokenizer.eos_token_ids)
    banned = [SamplingParams(max_tokens=4, temperature=0.0, allowed_token_ids=[eos], min_tokens=2),
              SamplingParams(max_tokens=4, temperature=1.0, seed=1, allowed_token_ids=[eos], min_tokens=2)]
    outs = llm.generate(["a", "b", "c"], [*banned, greedy(3)])
    for out in outs[:2]:
        assert (out.finish_reason, out.error_kind, out.token_ids) == ("error", "bad_sampling", []), out
        assert "ban every token" in out.error
    assert outs[2].error is None and len(outs[2].token_ids) == 3


def test_truncate_prompt_tokens_keeps_the_end(llm):
    ids = list(range(5, 25))
    out = llm.generate({"prompt_token_ids": ids}, greedy(3, truncate_prompt_tokens=6))[0]
    assert out.prompt_token_ids == ids[-6:]
    same = llm.generate({"prompt_token_ids": ids[-6:]}, greedy(3))[0]
    assert out.token_ids == same.token_ids
    text = llm.generate("one two three four five six", greedy(2, truncate_prompt_tokens=3))[0]
    assert text.prompt == "one two three four five six" and len(text.prompt_token_ids) == 3  # the prompt as given
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        SamplingParams(truncate_prompt_tokens=0)


def test_truncate_prompt_tokens_minus_one_leaves_room_to_generate(llm):
    ids = [5 + i % 300 for i in range(llm.max_model_len + 50)]
    out = llm.generate({"prompt_token_ids": ids}, greedy(3, truncate_prompt_tokens=-1))[0]
    assert out.error is None and len(out.prompt_token_ids) == llm.max_model_len - 1 and len(out.token_ids) == 1
    assert out.prompt_token_ids == ids[-(llm.max_model_len - 1):]


def test_clone_is_a_deep_copy_that_shares_logits_processors():
    def proc(ids, logits):
        return logits

    params = SamplingParams(stop=["x"], logit_bias={3: 1.0}, logits_processors=[proc], logprobs=2)
    twin = params.clone()
    assert twin == params and twin is not params
    twin.stop.append("y")
    twin.logit_bias[4] = 2.0
    assert params.stop == ["x"] and params.logit_bias == {3: 1.0}
    assert twin.logits_processors[0] is proc


@pytest.mark.parametrize("option,value", [("block_size", 0), ("max_num_seqs", 0), ("max_num_seqs", -1),
                                          ("max_model_len", 0), ("max_model_len", -5), ("num_blocks", 0),
                                          ("max_num_batched_tokens", 1.5)])
def test_an_engine_size_below_one_is_refused_by_name(tiny_model_dir, option, value):
    with pytest.raises(ValueError, match=f"{option} must be an int >= 1"):
        LLM(str(tiny_model_dir), device="cpu", dtype="float32", **{option: value})


def test_the_triton_backend_without_a_gpu_is_refused_when_built(tiny_model_dir, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="kernel_backend 'triton' needs a CUDA device"):
        LLM(str(tiny_model_dir), device="cpu", dtype="float32", kernel_backend="triton")


def test_engine_info_records_the_cache_and_batch_sizes(llm):
    info, config = llm.engine_info, llm.engine_config
    assert (info["num_blocks"], info["block_size"], info["max_num_seqs"]) == (config.num_blocks, config.block_size,
                                                                           config.max_num_seqs)
    assert info["kv_cache"] == "paged" and info["enable_prefix_caching"] is True and info["max_num_batched_tokens"] > 0



def test_generate_stream_says_how_many_results_of_its_step_are_still_to_come(llm):
    """A runner committing on a timer waits for the rest of a step's results (they come at once) rather than
    leave them uncommitted until the next step ends."""
    waiting = [llm.outputs_waiting for _ in llm.generate_stream(["a", "b", "c"], greedy(3))]
    assert waiting == [2, 1, 0]  # the three finish in the same step


def test_load_format_dummy_gives_a_checkpoint_random_weights_of_its_shape(tiny_model_dir, llm):
    dummy = LLM(str(tiny_model_dir), device="cpu", dtype="float32", load_format="dummy")
    assert dummy.config.vocab_size == llm.config.vocab_size and dummy.tokenizer is not None
    real = dict(llm.model.named_parameters())
    assert any(not torch.equal(p, real[name]) for name, p in dummy.model.named_parameters())


def test_vllm_spellings_of_options_this_engine_honours(tiny_model_dir, caplog):
    import logging

    llm = LLM(str(tiny_model_dir), device="cpu", dtype="float", seed=None, max_logprobs=-1, enable_chunked_prefill=True)
    assert llm.dtype == torch.float32
    assert llm.generate("x", greedy(2, logprobs=50))[0].error is None  # -1: no cap
    with pytest.raises(ValueError, match="max_logprobs must be an int >= 0"):
        LLM(str(tiny_model_dir), device="cpu", max_logprobs=-5)
    with pytest.raises(ValueError, match="enable_chunked_prefill"):
        LLM(str(tiny_model_dir), device="cpu", enable_chunked_prefill=False)
    with caplog.at_level(logging.WARNING, logger="forge_batch.engine"):
        half = LLM(str(tiny_model_dir), device="cpu", dtype="half")
    assert half.dtype == torch.float16 and any("batch invariance is off" in r.getMessage() for r in caplog.records)
