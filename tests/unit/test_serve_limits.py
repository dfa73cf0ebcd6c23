"""``llmtrain serve``'s isolation and bounds, in process (issue 26 item 1): a sequence that fails
fails alone and the others finish as if it had never come; every number is finite and a tiny
temperature is greedy; the body's size, the API key and the waiting queue are enforced with
OpenAI's error bodies, and each refusal is counted."""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from llmtrain.runtime.generate import Sampling, generate, next_token
from llmtrain.runtime.serve import app as serve_app
from llmtrain.runtime.serve.engine import Engine, Event, Sequence
from llmtrain.runtime.serve.limits import CLIENT_TIMEOUT_SECONDS, Limits
from llmtrain.runtime.serve.metrics import ServeMetrics
from llmtrain.runtime.serve.protocol import MAX_BODY_BYTES, ApiError, decode_body
from llmtrain.runtime.serve.text import TextStream

from llmtrain.cli import model as cli_model
from tests.unit.test_serve import PROMPTS, parse, tiny_gpt

# ------------------------------------------------------------------ one bad sequence

BAD_TEMPERATURE = 1e-300  # logits / 1e-300 overflow: the softmax is NaN and multinomial raises


class Collector:
    """Events of sequences, and a semaphore released when each ends (finished or failed)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.done = threading.Semaphore(0)

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if event.finish_reason is not None or event.error is not None:
            self.done.release()


def seq(index: int, prompt: list[int], s: Sampling, emit: Collector, decode: Any = None) -> Sequence:
    gen = None if s.greedy else torch.Generator().manual_seed(s.seed)
    return Sequence(index, prompt, s, TextStream(decode or (lambda ids: "")), emit, generator=gen)


def run(engine: Engine, seqs: list[Sequence], emit: Collector) -> None:
    """Submit ``seqs`` as one request each, all before the first step, and wait for every end."""
    for s in seqs:
        assert engine.submit([s])
    engine.start()
    try:
        for _ in seqs:
            assert emit.done.acquire(timeout=60)
    finally:
        engine.stop()
    assert engine.active_count == 0


GOOD = [(PROMPTS[0], Sampling(max_new_tokens=20, temperature=0)), (PROMPTS[2], Sampling(max_new_tokens=14))]


def good_alone() -> list[list[int]]:
    """The good requests' tokens, each run alone (no bad request anywhere)."""
    model = tiny_gpt(seed=1)
    out = []
    for prompt, s in GOOD:
        emit = Collector()
        one = seq(0, prompt, s, emit)
        run(Engine(model), [one], emit)
        out.append(one.text.ids)
    return out


def test_the_bad_temperature_really_breaks_sampling() -> None:
    """The premise: without isolation this row's sampling raises (the bug of issue 26)."""
    with pytest.raises(RuntimeError, match="probability tensor contains"):
        next_token(torch.randn(64), Sampling(temperature=BAD_TEMPERATURE), torch.Generator().manual_seed(0))


def bad_and_good(model: torch.nn.Module) -> tuple[list[Sequence], Collector]:
    """A greedy and a seeded request, one with a bad temperature, and one whose text fails after
    5 tokens (it leaves the batch mid-way, while the others decode)."""
    emit = Collector()

    def decode(ids: list[int]) -> str:
        if len(ids) > 5:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a tokenizer bug")
        return ""

    seqs = [
        seq(0, PROMPTS[0], GOOD[0][1], emit),
        seq(1, PROMPTS[1], Sampling(max_new_tokens=20, temperature=BAD_TEMPERATURE), emit),
        seq(2, PROMPTS[2], GOOD[1][1], emit),
        seq(3, PROMPTS[3], Sampling(max_new_tokens=20, temperature=0), emit, decode=decode),
    ]
    return seqs, emit


def test_a_failing_sequence_fails_alone_and_the_others_equal_their_solo_runs() -> None:
    want = good_alone()
    assert want[0] == generate(tiny_gpt(seed=1), PROMPTS[0], GOOD[0][1])
    model = tiny_gpt(seed=1)
    engine = Engine(model, max_batch=8)
    seqs, emit = bad_and_good(model)
    run(engine, seqs, emit)
    assert [seqs[0].text.ids, seqs[2].text.ids] == want
    errors = {e.index: e.error for e in emit.events if e.error is not None}
    assert set(errors) == {1, 3}
    assert "probability tensor contains" in (errors[1] or "") and "UnicodeDecodeError" in (errors[3] or "")
    assert seqs[3].generated == 6  # it failed mid-way, in the batch
    ends = {e.index: e.finish_reason for e in emit.events if e.finish_reason is not None}
    assert ends == {0: "length", 2: "length"}
    assert engine.alive is False and engine.stats.max_rows >= 3  # the good ones were batched with it


def test_negative_control_without_isolation_every_row_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same requests through the pre-fix path (one sampling error fails the whole step):
    the good requests fail too, so the test above would catch a regression."""

    def unguarded_take(self: Engine, rows: list[Sequence], logits: torch.Tensor) -> None:
        for i, s in enumerate(rows):
            self._emit(s, next_token(logits[i], s.sampling, s.generator))

    monkeypatch.setattr(Engine, "_take", unguarded_take)
    model = tiny_gpt(seed=1)
    seqs, emit = bad_and_good(model)
    run(Engine(model, max_batch=8), seqs, emit)
    failed = {e.index for e in emit.events if e.error is not None}
    assert {0, 2} <= failed  # the good requests were failed by the bad one


# ------------------------------------------------------------------ finite numbers


@pytest.mark.parametrize("name", ["temperature", "top_p", "presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_number_must_be_finite(name: str, value: float) -> None:
    with pytest.raises(ApiError) as info:
        parse(**{name: value})
    assert (info.value.status, info.value.param) == (400, name)
    assert info.value.body()["error"]["type"] == "invalid_request_error"


def test_nan_as_python_json_parses_it_is_refused_naming_the_parameter() -> None:
    body = decode_body(b'{"model": "m", "prompt": "ab", "temperature": NaN}')
    assert math.isnan(body["temperature"])
    with pytest.raises(ApiError) as info:
        parse(temperature=body["temperature"])
    assert info.value.param == "temperature" and "finite" in info.value.message
    with pytest.raises(ApiError) as info:
        parse(temperature=json.loads("1e400"))  # overflows to inf
    assert info.value.param == "temperature"


@pytest.mark.parametrize(
    ("sent", "used"), [(1e-300, 0.0), (5e-324, 0.0), (9e-6, 0.0), (1e-5, 1e-5), (0.7, 0.7)]
)
def test_a_temperature_below_epsilon_is_greedy(sent: float, used: float) -> None:
    assert parse(temperature=sent).temperature == used


# ------------------------------------------------------------------ the HTTP bounds


class CharTokenizer:
    """Enough of TextTokenizer for the app: characters ↔ ids 0…63."""

    eos_id = None
    vocab_size = 64

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 64 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(48 + i % 64) for i in ids)


def server(limits: Limits, *, max_waiting: int = 4, start: bool = True) -> serve_app.ModelServer:
    engine = Engine(tiny_gpt(seed=1), max_batch=1, max_waiting=max_waiting)
    if start:
        engine.start()
    return serve_app.ModelServer(
        model_id="m",
        tokenizer=CharTokenizer(),  # type: ignore[arg-type]
        context_length=32,
        engine=engine,
        metrics=ServeMetrics(engine),
        device="cpu",
        limits=limits,
    )


@pytest.fixture
def client_of() -> Iterator[Any]:
    made: list[serve_app.ModelServer] = []

    def make(limits: Limits, **kw: Any) -> tuple[TestClient, serve_app.ModelServer]:
        s = server(limits, **kw)
        made.append(s)
        return TestClient(serve_app.create_app(s)), s

    yield make
    for s in made:
        s.engine.stop()


def rejected(s: serve_app.ModelServer, reason: str) -> float:
    return (
        s.metrics.registry.get_sample_value("llmtrain_serve_rejected_requests_total", {"reason": reason}) or 0
    )


BODY = {"model": "m", "prompt": "ab", "max_tokens": 3, "temperature": 0}


def test_a_declared_body_over_the_limit_is_413_unread(client_of: Any) -> None:
    client, s = client_of(Limits(max_body_bytes=100))
    assert client.post("/v1/completions", json=BODY).status_code == 200
    big = json.dumps({**BODY, "user": "x" * 200}).encode()
    r = client.post("/v1/completions", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert r.headers["connection"] == "close"
    # Chunked (no Content-Length): cut at the chunk that passes the limit, the rest never read.
    pulled = []

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(big), 40):
            pulled.append(i)
            yield big[i : i + 40]

    r = client.post("/v1/completions", content=chunks())
    assert r.status_code == 413 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert rejected(s, "body_too_large") == 2


def test_api_key_bearer_health_open_metrics_by_flag(client_of: Any) -> None:
    for require in (False, True):
        client, s = client_of(Limits(api_key="sekret", metrics_require_key=require))
        r = client.post("/v1/completions", json=BODY)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert "provide an API key" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json=BODY, headers={"Authorization": "Bearer sekre"})
        assert r.status_code == 401 and "Incorrect API key" in r.json()["error"]["message"]
        assert "sekre" not in r.text
        assert client.get("/v1/models", headers={"Authorization": "Basic sekret"}).status_code == 401
        assert client.get("/nope").status_code == 401  # no route is disclosed without the key
        ok = client.post("/v1/completions", json=BODY, headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
        assert client.get("/health").status_code == 200
        assert client.get("/metrics").status_code == (401 if require else 200)
        assert client.get("/metrics", headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert rejected(s, "unauthorized") == 4 + require


def test_a_full_queue_is_429_with_retry_after(client_of: Any) -> None:
    client, s = client_of(Limits(), max_waiting=2, start=False)  # nothing is admitted: all wait
    for i in range(2):
        assert s.engine.submit([seq(i, [1], Sampling(max_new_tokens=2, temperature=0), Collector())])
    r = client.post("/v1/completions", json=BODY)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "requests" and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert rejected(s, "queue_full") == 1
    assert s.metrics.registry.get_sample_value("llmtrain_serve_prompt_tokens_total") == 0  # not accepted


def test_a_cancelled_waiter_leaves_the_queue_at_once() -> None:
    engine = Engine(tiny_gpt(), max_batch=1, max_waiting=1)  # not started: nothing is admitted
    a = [seq(i, [1], Sampling(max_new_tokens=2, temperature=0), Collector()) for i in range(2)]
    assert engine.submit(a) and engine.waiting_requests == 1
    assert not engine.submit([seq(0, [1], Sampling(max_new_tokens=2), Collector())])
    engine.cancel(a[:1])
    assert engine.waiting_requests == 1 and engine.waiting_count == 1  # one of its two still waits
    engine.cancel(a)
    assert engine.waiting_requests == 0 and engine.waiting_count == 0 and engine.stats.cancelled == 2
    assert engine.submit([seq(0, [1], Sampling(max_new_tokens=2), Collector())])


def test_a_stream_nobody_reads_is_dropped_after_the_timeout() -> None:
    """A client that stays connected but stops reading: the send waits on full buffers; after
    the timeout the stream ends unfinished, counted, and its sequences are cancelled. (Over real
    loopback sockets the kernel's buffers take megabytes before a send waits: too slow a test
    on the tiny model, so the blocked send is a fake here.)"""
    calls: list[str] = []
    sent: list[dict[str, Any]] = []

    async def chunks() -> Any:
        for i in range(3):
            yield b"data: %d\n\n" % i

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            await asyncio.Event().wait()  # the client reads nothing more

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # never disconnects
        return {}

    stream = serve_app.EventStream(
        chunks(), lambda: calls.append("close"), send_timeout=0.2, on_stalled=lambda: calls.append("stalled")
    )
    scope = {"type": "http", "asgi": {"spec_version": "2.3"}}
    asyncio.run(asyncio.wait_for(stream(scope, receive, send), 10))
    assert calls == ["stalled", "close"] and [m["type"] for m in sent] == [
        "http.response.start",
        "http.response.body",
    ]


def test_the_clis_defaults_are_the_runtimes() -> None:
    assert (cli_model.MAX_BODY_BYTES, cli_model.CLIENT_TIMEOUT_SECONDS) == (
        MAX_BODY_BYTES,
        CLIENT_TIMEOUT_SECONDS,
    )
    with pytest.raises(ValueError, match="--api-key-file"):
        Limits(api_key="")
