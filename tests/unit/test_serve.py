"""The pure parts of ``llmtrain serve`` and its engine, in process: request validation → OpenAI
error bodies, stop strings and text streaming, SSE chunks, and the batched KV-cache decoding
(greedy tokens identical to ``generate()``, rows joining and leaving, cancellation)."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
import torch
from llmtrain.runtime.generate import Sampling, generate
from llmtrain.runtime.model import GPT, BatchKVCache, KVCache
from llmtrain.runtime.serve.engine import Engine, Event, Sequence
from llmtrain.runtime.serve.protocol import ApiError, ChunkEncoder, parse_completion_request, sse
from llmtrain.runtime.serve.text import TextStream, held_back, stop_position

from llmtrain.api.config import ModelConfig
from tests.unit.test_export import randomize

MODEL = "m"
CONTEXT = 32
VOCAB = 100


def parse(**body: Any) -> Any:
    """Validate ``body`` with a character-level "tokenizer" (ord) over a 100-token vocabulary."""
    return parse_completion_request(
        {"model": MODEL, "prompt": "ab", **body},
        model_id=MODEL,
        context_length=CONTEXT,
        encode=lambda text: [ord(c) % VOCAB for c in text],
        vocab_size=VOCAB,
    )


# ------------------------------------------------------------------ validation


def test_valid_requests_and_their_defaults() -> None:
    r = parse()
    assert (r.prompts, r.max_tokens, r.temperature, r.top_p, r.top_k, r.n, r.seed, r.stop, r.stream) == (
        [[97, 98]],
        16,  # OpenAI's default
        1.0,
        1.0,
        None,
        1,
        None,
        (),
        False,
    )
    assert parse(prompt=["ab", "c"]).prompts == [[97, 98], [99]]
    assert parse(prompt=[1, 2, 3]).prompts == [[1, 2, 3]]
    assert parse(prompt=[[1], [2, 3]]).prompts == [[1], [2, 3]]
    r = parse(max_tokens=30, temperature=0, top_p=0.5, top_k=-1, n=2, seed=-5, stop="x", stream=True)
    assert (r.max_tokens, r.temperature, r.top_p, r.top_k, r.n, r.seed, r.stop) == (
        30,
        0.0,
        0.5,
        None,
        2,
        -5,
        ("x",),
    )
    assert parse(
        top_k=3, stop=["a", "b"], user="u", stream=True, stream_options={"include_usage": True}
    ).include_usage
    # Prompt 2 + 30 = the context: allowed; one more is not.
    assert parse(max_tokens=CONTEXT - 2).max_tokens == CONTEXT - 2


BAD: list[tuple[dict[str, Any], int, str | None]] = [
    ({"model": "other"}, 404, "model"),
    ({"model": None}, 400, "model"),
    ({"model": 3}, 400, "model"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [[]]}, 400, "prompt"),
    ({"prompt": ["a", 1]}, 400, "prompt"),
    ({"prompt": [True]}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),  # encodes to no tokens
    ({"prompt": [VOCAB]}, 400, "prompt"),  # outside the vocabulary
    ({"prompt": "x" * CONTEXT}, 400, "prompt"),  # the prompt alone fills the context
    ({"max_tokens": -1}, 400, "max_tokens"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": CONTEXT - 1}, 400, "max_tokens"),  # 2 + 31 > 32
    ({"max_tokens": 10**12}, 400, "max_tokens"),
    ({"max_tokens": "5"}, 400, "max_tokens"),
    ({"max_tokens": 2.5}, 400, "max_tokens"),
    ({"temperature": 2.01}, 400, "temperature"),
    ({"temperature": -0.5}, 400, "temperature"),
    ({"temperature": "hot"}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"top_p": 1.5}, 400, "top_p"),
    ({"top_k": -2}, 400, "top_k"),
    ({"n": 0}, 400, "n"),
    ({"n": 129}, 400, "n"),
    ({"n": True}, 400, "n"),
    ({"seed": 1.5}, 400, "seed"),
    ({"seed": 2**64}, 400, "seed"),
    ({"stop": 3}, 400, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"stop": [""]}, 400, "stop"),
    ({"stream": "yes"}, 400, "stream"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options"),  # without stream
    ({"echo": True}, 400, "echo"),
    ({"logprobs": 2}, 400, "logprobs"),
    ({"best_of": 3}, 400, "best_of"),
    ({"presence_penalty": 1.0}, 400, "presence_penalty"),
    ({"frequency_penalty": 3.0}, 400, "frequency_penalty"),
    ({"logit_bias": {"1": 5}}, 400, "logit_bias"),
    ({"suffix": "x"}, 400, "suffix"),
    ({"temperatur": 1}, 400, "temperatur"),  # a typo: unrecognized argument
    ({"n": 100, "prompt": ["a", "b", "c"]}, 400, "n"),  # 300 sequences
]


@pytest.mark.parametrize(("body", "status", "param"), BAD, ids=[json.dumps(b)[:40] for b, _, _ in BAD])
def test_bad_requests_name_the_parameter(body: dict[str, Any], status: int, param: str | None) -> None:
    with pytest.raises(ApiError) as info:
        parse(**body)
    e = info.value
    assert (e.status, e.param) == (status, param), e.message
    assert e.body() == {
        "error": {"message": e.message, "type": "invalid_request_error", "param": param, "code": e.code}
    }


def test_missing_fields_and_non_objects() -> None:
    def check(body: Any, param: str | None) -> str:
        with pytest.raises(ApiError) as info:
            parse_completion_request(
                body, model_id=MODEL, context_length=CONTEXT, encode=lambda t: [1], vocab_size=VOCAB
            )
        assert info.value.param == param and info.value.status == 400
        return info.value.message

    check([1, 2], None)
    check({"prompt": "x"}, "model")
    check({"model": MODEL}, "prompt")


def test_context_length_message_is_openais() -> None:
    with pytest.raises(ApiError) as info:
        parse(max_tokens=40)
    assert info.value.message.startswith(
        f"This model's maximum context length is {CONTEXT} tokens, however you requested 42 tokens "
        "(2 in your prompt; 40 for the completion)."
    )
    assert info.value.code == "context_length_exceeded"


# ------------------------------------------------------------- stops and streams


def test_stop_position_and_held_back_tail() -> None:
    assert stop_position("hello world", ["wor", "lo"]) == 3
    assert stop_position("hello", ["x"]) is None
    assert held_back("hello wo", ["world"]) == 2  # "wo" may become "world"
    assert held_back("hello w", ["world", "ww"]) == 1
    assert held_back("hello", ["world"]) == 0
    assert held_back("abcab", ["abcabd"]) == 5


def utf8(ids: list[int]) -> str:
    """A byte-level decoder (token id = byte), as byte-level BPE decodes."""
    return bytes(ids).decode("utf-8", errors="replace")


def stream_all(stops: tuple[str, ...], text: str) -> tuple[list[str], TextStream]:
    s = TextStream(utf8, stops)
    deltas = []
    for b in text.encode():
        deltas.append(s.feed(b))
        if s.stopped:
            break
    else:
        deltas.append(s.finish())
    return deltas, s


def test_text_stream_waits_for_whole_characters() -> None:
    deltas, _ = stream_all((), "aé日🦙")
    assert "".join(deltas) == "aé日🦙" and all("\ufffd" not in d for d in deltas)
    assert deltas[:3] == ["a", "", "é"]  # é is two bytes: nothing after the first


def test_text_stream_truncates_before_the_stop_string_openai_style() -> None:
    deltas, s = stream_all(("STOP", "\n\n"), "one two STOP three")
    assert s.stopped and "".join(deltas) == s.text == "one two "
    assert "S" not in "".join(deltas)  # the held-back prefix of the stop is never sent
    deltas, s = stream_all(("STOP",), "one ST two")  # a false start is released
    assert not s.stopped and "".join(deltas) == "one ST two"
    deltas, s = stream_all(("STOP",), "ends with ST")  # held back, then flushed at the end
    assert deltas[-1] == "ST" and "".join(deltas) == "ends with ST"


def completion_chunk(
    completion_id: str, created: int, model: str, index: int, text: str, finish_reason: str | None
) -> dict[str, Any]:
    """OpenAI's streamed ``text_completion`` object, as a dict: what ChunkEncoder must encode."""
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }


def test_sse_chunk_is_openais_text_completion_chunk() -> None:
    chunk = completion_chunk("cmpl-1", 7, "m", 2, "hé", None)
    assert (
        sse(chunk)
        == (
            'data: {"id":"cmpl-1","object":"text_completion","created":7,"model":"m",'
            '"choices":[{"index":2,"text":"hé","logprobs":null,"finish_reason":null}]}\n\n'
        ).encode()
    )
    assert sse("[DONE]") == b"data: [DONE]\n\n"
    # The streaming path's encoder writes the same bytes without building the dict.
    encode = ChunkEncoder("cmpl-1", 7, 'm"\\é')
    for index, text, reason in [(2, "hé", None), (0, 'a"b\\c\n\t\u2028🦙', "stop"), (5, "", "length")]:
        assert encode(index, text, reason) == sse(completion_chunk("cmpl-1", 7, 'm"\\é', index, text, reason))


# ------------------------------------------------------------ batched decoding


def tiny_gpt(seed: int = 0) -> GPT:
    cfg = ModelConfig(
        vocab_size=64,
        n_layers=2,
        d_model=32,
        n_heads=4,
        n_kv_heads=2,
        context_length=CONTEXT,
        ffn_hidden_size=48,
        rope_theta=1000.0,
    )
    model = GPT(cfg)
    randomize(model, seed)
    return model.eval()


PROMPTS = [[1, 2, 3], [5], [9, 8, 7, 6, 5, 4, 3], [30, 31], [40, 2, 50, 3, 60], [11] * 9]


@torch.no_grad()
def test_batched_masked_attention_decodes_each_row_as_if_alone() -> None:
    """One batched, masked step per token over rows of different lengths = each row's lone step;
    rows leave (the last row moves into the freed one) and join mid-way."""
    model = tiny_gpt()
    alone: list[KVCache] = []
    batch = BatchKVCache(2, CONTEXT)
    last: list[int] = []

    def join(prompt: list[int]) -> None:
        a, b = KVCache(2, CONTEXT), KVCache(2, CONTEXT)
        la = model(torch.tensor([prompt]), kv=a)[0, -1]
        assert torch.equal(la, model(torch.tensor([prompt]), kv=b)[0, -1])
        assert batch.add(b) == len(alone)
        alone.append(a)
        last.append(int(la.argmax()))

    for p in PROMPTS[:4]:
        join(p)
    for step in range(12):
        if step == 3:
            for i in (2, 0):  # from the end, as the engine does: row 3 → 2, then row 2 (old 3)… → 0
                batch.remove(i)
                for rows in (alone, last):
                    rows[i] = rows[-1]
                    rows.pop()
        if step == 5:
            for p in PROMPTS[4:]:
                join(p)
        assert batch.rows == len(alone) and len(set(batch.lengths)) > 1  # the mask is in play
        tokens = torch.tensor([[t] for t in last])
        got = model(tokens, kv=batch)[:, -1]
        want = torch.stack([model(tokens[i : i + 1], kv=a)[0, -1] for i, a in enumerate(alone)])
        # Only float rounding differs: batched GEMMs, and the softmax over a zero-padded row.
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert got.argmax(-1).tolist() == want.argmax(-1).tolist()
        last = got.argmax(-1).tolist()
    assert batch.lengths == [a.length for a in alone]
    # Unwritten positions enter the masked matmuls: they must be finite (0 · NaN = NaN).
    assert all(torch.isfinite(b).all() for b in batch.k + batch.v)
    with pytest.raises(ValueError, match="one token per row"):
        model(torch.tensor([[1, 2]] * batch.rows), kv=batch)


@torch.no_grad()
def test_a_lone_batched_row_is_generates_call_bit_for_bit() -> None:
    """One row (or rows of one length): no mask, the exact call a lone KVCache makes."""
    model = tiny_gpt()
    a, b = KVCache(2, CONTEXT), KVCache(2, CONTEXT)
    token = int(model(torch.tensor([PROMPTS[2]]), kv=a)[0, -1].argmax())
    model(torch.tensor([PROMPTS[2]]), kv=b)
    batch = BatchKVCache(2, CONTEXT)
    batch.add(b)
    for _ in range(5):
        want = model(torch.tensor([[token]]), kv=a)[0, -1]
        got = model(torch.tensor([[token]]), kv=batch)[0, -1]
        assert torch.equal(got, want)
        token = int(want.argmax())
    batch.remove(0)
    assert batch.rows == 0


def run_engine(model: GPT, jobs: list[tuple[list[int], Sampling]], *, max_batch: int = 8) -> list[list[int]]:
    """Submit all jobs at once to a real engine; the token ids each sequence generated."""
    engine = Engine(model, max_batch=max_batch)
    done = threading.Semaphore(0)
    seqs = []
    for i, (prompt, s) in enumerate(jobs):

        def emit(event: Event) -> None:
            if event.finish_reason is not None or event.error is not None:
                done.release()

        gen = None if s.greedy else torch.Generator().manual_seed(s.seed)
        seqs.append(Sequence(i, prompt, s, TextStream(lambda ids: ""), emit, generator=gen))
    engine.submit(seqs)  # before start: the first step admits them all together
    engine.start()
    try:
        for _ in jobs:
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    assert engine.active_count == 0
    return [s.text.ids for s in seqs]


def test_engine_greedy_equals_generate_while_batched() -> None:
    model = tiny_gpt(seed=1)
    jobs = [(p, Sampling(max_new_tokens=4 + 3 * i, temperature=0)) for i, p in enumerate(PROMPTS)]
    expected = [generate(model, p, s) for p, s in jobs]
    assert len({tuple(e) for e in expected}) == len(jobs)  # distinct outputs: a row mix-up shows
    assert run_engine(model, jobs) == expected
    # Rows leave at different steps (max tokens 4 … 19) and, with 3 slots, others join mid-way.
    assert run_engine(model, jobs, max_batch=3) == expected


def test_engine_seeded_sampling_is_reproducible_and_equals_generate() -> None:
    model = tiny_gpt(seed=2)
    s = Sampling(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9, seed=11)
    jobs = [
        (PROMPTS[0], s),
        (PROMPTS[0], s),
        (PROMPTS[0], Sampling(max_new_tokens=12, temperature=1.0, seed=12)),
    ]
    a, b, c = run_engine(model, jobs)
    assert a == b and a != c
    assert run_engine(model, [jobs[0]]) == [generate(model, PROMPTS[0], s)]  # alone: the same stream


def test_engine_stops_at_end_of_text_and_cancelled_rows_free_their_slot() -> None:
    model = tiny_gpt(seed=1)
    greedy = generate(model, PROMPTS[2], Sampling(max_new_tokens=8, temperature=0))
    stop = greedy[3]
    out = run_engine(model, [(PROMPTS[2], Sampling(max_new_tokens=8, temperature=0, stop_ids=(stop,)))])
    assert out == [greedy[: greedy.index(stop) + 1]]

    engine = Engine(model, max_batch=2)
    events: list[Event] = []

    def emit(event: Event) -> None:
        events.append(event)
        engine.cancel([seq])  # the client goes away after the first token, mid-generation

    seq = Sequence(
        0, [1], Sampling(max_new_tokens=CONTEXT - 1, temperature=0), TextStream(lambda ids: ""), emit
    )
    engine.start()
    try:
        engine.submit([seq])
        for _ in range(1000):
            if seq.finished:
                break
            threading.Event().wait(0.01)
        assert seq.finished and engine.stats.cancelled == 1
        assert engine.active_count == 0
        assert seq.generated == 1 and [e.finish_reason for e in events] == [None]  # dropped, not completed
    finally:
        engine.stop()
