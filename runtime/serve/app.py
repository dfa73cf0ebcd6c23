"""The HTTP side of ``llmtrain serve``: FastAPI routes on uvicorn, one asyncio loop.

The loop validates requests (:mod:`~llmtrain.runtime.serve.protocol`; chat's messages become a
prompt in :mod:`~llmtrain.runtime.serve.chat_protocol`), hands their sequences to
the engine thread (:mod:`~llmtrain.runtime.serve.engine`) and turns the engine's events into
OpenAI responses, whole or as server-sent events. The engine and the loop share the GIL and,
here, two cores, so the per-token Python on this side is kept small: events reach the loop
through a :class:`Mailbox`, one wake-up per engine step; a stream merges what arrived into one
write, its chunks encoded from a per-request template
(:class:`~llmtrain.runtime.serve.protocol.ChunkEncoder`).

:func:`load_server` and :func:`serve` are what ``llmtrain serve`` calls.
"""

from __future__ import annotations

import asyncio
import functools
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from llmtrain.runtime.generate import Sampling, TextTokenizer, load_text_tokenizer
from llmtrain.runtime.lora import load_model
from llmtrain.runtime.publish import resolve_export
from llmtrain.runtime.serve.chat_protocol import CHAT, ChatPrompt, parse_chat_request
from llmtrain.runtime.serve.engine import Engine, Event, Sequence
from llmtrain.runtime.serve.limits import (
    BodyRefused,
    Limits,
    guard,
    header_timeout_protocol,
    read_body,
    refusal,
)
from llmtrain.runtime.serve.metrics import COMPLETION_PATHS, FirstToken, ServeMetrics, observing_middleware
from llmtrain.runtime.serve.protocol import (
    COMPLETIONS,
    RETRY_AFTER_SECONDS,
    TORCH_SEED_RANGE,
    ApiError,
    CompletionRequest,
    ResponseShape,
    decode_body,
    error_body,
    model_card,
    model_not_found,
    parse_completion_request,
    rate_limited,
    sse,
    usage,
)
from llmtrain.runtime.serve.text import TextStream
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from llmtrain.api.s3 import S3Options

CHAT_FILES = ("tokenizer_config.json", "chat_template.jinja")  # where an export keeps its template

# ------------------------------------------------------------------------ the model


@dataclass
class ModelServer:
    """What the HTTP handlers need: the model's identity, its tokenizer and the engine."""

    model_id: str
    tokenizer: TextTokenizer
    context_length: int
    engine: Engine
    metrics: ServeMetrics
    device: str
    limits: Limits = field(default_factory=Limits)
    created: int = field(default_factory=lambda: int(time.time()))
    chat: ChatPrompt | None = None  # the export's chat template: /v1/chat/completions

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


# ------------------------------------------------------------------------ the routes


class EventStream(StreamingResponse):
    """A StreamingResponse that runs ``on_close`` however it ends: completed, the client
    gone (the send fails, or Starlette cancels the stream on http.disconnect), or shutdown.

    A client that stays connected but stops reading fills the socket's buffers, and a send
    then waits; past ``send_timeout`` the stream ends unfinished (uvicorn closes the
    connection) and ``on_stalled`` counts it."""

    def __init__(
        self,
        content: AsyncIterator[bytes],
        on_close: Callable[[], None],
        *,
        send_timeout: float,
        on_stalled: Callable[[], None],
    ) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close, self.send_timeout, self.on_stalled = on_close, send_timeout, on_stalled

    async def stream_response(self, send: Any) -> None:
        async def timed(message: Any) -> None:
            async with asyncio.timeout(self.send_timeout):
                await send(message)

        await super().stream_response(timed)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        except TimeoutError:  # unfinished on purpose: uvicorn drops the connection
            self.on_stalled()
        finally:
            self.on_close()


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def create_app(server: ModelServer) -> Any:
    """The FastAPI application (wrapped by the metrics middleware), ready for uvicorn."""
    app = FastAPI(title="llmtrain serve", docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(app)
    _add_info_routes(app, server)
    mailbox = _LoopMailbox()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _complete(request, server, mailbox, COMPLETIONS)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _complete(request, server, mailbox, CHAT)

    paths = {"/health", "/metrics", "/v1/models", *COMPLETION_PATHS}
    guarded = guard(app, server.limits, lambda reason: server.metrics.rejected.labels(reason).inc())
    return observing_middleware(guarded, server.metrics, paths)


async def _complete(
    request: Request, server: ModelServer, mailbox: _LoopMailbox, shape: ResponseShape
) -> Response:
    """One completions or chat request, from its body to its response (``shape`` says which)."""
    arrived = time.perf_counter()
    try:
        req = await _read_request(request, server, chat=shape is CHAT)
    except ApiError as e:
        return error_response(e)
    except BodyRefused as e:
        server.metrics.rejected.labels(e.reason).inc()
        return e.response
    job = _submit(server, req, mailbox.get(), arrived, shape)
    if job is None:
        server.metrics.rejected.labels("queue_full").inc()
        return refusal(rate_limited(server.engine.waiting_requests), retry_after=RETRY_AFTER_SECONDS)
    if req.stream:
        return EventStream(
            _stream(server, job),
            on_close=lambda: server.engine.cancel(job.seqs),
            send_timeout=server.limits.client_timeout,
            on_stalled=server.metrics.rejected.labels("write_timeout").inc,
        )
    return await _collect(request, server, job)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        # Unknown paths and methods too get OpenAI's error shape.
        return error_response(ApiError(str(e.detail), status=e.status_code))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(ApiError(str(e), status=400))


def _add_info_routes(app: FastAPI, server: ModelServer) -> None:
    """/health, /metrics and /v1/models: everything but the completions."""

    @app.get("/health")
    async def health() -> Response:
        if not server.engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> Response:
        card = model_card(server.model_id, server.created, server.context_length)
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Response:
        if model_id != server.model_id:
            return error_response(model_not_found(model_id))
        return JSONResponse(model_card(server.model_id, server.created, server.context_length))


async def _read_request(request: Request, server: ModelServer, *, chat: bool) -> CompletionRequest:
    body = decode_body(await read_body(request, server.limits))
    tok = server.tokenizer
    if chat:
        if server.chat is None:
            raise ApiError("this server has no chat template: use /v1/completions", status=404)
        return parse_chat_request(
            body,
            model_id=server.model_id,
            context_length=server.context_length,
            encode=server.chat.encode,
            vocab_size=tok.vocab_size,
        )
    return parse_completion_request(
        body,
        model_id=server.model_id,
        context_length=server.context_length,
        encode=tok.encode,
        vocab_size=tok.vocab_size,
    )


# ------------------------------------------------------------------- the completions


@dataclass
class _Completion:
    """An accepted completions request: its sequences, where their events arrive, its identity."""

    req: CompletionRequest
    shape: ResponseShape  # completions' or chat's objects
    seqs: list[Sequence]
    queue: asyncio.Queue[Event]
    first: FirstToken
    completion_id: str
    created: int
    prompt_tokens: int


def _submit(
    server: ModelServer, req: CompletionRequest, mailbox: Mailbox, arrived: float, shape: ResponseShape
) -> _Completion | None:
    """Hand ``req``'s sequences to the engine; their events arrive in the returned queue.
    None: the engine's queue is full (``--max-waiting``)."""
    queue: asyncio.Queue[Event] = asyncio.Queue()
    seqs = server.sequences(req, functools.partial(mailbox.post, queue))
    if not server.engine.submit(seqs):
        return None
    prompt_tokens = sum(len(p) for p in req.prompts)
    server.metrics.prompt_tokens.inc(prompt_tokens)
    return _Completion(
        req=req,
        shape=shape,
        seqs=seqs,
        queue=queue,
        first=FirstToken(server.metrics, arrived),
        completion_id=f"{shape.id_prefix}{uuid.uuid4().hex}",
        created=int(time.time()),
        prompt_tokens=prompt_tokens,
    )


async def _collect(request: Request, server: ModelServer, job: _Completion) -> Response:
    """A whole ``text_completion`` (or ``chat.completion``): every choice's text once all have finished."""
    texts = [""] * len(job.seqs)
    reasons: list[str | None] = [None] * len(job.seqs)
    done = 0
    try:
        while done < len(job.seqs):
            try:
                event = await asyncio.wait_for(job.queue.get(), timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    return Response(status_code=499)  # nobody reads it; counted in metrics
                continue
            job.first.seen()
            if event.error is not None:
                return error_response(ApiError(event.error, status=500, type="server_error"))
            texts[event.index] += event.text
            if event.finish_reason is not None:
                reasons[event.index] = event.finish_reason
                done += 1
    finally:
        server.engine.cancel(job.seqs)  # no-op for finished ones
    completion_tokens = sum(s.generated for s in job.seqs)
    server.metrics.completion_tokens.inc(completion_tokens)
    counts = usage(job.prompt_tokens, completion_tokens)
    return JSONResponse(
        job.shape.body(job.completion_id, job.created, server.model_id, texts, reasons, counts)
    )


async def _stream(server: ModelServer, job: _Completion) -> AsyncIterator[bytes]:
    """SSE body: ``text_completion`` chunks of each choice's new text, the last one of a choice
    with its finish_reason, the usage chunk if asked, then ``data: [DONE]`` (OpenAI's stream).
    Chat's ``chat.completion.chunk`` stream opens with each choice's role (``encode.start``).

    Events that arrived together are merged per choice into one chunk, and the chunks into one
    write: when the client or the loop falls behind the engine, chunks grow instead of piling up.
    """
    encode = job.shape.encoder(job.completion_id, job.created, server.model_id)
    opening = encode.start(len(job.seqs))
    if opening:
        yield opening
    queue, first, done = job.queue, job.first, 0  # locals: this loop runs once per engine step
    while done < len(job.seqs):
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
    completion_tokens = sum(s.generated for s in job.seqs)
    server.metrics.completion_tokens.inc(completion_tokens)
    if job.req.include_usage:
        counts = usage(job.prompt_tokens, completion_tokens)
        yield sse(job.shape.usage_chunk(job.completion_id, job.created, server.model_id, counts))
    yield sse("[DONE]")


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


class _LoopMailbox:
    """The app's :class:`Mailbox`, made by the first request: uvicorn's loop runs only from then."""

    def __init__(self) -> None:
        self._mailbox: Mailbox | None = None

    def get(self) -> Mailbox:
        if self._mailbox is None:
            self._mailbox = Mailbox(asyncio.get_running_loop())
        return self._mailbox


# ------------------------------------------------------------------------ serve


def load_server(
    model_uri: str,
    *,
    device: str | torch.device = "cpu",
    s3: S3Options | None = None,
    max_batch: int = 32,
    model_id: str | None = None,
    threads: int | None = None,
    max_waiting: int | None = None,
    limits: Limits | None = None,
) -> ModelServer:
    """Load an exported directory (as ``llmtrain generate`` does) and start its engine.

    On CPU the engine's matmuls get all cores but one (``threads`` overrides): the event loop
    (HTTP, JSON, SSE) needs a core of its own, and spinning OpenMP workers on it cost more than
    they gain (bench/serve.py on 2 cores: 1 thread gives 1.7× the aggregate tokens/s of 2).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    elif torch.device(device).type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))

    # One published export, pinned: a re-export meanwhile cannot pair its files with ours.
    export = resolve_export(model_uri, s3)
    pinned = export.uri
    tok = load_text_tokenizer(pinned, s3)
    config_file, jinja_file = (export.read(n) if export.has(n) else None for n in CHAT_FILES)
    chat = ChatPrompt.from_export(tok.tokenizer, config_file, jinja_file, tok.eos_id)
    net = load_model(pinned, device=device, s3=s3)  # an adapter export: merged into its base
    engine = Engine(net, max_batch=max_batch, max_waiting=max_waiting)
    metrics = ServeMetrics(engine)
    engine._observe_batch = metrics.observe_batch  # the metrics read the engine, and it feeds them
    engine.start()
    return ModelServer(
        model_id=model_id or model_uri.rstrip("/"),
        tokenizer=tok,
        context_length=net.cfg.context_length,
        engine=engine,
        metrics=metrics,
        device=str(device),
        limits=limits or Limits(),
        chat=chat,
    )


def serve(server: ModelServer, host: str, port: int, *, announce: Callable[[str], None] = print) -> None:
    """Serve until SIGINT/SIGTERM. Binds first, so ``port`` 0 picks a free port, which is announced."""
    import uvicorn  # only the serving process needs it, not the tests that build the app

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
    timed_out = server.metrics.rejected.labels("header_timeout").inc
    config = uvicorn.Config(
        create_app(server),
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        backlog=2048,
        http=header_timeout_protocol(server.limits.client_timeout, timed_out),
        timeout_keep_alive=5,  # uvicorn's default: an idle keep-alive connection closes after 5 s
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
