"""Chat conversations → text and token ids, with the mask of what the model must learn.

One chat template (Jinja, the format of Hugging Face ``tokenizer_config.json``'s
``chat_template``) is used everywhere a conversation becomes tokens: task-data tokenization,
the export (so ``transformers``' ``apply_chat_template`` renders the same text) and
``llmtrain serve``'s ``/v1/chat/completions``.

* :data:`DEFAULT_CHAT_TEMPLATE` wraps each assistant turn's content and its end-of-text
  token in ``{% generation %}…{% endgeneration %}``: that span is what the loss covers
  (``return_assistant_tokens_mask=True`` in ``transformers`` marks the same tokens), and a
  generated answer stops at end-of-text because every trained answer ended with it.
* :func:`render` renders as ``transformers`` does (``ImmutableSandboxedEnvironment``,
  ``trim_blocks`` and ``lstrip_blocks``, ``loopcontrols``, ``raise_exception`` / ``tojson`` /
  ``strftime_now``): templates come from imported tokenizers, i.e. untrusted, hence the sandbox.
  Hand-written rather than calling ``transformers`` because the data pipeline must not import
  it (seconds per process) and ``transformers`` tracks generation spans with a stateful
  extension that is not safe to share between serving threads; here the span is bracketed by
  two private-use characters that are removed after rendering.
* :func:`encode_conversation` tokenizes the *whole* rendered string once (so the ids are
  exactly those of tokenizing it, as ``apply_chat_template`` does) and marks the tokens that
  overlap a generation span, which is ``transformers``' ``char_to_token`` rule.

Special tokens written by the template (end-of-text) are encoded as their ids. A message
whose content contains a special token's text is refused (:class:`ChatError`): tokenized as a
whole string it would become that token — an answer that "ends" early, or a forged turn.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

ROLES = ("system", "user", "assistant")

# Plain-text role headers: our tokenizers have one special token (end-of-text), so a header is
# ordinary text the model learns. The answer (content + end-of-text) is the generation span.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '### System:\\n' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '### User:\\n' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '### Assistant:\\n' }}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}"
    "{{ raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)

# Brackets for generation spans in the rendered text (Unicode private use: never in a message,
# checked). Removed before the text leaves render_with_spans.
_OPEN, _CLOSE = "\ue000", "\ue001"

TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers >= 4.50 saves the template here too


class ChatError(ValueError):
    """A conversation (or a chat template) that cannot be rendered; the message says which and why."""


# ------------------------------------------------------------------ conversations


def check_messages(messages: Sequence[Mapping[str, Any]], *, for_generation: bool) -> list[dict[str, str]]:
    """``messages`` as plain dicts, or :class:`ChatError` naming the first bad one.

    Order: an optional ``system`` first, then ``user`` and ``assistant`` alternating from
    ``user``. The last is ``assistant`` for training (``for_generation=False``: the answer to
    learn) and ``user`` for generation (the model writes the next ``assistant`` turn).
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatError("messages must be a list of {role, content} objects")
    if not messages:
        raise ChatError("messages is empty")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatError(f"messages[{i}] is not an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ChatError(f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatError(f"messages[{i}].content must be a string")
        if not content.strip():
            raise ChatError(f"messages[{i}].content is empty")
        if _OPEN in content or _CLOSE in content:
            raise ChatError(f"messages[{i}].content contains a reserved character (U+E000/U+E001)")
        out.append({"role": role, "content": content})
    body = out[1:] if out[0]["role"] == "system" else out
    for j, m in enumerate(body):
        want = "user" if j % 2 == 0 else "assistant"
        if m["role"] != want:
            i = j + len(out) - len(body)
            raise ChatError(
                f"messages[{i}].role is {m['role']!r} but {want!r} is expected there: after an optional "
                "system message, user and assistant turns alternate, starting with user"
            )
    last = "user" if for_generation else "assistant"
    if not body or body[-1]["role"] != last:
        raise ChatError(
            f"the conversation must end with {'a user' if for_generation else 'an assistant'} message "
            + ("(the model answers it)" if for_generation else "(the answer to learn)")
        )
    return out


# ----------------------------------------------------------------------- rendering


@lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    """A compiled template in an environment configured as ``transformers`` configures its own."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """``{% generation %}…{% endgeneration %}``: the body, bracketed by the span markers."""

        tags = {"generation"}  # noqa: RUF012 (jinja declares it a plain class attribute)

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_bracket"), [], [], body).set_lineno(lineno)

        def _bracket(self, caller: Any) -> str:
            return f"{_OPEN}{caller()}{_CLOSE}"

    def raise_exception(message: str) -> None:
        raise ChatError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:  # fmt: skip
        # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatError(f"the chat template does not compile: {e} (line {e.lineno})") from e


def render_with_spans(
    messages: Sequence[Mapping[str, Any]],
    template: str,
    *,
    add_generation_prompt: bool = False,
    eos_token: str,
    bos_token: str | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and its generation spans (character ``[start, end)``, in order)."""
    import jinja2

    msgs = check_messages(messages, for_generation=add_generation_prompt)
    special = {"eos_token": eos_token} | ({"bos_token": bos_token} if bos_token is not None else {})
    try:
        raw = _compile(template).render(messages=msgs, add_generation_prompt=add_generation_prompt, **special)
    except jinja2.TemplateError as e:
        raise ChatError(f"the chat template failed: {e}") from e
    text: list[str] = []
    spans: list[tuple[int, int]] = []
    pos, start = 0, -1
    for piece in _split_markers(raw):
        if piece == _OPEN:
            if start >= 0:
                raise ChatError("the chat template nests {% generation %} blocks")
            start = pos
        elif piece == _CLOSE:
            spans.append((start, pos))
            start = -1
        else:
            text.append(piece)
            pos += len(piece)
    return "".join(text), [s for s in spans if s[1] > s[0]]


def _split_markers(raw: str) -> Iterable[str]:
    piece: list[str] = []
    for ch in raw:
        if ch in (_OPEN, _CLOSE):
            if piece:
                yield "".join(piece)
                piece = []
            yield ch
        else:
            piece.append(ch)
    if piece:
        yield "".join(piece)


def render(
    messages: Sequence[Mapping[str, Any]],
    template: str,
    *,
    add_generation_prompt: bool = False,
    eos_token: str = "<|endoftext|>",
    bos_token: str | None = None,
) -> str:
    """The text ``transformers``' ``apply_chat_template(..., tokenize=False)`` renders."""
    text, _ = render_with_spans(
        messages,
        template,
        add_generation_prompt=add_generation_prompt,
        eos_token=eos_token,
        bos_token=bos_token,
    )
    return text


# ----------------------------------------------------------------------- tokens


def special_token_texts(tok: Any) -> list[str]:
    """The text of every special added token of a ``tokenizers.Tokenizer``."""
    return [t.content for t in tok.get_added_tokens_decoder().values() if t.special]


def check_no_special_text(messages: Sequence[Mapping[str, Any]], specials: Iterable[str]) -> None:
    for i, m in enumerate(messages):
        content = m.get("content")
        for s in specials:
            if isinstance(content, str) and s and s in content:
                raise ChatError(
                    f"messages[{i}].content contains the special token {s!r}: it would be read as that "
                    "token, not as text; remove it from the record"
                )


def encode_rendered(tok: Any, text: str, spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Ids of ``text`` (special tokens as ids, none added) and 1 where a token overlaps a span."""
    previous = tok.encode_special_tokens
    tok.encode_special_tokens = False  # the template's end-of-text is the token, not its text
    try:
        enc = tok.encode(text, add_special_tokens=False)
    finally:
        tok.encode_special_tokens = previous
    ids = list(enc.ids)
    mask = [0] * len(ids)
    for start, end in spans:
        # transformers' rule: the token holding the span's first character through the one
        # holding its last (a token straddling a boundary counts as the answer's).
        first, last = enc.char_to_token(start), enc.char_to_token(end - 1)
        if first is None:
            continue
        for i in range(first, (last if last is not None else len(ids) - 1) + 1):
            mask[i] = 1
    return ids, mask


def encode_conversation(
    tok: Any,
    messages: Sequence[Mapping[str, Any]],
    template: str,
    *,
    eos_token: str,
    bos_token: str | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and the loss mask (1 = assistant content + end-of-turn).

    ``tok``: a ``tokenizers.Tokenizer``. The conversation must end with an assistant turn.
    """
    check_no_special_text(messages, special_token_texts(tok))
    text, spans = render_with_spans(messages, template, eos_token=eos_token, bos_token=bos_token)
    return encode_rendered(tok, text, spans)


def encode_prompt(
    tok: Any,
    messages: Sequence[Mapping[str, Any]],
    template: str,
    *,
    eos_token: str,
    bos_token: str | None = None,
) -> list[int]:
    """Ids of a conversation ending with a user turn, followed by the assistant header (generation)."""
    check_no_special_text(messages, special_token_texts(tok))
    text, _ = render_with_spans(
        messages, template, add_generation_prompt=True, eos_token=eos_token, bos_token=bos_token
    )
    ids, _ = encode_rendered(tok, text, ())
    return ids


# ----------------------------------------------------------------- which template


def template_from_tokenizer_files(config: bytes | None, jinja_file: bytes | None) -> str | None:
    """The chat template a Hugging Face tokenizer directory declares, if any.

    ``chat_template.jinja`` wins (``transformers`` writes it and then omits the config's
    field); a config's list of named templates gives the one named ``default``.
    """
    if jinja_file is not None:
        return jinja_file.decode("utf-8")
    if config is None:
        return None
    value = json.loads(config).get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) and value.strip() else None


def _read_beside(uri: str, s3: Any) -> str | None:
    """The chat template in the tokenizer directory ``uri`` (local or s3://), if any."""
    from llmtrain.runtime.publish import resolve_export
    from llmtrain.runtime.store import StorageError

    try:
        export = resolve_export(uri, s3)
    except StorageError:
        return None
    files = {
        name: (export.read(name) if export.has(name) else None)
        for name in (TOKENIZER_CONFIG_NAME, CHAT_TEMPLATE_FILE)
    }
    return template_from_tokenizer_files(files[TOKENIZER_CONFIG_NAME], files[CHAT_TEMPLATE_FILE])


def resolve_chat_template(spec: Any, s3: Any = None) -> str:
    """The chat template of a job (``spec``: an ``LLMTrainingJob`` spec), first found of:

    1. ``spec.data.tokenizer.chatTemplate``;
    2. the imported tokenizer's: ``tokenizer_config.json`` (or ``chat_template.jinja``) beside
       ``spec.data.tokenizer.load.uri``'s ``tokenizer.json``, then in
       ``spec.model.init.pretrained.uri``;
    3. :data:`DEFAULT_CHAT_TEMPLATE`.
    """
    tokenizer = spec.data.tokenizer
    declared = getattr(tokenizer, "chat_template", None)
    if declared:
        _check_compiles(declared, "spec.data.tokenizer.chatTemplate")
        return str(declared)
    places = []
    if tokenizer.load is not None:
        parent = str(tokenizer.load.uri).rstrip("/").rpartition("/")[0]
        places.append(parent or ".")
    init = getattr(getattr(spec, "model", None), "init", None)
    pretrained = getattr(init, "pretrained", None)
    if pretrained is not None:
        places.append(str(pretrained.uri))
    for place in places:
        found = _read_beside(place, s3)
        if found is not None:
            _check_compiles(found, f"the chat_template in {place}/{TOKENIZER_CONFIG_NAME}")
            return found
    return DEFAULT_CHAT_TEMPLATE


def _check_compiles(template: str, where: str) -> None:
    try:
        _compile(template)
    except ChatError as e:
        raise ChatError(f"{where}: {e}") from e
