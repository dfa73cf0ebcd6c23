"""What bounds ``llmtrain serve`` against clients: an optional API key, the body's size, and
timeouts on clients that send or read too slowly.

- :func:`guard` — a pure ASGI wrapper in front of every route: ``Authorization: Bearer`` against
  the key (``hmac.compare_digest``: constant time), ``/health`` always open and ``/metrics`` open
  unless asked; a ``Content-Length`` over the limit is a 413 before a byte of the body is read.
- :func:`read_body` — a completions body read chunk by chunk: over the limit (a chunked body has
  no ``Content-Length``) → 413 at that chunk; slower than the timeout → 408.
- :func:`header_timeout_protocol` — uvicorn's h11 protocol with a deadline on each request's
  headers. uvicorn (0.55) bounds an idle keep-alive connection (``timeout_keep_alive``) and the
  headers' size (``h11_max_incomplete_event_size``) but not the time to send them: a client
  that opens connections and trickles header bytes would hold each for ever. Its
  ``limit_concurrency`` answers 503, a 5xx that says nothing about the client. Starlette has no
  body-size limit either, so the two checks above are ours too.

Every refusal is OpenAI's error body and is counted in
``llmtrain_serve_rejected_requests_total{reason}`` (:class:`~llmtrain.runtime.serve.metrics.ServeMetrics`).
A 413 or 408 closes the connection (``Connection: close``): the rest of that body is never read.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmtrain.runtime.serve.protocol import MAX_BODY_BYTES, ApiError, body_too_large, invalid_api_key
from starlette.requests import Request
from starlette.responses import JSONResponse

OPEN_PATHS = frozenset({"/health"})  # probes carry no key
CLIENT_TIMEOUT_SECONDS = 10.0  # the default of --client-timeout


@dataclass(frozen=True)
class Limits:
    """The server's bounds on clients (``llmtrain serve`` flags)."""

    max_body_bytes: int = MAX_BODY_BYTES
    client_timeout: float = CLIENT_TIMEOUT_SECONDS  # headers, body, a stalled stream's write
    api_key: str | None = None
    metrics_require_key: bool = False

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1:
            raise ValueError(f"max body bytes must be ≥ 1, got {self.max_body_bytes} (--max-body-bytes)")
        if not self.client_timeout > 0:
            raise ValueError(f"client timeout must be > 0, got {self.client_timeout} (--client-timeout)")
        if self.api_key is not None and not self.api_key:
            raise ValueError("the API key is empty (--api-key-file)")


def refusal(e: ApiError, *, close: bool = False, retry_after: int | None = None) -> JSONResponse:
    """``e`` as OpenAI's error body; ``close`` ends the connection after it."""
    headers = {}
    if close:
        headers["Connection"] = "close"
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if e.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _bearer(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else b""
    return None


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.isdigit() else None  # h11 refuses a malformed one before us
    return None


def guard(app: Any, limits: Limits, reject: Callable[[str], None]) -> Any:
    """ASGI wrapper: the key and the declared body size, checked before routing and before the
    body is read. ``reject(reason)`` counts each refusal."""
    key = None if limits.api_key is None else limits.api_key.encode()
    open_paths = OPEN_PATHS if limits.metrics_require_key else OPEN_PATHS | {"/metrics"}

    async def guarded(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        headers = scope["headers"]
        if key is not None and scope["path"] not in open_paths:
            sent = _bearer(headers)
            if sent is None or not hmac.compare_digest(sent, key):
                reject("unauthorized")
                await refusal(invalid_api_key(sent is not None))(scope, receive, send)
                return
        declared = _content_length(headers)
        if declared is not None and declared > limits.max_body_bytes:
            reject("body_too_large")
            await refusal(body_too_large(limits.max_body_bytes), close=True)(scope, receive, send)
            return
        await app(scope, receive, send)

    return guarded


class BodyRefused(Exception):
    """The body was too large or too slow; ``response`` says so (and closes the connection)."""

    def __init__(self, reason: str, response: JSONResponse) -> None:
        super().__init__(reason)
        self.reason, self.response = reason, response


async def read_body(request: Request, limits: Limits) -> bytes:
    """The whole body, at most ``max_body_bytes`` (counted as chunks arrive, so a chunked body
    is cut at the chunk that passes the limit) within ``client_timeout``; else :class:`BodyRefused`."""
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(limits.client_timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limits.max_body_bytes:
                    raise BodyRefused(
                        "body_too_large", refusal(body_too_large(limits.max_body_bytes), close=True)
                    )
                chunks.append(chunk)
    except TimeoutError:
        message = f"the request body did not arrive within {limits.client_timeout:g} s"
        raise BodyRefused(
            "body_timeout", refusal(ApiError(message, status=408, code="request_timeout"), close=True)
        ) from None
    return b"".join(chunks)


def header_timeout_protocol(seconds: float, on_timeout: Callable[[], None]) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request's headers are not all in
    ``seconds`` after it opened, or after the first bytes that follow its previous response
    (see the module docstring)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol  # only the serving process needs it

    class HeaderTimeoutProtocol(H11Protocol):
        _armed_for: object = None  # the cycle whose successor's headers the deadline awaits

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm(None)

        def data_received(self, data: bytes) -> None:
            # The first bytes after a response start the next request's deadline; an idle
            # keep-alive connection is uvicorn's to close (timeout_keep_alive), not a refusal.
            done = self.cycle
            if done is not None and done.response_complete and self._armed_for is not done:
                self._arm(done)
            super().data_received(data)

        def _arm(self, cycle: object) -> None:
            self._armed_for = cycle
            self.loop.call_later(seconds, self._headers_due, cycle)

        def _headers_due(self, cycle: object) -> None:
            # Still the same cycle: no new request's headers arrived in time.
            if self.cycle is cycle and not self.transport.is_closing():
                on_timeout()
                self.transport.close()

    return HeaderTimeoutProtocol
