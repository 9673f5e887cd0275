"""Render a model's Jinja chat template the way Hugging Face transformers does.

Chat templates arrive inside model files from the internet, so they are untrusted code: they run in
jinja2's ``ImmutableSandboxedEnvironment`` (no underscore attributes, no mutating builtins), with
the same globals and filters transformers provides so that templates written for it render
byte-for-byte identically here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The message roles a job's chat may use: the ones the chat templates of the model families here (ChatML,
# Llama 3, Qwen2) and the OpenAI chat format share. Templates render any string, so another role would be
# sent to the model as is, as text it was never trained on.
CHAT_ROLES = ("system", "user", "assistant", "tool")


class ChatTemplateError(ValueError):
    """The template is missing, does not compile, or raised while rendering (e.g. via raise_exception)."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja's own tojson HTML-escapes <, >, & and ' -- wrong inside a prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _SafeNamespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore names, so ``ns.__class__``-style tricks cannot be planted."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - mirrors jinja's signature trick
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates may not set underscore attribute {name!r}")


class _GenerationBlock(jinja2.ext.Extension):
    """Accept ``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker); we only
    need the text, so the block renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


@lru_cache(maxsize=32)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile once per distinct template string (every row of a job uses the same one)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _SafeNamespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template does not compile: {exc} (line {exc.lineno})") from exc


def _plain(value: Any) -> Any:
    """Deep-copy into plain dicts/lists so a template can never mutate the caller's rows."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def render_chat_template(
    template: str | None,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str | None] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    **extra: Any,
) -> str:
    """Render ``messages`` ([{role, content}, ...]) with ``template``; the variables match what
    transformers' ``apply_chat_template`` passes (``bos_token``, ``eos_token``, ``tools``, ...)."""
    if not template:
        raise ChatTemplateError(
            "the model's tokenizer has no chat template; send a plain prompt instead of messages, "
            "or set a chat template in the job"
        )
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of {{role, content}} objects, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"message {i} must be an object with 'role' and 'content', got {message!r}")
        if not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"message {i} has no string 'role': {dict(message)!r}")
    compiled = compile_chat_template(template)
    variables: dict[str, Any] = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    variables.update(_plain(extra))
    try:
        return compiled.render(
            messages=_plain(list(messages)),
            add_generation_prompt=add_generation_prompt,
            tools=_plain(tools) if tools is not None else None,
            **variables,
        )
    except jinja2.exceptions.TemplateError as exc:  # includes SecurityError and raise_exception()
        raise ChatTemplateError(f"chat template failed to render: {exc}") from exc
    except (TypeError, KeyError, AttributeError, IndexError, ValueError) as exc:
        raise ChatTemplateError(f"chat template failed to render: {type(exc).__name__}: {exc}") from exc
