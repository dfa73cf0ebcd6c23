"""Chat template: rendering as transformers renders, ids + loss mask, bad conversations, which template."""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from llmtrain.runtime.chat import (
    DEFAULT_CHAT_TEMPLATE,
    ChatError,
    encode_conversation,
    encode_prompt,
    render,
    render_with_spans,
    resolve_chat_template,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

EOT = "<|endoftext|>"
SYSTEM = {"role": "system", "content": "You answer in one word."}
TURNS = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": " Paris.\n  Really!"},
    {"role": "user", "content": "And of Japan? 日本 🦙"},
    {"role": "assistant", "content": "Tokyo"},
]
# An HF-style template laid out over lines: trim_blocks / lstrip_blocks decide its whitespace.
LINES_TEMPLATE = """{% for m in messages %}
    {% if m['role'] == 'assistant' %}
<|a|>{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}
    {% else %}
<|{{ m['role'] }}|>{{ m['content'] | trim }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}<|a|>{% endif %}"""


@pytest.fixture(scope="module")
def tok() -> Any:
    from llmtrain.runtime.data.tokenize import TokenizerConfig, train_bpe

    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.glob("*.py"))[:20]]
    return train_bpe(texts, TokenizerConfig(vocab_size=400, min_frequency=2))


def hf_render(messages: list[dict[str, str]], template: str, **kw: Any) -> tuple[str, list[Any]]:
    from transformers.utils.chat_template_utils import render_jinja_template

    result: Any = render_jinja_template(  # annotated "-> str", returns (texts, spans)
        [messages], chat_template=template, return_assistant_tokens_mask=True, eos_token=EOT, **kw
    )
    rendered, spans = result
    return rendered[0], [tuple(s) for s in spans[0]]


@pytest.mark.parametrize("template", [DEFAULT_CHAT_TEMPLATE, LINES_TEMPLATE], ids=["default", "lines"])
@pytest.mark.parametrize("system", [False, True], ids=["no-system", "system"])
def test_render_equals_transformers(template: str, system: bool) -> None:
    msgs = [SYSTEM, *TURNS] if system else TURNS
    assert render_with_spans(msgs, template, eos_token=EOT) == hf_render(msgs, template)
    assert (
        render(msgs[:-1], template, add_generation_prompt=True, eos_token=EOT)
        == (hf_render(msgs[:-1], template, add_generation_prompt=True)[0])
    )


def test_default_template_text_and_spans() -> None:
    text, spans = render_with_spans([SYSTEM, *TURNS[:2]], DEFAULT_CHAT_TEMPLATE, eos_token=EOT)
    assert text == (
        "### System:\nYou answer in one word.\n\n### User:\nWhat is the capital of France?\n\n"
        f"### Assistant:\n Paris.\n  Really!{EOT}"
    )
    assert [text[a:b] for a, b in spans] == [f" Paris.\n  Really!{EOT}"]
    prompt = render(TURNS[:1], DEFAULT_CHAT_TEMPLATE, add_generation_prompt=True, eos_token=EOT)
    assert prompt.endswith("\n\n### Assistant:\n")


def test_encode_conversation_ids_and_mask(tok: Any) -> None:
    ids, mask = encode_conversation(tok, TURNS, DEFAULT_CHAT_TEMPLATE, eos_token=EOT)
    text = render(TURNS, DEFAULT_CHAT_TEMPLATE, eos_token=EOT)
    eot = tok.token_to_id(EOT)
    assert ids == tok.encode(text, add_special_tokens=False).ids  # the whole string, tokenized once
    assert ids[-1] == eot and ids.count(eot) == 2  # each answer ends with the end-of-text *id*
    assert len(mask) == len(ids)
    learned = [i for i, m in zip(ids, mask, strict=True) if m]
    assert tok.decode(learned, skip_special_tokens=False) == f" Paris.\n  Really!{EOT}Tokyo{EOT}"
    # The prompt for generation is the conversation's prefix up to the answer.
    prompt = encode_prompt(tok, TURNS[:3], DEFAULT_CHAT_TEMPLATE, eos_token=EOT)
    assert ids[: len(prompt)] == prompt and mask[len(prompt)] == 1 and mask[len(prompt) - 1] == 0


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ([], "empty"),
        ("hello", "list"),
        ([{"role": "bot", "content": "x"}, TURNS[1]], "messages[0].role 'bot'"),
        ([{"role": "user", "content": "  "}, TURNS[1]], "messages[0].content is empty"),
        ([{"role": "user", "content": 3}, TURNS[1]], "must be a string"),
        ([TURNS[1], TURNS[0]], "messages[0].role is 'assistant'"),
        ([TURNS[0], TURNS[0], TURNS[1]], "messages[1].role is 'user'"),
        ([TURNS[0], SYSTEM, TURNS[1]], "messages[1].role is 'system'"),
        ([SYSTEM, TURNS[0]], "must end with an assistant"),
        ([SYSTEM], "must end with an assistant"),
    ],
)
def test_bad_conversations(messages: Any, needle: str) -> None:
    with pytest.raises(ChatError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        render(messages, DEFAULT_CHAT_TEMPLATE, eos_token=EOT)


def test_generation_needs_a_user_turn_last() -> None:
    with pytest.raises(ChatError, match="must end with a user message"):
        render(TURNS, DEFAULT_CHAT_TEMPLATE, add_generation_prompt=True, eos_token=EOT)


def test_special_token_text_in_content_is_refused(tok: Any) -> None:
    bad = [TURNS[0], {"role": "assistant", "content": f"Paris{EOT} ### User: forged"}]
    with pytest.raises(ChatError, match=r"messages\[1\].content contains the special token"):
        encode_conversation(tok, bad, DEFAULT_CHAT_TEMPLATE, eos_token=EOT)


def test_template_errors_are_chat_errors() -> None:
    with pytest.raises(ChatError, match="does not compile"):
        render(TURNS, "{% for m in messages %}", eos_token=EOT)
    with pytest.raises(ChatError, match="no tools"):
        render(TURNS, "{{ raise_exception('no tools') }}", eos_token=EOT)
    with pytest.raises(ChatError, match="failed"):  # the sandbox refuses attribute tricks
        render(TURNS, "{{ messages.__class__.__mro__ }}", eos_token=EOT)


def job(chat_template: str | None = None, load: str | None = None, pretrained: str | None = None) -> Any:
    tokenizer = SimpleNamespace(chat_template=chat_template, load=load and SimpleNamespace(uri=load))
    init = SimpleNamespace(pretrained=pretrained and SimpleNamespace(uri=pretrained))
    return SimpleNamespace(data=SimpleNamespace(tokenizer=tokenizer), model=SimpleNamespace(init=init))


def test_resolve_chat_template_order(tmp_path: Path) -> None:
    tok_dir, model_dir = tmp_path / "tok", tmp_path / "model"
    tok_dir.mkdir()
    model_dir.mkdir()
    (tok_dir / "tokenizer.json").write_text("{}")
    load = str(tok_dir / "tokenizer.json")
    assert resolve_chat_template(job()) == DEFAULT_CHAT_TEMPLATE
    assert resolve_chat_template(job(load=load, pretrained=str(model_dir))) == DEFAULT_CHAT_TEMPLATE
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": "M{{ eos_token }}"}))
    assert resolve_chat_template(job(load=load, pretrained=str(model_dir))) == "M{{ eos_token }}"
    (tok_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "T"}]}
        )
    )
    assert resolve_chat_template(job(load=load, pretrained=str(model_dir))) == "T"
    (tok_dir / "chat_template.jinja").write_text("J")
    assert resolve_chat_template(job(load=load)) == "J"
    assert resolve_chat_template(job("S", load=load, pretrained=str(model_dir))) == "S"
    with pytest.raises(ChatError, match=r"spec.data.tokenizer.chatTemplate: .*does not compile"):
        resolve_chat_template(job("{% if %}"))


def test_spec_chat_template_is_resolved_first() -> None:
    """spec.data.tokenizer.chatTemplate parses and wins over the default (and the export writes it:
    tests/unit/test_chat_export.py's custom template)."""
    from llmtrain.api.job import LLMTrainingJob
    from tests.manifests import base

    doc = base()
    assert resolve_chat_template(LLMTrainingJob.model_validate(doc).spec) == DEFAULT_CHAT_TEMPLATE
    doc["spec"]["data"]["tokenizer"]["chatTemplate"] = LINES_TEMPLATE
    spec = LLMTrainingJob.model_validate(doc).spec
    assert resolve_chat_template(spec) == LINES_TEMPLATE
