"""``llmtrain serve``: an exported model behind an OpenAI-compatible HTTP API.

Endpoints: ``GET /v1/models``, ``POST /v1/completions`` (plain and server-sent events),
``GET /health`` and ``GET /metrics`` (Prometheus). The API shape is vLLM's and OpenAI's, so the
official ``openai`` client, LangChain and friends talk to it unchanged; the server itself is our
own: vLLM wants a GPU and its own model classes, while this one runs the
:class:`~llmtrain.runtime.model.GPT` the job trained, on CPU or GPU, with the sampling code of
``llmtrain generate`` (:mod:`llmtrain.runtime.generate`).

Design: one engine thread owns the model and runs *continuous batching* (Orca's iteration-level
scheduling). Each iteration it admits waiting sequences (up to ``--max-batch`` active), encodes
each new prompt alone into its own :class:`~llmtrain.runtime.model.KVCache` (the exact call
``generate`` makes, which also yields its first token) and copies that cache in as the last row
of the batch's :class:`~llmtrain.runtime.model.BatchKVCache` (one buffer per layer, a row per
sequence). It then runs **one** forward pass over every row's newest token: the weights are read
once for all rows, which is where decoding's time goes, and one attention call covers all rows,
a boolean mask hiding the positions past each row's own length. Masked keys weigh exactly 0, so a
row's tokens are its single-stream tokens; only float rounding differs (≈1e-7: the batched GEMMs,
a softmax over a zero-padded row), which changes a greedy token only at an exact near-tie. A lone
row needs no mask and is ``generate``'s call bit for bit. Sequences leave the batch the step they
finish, are cancelled, or their client goes away (the last row moves into the freed one); new ones
join between steps, so nobody waits for the longest request of a batch. Greedy rows are sampled
by one argmax over the batch.

Prompts are encoded alone (no chunked prefill): a long prompt delays the running rows by one
prompt's forward, fine at our context lengths. The HTTP side (FastAPI on uvicorn, one asyncio
loop) validates requests, hands sequences to the engine and turns their events into responses.
The engine and the loop share the GIL and, here, two cores, so the per-token Python on both sides
is kept small: the engine decodes text incrementally (:class:`TextStream`) and its events reach
the loop through a :class:`Mailbox`, one wake-up per step; a stream merges what arrived into one
write, its chunks encoded from a per-request template (:class:`ChunkEncoder`).

Policies: a request whose prompt + ``max_tokens`` exceeds the model's context length is refused
(400, OpenAI's ``context_length_exceeded`` message naming the limit) rather than truncated or
slid (a sliding window re-encodes every step and would not be batched); errors follow OpenAI's
body ``{"error": {"message", "type", "param", "code"}}``.

This module imports torch and FastAPI: :mod:`llmtrain.cli` imports it only inside ``llmtrain serve``.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from llmtrain.runtime.generate import Sampling, TextTokenizer, load_text_tokenizer, next_token
from llmtrain.runtime.hf_import import load_pretrained_model
from llmtrain.runtime.model import GPT, BatchKVCache, KVCache
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException

log = logging.getLogger("llmtrain.serve")

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_N = 128  # OpenAI's limit on choices per prompt
MAX_SEQUENCES_PER_REQUEST = 256  # prompts × n: one request cannot take the whole server's memory
MAX_BODY_BYTES = 8 << 20
# Time to first token / request latency: 5 ms (a tiny model on CPU) to 5 min (long generations).
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
THROUGHPUT_WINDOW_SECONDS = 10.0
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
    if value > hi or value < lo or (lo_open and value == lo):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ApiError(f"{value!r} is out of range: '{name}' must be in {interval}", param=name)
    return float(value)


def _prompt_list(prompt: Any) -> list[str | list[int]]:
    """OpenAI's four prompt forms → a list of strings or token-id lists."""
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


def parse_completion_request(
    body: Any,
    *,
    model_id: str,
    context_length: int,
    encode: Callable[[str], list[int]],
    vocab_size: int,
) -> CompletionRequest:
    """Validate a decoded JSON body the way OpenAI does: the first problem → :class:`ApiError`."""
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, not {_type_name(body)}")
    for key in body:
        if key not in _KNOWN:
            raise ApiError(f"Unrecognized request argument supplied: {key}", param=key)
    model = body.get("model")
    if model is None:
        raise ApiError("you must provide a model parameter", param="model")
    if not isinstance(model, str):
        raise ApiError(f"{model!r} is not of type 'string' - 'model'", param="model")
    if model != model_id:
        raise ApiError(
            f"The model `{model}` does not exist (this server serves `{model_id}`)",
            param="model",
            status=404,
            code="model_not_found",
        )
    if "prompt" not in body:
        raise ApiError("you must provide a prompt parameter", param="prompt")
    raw_prompts = _prompt_list(body["prompt"])

    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    elif not _is_int(max_tokens):
        raise ApiError(f"{max_tokens!r} is not of type 'integer' - 'max_tokens'", param="max_tokens")
    elif max_tokens < 1:
        raise ApiError(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < -1):
        raise ApiError(f"top_k must be an integer ≥ 1 (-1 or 0: all tokens), got {top_k!r}", param="top_k")
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
    # Features that change the output and that we do not compute: refuse rather than ignore.
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
    if len(raw_prompts) * n > MAX_SEQUENCES_PER_REQUEST:
        raise ApiError(
            f"{len(raw_prompts)} prompts × n {n} exceeds {MAX_SEQUENCES_PER_REQUEST} sequences per request",
            param="n" if n > 1 else "prompt",
        )

    prompts: list[list[int]] = []
    for p in raw_prompts:
        ids = encode(p) if isinstance(p, str) else p
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
        prompts.append(ids)
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


# ----------------------------------------------------------------- text and stops


def stop_position(text: str, stops: Iterable[str]) -> int | None:
    """Where the earliest stop string starts in ``text`` (the output ends before it), or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: Iterable[str]) -> int:
    """How many trailing characters of ``text`` could begin a stop string: not sent yet."""
    return max(
        (k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
        default=0,
    )


class TextStream:
    """Token ids → text deltas for a stream: whole characters only, and never a stop string.

    Byte-level BPE splits characters across tokens, so text is final only once it does not end
    in U+FFFD. Decoding is incremental (vLLM's scheme): each token decodes a window of the few
    ids since the last point where the text was whole, ``ids[prefix:]``, and the window without
    the newest ids, ``ids[prefix:read]``; the difference is the new text. Re-decoding every id
    each token costs O(length) per token under the GIL, which the engine thread shares with the
    HTTP loop. Both windows start at the same id, so a decoder's start-of-text rule (a
    SentencePiece leading space) cancels out; should a tokenizer's window text not extend its
    shorter window's, the stream falls back to decoding every id.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...] = ()) -> None:
        self.decode, self.stops = decode, stops
        self.ids: list[int] = []
        self.text = ""  # handed out so far
        self.stopped = False  # a stop string was reached: the text ends before it
        self._whole = ""  # the decoded text of ids[:read]: whole characters
        self._prefix = self._read = 0  # ids[prefix:read] decode to the end of _whole
        self._incremental = True

    def feed(self, token: int) -> str:
        """Append one token; return the new final text (possibly empty)."""
        self.ids.append(token)
        if self._incremental:
            before = self.decode(self.ids[self._prefix : self._read])
            after = self.decode(self.ids[self._prefix :])
            if after.startswith(before):
                new = after[len(before) :]
                if new and not new.endswith("\ufffd"):
                    self._whole += new
                    self._prefix, self._read = self._read, len(self.ids)
                    return self._advance(self._whole, final=False)
                # A trailing U+FFFD may be an incomplete UTF-8 character: wait for its bytes.
                return self._advance(self._whole + new.rstrip("\ufffd"), final=False)
            self._incremental = False
        return self._advance(self.decode(self.ids).rstrip("\ufffd"), final=False)

    def finish(self) -> str:
        """The sequence ended (length or end-of-text): whatever was held back."""
        return "" if self.stopped else self._advance(self.decode(self.ids), final=True)

    def _advance(self, decoded: str, *, final: bool) -> str:
        cut = stop_position(decoded, self.stops)
        if cut is not None:
            self.stopped = True
            end = cut
        else:
            end = len(decoded) if final else len(decoded) - held_back(decoded, self.stops)
        end = max(end, len(self.text))  # never take back what was sent
        delta = decoded[len(self.text) : end]
        self.text += delta
        return delta


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


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# ---------------------------------------------------------------------- engine


@dataclass(frozen=True)
class Event:
    """What the engine tells a request about one of its sequences."""

    index: int  # the choice
    text: str  # new final text (may be empty)
    finish_reason: str | None = None  # "stop" | "length" once finished
    completion_tokens: int = 0
    error: str | None = None


@dataclass(eq=False)
class Sequence:
    """One choice being generated: its prompt, sampling, cache and where its events go."""

    index: int
    prompt: list[int]
    sampling: Sampling
    text: TextStream
    emit: Callable[[Event], None]  # thread-safe: called from the engine thread
    generator: torch.Generator | None = None
    last: int = -1
    generated: int = 0
    finished: bool = False
    cancelled: bool = False  # set by the HTTP side (client gone); the engine drops it next step


@dataclass
class EngineStats:
    """Counters the engine keeps for /metrics (read from other threads: plain ints)."""

    steps: int = 0
    max_rows: int = 0
    cancelled: int = 0
    window: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)
    lock: threading.Lock = field(default_factory=threading.Lock)  # the window: engine vs scrapes

    def generated(self, tokens: int, now: float) -> None:
        with self.lock:
            self.window.append((now, tokens))
            while self.window and now - self.window[0][0] > THROUGHPUT_WINDOW_SECONDS:
                self.window.popleft()

    def tokens_per_second(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self.lock:
            recent = sum(n for t, n in self.window if now - t <= THROUGHPUT_WINDOW_SECONDS)
        return recent / THROUGHPUT_WINDOW_SECONDS


class Engine:
    """Continuous batching over one :class:`GPT` in a thread of its own (see the module docstring)."""

    def __init__(
        self,
        model: GPT,
        *,
        max_batch: int = 32,
        observe_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max batch must be ≥ 1, got {max_batch} (--max-batch)")
        self.model = model
        self.max_batch = max_batch
        self.device = next(model.parameters()).device
        self.stats = EngineStats()
        self._observe_batch = observe_batch
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._active: list[Sequence] = []  # _active[i] is row i of _batch
        self._batch = self._new_batch()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="llmtrain-serve-engine", daemon=True)

    # -- the HTTP side

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def active_count(self) -> int:
        return len(self._active)

    @property
    def waiting_count(self) -> int:
        return len(self._waiting)

    def submit(self, seqs: list[Sequence]) -> None:
        with self._cv:
            self._waiting.extend(seqs)
            self._cv.notify_all()

    def cancel(self, seqs: Iterable[Sequence]) -> None:
        """Drop sequences whose client went away: their slots free at the next step."""
        with self._cv:
            for s in seqs:
                if not s.finished and not s.cancelled:
                    s.cancelled = True
            self._cv.notify_all()

    # -- the engine thread

    def _new_batch(self) -> BatchKVCache:
        return BatchKVCache(len(self.model.layers), self.model.cfg.context_length)

    def _run(self) -> None:

        while True:
            with self._cv:
                while not self._stopping and not self._waiting and not self._active:
                    self._cv.wait()
                if self._stopping:
                    return
                admitted: list[Sequence] = []
                while self._waiting and len(self._active) + len(admitted) < self.max_batch:
                    s = self._waiting.popleft()
                    if s.cancelled:
                        self.stats.cancelled += 1
                    else:
                        admitted.append(s)
            try:
                with torch.no_grad():
                    self._step(admitted)
            except Exception as e:  # a bug or out of memory: fail these requests, keep serving
                log.exception("engine step failed")
                for s in [*self._active, *admitted]:
                    if not s.finished:
                        s.finished = True
                        s.emit(Event(s.index, "", error=f"generation failed: {type(e).__name__}: {e}"))
                self._active, self._batch = [], self._new_batch()

    def _step(self, admitted: list[Sequence]) -> None:

        # New prompts, each alone: exactly generate()'s prefill; it yields their first token.
        # Its cache then joins the batch as the last row.
        for s in admitted:
            kv = KVCache(len(self.model.layers), self.model.cfg.context_length)
            logits = self.model(torch.tensor([s.prompt], device=self.device), kv=kv)[0, -1]
            self._take([s], logits[None])
            if not s.finished:
                self._batch.add(kv)
                self._active.append(s)
        for s in self._active:
            if s.cancelled and not s.finished:
                s.finished = True
                self.stats.cancelled += 1
        self._drop_finished()
        rows = self._active
        if rows:
            # One forward for every running sequence: each row's newest token at its own position.
            t0 = time.perf_counter()
            tokens = torch.tensor([[s.last] for s in rows], device=self.device)
            self._take(rows, self.model(tokens, kv=self._batch)[:, -1])
            self.stats.steps += 1
            self.stats.max_rows = max(self.stats.max_rows, len(rows))
            if self._observe_batch is not None:
                self._observe_batch(len(rows), time.perf_counter() - t0)
        self.stats.generated(len(rows) + len(admitted), time.monotonic())
        self._drop_finished()  # frees their rows now, not when the next request arrives

    def _drop_finished(self) -> None:
        """Remove finished rows from the batch, mirroring its moves (last row → freed row)."""
        for i in range(len(self._active) - 1, -1, -1):  # from the end: the last row is never a leaver
            if self._active[i].finished:
                self._batch.remove(i)
                self._active[i] = self._active[-1]
                self._active.pop()

    def _take(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        """Sample each row's next token from its logits [B, V] and tell its request."""
        for s, token in zip(rows, self._sample(rows, logits), strict=True):
            self._emit(s, token)

    @staticmethod
    def _sample(rows: list[Sequence], logits: torch.Tensor) -> list[int]:
        """``next_token`` per row; greedy rows sharing one vocabulary bound take one argmax over
        the batch and one host sync (the same ids: argmax over the allowed ids = argmax after
        masking the others to -inf, first index on ties)."""
        greedy = [i for i, s in enumerate(rows) if s.sampling.greedy]
        limits = {rows[i].sampling.vocab_limit for i in greedy}
        tokens: list[int] = [-1] * len(rows)
        if len(limits) == 1:
            limit = limits.pop()
            sub = logits if len(greedy) == len(rows) else logits[greedy]
            if limit is not None:
                sub = sub[:, :limit]
            for i, t in zip(greedy, sub.argmax(-1).tolist(), strict=True):
                tokens[i] = t
        for i, s in enumerate(rows):
            if tokens[i] < 0:
                tokens[i] = next_token(logits[i], s.sampling, s.generator)
        return tokens

    def _emit(self, s: Sequence, token: int) -> None:
        """Record ``s``'s new token and tell its request what text became final."""
        s.last = token
        s.generated += 1
        text = s.text.feed(token)
        ended = token in s.sampling.stop_ids or s.generated >= s.sampling.max_new_tokens
        if ended:
            text += s.text.finish()  # what was held back (may still reach a stop string)
        reason = None
        if s.text.stopped or token in s.sampling.stop_ids:
            reason = "stop"
        elif ended:
            reason = "length"
        if reason is not None:
            s.finished = True  # its row leaves the batch at the end of this step
        if text or reason is not None or s.generated == 1:  # the first token: time to first token
            s.emit(Event(s.index, text, reason, s.generated))


# --------------------------------------------------------------------- metrics


class ServeMetrics:
    """``llmtrain_serve_*`` series in a registry of the server's own."""

    def __init__(self, engine: Engine) -> None:

        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "llmtrain_serve_requests",
            "HTTP requests answered, by path and status code.",
            ("path", "code"),
            registry=r,
        )
        self.prompt_tokens = Counter(
            "llmtrain_serve_prompt_tokens", "Prompt tokens of accepted requests.", registry=r
        )
        self.completion_tokens = Counter(
            "llmtrain_serve_completion_tokens", "Tokens generated for completed choices.", registry=r
        )
        self.ttft = Histogram(
            "llmtrain_serve_time_to_first_token_seconds",
            "From a completion request's arrival to its first generated token.",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "llmtrain_serve_request_duration_seconds",
            "Wall time of /v1/completions requests, arrival to last byte.",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.batch_rows = Histogram(
            "llmtrain_serve_batch_rows",
            "Sequences decoded together by one forward pass (continuous batching).",
            buckets=BATCH_ROWS_BUCKETS,
            registry=r,
        )
        self.step_seconds = Histogram(
            "llmtrain_serve_decode_step_seconds",
            "Wall time of one batched decode step (forward + sampling).",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        Gauge(
            "llmtrain_serve_generation_tokens_per_second",
            f"Tokens generated per second over the last {THROUGHPUT_WINDOW_SECONDS:g} s.",
            registry=r,
        ).set_function(engine.stats.tokens_per_second)
        Gauge("llmtrain_serve_active_sequences", "Sequences in the running batch.", registry=r).set_function(
            lambda: engine.active_count
        )
        Gauge(
            "llmtrain_serve_waiting_sequences", "Sequences waiting for a batch slot.", registry=r
        ).set_function(lambda: engine.waiting_count)
        Gauge(
            "llmtrain_serve_batch_rows_max", "Most sequences one decode step has run together.", registry=r
        ).set_function(lambda: engine.stats.max_rows)
        Gauge(
            "llmtrain_serve_cancelled_sequences",
            "Sequences dropped because their client went away (cumulative).",
            registry=r,
        ).set_function(lambda: engine.stats.cancelled)

    def observe_batch(self, rows: int, seconds: float) -> None:
        self.batch_rows.observe(rows)
        self.step_seconds.observe(seconds)


# ------------------------------------------------------------------------- app


@dataclass
class ModelServer:
    """What the HTTP handlers need: the model's identity, its tokenizer and the engine."""

    model_id: str
    tokenizer: TextTokenizer
    context_length: int
    engine: Engine
    metrics: ServeMetrics
    device: str
    created: int = field(default_factory=lambda: int(time.time()))

    def sequences(self, req: CompletionRequest, emit: Callable[[Event], None]) -> list[Sequence]:
        """One sequence per (prompt, choice); choice index = prompt index · n + j, as OpenAI's."""

        tok = self.tokenizer
        base = Sampling(
            max_new_tokens=req.max_tokens,
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p,
            # The same stops and vocabulary bound as `llmtrain generate`: greedy output equals its.
            stop_ids=(tok.eos_id,) if tok.eos_id is not None else (),
            vocab_limit=tok.vocab_size,
        )
        seed = secrets.randbits(63) if req.seed is None else req.seed
        out = []
        for p, prompt in enumerate(req.prompts):
            for j in range(req.n):
                # Reproducible per (seed, choice), and the n choices of one request differ.
                s = replace(base, seed=_choice_seed(seed, j))
                gen = None if s.greedy else torch.Generator(device=self.engine.device).manual_seed(s.seed)
                out.append(
                    Sequence(
                        index=p * req.n + j,
                        prompt=prompt,
                        sampling=s,
                        text=TextStream(tok.decode, req.stop),
                        emit=emit,
                        generator=gen,
                    )
                )
        return out


def _choice_seed(seed: int, choice: int) -> int:
    """Choice j of a seeded request draws from seed + j (wrapped into torch's seed range)."""
    lo, hi = TORCH_SEED_RANGE
    value = seed + choice
    return value if value <= hi else lo + (value - hi - 1)


def _observing_middleware(app: Any, metrics: ServeMetrics, paths: set[str]) -> Any:
    """Pure ASGI wrapper: count every response by path and status; time the completions."""

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in paths else "other"
        start = time.perf_counter()
        status = {"code": 500}

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await app(scope, receive, sending)
        finally:
            metrics.requests.labels(path, str(status["code"])).inc()
            if path == "/v1/completions":
                metrics.latency.observe(time.perf_counter() - start)

    return wrapped


class EventStream(StreamingResponse):
    """A StreamingResponse that runs ``on_close`` however it ends: completed, the client
    gone (the send fails, or Starlette cancels the stream on http.disconnect), or shutdown."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def create_app(server: ModelServer) -> Any:
    """The FastAPI application (wrapped by the metrics middleware), ready for uvicorn."""

    app = FastAPI(title="llmtrain serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        # Unknown paths and methods too get OpenAI's error shape.
        return error_response(ApiError(str(e.detail), status=e.status_code))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(ApiError(str(e), status=400))

    @app.get("/health")
    async def health() -> Response:
        if not server.engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict[str, Any]:
        return {
            "id": server.model_id,
            "object": "model",
            "created": server.created,
            "owned_by": "llmtrain",
            "max_model_len": server.context_length,
        }

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Response:
        if model_id != server.model_id:
            return error_response(
                ApiError(
                    f"The model `{model_id}` does not exist",
                    param="model",
                    status=404,
                    code="model_not_found",
                )
            )
        return JSONResponse(model_card())

    mailboxes: dict[str, Mailbox] = {}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        arrived = time.perf_counter()
        try:
            req = await _read_request(request, server)
        except ApiError as e:
            return error_response(e)
        if mailboxes.get("loop") is None:  # the first request: uvicorn's loop is running now
            mailboxes["loop"] = Mailbox(asyncio.get_running_loop())
        queue: asyncio.Queue[Event] = asyncio.Queue()
        seqs = server.sequences(req, functools.partial(mailboxes["loop"].post, queue))
        prompt_tokens = sum(len(p) for p in req.prompts)
        server.metrics.prompt_tokens.inc(prompt_tokens)
        server.engine.submit(seqs)
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        first = _FirstToken(server.metrics, arrived)
        if req.stream:
            return EventStream(
                _stream(server, req, seqs, queue, first, completion_id, created, prompt_tokens),
                on_close=lambda: server.engine.cancel(seqs),
            )
        texts = [""] * len(seqs)
        reasons: list[str | None] = [None] * len(seqs)
        done = 0
        try:
            while done < len(seqs):
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=1.0)
                except TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)  # nobody reads it; counted in metrics
                    continue
                first.seen()
                if event.error is not None:
                    return error_response(ApiError(event.error, status=500, type="server_error"))
                texts[event.index] += event.text
                if event.finish_reason is not None:
                    reasons[event.index] = event.finish_reason
                    done += 1
        finally:
            server.engine.cancel(seqs)  # no-op for finished ones
        completion_tokens = sum(s.generated for s in seqs)
        server.metrics.completion_tokens.inc(completion_tokens)
        return JSONResponse(
            {
                "id": completion_id,
                "object": "text_completion",
                "created": created,
                "model": server.model_id,
                "choices": [
                    {"index": i, "text": texts[i], "logprobs": None, "finish_reason": reasons[i]}
                    for i in range(len(seqs))
                ],
                "usage": usage(prompt_tokens, completion_tokens),
            }
        )

    paths = {"/health", "/metrics", "/v1/models", "/v1/completions"}
    return _observing_middleware(app, server.metrics, paths)


async def _read_request(request: Request, server: ModelServer) -> CompletionRequest:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(f"request body over {MAX_BODY_BYTES} bytes", status=413)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(
            f"We could not parse the JSON body of your request ({e}). The body must be valid JSON."
        ) from None
    tok = server.tokenizer
    return parse_completion_request(
        body,
        model_id=server.model_id,
        context_length=server.context_length,
        encode=tok.encode,
        vocab_size=tok.vocab_size,
    )


class Mailbox:
    """Events from the engine thread into the event loop, one wake-up for all that are pending.

    A decode step of B rows yields B events; waking the loop once per event (a self-pipe write
    and a callback each) costs more than the step itself on a small model.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue[Event], Event]] = []

    def post(self, queue: asyncio.Queue[Event], event: Event) -> None:
        """From any thread: deliver ``event`` into ``queue`` on the loop."""
        with self._lock:
            self._pending.append((queue, event))
            wake = len(self._pending) == 1  # otherwise a delivery is already scheduled
        if wake:
            try:
                self.loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop is closed: the server is shutting down
                pass

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, event in pending:
            queue.put_nowait(event)


class _FirstToken:
    """Observes time to first token once per request."""

    def __init__(self, metrics: ServeMetrics, arrived: float) -> None:
        self.metrics, self.arrived, self.done = metrics, arrived, False

    def seen(self) -> None:
        if not self.done:
            self.done = True
            self.metrics.ttft.observe(time.perf_counter() - self.arrived)


async def _stream(
    server: ModelServer,
    req: CompletionRequest,
    seqs: list[Sequence],
    queue: asyncio.Queue[Event],
    first: _FirstToken,
    completion_id: str,
    created: int,
    prompt_tokens: int,
) -> AsyncIterator[bytes]:
    """SSE body: ``text_completion`` chunks of each choice's new text, the last one of a choice
    with its finish_reason, the usage chunk if asked, then ``data: [DONE]`` (OpenAI's stream).

    Events that arrived together are merged per choice into one chunk, and the chunks into one
    write: when the client or the loop falls behind the engine, chunks grow instead of piling up.
    """
    encode = ChunkEncoder(completion_id, created, server.model_id)
    done = 0
    while done < len(seqs):
        events = [await queue.get()]
        while not queue.empty():
            events.append(queue.get_nowait())
        first.seen()
        merged: dict[int, list[Any]] = {}  # index → [text, finish_reason], in arrival order
        for event in events:
            if event.error is not None:
                yield sse(error_body(event.error, type="server_error"))
                return
            entry = merged.setdefault(event.index, ["", None])
            entry[0] += event.text
            if event.finish_reason is not None:
                entry[1] = event.finish_reason
                done += 1
        # A first token's text may be held back: nothing to send for it.
        out = [encode(index, text, reason) for index, (text, reason) in merged.items() if text or reason]
        if out:
            yield out[0] if len(out) == 1 else b"".join(out)
    completion_tokens = sum(s.generated for s in seqs)
    server.metrics.completion_tokens.inc(completion_tokens)
    if req.include_usage:
        chunk = {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": server.model_id,
            "choices": [],
            "usage": usage(prompt_tokens, completion_tokens),
        }
        yield sse(chunk)
    yield sse("[DONE]")


# ------------------------------------------------------------------------ serve


def load_server(
    model_uri: str,
    *,
    device: str | torch.device = "cpu",
    s3: Any = None,
    max_batch: int = 32,
    model_id: str | None = None,
    threads: int | None = None,
) -> ModelServer:
    """Load an exported directory (as ``llmtrain generate`` does) and start its engine.

    On CPU the engine's matmuls get all cores but one (``threads`` overrides): the event loop
    (HTTP, JSON, SSE) needs a core of its own, and spinning OpenMP workers on it cost more than
    they gain (bench/serve.py on 2 cores: 1 thread gives 1.7× the aggregate tokens/s of 2).
    """
    import os

    if threads is not None:
        torch.set_num_threads(threads)
    elif torch.device(device).type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))

    tok = load_text_tokenizer(model_uri, s3)
    net = load_pretrained_model(model_uri, device=device, s3=s3)
    engine = Engine(net, max_batch=max_batch)
    metrics = ServeMetrics(engine)
    engine._observe_batch = metrics.observe_batch
    engine.start()
    return ModelServer(
        model_id=model_id or model_uri.rstrip("/"),
        tokenizer=tok,
        context_length=net.cfg.context_length,
        engine=engine,
        metrics=metrics,
        device=str(device),
    )


def serve(server: ModelServer, host: str, port: int, *, announce: Callable[[str], None] = print) -> None:
    """Serve until SIGINT/SIGTERM. Binds first, so ``port`` 0 picks a free port, which is announced."""
    import socket

    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        # Listening before the announcement: a client that connects as soon as it reads the port
        # waits in the backlog for uvicorn's loop instead of being refused.
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    bound = sock.getsockname()[1]
    config = uvicorn.Config(
        create_app(server), log_level="warning", access_log=False, timeout_graceful_shutdown=5, backlog=2048
    )
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    announce(
        f"serving {server.model_id} (context {server.context_length}, {server.device}, batch ≤ "
        f"{server.engine.max_batch}) on http://{shown}:{bound}/v1"
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        server.engine.stop()
        sock.close()
