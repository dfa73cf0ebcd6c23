"""OpenAI's ``/v1/chat/completions``: messages → a prompt through the export's chat template,
request validation, and the ``chat.completion`` / ``chat.completion.chunk`` shapes.

A chat request becomes the same :class:`~llmtrain.runtime.serve.protocol.CompletionRequest` as
a completions request (one prompt: the rendered conversation with the generation prompt, as
token ids), so the engine, the limits and the metrics are the completions' own; only the
messages and the response shapes are chat's. The sampling parameters are validated by the
completions' helpers, in OpenAI's order, so both endpoints word an error the same way.

The prompt is rendered with the export's ``chat_template`` (its ``tokenizer_config.json``;
llmtrain's default template if it has none) by :mod:`llmtrain.runtime.chat`, exactly as
training tokenized its conversations, and generation stops at the end-of-text token that ended
every trained answer (``finish_reason: "stop"``).

Messages: roles ``system`` (and OpenAI's newer ``developer``, the same thing), ``user``,
``assistant``; content a string or an array of ``{"type": "text"}`` parts (joined by newlines,
as vLLM joins them). Tool calls, images and audio change the output and are not computed here:
refused (400 naming the parameter), never ignored.

No torch and no HTTP framework here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmtrain.runtime.chat import (
    DEFAULT_CHAT_TEMPLATE,
    ChatError,
    check_no_special_text,
    encode_prompt,
    special_token_texts,
    template_from_tokenizer_files,
)
from llmtrain.runtime.serve.protocol import (
    _IGNORED,
    ApiError,
    ChunkEncoder,
    CompletionRequest,
    ResponseShape,
    _check_sequence_count,
    _choices,
    _is_int,
    _model,
    _number,
    _sampling,
    _stops,
    _streaming,
    _type_name,
)

_CHAT_IGNORED = _IGNORED | {"store", "parallel_tool_calls"}  # no effect on the output
_CHAT_KNOWN = {
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "logprobs",
    "top_logprobs",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
    "modalities",
    "audio",
    "prediction",
    "reasoning_effort",
} | _CHAT_IGNORED


@dataclass(frozen=True)
class ChatPrompt:
    """The served model's chat template and tokenizer: messages → prompt ids."""

    tokenizer: Any  # tokenizers.Tokenizer
    template: str
    eos_token: str
    bos_token: str | None = None

    @classmethod
    def from_export(
        cls, tokenizer: Any, config: bytes | None, jinja_file: bytes | None, eos_id: int | None
    ) -> ChatPrompt:
        """From an export's ``tokenizer_config.json`` / ``chat_template.jinja`` (either may be absent)."""
        settings = json.loads(config) if config else {}
        template = template_from_tokenizer_files(config, jinja_file) or DEFAULT_CHAT_TEMPLATE
        eos = _token_text(settings.get("eos_token"))
        if eos is None and eos_id is not None:
            eos = tokenizer.id_to_token(eos_id)
        if eos is None:
            raise ValueError("the export names no end-of-text token (tokenizer_config.json eos_token)")
        return cls(tokenizer, template, eos, _token_text(settings.get("bos_token")))

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        """The conversation + the assistant header, as ids; :class:`ChatError` for a bad one."""
        check_no_special_text(messages, special_token_texts(self.tokenizer))
        return encode_prompt(
            self.tokenizer, messages, self.template, eos_token=self.eos_token, bos_token=self.bos_token
        )


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken object."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


# ------------------------------------------------------------------- request parsing


def parse_chat_request(
    body: Any,
    *,
    model_id: str,
    context_length: int,
    encode: Callable[[list[dict[str, str]]], list[int]],
    vocab_size: int,
) -> CompletionRequest:
    """Validate a decoded ``/v1/chat/completions`` body; the first problem → :class:`ApiError`.

    ``encode``: messages → prompt ids (:meth:`ChatPrompt.encode`; a :class:`ChatError` from it
    is a 400 on ``messages``). Without ``max_tokens`` / ``max_completion_tokens`` the answer may
    fill the context, as OpenAI's and vLLM's chat endpoints allow."""
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, not {_type_name(body)}")
    for key in body:
        if key not in _CHAT_KNOWN:
            raise ApiError(f"Unrecognized request argument supplied: {key}", param=key)
    model = _model(body, model_id)
    messages = _messages(body)
    max_tokens = _max_completion_tokens(body)
    temperature, top_p, top_k = _sampling(body)
    n, seed = _choices(body)
    stops = _stops(body)
    stream, include_usage = _streaming(body)
    _refuse_unsupported_chat(body)
    _check_sequence_count(1, n)
    try:
        ids = encode(messages)
    except ChatError as e:
        raise ApiError(str(e), param="messages") from None
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:  # a template's token the model does not have
        raise ApiError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})", param="messages")
    if max_tokens is None:
        max_tokens = context_length - len(ids)
    if max_tokens < 1 or len(ids) + max_tokens > context_length:
        raise ApiError(
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{len(ids) + max(max_tokens, 1)} tokens ({len(ids)} in the messages, {max(max_tokens, 1)} in "
            "the completion). Please reduce the length of the messages or completion.",
            param="messages" if len(ids) >= context_length else "max_tokens",
            code="context_length_exceeded",
        )
    return CompletionRequest(
        model=model,
        prompts=[ids],
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k if top_k is not None and top_k >= 1 else None,
        n=n,
        seed=seed,
        stop=stops,
        stream=stream,
        include_usage=include_usage,
    )


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """OpenAI's message objects → ``{role, content}`` with text content (order checked by the template)."""
    messages = body.get("messages")
    if messages is None:
        raise ApiError("Missing required parameter: 'messages'.", param="messages")
    if not isinstance(messages, list) or not messages:
        what = "an empty array" if messages == [] else _type_name(messages)
        raise ApiError(f"{what} is not a valid 'messages': expected a non-empty array", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(f"{where}: expected an object, got {_type_name(m)}", param=where)
        role = m.get("role")
        if role in ("tool", "function") or m.get("tool_calls") or m.get("function_call"):
            raise ApiError(f"{where}: tool and function calls are not supported", param=f"{where}.role")
        if role not in ("system", "developer", "user", "assistant"):
            raise ApiError(
                f"{where}.role {role!r} is not one of system, developer, user, assistant",
                param=f"{where}.role",
            )
        for key in m:
            if key not in ("role", "content", "name"):
                raise ApiError(f"Unrecognized message argument supplied: {key}", param=f"{where}.{key}")
        out.append({"role": "system" if role == "developer" else role, "content": _content(m, where)})
    return out


def _content(message: dict[str, Any], where: str) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for j, part in enumerate(content):
            if not (
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                raise ApiError(
                    f"{where}.content[{j}]: only text parts ({{'type': 'text', 'text': ...}}) are supported",
                    param=f"{where}.content",
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise ApiError(
        f"{where}.content must be a string or a non-empty array of text parts", param=f"{where}.content"
    )


def _max_completion_tokens(body: dict[str, Any]) -> int | None:
    """``max_completion_tokens`` (OpenAI's current name) or ``max_tokens`` (its older one); None: unset."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not _is_int(value):
            raise ApiError(f"{value!r} is not of type 'integer' - '{name}'", param=name)
        if value < 1:
            raise ApiError(f"{name} must be at least 1, got {value}", param=name)
        return int(value)
    return None


def _refuse_unsupported_chat(body: dict[str, Any]) -> None:
    """Features that change the output and that we do not compute: refuse rather than ignore."""
    if body.get("logprobs") not in (None, False):
        raise ApiError("logprobs is not supported", param="logprobs")
    if body.get("top_logprobs") is not None:
        raise ApiError("top_logprobs is not supported", param="top_logprobs")
    for name in ("tools", "functions"):
        if body.get(name):
            raise ApiError(f"{name} are not supported (no tool calling)", param=name)
    for name in ("tool_choice", "function_call"):
        if body.get(name) not in (None, "none"):
            raise ApiError(f"{name} is not supported (no tool calling)", param=name)
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise ApiError("response_format is not supported (only {'type': 'text'})", param="response_format")
    if body.get("modalities") not in (None, ["text"]):
        raise ApiError("only the text modality is supported", param="modalities")
    for name in ("audio", "prediction", "reasoning_effort"):
        if body.get(name) is not None:
            raise ApiError(f"{name} is not supported", param=name)
    if body.get("logit_bias"):
        raise ApiError("logit_bias is not supported", param="logit_bias")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0) != 0:
            raise ApiError(f"{name} is not supported (only 0)", param=name)


# ------------------------------------------------------------------------ responses


def chat_completion_body(
    completion_id: str,
    created: int,
    model: str,
    texts: list[str],
    reasons: list[str | None],
    counts: dict[str, int],
) -> dict[str, Any]:
    """A whole (not streamed) ``chat.completion``: one assistant message per choice."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": texts[i]},
                "logprobs": None,
                "finish_reason": reasons[i],
            }
            for i in range(len(texts))
        ],
        "usage": counts,
    }


class ChatChunkEncoder(ChunkEncoder):
    """A streamed ``chat.completion.chunk`` of one choice, from a per-request template (as
    :class:`~llmtrain.runtime.serve.protocol.ChunkEncoder`): ``delta`` carries the new content;
    the stream opens with each choice's ``{"role": "assistant", "content": ""}`` delta and the
    last chunk of a choice carries its ``finish_reason``."""

    def __init__(self, completion_id: str, created: int, model: str) -> None:
        fixed = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
        head = json.dumps(fixed, separators=(",", ":"), ensure_ascii=False)[:-1]
        self._head = f'data: {head},"choices":[{{"index":'

    def __call__(self, index: int, text: str, finish_reason: str | None) -> bytes:
        reason = "null" if finish_reason is None else json.dumps(finish_reason, ensure_ascii=False)
        delta = f'{{"content":{json.dumps(text, ensure_ascii=False)}}}' if text else "{}"
        return (
            f'{self._head}{index},"delta":{delta},"logprobs":null,"finish_reason":{reason}}}]}}\n\n'.encode()
        )

    def start(self, choices: int) -> bytes:
        return b"".join(
            f'{self._head}{i},"delta":{{"role":"assistant","content":""}},"logprobs":null,'
            f'"finish_reason":null}}]}}\n\n'.encode()
            for i in range(choices)
        )


def chat_usage_chunk(completion_id: str, created: int, model: str, counts: dict[str, int]) -> dict[str, Any]:
    """The stream's last chunk when ``stream_options.include_usage``: no choices, the usage."""
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": counts,
    }


CHAT = ResponseShape("chatcmpl-", chat_completion_body, ChatChunkEncoder, chat_usage_chunk)
