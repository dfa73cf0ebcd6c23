"""Task data: prompt/response and chat records → conversations → ids + loss mask → packed blocks.

A source with ``task`` set (``spec.data.sources[].task``) is read record by record instead of
as text. Each record becomes one conversation (a list of ``{role, content}``):

* ``promptResponse``: ``[system?, user: record[promptField], assistant: record[responseField]]``;
* ``chat``: ``record[messagesField]`` as given (``task.system`` goes first when it has none).

A record that cannot be one is a **bad record**, counted by reason and named (source, file and
line/row) in the manifest, never trained on. Reasons (:data:`BAD_REASONS`): ``not_json``,
``missing_field``, ``wrong_type``, ``bad_role``, ``empty_content``, ``role_order`` (after an
optional system message user and assistant alternate from user, and the last turn is the
assistant's), ``special_token`` (content holding a special token's text), ``template`` (the chat
template failed), ``too_long`` (the tokenized conversation is longer than
``spec.model.architecture.contextLength``).

Inside the pipeline a record travels as a document whose text is its conversation in canonical
JSON (:func:`to_text`): cleaning applies to each message's content, exact dedup to the whole
conversation, and the split, mixture and ordering steps work unchanged on its stable key.

Tokenization: :func:`llmtrain.runtime.chat.encode_conversation` with the job's tokenizer and
chat template gives the ids and a 0/1 mask, 1 on the assistant turns' content and end of turn.

Packing (:func:`pack_blocks`): **records are kept whole**. The loader cuts windows of
``contextLength + 1`` tokens starting every ``contextLength`` tokens, so task shards are laid
out in blocks of exactly ``contextLength`` tokens: records are placed in order, several to a
block while they fit; one that does not fit starts the next block and the rest of the current
one is padding (end-of-text ids, mask 0). A record therefore never straddles a window, and a
record's first token always has mask 0 (it is never predicted from the previous record), so no
loss term crosses a record boundary. Attention does: a later record in a block attends to the
earlier ones (causal attention over the window, as in most packed SFT); the loss does not see
it. Each shard holds whole blocks plus one padding token, so its windows are exactly its blocks.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

BAD_REASONS = (
    "not_json",
    "missing_field",
    "wrong_type",
    "bad_role",
    "empty_content",
    "role_order",
    "special_token",
    "template",
    "too_long",
)
BAD_EXAMPLES = 20  # named in the manifest (all are counted)
ROLES = ("system", "user", "assistant")
PACKING = "whole records: several per contextLength block while they fit, the rest padded; mask 0 on padding and on each record's first token"


@dataclass(frozen=True)
class TaskFields:
    """Plain form of ``spec.data.sources[].task``."""

    format: str  # promptResponse | chat
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    system: str | None = None

    @property
    def columns(self) -> tuple[str, ...]:
        if self.format == "chat":
            return (self.messages_field,)
        return (self.prompt_field, self.response_field)


class BadRecord(ValueError):
    """Why one record is not a conversation: ``reason`` (one of BAD_REASONS) and a detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def bad_entry(source: str, ref: str, reason: str, detail: str) -> dict[str, str]:
    """One named bad record, as the manifest lists it."""
    return {"source": source, "record": ref, "reason": reason, "detail": detail[:200]}


# ------------------------------------------------------------------ records → conversations


def conversation(record: Any, task: TaskFields) -> list[dict[str, str]]:
    """The record's conversation, or :class:`BadRecord` saying why it has none."""
    if not isinstance(record, Mapping):
        raise BadRecord("wrong_type", "the record is not an object")
    if task.format == "promptResponse":
        msgs = [
            {"role": "user", "content": _field(record, task.prompt_field)},
            {"role": "assistant", "content": _field(record, task.response_field)},
        ]
    else:
        if task.messages_field not in record or record[task.messages_field] is None:
            raise BadRecord("missing_field", f"no field {task.messages_field!r}")
        raw = record[task.messages_field]
        if isinstance(raw, (str, bytes)) or not isinstance(raw, Iterable):
            raise BadRecord("wrong_type", f"{task.messages_field!r} is not a list of messages")
        msgs = []
        for i, m in enumerate(raw):
            if not isinstance(m, Mapping):
                raise BadRecord("wrong_type", f"messages[{i}] is not an object with role and content")
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise BadRecord("bad_role", f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}")
            if not isinstance(content, str):
                raise BadRecord("wrong_type", f"messages[{i}].content is not a string")
            msgs.append({"role": str(role), "content": content})
    if task.system is not None and not (msgs and msgs[0]["role"] == "system"):
        msgs.insert(0, {"role": "system", "content": task.system})
    check_order(msgs)
    return msgs


def _field(record: Mapping[str, Any], name: str) -> str:
    if name not in record or record[name] is None:
        raise BadRecord("missing_field", f"no field {name!r}")
    value = record[name]
    if not isinstance(value, str):
        raise BadRecord("wrong_type", f"field {name!r} is {type(value).__name__}, not a string")
    return value


def check_order(msgs: list[dict[str, str]]) -> None:
    """Empty content and role order, with the chat module's rule (the one serving applies)."""
    from llmtrain.runtime.chat import ChatError, check_messages

    for i, m in enumerate(msgs):
        if not m["content"].strip():
            raise BadRecord("empty_content", f"messages[{i}] ({m['role']}) has empty content")
    try:
        check_messages(msgs, for_generation=False)
    except ChatError as e:
        raise BadRecord("role_order", str(e)) from e


def to_text(msgs: list[dict[str, str]]) -> str:
    """Canonical JSON of a conversation: the document text (dedup identity) inside the pipeline."""
    return json.dumps(msgs, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def from_text(text: str) -> list[dict[str, str]]:
    return list(json.loads(text))


def contents(text: str) -> str:
    """The conversation's contents joined by blank lines (the tokenizer's training sample)."""
    return "\n\n".join(m["content"] for m in from_text(text))


def read_records(data: bytes, fmt: str, ident: str) -> Iterator[tuple[str, Any]]:
    """``(ref, record or BadRecord)`` of one jsonl/parquet file; refs name the line or row."""
    if fmt == "jsonl":
        for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield f"{ident} line {lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{ident} line {lineno}", BadRecord("not_json", f"not JSON: {e}")
        return
    import io

    import pyarrow.parquet as pq

    for i, row in enumerate(pq.read_table(io.BytesIO(data)).to_pylist()):
        yield f"{ident} row {i}", row


# ------------------------------------------------------------------ tokens


def encode_block(
    items: list[tuple[str, str]], tok_json: str, template: str, eos_token: str, context_length: int
) -> list[tuple[str, Any, Any, str, str]]:
    """Worker side: ``(key, ids, mask, "", "")`` per conversation, or ``(key, None, None, reason,
    detail)`` for one that cannot be trained on (template failure, too long)."""
    from llmtrain.runtime.chat import ChatError, encode_conversation
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tok_json)
    out: list[tuple[str, Any, Any, str, str]] = []
    for key, text in items:
        try:
            ids, mask = encode_conversation(tok, from_text(text), template, eos_token=eos_token)
        except ChatError as e:
            reason = "special_token" if "special token" in str(e) else "template"
            out.append((key, None, None, reason, str(e)))
            continue
        if len(ids) > context_length:
            out.append((key, None, None, "too_long",
                        f"{len(ids)} tokens, more than contextLength {context_length}"))  # fmt: skip
            continue
        m = np.asarray(mask, dtype=np.uint8)
        m[0] = 0  # never predicted from the previous record: no loss term crosses a boundary
        if not m.any():
            out.append((key, None, None, "template", "the chat template marks no answer tokens"))
            continue
        out.append((key, np.asarray(ids, dtype=np.uint32), m, "", ""))
    return out


# ------------------------------------------------------------------ packing


@dataclass
class Block:
    tokens: np.ndarray  # uint32 [context_length]
    mask: np.ndarray  # uint8 [context_length]
    records: int


def pack_blocks(
    records: Iterable[tuple[np.ndarray, np.ndarray]], context_length: int, pad_id: int
) -> Iterator[Block]:
    """Whole records into blocks of ``context_length`` tokens (see the module docstring)."""
    L = context_length
    tokens = np.full(L, pad_id, dtype=np.uint32)
    mask = np.zeros(L, dtype=np.uint8)
    used = n = 0
    for ids, m in records:
        if ids.size > L:  # filtered before (too_long); a caller's bug otherwise
            raise ValueError(f"a record of {ids.size} tokens does not fit contextLength {L}")
        if used + ids.size > L:
            yield Block(tokens, mask, n)
            tokens = np.full(L, pad_id, dtype=np.uint32)
            mask = np.zeros(L, dtype=np.uint8)
            used = n = 0
        tokens[used : used + ids.size] = ids
        mask[used : used + ids.size] = m
        used += ids.size
        n += 1
    if n:
        yield Block(tokens, mask, n)


def shard_groups(blocks: Iterable[Block], max_tokens: int, context_length: int) -> Iterator[list[Block]]:
    """Blocks per shard: as many as fit ``max_tokens`` with the trailing pad token (at least one)."""
    per = max(1, (max_tokens - 1) // context_length)
    group: list[Block] = []
    for b in blocks:
        group.append(b)
        if len(group) == per:
            yield group
            group = []
    if group:
        yield group


def join_blocks(group: list[Block], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """A shard's tokens and mask: its blocks, then one padding token (the last window's target)."""
    tokens = np.concatenate([*(b.tokens for b in group), np.array([pad_id], dtype=np.uint32)])
    mask = np.concatenate([*(b.mask for b in group), np.zeros(1, dtype=np.uint8)])
    return tokens, mask


def eval_line(record_id: str, text: str) -> dict[str, Any]:
    """A held-out record for the task metric: the turns before the final answer, and the answer."""
    msgs = from_text(text)
    return {"id": record_id, "messages": msgs[:-1], "reference": msgs[-1]["content"]}
