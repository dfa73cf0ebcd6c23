"""A fault-injecting HTTP/1.1 reverse proxy for S3, on loopback, in front of moto or gofakes3.

Rules pick requests by method and key (a regex on the path) and give the next ``times`` of them
one fault each:

- ``latency``: the request waits ``delay`` seconds, then goes through;
- ``slowdown``: answered 503 ``SlowDown`` (S3's throttling reply) without reaching the server;
- ``reset``: forwarded; the client gets the response head and half the body, then a TCP RST;
- ``truncate``: forwarded; the client gets the head (its full Content-Length) and half the
  body, then a clean close (FIN).

Every request and every fault given is counted (:attr:`FaultProxy.served`,
:attr:`Rule.hits`), so a test proves that the faults it asked for really happened.

Why our own and not a maintained tool (the project's rule is to prefer one):
Toxiproxy (github.com/Shopify/toxiproxy/v2, served by the Go proxy) works on TCP byte streams:
it cannot answer HTTP 503 SlowDown, and its toxics hit whatever bytes pass — listings, HEADs,
uploads alike — so "the first GET of shard train-00001.bin breaks off mid-body" cannot be said
and the counts in bench/RESULTS.md would not be repeatable. mitmproxy can speak HTTP, but its
releases since 11.1 need Python ≥ 3.12 (this project is on 3.11), 11.0.2 pins exact versions of
msgpack, cryptography, h11, tornado and Flask that differ from the ones Ray and torch are
installed with (``pip install --dry-run mitmproxy==11.0.2`` downgrades them), and its addon API
has no way to send part of a body and then reset the connection. What is left is small: one
request at a time per connection, upstream connections closed after each response.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Fault = Literal["latency", "slowdown", "reset", "truncate"]

SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


@dataclass
class Rule:
    fault: Fault
    method: str | None = None  # "GET", "PUT", …; None: any
    key: str = ""  # regex searched in the request path ("/bucket/key?query")
    times: int = 1
    delay: float = 0.0  # latency only
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (
            self.hits < self.times
            and (self.method is None or self.method == method)
            and re.search(self.key, path) is not None
        )


@dataclass
class _Request:
    method: str
    path: str
    head: list[tuple[str, str]]
    body: bytes


@dataclass
class FaultProxy:
    upstream_host: str
    upstream_port: int
    rules: list[Rule] = field(default_factory=list)
    served: Counter[str] = field(default_factory=Counter)  # "GET" … and each fault given
    port: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.served.clear()

    def _pick(self, method: str, path: str) -> Rule | None:
        with self._lock:
            self.served[method] += 1
            for rule in self.rules:
                if rule.matches(method, path):
                    rule.hits += 1
                    self.served[rule.fault] += 1
                    return rule
        return None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FaultProxy:
        ready = threading.Event()

        async def main() -> None:
            self._stopped = asyncio.Event()
            server = await asyncio.start_server(self._client, "127.0.0.1", 0)
            self.port = int(server.sockets[0].getsockname()[1])
            self._loop = asyncio.get_running_loop()
            ready.set()
            async with server:
                await self._stopped.wait()

        self._thread = threading.Thread(
            target=lambda: asyncio.run(main()), name="s3-fault-proxy", daemon=True
        )
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the S3 fault proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ------------------------------------------------------------------ HTTP

    @staticmethod
    async def _read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> _Request | None:
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        lines = raw.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        head = [(k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)]
        names = {k.lower(): v for k, v in head}
        if names.get("expect", "").lower() == "100-continue":
            # Answer at once: botocore otherwise waits a second for it before sending a body.
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        body = b""
        if names.get("transfer-encoding", "").lower() == "chunked":
            while True:  # keep the chunked framing: it is forwarded as it came
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                chunk = await reader.readexactly(size + 2)
                body += size_line + chunk
                if size == 0:
                    if chunk != b"\r\n":  # trailers, then an empty line
                        body += await reader.readuntil(b"\r\n\r\n")
                    break
        elif "content-length" in names:
            body = await reader.readexactly(int(names["content-length"]))
        return _Request(method, path, head, body)

    async def _forward(self, req: _Request) -> bytes:
        """The whole upstream response, read to the end (the upstream connection is closed)."""
        up_reader, up_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        head = [(k, v) for k, v in req.head if k.lower() not in ("connection", "expect")]
        lines = [f"{req.method} {req.path} HTTP/1.1", *(f"{k}: {v}" for k, v in head), "Connection: close"]
        up_writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + req.body)
        await up_writer.drain()
        response = await up_reader.read()
        up_writer.close()
        return response

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                req = await self._read_request(reader, writer)
                if req is None:
                    break
                rule = self._pick(req.method, req.path)
                if rule is not None and rule.fault == "slowdown":
                    writer.write(
                        b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                        + f"Content-Length: {len(SLOWDOWN_BODY)}\r\n\r\n".encode()
                        + SLOWDOWN_BODY
                    )
                    await writer.drain()
                    continue
                if rule is not None and rule.fault == "latency":
                    await asyncio.sleep(rule.delay)
                response = await self._forward(req)
                split = response.index(b"\r\n\r\n") + 4
                head, body = response[:split], response[split:]
                if rule is not None and rule.fault in ("reset", "truncate"):
                    writer.transport.set_write_buffer_limits(0)
                    writer.write(head + body[: len(body) // 2])
                    await writer.drain()
                    await asyncio.sleep(0.05)  # let the kernel send it before the close
                    if rule.fault == "reset":
                        sock = writer.get_extra_info("socket")
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.close()
                    return
                lower = head.lower()
                framed = b"content-length:" in lower or b"transfer-encoding: chunked" in lower
                if framed:  # the upstream's "Connection: close" was ours: keep the client's open
                    head = b"\r\n".join(
                        ln for ln in head.split(b"\r\n") if not ln.lower().startswith(b"connection:")
                    )
                writer.write(head + body)
                await writer.drain()
                if not framed and req.method != "HEAD":
                    break  # the body ends at the close: so must this connection
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # the proxy is stopping: end quietly (a cancelled handler task is logged)
        finally:
            writer.close()


# ------------------------------------------------------------------ the second S3 server


def gofakes3_bin() -> Path:
    """Where tests/cluster/build.sh s3 (part of `make cluster-tools`) installs gofakes3."""
    env = dict(
        ln.split("=", 1)
        for ln in (Path(__file__).parent / "cluster" / "versions.env").read_text().splitlines()
        if "=" in ln and not ln.startswith("#")
    )
    cache = Path(os.environ.get("LLMTRAIN_CACHE", Path.home() / ".cache" / "llmtrain"))
    return cache / "bin" / f"gofakes3-{env['GOFAKES3_VERSION']}" / "gofakes3"


@contextlib.contextmanager
def gofakes3_server() -> Iterator[str]:
    """gofakes3 (Go, MIT) on 127.0.0.1 with its in-memory backend; yields the endpoint."""
    exe = gofakes3_bin()
    if not exe.exists():
        raise FileNotFoundError(f"{exe} is missing: run `bash tests/cluster/build.sh s3`")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    proc = subprocess.Popen(
        [str(exe), "-backend", "memory", "-host", f"127.0.0.1:{port}", "-quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("gofakes3 did not start") from None
            time.sleep(0.05)
    try:
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
