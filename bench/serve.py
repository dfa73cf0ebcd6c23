"""``llmtrain serve`` throughput and latency (issue 17): 1, 4 and 8 concurrent streams.

    .venv/bin/python -P bench/serve.py [--model DIR] [--max-tokens 128] [--requests 4] [--append]

Without ``--model`` it exports a freshly initialised model of ``examples/quickstart.yaml``'s
architecture (4 layers, dModel 192, 6/3 heads, context 256) with a byte-level BPE of 4096 tokens
trained on the standard library: decode speed depends on the shapes, not on the weights' values.

The server runs as a real ``llmtrain serve`` subprocess on 127.0.0.1 (``--max-batch 8``); each
stream is a client thread sending ``--requests`` streamed greedy completions one after another
(different prompts) over raw HTTP, reading the server-sent events. Per request: time to the
first text chunk (TTFT), total latency, completion tokens (the usage chunk). Per level:
aggregate completion tokens/s over the level's wall time. Client and server share the machine.

Prints a markdown table; ``--append`` adds it to bench/RESULTS.md with date, commit and machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "def main():\n    ",
    "import os\nimport sys\n\n",
    "class Parser(object):\n    def __init__(self",
    "It is a truth universally acknowledged, that",
    "for i in range(10):\n",
    "# Copyright (c) 2001 Python Software Foundation",
    "    return self._data[",
    'if __name__ == "__main__":\n',
]


@dataclass
class Result:
    ttft: float
    latency: float
    tokens: int


def quickstart_model(out: Path) -> Path:
    """Export a freshly initialised model of the quickstart's architecture to ``out``."""
    import yaml
    from llmtrain.runtime.data.tokenize import TokenizerConfig, tokenizer_json, train_bpe
    from llmtrain.runtime.export import TokenizerFiles, export_model
    from llmtrain.runtime.model import GPT

    from llmtrain.api.config import runtime_config_from_spec
    from llmtrain.api.spec import LLMTrainingJobSpec

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))[:120]]
    tok = TokenizerFiles.from_json_bytes(
        tokenizer_json(train_bpe(texts, TokenizerConfig(vocab_size=4096, min_frequency=2))), "<|endoftext|>"
    )
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    cfg = runtime_config_from_spec(
        LLMTrainingJobSpec.model_validate(doc["spec"]), vocab_size=tok.vocab_size
    ).model
    model = GPT(cfg)
    model.init_weights()
    export_model(model.state_dict(), cfg, str(out), tok)
    return out


def start_server(model: Path, log: Path, max_batch: int) -> tuple[subprocess.Popen[bytes], int]:
    with log.open("wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "llmtrain.cli", "serve", "--model", str(model), "--port", "0",
             "--device", "cpu", "--max-batch", str(max_batch)],
            stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        m = re.search(r"on http://127\.0\.0\.1:(\d+)/v1", log.read_text())
        if m:
            return proc, int(m.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"llmtrain serve did not start:\n{log.read_text()}")


def stream_once(port: int, model: str, prompt: str, max_tokens: int) -> Result:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"{r.status}: {r.read()[:300]!r}")
        ttft, tokens = None, 0
        for line in r:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if chunk["choices"] and chunk["choices"][0]["text"] and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        latency = time.perf_counter() - t0
    finally:
        conn.close()
    return Result(ttft=latency if ttft is None else ttft, latency=latency, tokens=tokens)


def level(port: int, model: str, streams: int, requests: int, max_tokens: int) -> tuple[list[Result], float]:
    """``streams`` client threads, ``requests`` sequential requests each; (results, wall seconds)."""
    results: list[Result] = []
    lock = threading.Lock()
    barrier = threading.Barrier(streams)

    def client(k: int) -> None:
        barrier.wait()
        for j in range(requests):
            res = stream_once(port, model, PROMPTS[(k + j) % len(PROMPTS)], max_tokens)
            with lock:
                results.append(res)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def stamp() -> tuple[str, str]:
    """(UTC date and time, short commit) for a RESULTS.md section."""
    date = subprocess.run(["date", "-u", "+%Y-%m-%d %H:%M UTC"], capture_output=True, text=True).stdout
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout
    return date.strip(), commit.strip()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--model", type=Path, default=None, help="an exported directory (default: quickstart shape)"
    )
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, default=4, help="sequential requests per stream")
    ap.add_argument("--levels", default="1,4,8")
    ap.add_argument("--append", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model = args.model or quickstart_model(tmp / "model")
    levels = [int(x) for x in args.levels.split(",")]
    proc, port = start_server(model, tmp / "serve.log", max_batch=max(levels))
    rows = []
    try:
        stream_once(port, str(model), PROMPTS[0], 8)  # warm-up: allocator, first kernels
        for streams in levels:
            results, wall = level(port, str(model), streams, args.requests, args.max_tokens)
            tokens = sum(r.tokens for r in results)
            per_stream = [
                r.tokens / (r.latency - r.ttft) for r in results if r.latency > r.ttft and r.tokens > 1
            ]
            rows.append(
                {
                    "streams": streams,
                    "requests": len(results),
                    "tokens": tokens,
                    "aggregate": tokens / wall,
                    "per_stream": statistics.median(per_stream),
                    "ttft_p50": pct([r.ttft for r in results], 0.5),
                    "ttft_p99": pct([r.ttft for r in results], 0.99),
                    "lat_p50": pct([r.latency for r in results], 0.5),
                    "lat_p99": pct([r.latency for r in results], 0.99),
                }
            )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    single = rows[0]["aggregate"] if levels[0] == 1 else float("nan")
    lines = [
        "| concurrent streams | requests | completion tokens | aggregate tokens/s | × single-stream | "
        "tokens/s per stream (p50) | TTFT p50 / p99 ms | latency p50 / p99 s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['streams']} | {r['requests']} | {r['tokens']} | {r['aggregate']:.0f} | "
            f"{r['aggregate'] / single:.2f} | {r['per_stream']:.0f} | {1000 * r['ttft_p50']:.1f} / "
            f"{1000 * r['ttft_p99']:.1f} | {r['lat_p50']:.2f} / {r['lat_p99']:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.append:
        date, commit = stamp()
        load = os.getloadavg()[0]
        what = (
            f"`{args.model}`"
            if args.model
            else "a freshly initialised model of the quickstart architecture (4 layers, dModel 192, heads 6 / "
            "kvHeads 3, context 256, BPE vocab 4096; decode speed depends on shapes, not weights)"
        )
        section = (
            "\n\n## Serving (issue 17): `llmtrain serve`, continuous batching on CPU\n\n"
            f"- Date: {date}. Commit: {commit} (plus the uncommitted serve work). Machine: 2 cores / 24 GiB, no GPU, "
            f"shared (load average {load:.1f} at the end); client threads and server on the same 2 cores.\n"
            f"- `.venv/bin/python -P bench/serve.py --max-tokens {args.max_tokens} --requests {args.requests}`: "
            f"{what}; `llmtrain serve --max-batch {max(levels)}` as a subprocess; each stream sends "
            f"{args.requests} streamed greedy requests of {args.max_tokens} new tokens one after another.\n\n"
            f"{table}\n"
        )
        with (ROOT / "bench" / "RESULTS.md").open("a") as f:
            f.write(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
