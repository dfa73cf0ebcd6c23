"""``POST /v1/chat/completions`` of a real ``llmtrain serve`` subprocess, through the official
``openai`` client: the same tiny trained export as tests/integration/test_serve.py.

Greedy chat equals ``llmtrain generate`` on the conversation rendered by the export's chat
template (so the prompt is the template's, token for token); streamed = whole; ``n``, seeds,
``stop``, ``max_tokens`` → ``finish_reason: "length"``; usage; bad requests are OpenAI's
``BadRequestError`` naming the parameter; ``/v1/models`` is unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from llmtrain.runtime.chat import encode_prompt, render
from llmtrain.runtime.generate import load_text_tokenizer

from tests.integration.test_serve import (  # noqa: F401  (fixtures)
    Served,
    exported,
    generate_cli,
    http_request,
    served,
)
from tests.unit.test_export import tokenizer  # noqa: F401

pytestmark = pytest.mark.timeout(600)  # the first test also trains and exports the model (module fixtures)

EOT = "<|endoftext|>"
SYSTEM = {"role": "system", "content": "Continue the letters."}
ASK = [{"role": "user", "content": "ACEG"}]


def export_template(model: str) -> str:
    return str(json.loads((Path(model) / "tokenizer_config.json").read_text())["chat_template"])


def test_chat_greedy_equals_generate_on_the_rendered_conversation(served: Served) -> None:  # noqa: F811
    client = served.client()
    assert [m.id for m in client.models.list().data] == [served.model]  # unchanged
    template = export_template(served.model)
    text = load_text_tokenizer(served.model)
    eos = text.eos_id
    history = [SYSTEM, *ASK, {"role": "assistant", "content": "IKMO"}, {"role": "user", "content": "bdfh"}]
    for messages in (ASK, [SYSTEM, *ASK], history):
        prompt = render(messages, template, add_generation_prompt=True, eos_token=EOT)
        want = generate_cli(served.model, prompt, 12)
        got = client.chat.completions.create(
            model=served.model, messages=messages, max_tokens=12, temperature=0
        )
        choice = got.choices[0]
        assert got.object == "chat.completion" and got.id.startswith("chatcmpl-")
        assert choice.message.role == "assistant" and choice.message.content == text.decode(want["new"])
        # generate's prompt ids (the rendered text, tokenized as the export's tokenizer does) are
        # the server's: the chat template's end-of-text of an earlier answer is the id, not text.
        assert want["prompt"] == encode_prompt(text.tokenizer, messages, template, eos_token=EOT)
        stopped = want["new"][-1] == eos
        assert choice.finish_reason == ("stop" if stopped else "length")
        assert got.usage is not None
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (
            len(want["prompt"]),
            len(want["new"]),
        )
        assert got.usage.total_tokens == len(want["prompt"]) + len(want["new"])


def test_chat_streamed_equals_whole_and_n_stop_max_tokens(served: Served) -> None:  # noqa: F811
    client = served.client()
    kw: dict[str, Any] = {"model": served.model, "messages": ASK, "temperature": 0}
    whole = client.chat.completions.create(max_tokens=30, **kw)
    full = whole.choices[0].message.content or ""
    assert len(full) > 6 and whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 30
    chunks = list(
        client.chat.completions.create(
            max_tokens=30, stream=True, stream_options={"include_usage": True}, **kw
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"  # the first chunk names the role
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 30
    # max_completion_tokens (OpenAI's current name) and max_tokens: a shorter answer, "length".
    short = client.chat.completions.create(max_completion_tokens=3, **kw)
    assert short.choices[0].finish_reason == "length" and full.startswith(
        short.choices[0].message.content or ""
    )
    # stop: the text ends before the first stop string, finish_reason "stop", streamed too.
    at = next(i for i in range(3, len(full) - 1) if full.index(full[i : i + 2]) == i)
    stop = full[at : at + 2]
    cut = client.chat.completions.create(max_tokens=30, stop=[stop, "\x00"], **kw)
    assert cut.choices[0].message.content == full[:at] and cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(max_tokens=30, stop=stop, stream=True, **kw)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[:at]

    # n: choices 0 and 1, reproducible with a seed, different from each other.
    def sample(seed: int) -> list[str]:
        r = client.chat.completions.create(
            model=served.model, messages=ASK, max_tokens=15, temperature=1.5, seed=seed, n=2
        )
        assert [c.index for c in r.choices] == [0, 1]
        return [c.message.content or "" for c in r.choices]

    a = sample(11)
    assert a == sample(11) and a[0] != a[1]
    chunks = list(
        client.chat.completions.create(model=served.model, messages=ASK, max_tokens=5, n=2, stream=True)
    )
    assert sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role) == [0, 1]
    assert sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason) == [0, 1]


def test_bad_chat_requests_are_openai_bad_request_errors(served: Served) -> None:  # noqa: F811
    import openai

    client = served.client()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"messages": [{"role": "assistant", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [*ASK, {"role": "assistant", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "a <|endoftext|> b"}]}, "messages"),
        ({"messages": ASK, "max_tokens": 10**6}, "max_tokens"),
        ({"messages": ASK, "temperature": 9}, "temperature"),
        ({"messages": ASK, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ]
    for body, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=served.model, **body)
        assert e.value.status_code == 400 and e.value.param == param, (body, e.value.body)
        assert e.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="gpt-4o", messages=ASK)
    assert nf.value.code == "model_not_found"
    status, raw = http_request(served.port, "POST", "/v1/chat/completions", b"{nope")
    assert status == 400 and set(json.loads(raw)["error"]) == {"message", "type", "param", "code"}
    # The server still answers, and /metrics counts the chat path apart.
    assert client.chat.completions.create(model=served.model, messages=ASK, max_tokens=2).choices
    counted = served.metrics()
    assert counted['llmtrain_serve_requests_total{code="400",path="/v1/chat/completions"}'] >= len(cases) + 1
