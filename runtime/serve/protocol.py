"""The OpenAI ``/v1/completions`` protocol: request validation, error bodies, response shapes.

Validation is written out by hand rather than declared as a pydantic model: the first problem
must come back as OpenAI words it (``{"error": {"message", "type", "param", "code"}}``, the
offending parameter named in ``param``) so that the official client raises the same
``BadRequestError`` against this server as against OpenAI's, and parameters that would change the
output but are not computed here (echo, logprobs, penalties, ...) are refused, never ignored.
:func:`parse_completion_request` checks the body in OpenAI's order, one parameter group per
helper.

Numbers: JSON as Python parses it admits ``NaN`` and ``Infinity``; every numeric parameter must be
finite (a 400 naming it), and a temperature below :data:`GREEDY_BELOW` is greedy (0): dividing
logits by 1e-300 overflows them, and the softmax of that is NaN.

Policies: a request whose prompt + ``max_tokens`` exceeds the model's context length is refused
(400, OpenAI's ``context_length_exceeded`` message naming the limit) rather than truncated or
slid (a sliding window re-encodes every step and would not be batched).

Responses: the streamed chunk of one choice is encoded from a per-request template
(:class:`ChunkEncoder`) rather than a dict and a full JSON encoding per token, because the event
loop that sends it shares the GIL with the engine thread.

No torch and no HTTP framework here: the app (:mod:`llmtrain.runtime.serve.app`) and the tests
use these functions on plain decoded JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_N = 128  # OpenAI's limit on choices per prompt
MAX_SEQUENCES_PER_REQUEST = 256  # prompts × n: one request cannot take the whole server's memory
MAX_BODY_BYTES = 8 << 20  # the default of --max-body-bytes
GREEDY_BELOW = 1e-5  # a temperature under this samples as 0 (greedy): see the module docstring
RETRY_AFTER_SECONDS = 1  # what a 429 asks the client to wait
TORCH_SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


# ----------------------------------------------------------------------------- errors


class ApiError(Exception):
    """A request the server refuses; rendered as OpenAI's error body with ``status``."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        status: int = 400,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.type = message, param, status, code, type

    def body(self) -> dict[str, Any]:
        return error_body(self.message, param=self.param, code=self.code, type=self.type)


def error_body(
    message: str, *, param: str | None = None, code: str | None = None, type: str = "invalid_request_error"
) -> dict[str, Any]:
    """OpenAI's error object: what its clients parse into ``APIError.message/param/code``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def rate_limited(waiting: int) -> ApiError:
    """429 when ``waiting`` requests already wait for a batch slot: OpenAI's rate-limit shape,
    which its clients retry after ``Retry-After``."""
    return ApiError(
        f"The server is busy: {waiting} requests are already waiting for a batch slot. "
        f"Please retry after {RETRY_AFTER_SECONDS} s.",
        status=429,
        type="requests",
        code="rate_limit_exceeded",
    )


def invalid_api_key(sent: bool) -> ApiError:
    """401 for a missing or wrong key, as OpenAI words it (the key itself is never echoed)."""
    message = (
        "Incorrect API key provided."
        if sent
        else "You didn't provide an API key. You need to provide your API key in an Authorization "
        "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
    )
    return ApiError(message, status=401, code="invalid_api_key")


def body_too_large(limit: int) -> ApiError:
    return ApiError(f"request body over {limit} bytes", status=413, code="request_too_large")


def model_not_found(model: str, detail: str = "") -> ApiError:
    """404 for a model this server does not serve (``detail`` follows OpenAI's sentence)."""
    return ApiError(
        f"The model `{model}` does not exist{detail}", param="model", status=404, code="model_not_found"
    )


# ------------------------------------------------------------------- request parsing


@dataclass(frozen=True)
class CompletionRequest:
    """A validated ``POST /v1/completions`` body, prompts already token ids."""

    model: str
    prompts: list[list[int]]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int | None
    n: int
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


# Accepted and ignored (no effect on the output), or accepted only at the value that means "off".
_IGNORED = {"user", "metadata", "service_tier"}
_KNOWN = {
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "echo",
    "logprobs",
    "best_of",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "suffix",
} | _IGNORED


def parse_completion_request(
    body: Any,
    *,
    model_id: str,
    context_length: int,
    encode: Callable[[str], list[int]],
    vocab_size: int,
) -> CompletionRequest:
    """Validate a decoded JSON body the way OpenAI does: the first problem → :class:`ApiError`.

    The helpers run in OpenAI's order, so a body with several problems names the same one."""
    body = _json_object(body)
    model = _model(body, model_id)
    raw_prompts = _raw_prompts(body)
    max_tokens = _max_tokens(body)
    temperature, top_p, top_k = _sampling(body)
    n, seed = _choices(body)
    stops = _stops(body)
    stream, include_usage = _streaming(body)
    _refuse_unsupported(body)
    _check_sequence_count(len(raw_prompts), n)
    prompts = [
        _prompt_ids(
            p, encode=encode, vocab_size=vocab_size, context_length=context_length, max_tokens=max_tokens
        )
        for p in raw_prompts
    ]
    return CompletionRequest(
        model=model,
        prompts=prompts,
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


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _type_name(x: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(x), "integer" if _is_int(x) else "number"
    )


def _number(
    body: dict[str, Any], name: str, default: float, lo: float, hi: float, *, lo_open: bool = False
) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise ApiError(f"{value!r} is not of type 'number' - '{name}'", param=name)
    if isinstance(value, float) and not math.isfinite(value):
        raise ApiError(f"{value!r} is not a finite number - '{name}'", param=name)
    if value > hi or value < lo or (lo_open and value == lo):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ApiError(f"{value!r} is out of range: '{name}' must be in {interval}", param=name)
    return float(value)


def _json_object(body: Any) -> dict[str, Any]:
    """An object with only parameters we know (an unknown one may change the output elsewhere)."""
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, not {_type_name(body)}")
    for key in body:
        if key not in _KNOWN:
            raise ApiError(f"Unrecognized request argument supplied: {key}", param=key)
    return body


def _model(body: dict[str, Any], model_id: str) -> str:
    model = body.get("model")
    if model is None:
        raise ApiError("you must provide a model parameter", param="model")
    if not isinstance(model, str):
        raise ApiError(f"{model!r} is not of type 'string' - 'model'", param="model")
    if model != model_id:
        raise model_not_found(model, f" (this server serves `{model_id}`)")
    return model


def _raw_prompts(body: dict[str, Any]) -> list[str | list[int]]:
    """OpenAI's four prompt forms → a list of strings or token-id lists."""
    if "prompt" not in body:
        raise ApiError("you must provide a prompt parameter", param="prompt")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(_is_int(t) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise ApiError(
        f"{_type_name(prompt) if not isinstance(prompt, list) or prompt else 'an empty array'} is not a valid "
        "'prompt': expected a string, an array of strings, an array of token ids or an array of "
        "token-id arrays (none empty)",
        param="prompt",
    )


def _max_tokens(body: dict[str, Any]) -> int:
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        return DEFAULT_MAX_TOKENS
    if not _is_int(max_tokens):
        raise ApiError(f"{max_tokens!r} is not of type 'integer' - 'max_tokens'", param="max_tokens")
    if max_tokens < 1:
        raise ApiError(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    return int(max_tokens)


def _sampling(body: dict[str, Any]) -> tuple[float, float, int | None]:
    """(temperature, top_p, top_k as sent: -1 and 0 still mean "all tokens")."""
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    if temperature < GREEDY_BELOW:
        temperature = 0.0
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < -1):
        raise ApiError(f"top_k must be an integer ≥ 1 (-1 or 0: all tokens), got {top_k!r}", param="top_k")
    return temperature, top_p, top_k


def _choices(body: dict[str, Any]) -> tuple[int, int | None]:
    """(n, seed): how many choices per prompt, and what makes them reproducible."""
    n = body.get("n", 1)
    n = 1 if n is None else n
    if not _is_int(n) or not 1 <= n <= MAX_N:
        raise ApiError(f"n must be an integer in [1, {MAX_N}], got {n!r}", param="n")
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise ApiError("best_of is not supported (only best_of = n)", param="best_of")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not TORCH_SEED_RANGE[0] <= seed <= TORCH_SEED_RANGE[1]):
        raise ApiError(f"seed must be a 64-bit integer, got {seed!r}", param="seed")
    return n, seed


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    stops: tuple[str, ...]
    if stop is None:
        stops = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and len(stop) <= MAX_STOP_STRINGS and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise ApiError(
            f"stop must be a string or an array of at most {MAX_STOP_STRINGS} strings", param="stop"
        )
    if any(not s for s in stops):
        raise ApiError("stop strings must not be empty", param="stop")
    return stops


def _streaming(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(f"{stream!r} is not of type 'boolean' - 'stream'", param="stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise ApiError("stream_options must be an object with only include_usage", param="stream_options")
        if not stream:
            raise ApiError("stream_options is only allowed when stream is true", param="stream_options")
        include_usage = options.get("include_usage") is True
    return stream, include_usage


def _refuse_unsupported(body: dict[str, Any]) -> None:
    """Features that change the output and that we do not compute: refuse rather than ignore."""
    if body.get("echo") not in (None, False):
        raise ApiError("echo is not supported", param="echo")
    if body.get("logprobs") is not None:
        raise ApiError("logprobs is not supported", param="logprobs")
    if body.get("suffix") is not None:
        raise ApiError("suffix is not supported", param="suffix")
    if body.get("logit_bias"):
        raise ApiError("logit_bias is not supported", param="logit_bias")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0) != 0:
            raise ApiError(f"{name} is not supported (only 0)", param=name)


def _check_sequence_count(prompts: int, n: int) -> None:
    if prompts * n > MAX_SEQUENCES_PER_REQUEST:
        raise ApiError(
            f"{prompts} prompts × n {n} exceeds {MAX_SEQUENCES_PER_REQUEST} sequences per request",
            param="n" if n > 1 else "prompt",
        )


def _prompt_ids(
    prompt: str | list[int],
    *,
    encode: Callable[[str], list[int]],
    vocab_size: int,
    context_length: int,
    max_tokens: int,
) -> list[int]:
    """One prompt as token ids that fit the vocabulary and, with the completion, the context."""
    ids = encode(prompt) if isinstance(prompt, str) else prompt
    if not ids:
        raise ApiError("the prompt encodes to no tokens; at least one is needed", param="prompt")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ApiError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})", param="prompt")
    if len(ids) + max_tokens > context_length:
        raise ApiError(
            f"This model's maximum context length is {context_length} tokens, however you requested "
            f"{len(ids) + max_tokens} tokens ({len(ids)} in your prompt; {max_tokens} for the "
            "completion). Please reduce your prompt; or completion length.",
            param="prompt" if len(ids) >= context_length else "max_tokens",
            code="context_length_exceeded",
        )
    return ids


def decode_body(raw: bytes) -> Any:
    """The request's bytes as JSON (its size already bounded as it was read), or OpenAI's error."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(
            f"We could not parse the JSON body of your request ({e}). The body must be valid JSON."
        ) from None


# ------------------------------------------------------------------------ responses


def model_card(model_id: str, created: int, context_length: int) -> dict[str, Any]:
    """One entry of ``GET /v1/models`` (vLLM's ``max_model_len`` added)."""
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "llmtrain",
        "max_model_len": context_length,
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    completion_id: str,
    created: int,
    model: str,
    texts: list[str],
    reasons: list[str | None],
    counts: dict[str, int],
) -> dict[str, Any]:
    """A whole (not streamed) ``text_completion`` object; ``counts`` is its :func:`usage`."""
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": i, "text": texts[i], "logprobs": None, "finish_reason": reasons[i]}
            for i in range(len(texts))
        ],
        "usage": counts,
    }


def sse(obj: Any) -> bytes:
    """One server-sent event carrying ``obj`` as JSON (``[DONE]`` is sent as-is)."""
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n".encode()


class ChunkEncoder:
    """One streamed ``text_completion`` object (a single choice's delta) as a server-sent event,
    without a dict and a full JSON encoding per chunk: the request's fixed fields are encoded once. A streamed token
    costs one chunk on the event loop, which shares the GIL with the engine thread."""

    def __init__(self, completion_id: str, created: int, model: str) -> None:
        fixed = {"id": completion_id, "object": "text_completion", "created": created, "model": model}
        head = json.dumps(fixed, separators=(",", ":"), ensure_ascii=False)[:-1]  # without its "}"
        self._head = f'data: {head},"choices":[{{"index":'

    def __call__(self, index: int, text: str, finish_reason: str | None) -> bytes:
        reason = "null" if finish_reason is None else json.dumps(finish_reason, ensure_ascii=False)
        return (
            f'{self._head}{index},"text":{json.dumps(text, ensure_ascii=False)},"logprobs":null,'
            f'"finish_reason":{reason}}}]}}\n\n'
        ).encode()

    def start(self, choices: int) -> bytes:
        """What a stream sends before any text: nothing here (chat sends each choice's role)."""
        return b""


def usage_chunk(completion_id: str, created: int, model: str, counts: dict[str, int]) -> dict[str, Any]:
    """The stream's last chunk when ``stream_options.include_usage``: no choices, the usage."""
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": counts,
    }


@dataclass(frozen=True)
class ResponseShape:
    """How one endpoint's answers look, so that the app's request path serves both
    ``/v1/completions`` (:data:`COMPLETIONS`) and ``/v1/chat/completions``
    (:data:`llmtrain.runtime.serve.chat_protocol.CHAT`) with the same code."""

    id_prefix: str
    body: Callable[[str, int, str, list[str], list[str | None], dict[str, int]], dict[str, Any]]
    encoder: Callable[[str, int, str], ChunkEncoder]  # (id, created, model) → a stream's chunks
    usage_chunk: Callable[[str, int, str, dict[str, int]], dict[str, Any]]


COMPLETIONS = ResponseShape("cmpl-", completion_body, ChunkEncoder, usage_chunk)
