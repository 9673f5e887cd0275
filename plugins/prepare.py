"""Built-in prompt preparation: turns a row into ``request.prompt`` (a plain string or a chat).

Runs first in the ``prepare_request`` chain (``tryfirst``), so other plugins see the prompt it built. In
order of precedence: ``input.template`` rendered over the row (jinja sandbox; an undefined column is a
``template_error`` on that row); the chat in ``input.messages_field``; the string in ``input.prompt_field``.
Plain prompts become a one-message chat (with ``input.system_prompt``) when the chat template applies.
A message's content is text or OpenAI-style content parts (``[{"type": "text", "text": ...}]``, joined with
newlines). Problems are the row's: ``missing_prompt``, ``empty_prompt``, ``bad_prompt`` (a prompt that is not
a string), ``bad_messages`` (not a list of ``{role, content}`` with a known role, see ``CHAT_ROLES``),
``template_error``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from forge_batch.engine.prompts import PromptError, content_text
from forge_batch.hookspecs import RowError, hookimpl
from forge_batch.models.chat_template import CHAT_ROLES

if TYPE_CHECKING:
    from forge_batch.contract import RunContext
    from forge_batch.engine.request import GenerationRequest


def _content_text(content: Any, where: str) -> str:
    try:
        return content_text(content, where)
    except PromptError as exc:
        raise RowError(str(exc), exc.kind) from None


def _messages(value: Any, field: str) -> list[dict[str, Any]]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RowError(f"messages field {field!r} is a string but not JSON: {e}", "bad_messages") from None
    if not isinstance(value, (list, tuple)):
        raise RowError(f"messages field {field!r} must be a list of {{role, content}}, got {type(value).__name__}", "bad_messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f"messages[{i}] in {field!r} needs 'role' and 'content'", "bad_messages")
        if m["role"] not in CHAT_ROLES:
            raise RowError(
                f"messages[{i}].role in {field!r} is {m['role']!r}; allowed roles: {', '.join(CHAT_ROLES)}", "bad_messages"
            )
        content = _content_text(m["content"], f"messages[{i}].content in {field!r}")
        out.append({"role": m["role"], "content": content})
    if not out or not any(m["content"].strip() for m in out):
        raise RowError(f"empty prompt: messages field {field!r} has no content", "empty_prompt")
    return out


@hookimpl(tryfirst=True)
def prepare_request(request: GenerationRequest, row: dict[str, Any], context: RunContext) -> None:
    spec = context.input
    chat = context.chat and row.get("_forge_chat", True) is not False
    if spec.template is not None:
        try:
            prompt: Any = context.template.render({**row, "row": row})
        except Exception as e:
            raise RowError(f"template error: {type(e).__name__}: {e}", "template_error") from None
    elif row.get(spec.messages_field) is not None:
        messages = _messages(row[spec.messages_field], spec.messages_field)
        # A chat is always rendered with the chat template; apply_chat_template only concerns plain prompts.
        if spec.system_prompt and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": spec.system_prompt})
        request.prompt = messages
        return
    elif row.get(spec.prompt_field) is not None:
        prompt = row[spec.prompt_field]
        if not isinstance(prompt, str):  # a number or a list is not made into text: the input is wrong
            raise RowError(f"prompt field {spec.prompt_field!r} must be a string, got {type(prompt).__name__}", "bad_prompt")
    else:
        def state(field: str) -> str:
            return "null" if field in row else "missing"

        raise RowError(f"missing prompt: field {spec.messages_field!r} (a chat) is {state(spec.messages_field)} and "
                       f"field {spec.prompt_field!r} is {state(spec.prompt_field)}", "missing_prompt")
    if not prompt.strip():
        raise RowError("empty prompt", "empty_prompt")
    if chat:
        messages = [{"role": "user", "content": prompt}]
        if spec.system_prompt:
            messages.insert(0, {"role": "system", "content": spec.system_prompt})
        request.prompt = messages
    else:
        request.prompt = prompt
