"""The OpenAI Batch API JSONL format, as input and output (the shape vLLM's ``run-batch`` accepts).

Input line::

    {"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "...", "messages": [...], "max_tokens": 64, "temperature": 0}}

Output line::

    {"id": "batch_req_...", "custom_id": "req-1",
     "response": {"status_code": 200, "request_id": "req_...",
                  "body": {"id": "chatcmpl-...", "object": "chat.completion", "created": 1700000000,
                           "model": "...", "choices": [{"index": 0, "message": {"role": "assistant",
                           "content": "..."}, "logprobs": null, "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}}},
     "error": null}

``logprobs`` is null unless the line asked (chat: ``logprobs: true`` and ``top_logprobs: k``; completions:
``logprobs: k``); then it is OpenAI's shape, from the output's logprobs column.
A failed request gets ``status_code`` 400 with an OpenAI-style error body, and the same error in ``error``.
The body's ``model`` is ignored on input: the job's model runs every line.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
SUPPORTED_URLS = (CHAT_URL, COMPLETIONS_URL)

# body key -> SamplingParams field
_DIRECT = (
    "n",
    "max_tokens",
    "min_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "ignore_eos",
    "stop_token_ids",
    "skip_special_tokens",
    "include_stop_str_in_output",
    "allowed_token_ids",
    "bad_words",
    "truncate_prompt_tokens",
)
_RENAMED = {
    "max_completion_tokens": "max_tokens",
    "guided_json": "json_schema",
    "guided_regex": "regex",
    "guided_choice": "choice",
}
# Accepted and ignored: they do not change what is generated here.
_IGNORED = {
    "model",
    "messages",
    "prompt",
    "user",
    "stream",
    "stream_options",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
    "priority",
    "request_id",
    "cache_salt",
    "guided_decoding_backend",
}
_UNSUPPORTED = {"tools", "tool_choice", "functions", "function_call", "audio", "modalities", "prediction"}
# vLLM fields that change what is generated, not supported here: accepted only at vLLM's default (per URL
# where it differs), a bad_request otherwise, never run without them. best_of is checked against n.
_ONLY_DEFAULT: dict[str, Any] = {
    "echo": False,
    "suffix": "",
    "use_beam_search": False,
    "length_penalty": 1.0,
    "spaces_between_special_tokens": True,
    "add_generation_prompt": True,
    "continue_final_message": False,
    "chat_template": None,
    "chat_template_kwargs": {},
    "documents": None,
    "guided_grammar": None,
    "guided_whitespace_pattern": None,
    "structural_tag": None,
    "logits_processors": None,
}
_ONLY_DEFAULT_BY_URL = {"add_special_tokens": {CHAT_URL: False, COMPLETIONS_URL: True}}
# vLLM's structured_outputs keys -> SamplingParams field (json_object: any JSON object)
_STRUCTURED = {"json": "json_schema", "regex": "regex", "choice": "choice"}


class OpenAIRequestError(ValueError):
    """A request line this tool cannot run; the message says why."""


def _logprobs_from_body(body: Mapping[str, Any], url: str) -> dict[str, Any]:
    """Chat: ``logprobs: true`` with ``top_logprobs: k``; completions: ``logprobs: k``; and vLLM's
    ``prompt_logprobs: k`` on either."""
    out: dict[str, Any] = {}
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if url == CHAT_URL:
        if logprobs is not None and not isinstance(logprobs, bool):
            raise OpenAIRequestError("body.logprobs must be true or false for chat completions (top_logprobs: k for more)")
        if top is not None and not logprobs:
            raise OpenAIRequestError("body.top_logprobs needs body.logprobs: true")
        if logprobs:
            out["logprobs"] = 0 if top is None else top
    elif logprobs is not None and logprobs is not False:
        if isinstance(logprobs, bool) or not isinstance(logprobs, int):
            raise OpenAIRequestError("body.logprobs must be an int (the top tokens per position) for completions")
        out["logprobs"] = logprobs
    if body.get("prompt_logprobs") is not None:
        out["prompt_logprobs"] = body["prompt_logprobs"]
    return out


def sampling_from_body(body: Mapping[str, Any], url: str = CHAT_URL) -> dict[str, Any]:
    """SamplingParams overrides from a request body (OpenAI names plus vLLM's extras)."""
    out: dict[str, Any] = _logprobs_from_body(body, url)
    for key, value in body.items():
        if value is None or key in _IGNORED or key in ("logprobs", "top_logprobs", "prompt_logprobs"):
            continue
        if key in _UNSUPPORTED:
            raise OpenAIRequestError(f"body.{key} is not supported")
        if key in _ONLY_DEFAULT or key in _ONLY_DEFAULT_BY_URL:
            default = _ONLY_DEFAULT[key] if key in _ONLY_DEFAULT else _ONLY_DEFAULT_BY_URL[key][url]
            if value != default:
                raise OpenAIRequestError(f"body.{key} = {value!r} is not supported (only vLLM's default, {default!r})")
        elif key == "best_of":
            if value != body.get("n", 1):
                raise OpenAIRequestError(f"body.best_of = {value!r} is not supported (only n's value: each of the n "
                                         "samples is returned)")
        elif key == "structured_outputs":
            out.update(_structured_outputs(value))
        elif key in _DIRECT:
            out[key] = value
        elif key in _RENAMED:
            out[_RENAMED[key]] = value
        elif key == "logit_bias":
            out["logit_bias"] = {int(k): float(v) for k, v in dict(value).items()}
        elif key == "response_format":
            rf = dict(value)
            kind = rf.get("type")
            if kind == "json_schema":
                js = rf.get("json_schema") or {}
                schema = js.get("schema") if isinstance(js, Mapping) else None
                if schema is None:
                    raise OpenAIRequestError("response_format json_schema needs json_schema.schema")
                out["json_schema"] = schema
            elif kind == "json_object":
                out["json_schema"] = {"type": "object"}
            elif kind not in (None, "text"):
                raise OpenAIRequestError(f"response_format type {kind!r} is not supported")
        # anything else: unknown extension fields are ignored, as vLLM does
    if "max_tokens" in out and "max_completion_tokens" in body and "max_tokens" in body:
        out["max_tokens"] = body["max_tokens"]
    return out


def _structured_outputs(value: Any) -> dict[str, Any]:
    """vLLM's ``structured_outputs`` object as SamplingParams fields: ``json``, ``regex``, ``choice`` and
    ``json_object``; its other kinds (``grammar``, ``structural_tag``) are refused."""
    if not isinstance(value, Mapping):
        raise OpenAIRequestError("body.structured_outputs must be an object")
    out: dict[str, Any] = {}
    for key, spec in value.items():
        if spec is None or spec is False:
            continue
        if key in _STRUCTURED:
            out[_STRUCTURED[key]] = spec
        elif key == "json_object":
            out["json_schema"] = {"type": "object"}
        elif key not in ("backend", "disable_fallback"):  # which grammar engine runs it: not what it allows
            raise OpenAIRequestError(f"body.structured_outputs.{key} is not supported (json, regex, choice or "
                                     "json_object are)")
    return out


def parse_request(obj: Any) -> dict[str, Any]:
    """Turn one parsed input line into a row: custom_id, url, body, messages or prompt, sampling.

    Raises OpenAIRequestError for a line that is JSON but not a runnable request."""
    if not isinstance(obj, Mapping):
        raise OpenAIRequestError(f"a batch line must be a JSON object, got {type(obj).__name__}")
    url = obj.get("url", CHAT_URL)
    body = obj.get("body")
    method = obj.get("method", "POST")
    # an absent custom_id stays absent (its row's error says "missing", not "null")
    row: dict[str, Any] = {**({"custom_id": obj["custom_id"]} if "custom_id" in obj else {}), "method": method, "url": url}
    if not isinstance(method, str) or method.upper() != "POST":
        raise OpenAIRequestError(f"method {method!r} is not supported (batch requests are POST)")
    if url not in SUPPORTED_URLS:
        raise OpenAIRequestError(f"url {url!r} is not supported (use {' or '.join(SUPPORTED_URLS)})")
    if not isinstance(body, Mapping):
        raise OpenAIRequestError("the line has no body object")
    row["body"] = dict(body)
    if url == CHAT_URL:
        row["messages"] = body.get("messages")
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            if len(prompt) != 1 or not isinstance(prompt[0], str):
                raise OpenAIRequestError("body.prompt must be a string (or a list of one string)")
            prompt = prompt[0]
        row["prompt"] = prompt
        row["_forge_chat"] = False  # a completions prompt is used as is, never chat-templated
    row["sampling"] = sampling_from_body(body, url)
    return row


def _short_hash(*parts: Any) -> str:
    return hashlib.blake2b("\x00".join(map(str, parts)).encode(), digest_size=12).hexdigest()


def _token_bytes(token: str | None) -> list[int] | None:
    return None if token is None else list(token.encode("utf-8"))


def _choice_logprobs(positions: list[Mapping[str, Any]] | None, url: str) -> dict[str, Any] | None:
    """A choice's ``logprobs`` from the output's logprobs column: chat completions' ``content`` list, or
    the completions API's parallel lists; None when the request did not ask."""
    if positions is None:
        return None
    if url == COMPLETIONS_URL:
        offsets, at = [], 0
        for p in positions:
            offsets.append(at)
            at += len(p["token"] or "")
        return {
            "tokens": [p["token"] for p in positions],
            "token_logprobs": [p["logprob"] for p in positions],
            "top_logprobs": [{t["token"]: t["logprob"] for t in p["top"] or []} for p in positions],
            "text_offset": offsets,
        }
    return {"content": [
        {"token": p["token"], "logprob": p["logprob"], "bytes": _token_bytes(p["token"]),
         "top_logprobs": [{"token": t["token"], "logprob": t["logprob"], "bytes": _token_bytes(t["token"])}
                          for t in p["top"] or []]}
        for p in positions
    ], "refusal": None}


def _answered(record: Mapping[str, Any]) -> bool:
    """The model answered: no error, or one about the answer (a constrained output that does not conform, cut
    by max_tokens say, which vLLM returns as a 200 with finish_reason "length"); the error is kept beside it."""
    return not record.get("error") or record.get("error_kind") in ("invalid_output", "type_mismatch")


def response_line(records: list[Mapping[str, Any]], id_column: str, model: str) -> dict[str, Any]:
    """One output line for all samples (records) of one request, in the Batch API's shape."""
    first = records[0]
    custom_id = first.get(id_column)
    custom_id = None if custom_id is None else str(custom_id)
    key = _short_hash(custom_id, first.get("row_index"))
    extra = first.get("extra_obj") or {}
    url = extra.get("openai_url") or CHAT_URL
    finished = first.get("finished_at")
    created = int(finished.timestamp()) if hasattr(finished, "timestamp") else 0
    ok = [r for r in records if _answered(r)]
    if not ok:
        kind = first.get("error_kind") or "error"
        message = first.get("error") or "failed"
        return {
            "id": f"batch_req_{key}",
            "custom_id": custom_id,
            "response": {
                "status_code": 400,
                "request_id": f"req_{key}",
                "body": {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": kind}},
            },
            "error": {"code": kind, "message": message},
        }
    choices = []
    for r in sorted(records, key=lambda r: r.get("sample_index") or 0):
        text = r.get("text") if _answered(r) else None
        choice: dict[str, Any] = {"index": r.get("sample_index") or 0}
        if url == COMPLETIONS_URL:
            choice["text"] = text
        else:
            choice["message"] = {"role": "assistant", "content": text}
        choice["logprobs"] = _choice_logprobs(r.get("logprobs"), url) if _answered(r) else None
        choice["finish_reason"] = r.get("finish_reason")
        if r.get("error"):
            choice["error"] = {"code": r.get("error_kind"), "message": r.get("error")}
        choices.append(choice)
    prompt_tokens = int(first.get("prompt_tokens") or 0)
    completion_tokens = sum(int(r.get("completion_tokens") or 0) for r in records)
    body = {
        "id": f"{'cmpl' if url == COMPLETIONS_URL else 'chatcmpl'}-{key}",
        "object": "text_completion" if url == COMPLETIONS_URL else "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
    if first.get("prompt_logprobs") is not None:  # vLLM's extension, in its shape
        body["prompt_logprobs"] = [
            None if p is None else {
                str(t["token_id"]): {"logprob": t["logprob"], "rank": rank, "decoded_token": t["token"]}
                for rank, t in [(p["rank"], p), *((i, t) for i, t in enumerate(p["top"] or [], start=1))]
            }
            for p in first["prompt_logprobs"]
        ]
    return {
        "id": f"batch_req_{key}",
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": f"req_{key}", "body": body},
        "error": None,
    }
