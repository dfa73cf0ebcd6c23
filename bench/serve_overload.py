"""``llmtrain serve`` under overload and abuse (issue 26 item 1): 64 concurrent clients for a fixed time.

    .venv/bin/python -P bench/serve_overload.py [--model DIR] [--seconds 40] [--append]

The server is a real ``llmtrain serve --max-batch 8`` subprocess on 127.0.0.1 (default
``--max-waiting``: 4 × 8 = 32; default ``--client-timeout``: 10 s), on the model bench/serve.py builds (the
quickstart's shape) unless ``--model`` names one. The clients, threads over raw sockets:

- 40 *good*: greedy completions of 32 tokens, every other one streamed; a 429 is honoured by
  sleeping its ``Retry-After``. Each answer's text is compared with the prompt's solo answer.
- 8 *bad*: NaN / Infinity / 1e-300 parameters, malformed JSON, an unknown model, a negative
  ``max_tokens``: each must be a 4xx (1e-300 is greedy: a 200).
- 4 *oversized*: a declared 64 MiB body (only 64 KiB sent) and a chunked one past the limit: 413.
- 8 *stalling*: half a request's headers, or the headers and half the body, then nothing: the
  server must cut them (408 for the body) after the client timeout.
- 4 *gone*: a streamed request of 200 tokens whose client reads one line and disconnects.

Pass: no 5xx anywhere (client side and the server's own ``llmtrain_serve_requests_total``), every
good request answered (200, its text equal to its solo run) or refused with 429 and
``Retry-After``. Recorded: latency p50 / p99 of the good answers, the server's peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench.serve: the model and the server start-up are its

from bench.serve import PROMPTS, pct, quickstart_model, stamp, start_server  # noqa: E402

MAX_TOKENS = 32
CLIENT_TIMEOUT = 10.0  # llmtrain serve's default --client-timeout


class Tally:
    """Outcomes by client kind, latencies of good answers, and whatever broke the rules."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.codes: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.latency: list[float] = []
        self.problems: list[str] = []

    def add(self, kind: str, outcome: str, latency: float | None = None, problem: str | None = None) -> None:
        with self.lock:
            self.codes[kind][outcome] += 1
            if latency is not None:
                self.latency.append(latency)
            if problem is not None and len(self.problems) < 50:
                self.problems.append(f"{kind}: {problem}")


def request(port: int, body: bytes, timeout: float = 120) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def good_body(model: str, prompt: str, stream: bool) -> bytes:
    return json.dumps(
        {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream}
    ).encode()


def text_of(raw: bytes, stream: bool) -> str:
    if not stream:
        return str(json.loads(raw)["choices"][0]["text"])
    out = []
    for line in raw.split(b"\n"):
        if line.startswith(b"data: {"):
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"error event: {chunk}")
            out += [c["text"] for c in chunk["choices"]]
    return "".join(out)


def good(port: int, model: str, k: int, solo: dict[str, str], tally: Tally, until: float) -> None:
    j = 0
    while time.monotonic() < until:
        prompt, stream = PROMPTS[(k + j) % len(PROMPTS)], j % 2 == 1
        j += 1
        t0 = time.perf_counter()
        status, headers, raw = request(port, good_body(model, prompt, stream))
        took = time.perf_counter() - t0
        if status == 200:
            text = text_of(raw, stream)
            tally.add("good", "200", took, None if text == solo[prompt] else f"text differs for {prompt!r}")
        elif status == 429 and headers.get("retry-after"):
            tally.add("good", "429")
            time.sleep(float(headers["retry-after"]))
        else:
            tally.add("good", str(status), problem=f"{status} {raw[:200]!r}")


BAD_BODIES = [
    ('{"model": "@", "prompt": "x", "temperature": NaN}', 400),
    ('{"model": "@", "prompt": "x", "temperature": 1e-300, "max_tokens": 8}', 200),
    ('{"model": "@", "prompt": "x", "top_p": Infinity}', 400),
    ('{"model": "@", "prompt": "x", "presence_penalty": -Infinity}', 400),
    ('{"model": "@", "prompt": "x", "max_tokens": -1}', 400),
    ('{"model": "gpt-4", "prompt": "x"}', 404),
    ('{"model": "@", "prompt": [1e400]}', 400),
    ("{not json", 400),
]


def bad(port: int, model: str, k: int, tally: Tally, until: float) -> None:
    j = 0
    while time.monotonic() < until:
        text, want = BAD_BODIES[(k + j) % len(BAD_BODIES)]
        j += 1
        status, headers, raw = request(port, text.replace('"@"', json.dumps(model)).encode())
        if status == 429:
            time.sleep(float(headers.get("retry-after", "1")))
        tally.add(
            "bad", str(status), problem=None if status in (want, 429) else f"{text}: {status} {raw[:200]!r}"
        )


def raw_exchange(port: int, head: bytes, chunks: list[bytes]) -> tuple[bytes, float]:
    """Send ``head`` then ``chunks`` (stopping if the server has closed), read to the close."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        try:
            s.sendall(head)
            for c in chunks:
                s.sendall(c)
        except OSError:  # the server answered and closed while we were sending: expected
            pass
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except OSError:
            pass
    return out, time.perf_counter() - t0


def oversized(port: int, k: int, tally: Tally, until: float) -> None:
    while time.monotonic() < until:
        if k % 2 == 0:
            head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 67108864\r\n\r\n"
            out, _ = raw_exchange(port, head, [b" " * 65536])
        else:
            head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            out, _ = raw_exchange(port, head, [b"10000\r\n" + b" " * 65536 + b"\r\n"] * 160)  # 10 MiB
        status = out[9:12].decode(errors="replace") or "closed"
        tally.add("oversized", status, problem=None if status == "413" else f"{out[:200]!r}")


def stalling(port: int, k: int, tally: Tally, until: float) -> None:
    while time.monotonic() < until:
        if k % 2 == 0:
            head, want = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty", "cut"
        else:
            head, want = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 80\r\n\r\n{", "408"
        out, took = raw_exchange(port, head, [])
        got = "cut" if out == b"" else out[9:12].decode(errors="replace")
        ok = got == want and took < CLIENT_TIMEOUT + 5
        tally.add(
            "stalling",
            f"{got} after {CLIENT_TIMEOUT:g} s" if ok else got,
            problem=None if ok else f"{got} in {took:.1f} s",
        )


def gone(port: int, model: str, k: int, tally: Tally, until: float) -> None:
    while time.monotonic() < until:
        body = json.dumps(
            {
                "model": model,
                "prompt": PROMPTS[k % len(PROMPTS)],
                "max_tokens": 200,
                "temperature": 0,
                "stream": True,
            }
        ).encode()
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(head + body)
            first = s.recv(12)
        status = first[9:12].decode(errors="replace")
        if status == "429":
            time.sleep(1)
        tally.add("gone", status, problem=None if status in ("200", "429") else f"{first!r}")


def server_metrics(port: int) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(port: int, model: str, seconds: float, solo: dict[str, str]) -> Tally:
    tally = Tally()
    until = time.monotonic() + seconds
    kinds: list[tuple[int, Callable[[int], None]]] = [
        (40, lambda k: good(port, model, k, solo, tally, until)),
        (8, lambda k: bad(port, model, k, tally, until)),
        (4, lambda k: oversized(port, k, tally, until)),
        (8, lambda k: stalling(port, k, tally, until)),
        (4, lambda k: gone(port, model, k, tally, until)),
    ]

    def guarded(fn: Callable[[int], None], k: int) -> None:
        try:
            fn(k)
        except Exception as e:  # a client-side exception is a finding, not a crash of the bench
            tally.add("client error", type(e).__name__, problem=repr(e))

    threads = [threading.Thread(target=guarded, args=(fn, k)) for n, fn in kinds for k in range(n)]
    assert len(threads) == 64
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tally


def table(tally: Tally, m: dict[str, float], rss_before: float, rss_peak: float, seconds: float) -> str:
    fivexx = sum(v for k, v in m.items() if k.startswith("llmtrain_serve_requests_total") and 'code="5' in k)
    rejected = {
        k.split('"')[1]: int(v)
        for k, v in m.items()
        if k.startswith("llmtrain_serve_rejected_requests_total")
    }
    lines = ["| clients | count | outcomes (client side) |", "|---|---:|---|"]
    for kind, n in (
        ("good", 40),
        ("bad", 8),
        ("oversized", 4),
        ("stalling", 8),
        ("gone", 4),
        ("client error", 0),
    ):
        if kind in tally.codes or n:
            outcomes = ", ".join(f"{k}: {v}" for k, v in sorted(tally.codes[kind].items()))
            lines.append(f"| {kind} | {n} | {outcomes or '—'} |")
    lat = tally.latency
    lines += [
        "",
        "| measure | value |",
        "|---|---|",
        f"| duration | {seconds:g} s, 64 clients, `--max-batch 8` (`--max-waiting` 32 by default), `--client-timeout` {CLIENT_TIMEOUT:g} s (default) |",
        f"| 5xx (server's `llmtrain_serve_requests_total`) | {int(fivexx)} |",
        f"| good answers: latency p50 / p99 | {pct(lat, 0.5):.2f} s / {pct(lat, 0.99):.2f} s ({len(lat)} answers) |"
        if lat
        else "| good answers | none |",
        f"| server `llmtrain_serve_rejected_requests_total` | {', '.join(f'{k}: {v}' for k, v in sorted(rejected.items()))} |",
        f"| server cancelled sequences (clients gone) | {int(m.get('llmtrain_serve_cancelled_sequences', 0))} |",
        f"| server RSS after warm-up / peak (VmHWM) | {rss_before:.0f} MiB / {rss_peak:.0f} MiB |",
        f"| rule breaks | {len(tally.problems)}{': ' + '; '.join(tally.problems[:5]) if tally.problems else ''} |",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--model", type=Path, default=None, help="an exported directory (default: quickstart shape)"
    )
    ap.add_argument("--seconds", type=float, default=40)
    ap.add_argument("--append", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-overload-"))
    model = args.model or quickstart_model(tmp / "model")
    proc, port = start_server(model, tmp / "serve.log", max_batch=8)
    try:
        solo = {}
        for p in PROMPTS:  # each prompt's answer alone, before the load
            status, _, raw = request(port, good_body(str(model), p, False))
            assert status == 200, raw
            solo[p] = text_of(raw, False)
        rss_before = peak_rss_mib(proc.pid)
        tally = run(port, str(model), args.seconds, solo)
        time.sleep(1)
        m = server_metrics(port)
        rss_peak = peak_rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    result = table(tally, m, rss_before, rss_peak, args.seconds)
    print(result)
    for problem in tally.problems:
        print("PROBLEM", problem)
    if args.append:
        date, commit = stamp()
        section = (
            "\n\n## Serving under overload (issue 26 item 1): `bench/serve_overload.py`\n\n"
            f"- Date: {date}. Commit: {commit}. Machine: 2 cores / 24 GiB, no GPU, shared with other agents "
            f"(load average {os.getloadavg()[0]:.1f} at the end); the 64 client threads and the server on the same "
            "2 cores, loopback.\n"
            f"- `.venv/bin/python -P bench/serve_overload.py --seconds {args.seconds:g}`: "
            f"{'`' + str(args.model) + '`' if args.model else 'a freshly initialised model of the quickstart architecture'}; "
            f"good requests: greedy, {MAX_TOKENS} tokens, half streamed.\n\n{result}\n"
        )
        with (ROOT / "bench" / "RESULTS.md").open("a") as f:
            f.write(section)
    return 1 if tally.problems else 0


if __name__ == "__main__":
    sys.exit(main())
