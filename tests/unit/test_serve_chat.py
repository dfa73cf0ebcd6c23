"""``/v1/chat/completions`` in process: request validation → OpenAI errors, the response and chunk
shapes (checked against the ``openai`` package's own types), and the route on a tiny model: the
prompt is the chat template's, generation stops at end-of-text, limits and metrics apply."""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from llmtrain.runtime.chat import DEFAULT_CHAT_TEMPLATE, encode_prompt
from llmtrain.runtime.generate import TextTokenizer
from llmtrain.runtime.model import GPT
from llmtrain.runtime.serve import app as serve_app
from llmtrain.runtime.serve.chat_protocol import (
    ChatChunkEncoder,
    ChatPrompt,
    chat_completion_body,
    chat_usage_chunk,
    parse_chat_request,
)
from llmtrain.runtime.serve.engine import Engine
from llmtrain.runtime.serve.limits import Limits
from llmtrain.runtime.serve.metrics import ServeMetrics
from llmtrain.runtime.serve.protocol import ApiError, sse

from llmtrain.api.config import ModelConfig
from tests.unit.test_export import randomize

EOT = "<|endoftext|>"
CONTEXT = 64
USER = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def tok() -> Any:
    from llmtrain.runtime.data.tokenize import TokenizerConfig, train_bpe

    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.glob("*.py"))[:10]]
    return train_bpe(texts, TokenizerConfig(vocab_size=300, min_frequency=2))


@pytest.fixture(scope="module")
def prompt(tok: Any) -> ChatPrompt:
    return ChatPrompt(tok, DEFAULT_CHAT_TEMPLATE, EOT)


def parse(chat: ChatPrompt, **body: Any) -> Any:
    return parse_chat_request(
        {"model": "m", "messages": USER, **body},
        model_id="m",
        context_length=CONTEXT,
        encode=chat.encode,
        vocab_size=300,
    )


def test_valid_chat_requests(prompt: ChatPrompt, tok: Any) -> None:
    ids = encode_prompt(tok, USER, DEFAULT_CHAT_TEMPLATE, eos_token=EOT)
    r = parse(prompt)
    assert r.prompts == [ids] and r.n == 1 and not r.stream
    assert r.max_tokens == CONTEXT - len(ids)  # unset: the answer may fill the context
    assert parse(prompt, max_tokens=5).max_tokens == 5
    assert parse(prompt, max_completion_tokens=4, max_tokens=5).max_tokens == 4  # the current name wins
    r = parse(prompt, temperature=0, top_p=0.5, n=2, seed=3, stop=["\n"], stream=True, user="u",
              stream_options={"include_usage": True}, tool_choice="none", response_format={"type": "text"})  # fmt: skip
    assert (r.temperature, r.top_p, r.n, r.seed, r.stop, r.include_usage) == (0.0, 0.5, 2, 3, ("\n",), True)
    # developer is system; text parts are joined by newlines.
    dev = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [
        {"type": "text", "text": "Say"}, {"type": "text", "text": "hi."}]}]  # fmt: skip
    sys_ = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say\nhi."}]
    assert parse(prompt, messages=dev).prompts == [
        encode_prompt(tok, sys_, DEFAULT_CHAT_TEMPLATE, eos_token=EOT)
    ]


BAD: list[tuple[dict[str, Any], int, str | None]] = [
    ({"model": "other"}, 404, "model"),
    ({"messages": None}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": ["hi"]}, 400, "messages[0]"),
    ({"messages": [{"role": "bot", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": None}]}, 400, "messages[0].content"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        400,
        "messages[0].content",
    ),
    ({"messages": [{"role": "user", "content": "x", "extra": 1}]}, 400, "messages[0].extra"),
    ({"messages": [{"role": "user", "content": "  "}]}, 400, "messages"),  # empty content
    ({"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages"),  # order
    ({"messages": [*USER, {"role": "assistant", "content": "x"}]}, 400, "messages"),  # ends with the answer
    ({"messages": [{"role": "user", "content": f"a{EOT}b"}]}, 400, "messages"),  # special token text
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_completion_tokens": "3"}, 400, "max_completion_tokens"),
    ({"max_tokens": CONTEXT}, 400, "max_tokens"),  # prompt + answer over the context
    ({"messages": [{"role": "user", "content": "word " * CONTEXT}]}, 400, "messages"),
    ({"temperature": 3}, 400, "temperature"),
    ({"n": 0}, 400, "n"),
    ({"stop": [""]}, 400, "stop"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"logprobs": True}, 400, "logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ({"response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"frequency_penalty": 1}, 400, "frequency_penalty"),
    ({"prompt": "x"}, 400, "prompt"),  # a completions parameter
]


@pytest.mark.parametrize(("body", "status", "param"), BAD, ids=[json.dumps(b)[:60] for b, _, _ in BAD])
def test_bad_chat_requests_name_the_parameter(prompt: ChatPrompt, body: dict[str, Any], status: int,
                                              param: str | None) -> None:  # fmt: skip
    with pytest.raises(ApiError) as e:
        parse(prompt, **body)
    assert (e.value.status, e.value.param) == (status, param)
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}


def test_chat_shapes_are_the_openai_packages_types() -> None:
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    body = chat_completion_body("chatcmpl-1", 7, "m", ["hé", ""], ["stop", "length"], {"prompt_tokens": 3,
                                "completion_tokens": 4, "total_tokens": 7})  # fmt: skip
    parsed = ChatCompletion.model_validate(body)
    assert parsed.choices[0].message.role == "assistant" and parsed.choices[0].message.content == "hé"
    assert parsed.choices[1].finish_reason == "length" and parsed.usage and parsed.usage.total_tokens == 7
    encode = ChatChunkEncoder("chatcmpl-1", 7, 'm"\\é')
    opening = encode.start(2).decode().split("\n\n")[:-1]
    assert [ChatCompletionChunk.model_validate_json(e.removeprefix("data: ")).choices[0].delta.role
            for e in opening] == ["assistant", "assistant"]  # fmt: skip
    for index, text, reason in [(1, "hé", None), (0, 'a"b\\c\n\t\u2028🦙', "stop"), (0, "", "length")]:
        raw = encode(index, text, reason)
        want = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": 'm"\\é',
                "choices": [{"index": index, "delta": {"content": text} if text else {}, "logprobs": None,
                             "finish_reason": reason}]}  # fmt: skip
        assert raw == sse(want)
        chunk = ChatCompletionChunk.model_validate_json(raw.decode().removeprefix("data: "))
        assert chunk.choices[0].delta.content == (text or None) and chunk.choices[0].finish_reason == reason
    usage = ChatCompletionChunk.model_validate(chat_usage_chunk("chatcmpl-1", 7, "m", {"prompt_tokens": 1,
                                               "completion_tokens": 2, "total_tokens": 3}))  # fmt: skip
    assert usage.choices == [] and usage.usage and usage.usage.completion_tokens == 2


def test_chat_prompt_from_an_exports_files(tok: Any) -> None:
    config = json.dumps({"eos_token": EOT, "chat_template": "T{{ eos_token }}"}).encode()
    assert ChatPrompt.from_export(tok, config, None, 0).template == "T{{ eos_token }}"
    assert ChatPrompt.from_export(tok, config, b"J", 0).template == "J"
    plain = ChatPrompt.from_export(tok, json.dumps({"eos_token": {"content": EOT}}).encode(), None, 0)
    assert (plain.template, plain.eos_token) == (DEFAULT_CHAT_TEMPLATE, EOT)
    assert ChatPrompt.from_export(tok, None, None, 0).eos_token == EOT  # by id


# ------------------------------------------------------------------ the route


def eos_model(vocab: int) -> GPT:
    """A model whose every logit is 0: greedy picks id 0, the end-of-text token."""
    cfg = ModelConfig(vocab_size=vocab, n_layers=1, d_model=32, n_heads=4, n_kv_heads=2,
                      context_length=CONTEXT, ffn_hidden_size=48, rope_theta=1000.0, tie_embeddings=False)  # fmt: skip
    model = GPT(cfg)
    randomize(model)
    with torch.no_grad():
        model.output.weight.zero_()
    return model.eval()


@pytest.fixture
def served(tok: Any) -> Iterator[tuple[TestClient, serve_app.ModelServer]]:
    vocab = 300
    engine = Engine(eos_model(384), max_batch=4)
    engine.start()
    s = serve_app.ModelServer(
        model_id="m",
        tokenizer=TextTokenizer(
            tok, split_special_tokens=False, eos_id=tok.token_to_id(EOT), vocab_size=vocab
        ),
        context_length=CONTEXT,
        engine=engine,
        metrics=ServeMetrics(engine),
        device="cpu",
        limits=Limits(max_body_bytes=2000, api_key="k"),
        chat=ChatPrompt(tok, DEFAULT_CHAT_TEMPLATE, EOT),
    )
    try:
        # One client for the whole test: its event loop is the app's (the mailbox binds to the first).
        with TestClient(serve_app.create_app(s), headers={"Authorization": "Bearer k"}) as client:
            yield client, s
    finally:
        engine.stop()


def test_the_route_stops_at_end_of_text_and_counts_usage(served: tuple[TestClient, Any], tok: Any) -> None:
    client, s = served
    assert tok.token_to_id(EOT) == 0
    body = {"model": "m", "messages": USER, "temperature": 0, "n": 2}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    prompt_tokens = len(encode_prompt(tok, USER, DEFAULT_CHAT_TEMPLATE, eos_token=EOT))
    assert got["object"] == "chat.completion" and got["id"].startswith("chatcmpl-")
    assert [(c["index"], c["message"], c["finish_reason"]) for c in got["choices"]] == [
        (i, {"role": "assistant", "content": ""}, "stop") for i in range(2)
    ]
    # OpenAI counts the prompt once for its n choices.
    assert got["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 2,
        "total_tokens": prompt_tokens + 2,
    }
    r = client.post(
        "/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    events = [json.loads(e.removeprefix("data: ")) for e in r.text.split("\n\n") if e and e != "data: [DONE]"]
    assert r.text.endswith("data: [DONE]\n\n")
    assert [e["choices"][0]["delta"] for e in events[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert sorted(e["choices"][0]["finish_reason"] for e in events[2:4]) == ["stop", "stop"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 2
    # The completions' limits and metrics cover chat: the key, the body's size, the counters.
    assert TestClient(serve_app.create_app(s)).post("/v1/chat/completions", json=body).status_code == 401
    big = {**body, "messages": [{"role": "user", "content": "x" * 3000}]}
    assert client.post("/v1/chat/completions", json=big).status_code == 413
    bad = client.post("/v1/chat/completions", json={**body, "messages": [{"role": "bot", "content": "x"}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages[0].role"
    sample = s.metrics.registry.get_sample_value
    assert sample("llmtrain_serve_requests_total", {"path": "/v1/chat/completions", "code": "200"}) == 2
    assert sample("llmtrain_serve_request_duration_seconds_count") == 5  # 200, 200, 401, 413, 400
