"""``llmtrain serve``'s isolation and bounds as a real subprocess (issue 26 item 1), spoken to with
the official ``openai`` client and raw sockets: bad requests beside a good one leave its text
exactly as alone; the key, the body limit, the waiting queue and the client timeouts each refuse
in OpenAI's shape and are counted in /metrics; a client that goes away frees its place."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_serve import (  # noqa: F401
    PROMPTS,
    Served,
    exported,
    http_request,
    served,
    start_serve,
    stop_serve,
    tokenizer,
)

pytestmark = pytest.mark.timeout(300)

KEY = "llmtrain-test-key-0123456789"
LIMIT = 4096  # --max-body-bytes
TIMEOUT = 1.0  # --client-timeout


@pytest.fixture(scope="module")
def guarded(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:  # noqa: F811
    """One slot, one waiting request, a key (with the newline a Secret file often has), a 4 KiB
    body limit and a 1 s client timeout."""
    tmp = tmp_path_factory.mktemp("guarded")
    (tmp / "key").write_text(KEY + "\n")
    s = start_serve(
        exported, tmp / "serve.log", "--max-batch", "1", "--max-waiting", "1", "--api-key-file",
        str(tmp / "key"), "--max-body-bytes", str(LIMIT), "--client-timeout", str(TIMEOUT),
    )  # fmt: skip
    try:
        yield s
    finally:
        stop_serve(s)


def client(s: Served, key: str = KEY) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{s.url}/v1", api_key=key, max_retries=0, timeout=60)


def raw(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def five_xx(s: Served) -> float:
    return sum(
        v for k, v in s.metrics().items() if k.startswith("llmtrain_serve_requests_total") and 'code="5' in k
    )


# ------------------------------------------------------------------ bad beside good


def test_bad_requests_beside_a_good_one_leave_its_text_as_alone(served: Served) -> None:  # noqa: F811
    """The issue's repro: temperature 1e-300 or NaN sent while a greedy request decodes used to
    fail both with a 500. Now the NaN is a 400 naming it, 1e-300 is greedy, and the good
    request's text equals its solo run."""
    c = client(served)
    prompt = PROMPTS[0]
    alone = c.completions.create(model=served.model, prompt=prompt, max_tokens=100, temperature=0)
    before = five_xx(served)
    bad = [
        ("temperature", "1e-300", 200),
        ("temperature", "NaN", 400),
        ("temperature", "Infinity", 400),
        ("top_p", "NaN", 400),
        ("presence_penalty", "-Infinity", 400),
        ("temperature", "5e-324", 200),
    ]
    got: dict[str, Any] = {}
    start = threading.Barrier(2)

    def good() -> None:
        start.wait(timeout=30)
        got["good"] = client(served).completions.create(
            model=served.model, prompt=prompt, max_tokens=100, temperature=0
        )

    t = threading.Thread(target=good)
    t.start()
    start.wait(timeout=30)
    answers = []
    for _ in range(3):
        for name, value, status in bad:
            body = f'{{"model": {json.dumps(served.model)}, "prompt": "{PROMPTS[1]}", "max_tokens": 30, "{name}": {value}}}'
            code, out = http_request(served.port, "POST", "/v1/completions", body.encode())
            assert code == status, (name, value, out)
            if code == 400:
                assert json.loads(out)["error"]["param"] == name
            else:
                answers.append(json.loads(out)["choices"][0]["text"])
    t.join(timeout=120)
    assert got["good"].choices[0].text == alone.choices[0].text
    assert got["good"].usage == alone.usage
    greedy = c.completions.create(model=served.model, prompt=PROMPTS[1], max_tokens=30, temperature=0)
    assert set(answers) == {greedy.choices[0].text}  # a temperature under 1e-5 is greedy
    assert five_xx(served) == before == 0


# ------------------------------------------------------------------ the key


def test_the_api_key_with_the_openai_client(guarded: Served) -> None:
    import openai

    with pytest.raises(openai.AuthenticationError) as info:
        client(guarded, "wrong").completions.create(model=guarded.model, prompt="x", max_tokens=2)
    assert info.value.code == "invalid_api_key" and "wrong" not in str(info.value)
    with pytest.raises(openai.AuthenticationError):
        client(guarded, "wrong").models.list()
    code, out = http_request(guarded.port, "POST", "/v1/completions", b'{"model": "x", "prompt": "x"}')
    assert code == 401 and "provide an API key" in json.loads(out)["error"]["message"]
    r = client(guarded).completions.create(model=guarded.model, prompt="x", max_tokens=2)
    assert r.usage.completion_tokens >= 1
    assert http_request(guarded.port, "GET", "/health")[0] == 200  # probes carry no key
    m = guarded.metrics()  # open without --metrics-require-key
    assert m['llmtrain_serve_rejected_requests_total{reason="unauthorized"}'] == 3


# ------------------------------------------------------------------ the body


def test_a_body_over_the_limit_is_413_before_it_is_sent(guarded: Served) -> None:
    auth = f"Authorization: Bearer {KEY}\r\n"
    with raw(guarded.port) as s:  # declared: the server answers without waiting for the body
        s.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n"
            f"Content-Length: {100 * LIMIT}\r\n\r\n".encode()
        )
        out = read_all(s)  # the server closes the connection after the 413
    assert out.startswith(b"HTTP/1.1 413") and b'"code":"request_too_large"' in out
    with raw(guarded.port) as s:  # chunked: counted as it arrives
        s.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        for _ in range(LIMIT // 1000 + 1):
            s.sendall(b"3e8\r\n" + b" " * 1000 + b"\r\n")
        out = read_all(s)
    assert out.startswith(b"HTTP/1.1 413")
    assert guarded.metrics()['llmtrain_serve_rejected_requests_total{reason="body_too_large"}'] == 2


# ------------------------------------------------------------------ the queue


def stream_request(port: int, body: dict[str, Any]) -> socket.socket:
    s = raw(port)
    data = json.dumps(body).encode()
    s.sendall(
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return s


def test_a_full_queue_is_429_and_a_client_gone_frees_its_place(guarded: Served) -> None:
    """One slot, one waiting request: a long request (n 60, its choices one at a time) holds the
    queue; the next is refused with 429 and Retry-After; when the long one's client goes away,
    its place frees at once and the next is served."""
    import openai

    before = guarded.metrics()
    long = {"model": guarded.model, "prompt": PROMPTS[0], "n": 60, "max_tokens": 100, "stream": True}
    s = stream_request(guarded.port, long)
    assert s.recv(12).startswith(b"HTTP/1.1 200")
    with pytest.raises(openai.RateLimitError) as info:
        client(guarded).completions.create(model=guarded.model, prompt="x", max_tokens=2)
    assert info.value.response.headers["retry-after"] == "1"
    assert info.value.code == "rate_limit_exceeded" and info.value.type == "requests"
    s.close()  # the client goes away: its waiting choices leave the queue
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            r = client(guarded).completions.create(model=guarded.model, prompt="x", max_tokens=2)
            break
        except openai.RateLimitError:
            time.sleep(0.1)
    else:
        pytest.fail("the gone client's place was not freed")
    assert r.usage.completion_tokens >= 1
    after = guarded.metrics()
    assert after['llmtrain_serve_rejected_requests_total{reason="queue_full"}'] >= 1
    assert after["llmtrain_serve_cancelled_sequences"] - before["llmtrain_serve_cancelled_sequences"] >= 50
    assert after["llmtrain_serve_waiting_sequences"] == 0


# ------------------------------------------------------------------ slow clients


def test_stalled_clients_are_cut_by_the_timeout(guarded: Served) -> None:
    before = guarded.metrics()
    cases = {
        "idle": b"",
        "half the headers": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n",
        "half the body": (
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            'Content-Length: 50\r\n\r\n{"model":'
        ).encode(),
    }
    for what, sent in cases.items():
        with raw(guarded.port) as s:
            t0 = time.monotonic()
            s.sendall(sent)
            out = read_all(s)  # returns when the server closes the connection
            took = time.monotonic() - t0
        assert TIMEOUT * 0.8 < took < TIMEOUT + 5, (what, took)
        if what == "half the body":
            assert out.startswith(b"HTTP/1.1 408") and b'"code":"request_timeout"' in out
        else:
            assert out == b"", what
    after = guarded.metrics()
    reasons = {
        r: after[f'llmtrain_serve_rejected_requests_total{{reason="{r}"}}']
        - before.get(f'llmtrain_serve_rejected_requests_total{{reason="{r}"}}', 0)
        for r in ("header_timeout", "body_timeout")
    }
    # ≥: a connection another test's client left without a request may be cut in this window.
    assert reasons["header_timeout"] >= 2 and reasons["body_timeout"] == 1
    assert client(guarded).completions.create(model=guarded.model, prompt="x", max_tokens=2).choices
