"""``llmtrain serve`` as a real subprocess on 127.0.0.1, spoken to with the official ``openai``
client and raw HTTP, over a tiny model trained here (a few steps on the synthetic loader),
checkpointed and exported by ``llmtrain export``.

Greedy completions equal ``llmtrain generate``'s, alone, streamed and with 8 concurrent
clients (the engine batches them: /metrics shows steps of more than one row); malformed
requests get OpenAI's 4xx error bodies and the server keeps answering; a client that goes
away mid-stream frees its batch slot.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from llmtrain.runtime.export import TokenizerFiles
from llmtrain.runtime.generate import load_text_tokenizer
from llmtrain.runtime.synthetic import SyntheticLoader, tiny_spec_dict
from llmtrain.runtime.train import RunContext, train
from torch import Tensor
from typer.testing import CliRunner

from llmtrain.api.config import runtime_config_from_spec
from llmtrain.api.spec import LLMTrainingJobSpec
from tests.unit.test_export import tokenizer  # noqa: F401
from tests.unit.test_generate import cli

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
CONTEXT = 128
PROMPTS = [  # character progressions, as trained, and text it never saw
    "ACEG",
    "bdfh",
    "KLMN",
    "159=",
    "def main():",
    "import os",
    "pqrs",
    "The quick brown fox",
]


class PrintableLoader(SyntheticLoader):
    """The synthetic progressions shifted to ids 1…89: printable ASCII ("!"…"y") in the byte-level
    BPE, never id 0 (end-of-text). The model learns to continue character progressions, so its
    text differs by prompt and runs to max_tokens."""

    def _windows(self, indices: Tensor) -> Tensor:
        return super()._windows(indices) + 1


@dataclass
class Served:
    url: str  # http://127.0.0.1:PORT
    model: str  # the exported directory, also the model id
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def client(self) -> Any:
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0, timeout=60)

    def metrics(self) -> dict[str, float]:
        """/metrics as {series with labels: value} (comments dropped)."""
        text = http_request(self.port, "GET", "/metrics")[1].decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out


def http_request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tokenizer: TokenizerFiles) -> Path:  # noqa: F811
    """A freshly trained tiny model (30 steps on the synthetic loader), exported by the CLI."""
    tmp = tmp_path_factory.mktemp("serve")
    raw = tiny_spec_dict(
        **{
            "model.architecture": {
                "layers": 2,
                "dModel": 64,
                "heads": 4,
                "kvHeads": 2,
                "contextLength": CONTEXT,
            },
            "training.duration.maxSteps": 30,
            "training.optimizer": {"type": "adamw", "lr": 0.01},
            "checkpoint.uri": str(tmp / "ckpt"),
        }
    )
    cfg = runtime_config_from_spec(LLMTrainingJobSpec.model_validate(raw), vocab_size=tokenizer.vocab_size)
    loader = functools.partial(PrintableLoader, vocab_size=89, windows=64)
    train(cfg, loader, ctx=RunContext(metrics_addr="127.0.0.1"))
    job = tmp / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "llmtrain.dev/v1alpha1",
                "kind": "LLMTrainingJob",
                "metadata": {"name": "s"},
                "spec": raw,
            }
        )
    )
    (tmp / "tokenizer.json").write_bytes(tokenizer.json_bytes)
    out = tmp / "model"
    r = subprocess.run(
        [sys.executable, "-P", "-m", "llmtrain.cli", "export", "--checkpoint", str(tmp / "ckpt"), "--out", str(out),
         "--job", str(job), "--tokenizer", str(tmp / "tokenizer.json")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return out


def start_serve(model: Path, log: Path, *args: str) -> Served:
    """``llmtrain serve --model MODEL --port 0 --device cpu ARGS`` as a subprocess, once it listens."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "llmtrain.cli", "serve", "--model", str(model), "--port", "0",
             "--device", "cpu", *args],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", log.read_text())
        if m:
            return Served(url=m.group(1), model=str(model), proc=proc, log=log)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"llmtrain serve did not start: {log.read_text()}")


def stop_serve(served: Served) -> None:
    """SIGTERM; the server must exit cleanly, no traceback in its log."""
    served.proc.terminate()
    try:
        served.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        served.proc.kill()
    text = served.log.read_text()
    # uvicorn shuts down gracefully, then re-raises SIGTERM so that the exit status says why.
    assert served.proc.returncode in (0, -signal.SIGTERM) and "Traceback" not in text, text[-3000:]


@pytest.fixture(scope="module")
def served(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    s = start_serve(exported, log, "--max-batch", "8")
    try:
        yield s
    finally:
        stop_serve(s)


@functools.cache
def generate_cli(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """``llmtrain generate --temperature 0 --ids`` and its text output."""
    args = [
        "generate",
        "--model",
        model,
        "--prompt",
        prompt,
        "--temperature",
        "0",
        "--max-tokens",
        str(max_tokens),
    ]
    ids = CliRunner().invoke(cli(), [*args, "--ids"])
    text = CliRunner().invoke(cli(), args)
    assert ids.exit_code == 0 and text.exit_code == 0, ids.output + text.output
    return {**json.loads(ids.output), "text": text.output.removesuffix("\n")}


def test_models_health_and_greedy_equals_llmtrain_generate(served: Served) -> None:
    client = served.client()
    assert [m.id for m in client.models.list().data] == [served.model]
    assert json.loads(http_request(served.port, "GET", "/health")[1]) == {"status": "ok"}
    tok = load_text_tokenizer(served.model)
    outputs = set()
    for prompt in PROMPTS[:3]:
        want = generate_cli(served.model, prompt, 24)
        got = client.completions.create(model=served.model, prompt=prompt, max_tokens=24, temperature=0)
        choice = got.choices[0]
        assert choice.text == tok.decode(want["new"])
        assert prompt + choice.text == want["text"]  # what `llmtrain generate` prints
        stopped = want["new"][-1] == tok.eos_id
        assert choice.finish_reason == ("stop" if stopped else "length")
        assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.total_tokens) == (
            len(want["prompt"]),
            len(want["new"]),
            len(want["prompt"]) + len(want["new"]),
        )
        assert got.object == "text_completion" and got.id.startswith("cmpl-")
        outputs.add(choice.text)
    assert len(outputs) == 3  # the model continues each prompt differently
    # Token-id prompts: the same answer as the text.
    got = client.completions.create(model=served.model, prompt=want["prompt"], max_tokens=24, temperature=0)
    assert got.choices[0].text == tok.decode(want["new"])


def test_streaming_yields_the_same_text_chunk_by_chunk(served: Served) -> None:
    client = served.client()
    prompt = PROMPTS[0]
    whole = client.completions.create(model=served.model, prompt=prompt, max_tokens=40, temperature=0)
    chunks = list(
        client.completions.create(
            model=served.model,
            prompt=prompt,
            max_tokens=40,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 5 and "".join(texts) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # The raw stream ends with OpenAI's terminator.
    body = json.dumps({"model": served.model, "prompt": prompt, "max_tokens": 3, "stream": True}).encode()
    status, raw = http_request(served.port, "POST", "/v1/completions", body)
    assert status == 200 and raw.endswith(b"data: [DONE]\n\n")


def test_stop_strings_seeds_and_n(served: Served) -> None:
    client = served.client()
    prompt = PROMPTS[1]
    full = (
        client.completions.create(model=served.model, prompt=prompt, max_tokens=30, temperature=0)
        .choices[0]
        .text
    )
    assert len(full) > 6
    # A two-character stop string first found at position ≥ 3 (not a lone-byte U+FFFD).
    at = next(
        i
        for i in range(3, len(full) - 1)
        if "\ufffd" not in full[i : i + 2] and full.index(full[i : i + 2]) == i
    )
    stop = full[at : at + 2]
    cut = client.completions.create(
        model=served.model, prompt=prompt, max_tokens=30, temperature=0, stop=[stop, "\x00"]
    )
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=served.model, prompt=prompt, max_tokens=30, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text

    def sample(seed: int) -> list[str]:
        r = client.completions.create(
            model=served.model, prompt=prompt, max_tokens=20, temperature=1.5, seed=seed, n=3
        )
        assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.prompt_tokens > 0
        return [c.text for c in r.choices]

    a = sample(7)
    assert a == sample(7) and len(set(a)) > 1  # reproducible; the choices differ
    assert a != sample(8)
    both = client.completions.create(model=served.model, prompt=PROMPTS[:2], max_tokens=5, temperature=0, n=2)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert both.choices[0].text == both.choices[1].text != both.choices[2].text == both.choices[3].text


MALFORMED: list[tuple[str, Any, int, str | None]] = [
    ("not json", b"{bad json", 400, None),
    ("not an object", [1, 2], 400, None),
    ("unknown model", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("no model", {"prompt": "x"}, 400, "model"),
    ("no prompt", {"model": "@"}, 400, "prompt"),
    ("prompt a number", {"model": "@", "prompt": 42}, 400, "prompt"),
    ("prompt a dict", {"model": "@", "prompt": {"a": 1}}, 400, "prompt"),
    ("empty prompt", {"model": "@", "prompt": ""}, 400, "prompt"),
    ("token id out of vocabulary", {"model": "@", "prompt": [10**9]}, 400, "prompt"),
    ("negative max_tokens", {"model": "@", "prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ("huge max_tokens", {"model": "@", "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ("prompt too long", {"model": "@", "prompt": list(range(1, CONTEXT + 2))}, 400, "prompt"),
    ("temperature above 2", {"model": "@", "prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ("negative temperature", {"model": "@", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ("top_p 0", {"model": "@", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("top_p above 1", {"model": "@", "prompt": "x", "top_p": 1.1}, 400, "top_p"),
    ("n 0", {"model": "@", "prompt": "x", "n": 0}, 400, "n"),
    ("stop a number", {"model": "@", "prompt": "x", "stop": 7}, 400, "stop"),
    ("stream a string", {"model": "@", "prompt": "x", "stream": "yes"}, 400, "stream"),
    ("unrecognized argument", {"model": "@", "prompt": "x", "temprature": 1}, 400, "temprature"),
]


def test_twenty_malformed_requests_get_openai_errors_and_the_server_survives(served: Served) -> None:
    assert len(MALFORMED) == 20
    for what, body, status, param in MALFORMED:
        if not isinstance(body, bytes):
            if isinstance(body, dict) and body.get("model") == "@":
                body = {**body, "model": served.model}
            body = json.dumps(body).encode()
        got_status, raw = http_request(served.port, "POST", "/v1/completions", body)
        error = json.loads(raw)["error"]
        assert (got_status, error["param"]) == (status, param), (what, raw)
        assert error["type"] == "invalid_request_error" and error["message"], what
        assert set(error) == {"message", "type", "param", "code"}, what
    # The context limit is named, as OpenAI names it.
    raw = http_request(
        served.port,
        "POST",
        "/v1/completions",
        json.dumps({"model": served.model, "prompt": "x", "max_tokens": 999}).encode(),
    )[1]
    assert f"maximum context length is {CONTEXT} tokens" in json.loads(raw)["error"]["message"]
    # The official client raises its typed errors with the parameter.
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        served.client().completions.create(model=served.model, prompt="x", temperature=3)
    assert info.value.param == "temperature"
    with pytest.raises(openai.NotFoundError):
        served.client().completions.create(model="nope", prompt="x")
    # Still serving, and the refusals are counted by status.
    assert served.proc.poll() is None
    assert (
        served.client()
        .completions.create(model=served.model, prompt="x", max_tokens=2)
        .usage.completion_tokens
        >= 1
    )
    metrics = served.metrics()
    assert metrics['llmtrain_serve_requests_total{code="400",path="/v1/completions"}'] >= 18


def test_eight_concurrent_clients_are_batched_and_kept_apart(served: Served) -> None:
    client = served.client()
    alone = {
        p: client.completions.create(model=served.model, prompt=p, max_tokens=48, temperature=0)
        for p in PROMPTS
    }
    assert len({r.choices[0].text for r in alone.values()}) >= 6  # a row mix-up would show
    before = served.metrics()
    barrier = threading.Barrier(len(PROMPTS))
    results: dict[str, Any] = {}
    errors: list[BaseException] = []

    def ask(prompt: str) -> None:
        try:
            c = served.client()
            barrier.wait(timeout=30)
            results[prompt] = c.completions.create(
                model=served.model, prompt=prompt, max_tokens=48, temperature=0
            )
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(p,)) for p in PROMPTS]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert time.monotonic() - start < 60
    for p in PROMPTS:
        assert results[p].choices[0].text == alone[p].choices[0].text, p
        assert results[p].usage == alone[p].usage
    after = served.metrics()
    steps = after["llmtrain_serve_batch_rows_count"] - before["llmtrain_serve_batch_rows_count"]
    single = (
        after['llmtrain_serve_batch_rows_bucket{le="1.0"}']
        - before['llmtrain_serve_batch_rows_bucket{le="1.0"}']
    )
    rows = after["llmtrain_serve_batch_rows_sum"] - before["llmtrain_serve_batch_rows_sum"]
    assert steps > single  # some steps decoded more than one sequence
    assert rows / steps > 2  # on average: 8 clients, 48 tokens each
    assert after["llmtrain_serve_batch_rows_max"] >= 4
    assert after["llmtrain_serve_active_sequences"] == 0
    # The series the issue names.
    for name in (
        "llmtrain_serve_prompt_tokens_total",
        "llmtrain_serve_completion_tokens_total",
        "llmtrain_serve_time_to_first_token_seconds_count",
        "llmtrain_serve_request_duration_seconds_count",
        "llmtrain_serve_generation_tokens_per_second",
    ):
        assert after[name] > 0, name
    assert after["llmtrain_serve_completion_tokens_total"] - before[
        "llmtrain_serve_completion_tokens_total"
    ] == sum(r.usage.completion_tokens for r in results.values())


def test_a_client_gone_mid_stream_frees_its_slot(served: Served) -> None:
    client = served.client()
    # A prompt whose greedy continuation runs to the length limit (no end-of-text on the way).
    limit = CONTEXT - 16
    prompt = next(
        p
        for p in PROMPTS
        if client.completions.create(model=served.model, prompt=p, max_tokens=limit, temperature=0)
        .choices[0]
        .finish_reason
        == "length"
    )
    before = served.metrics()
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
    body = {"model": served.model, "prompt": prompt, "max_tokens": limit, "temperature": 0, "stream": True}
    conn.request(
        "POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    r = conn.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: {")  # generation is under way
    conn.sock.close()  # the client goes away mid-stream
    conn.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = served.metrics()
        if (
            m["llmtrain_serve_active_sequences"] == 0
            and m["llmtrain_serve_cancelled_sequences"] > before["llmtrain_serve_cancelled_sequences"]
        ):
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the slot was not freed: {m}")
    # Dropped, not completed: its tokens are not counted as a finished completion.
    assert m["llmtrain_serve_completion_tokens_total"] == before["llmtrain_serve_completion_tokens_total"]
    assert client.completions.create(model=served.model, prompt="x", max_tokens=2).choices[0].text is not None
