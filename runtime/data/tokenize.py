"""Tokenize: train a byte-level BPE (or load a ``tokenizer.json``) and encode documents.

* Byte-level BPE (GPT-2 style) with no normaliser: every byte sequence round-trips exactly,
  leading spaces and CRLF included.
* Training sample: documents ordered by ``sha256(seed, key)`` — a stable, seeded order
  independent of arrival — taken until ``sampleBytes``.
* Encoding: ``encode_special_tokens=True``, so a literal ``<|endoftext|>`` *inside* a document
  is split as ordinary text; the end-of-text id is appended by id, never by string.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


class TokenizerError(ValueError):
    """A tokenizer cannot be trained/loaded as configured; the message names the spec field."""


@dataclass(frozen=True)
class TokenizerConfig:
    """Plain form of ``spec.data.tokenizer``: train (vocab_size set) or load (uri set)."""

    vocab_size: int | None = None
    special_tokens: tuple[str, ...] = ("<|endoftext|>",)
    min_frequency: int = 2
    sample_bytes: int = 200_000_000
    load_uri: str | None = None
    end_of_text: str = "<|endoftext|>"

    @property
    def eot_token(self) -> str:
        return self.special_tokens[0] if self.load_uri is None else self.end_of_text

    @classmethod
    def from_spec(cls, tok: Any) -> TokenizerConfig:
        if tok.train is not None:
            t = tok.train
            if not t.special_tokens:
                raise TokenizerError(
                    "spec.data.tokenizer.train.specialTokens is empty: the first special token is the "
                    "end-of-text token; list at least one, e.g. ['<|endoftext|>']"
                )
            return cls(
                vocab_size=t.vocab_size,
                special_tokens=tuple(t.special_tokens),
                min_frequency=t.min_frequency,
                sample_bytes=t.sample_bytes,
            )
        return cls(load_uri=tok.load.uri, end_of_text=tok.load.end_of_text)


def sample_order_key(seed: int, key: str) -> str:
    return hashlib.sha256(f"sample\0{seed}\0{key}".encode()).hexdigest()


def choose_sample(docs: Iterable[tuple[str, str]], seed: int, max_bytes: int) -> list[str]:
    """Texts for tokenizer training: seeded stable-key order, until ``max_bytes`` of UTF-8."""
    ordered = sorted(docs, key=lambda kv: sample_order_key(seed, kv[0]))
    out: list[str] = []
    total = 0
    for _, text in ordered:
        if total >= max_bytes:
            break
        out.append(text)
        total += len(text.encode("utf-8"))
    return out


def train_bpe(texts: Sequence[str], cfg: TokenizerConfig) -> Any:
    """A byte-level BPE trained on ``texts`` (in the given order)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    assert cfg.vocab_size is not None
    if cfg.vocab_size < 256 + len(cfg.special_tokens):
        raise TokenizerError(
            f"spec.data.tokenizer.train.vocabSize {cfg.vocab_size} is smaller than the 256 byte tokens "
            f"plus {len(cfg.special_tokens)} special tokens"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(cfg.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def load_tokenizer_bytes(data: bytes, cfg: TokenizerConfig) -> Any:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:
        raise TokenizerError(
            f"spec.data.tokenizer.load.uri: {cfg.load_uri} is not a tokenizer.json: {e}"
        ) from e
    if tok.token_to_id(cfg.end_of_text) is None:
        raise TokenizerError(
            f"spec.data.tokenizer.load.endOfText: {cfg.end_of_text!r} is not in the vocabulary of "
            f"{cfg.load_uri}; set endOfText to the tokenizer's end-of-text token"
        )
    return tok


def tokenizer_json(tok: Any) -> bytes:
    """Canonical bytes of a tokenizer (what is saved beside the shards and hashed)."""
    return json.dumps(json.loads(tok.to_str()), sort_keys=True, ensure_ascii=False).encode("utf-8")


def vocab_size(tok: Any) -> int:
    """Ids run 0 … vocab_size − 1 (added tokens included)."""
    return int(max(tok.get_vocab(with_added_tokens=True).values()) + 1)


def token_byte_lengths(tokenizer_json: str) -> list[int]:
    """UTF-8 bytes of text each id stands for (special tokens: 0): bits per byte's denominator.

    Byte-level BPE (every tokenizer ``llmtrain`` trains) maps each byte to one character of
    its alphabet, so a token's length in characters is exactly its length in bytes. Other
    tokenizers (loaded ones) fall back to decoding each id alone, exact unless a token ends
    inside a multi-byte character.
    """
    from tokenizers import Tokenizer

    spec = json.loads(tokenizer_json)
    tok = Tokenizer.from_str(tokenizer_json)
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    byte_level = (spec.get("decoder") or {}).get("type") == "ByteLevel"
    out = []
    for i in range(vocab_size(tok)):
        piece = tok.id_to_token(i)
        if i in special or piece is None:
            out.append(0)
        elif byte_level:
            out.append(len(piece))
        else:
            out.append(len(tok.decode([i]).encode("utf-8")))
    return out


def eot_id(tok: Any, token: str) -> int:
    i = tok.token_to_id(token)
    if i is None:
        raise TokenizerError(f"end-of-text token {token!r} is not in the tokenizer's vocabulary")
    return int(i)


def encode_documents(tok: Any, texts: Sequence[str], eot: int) -> list[np.ndarray]:
    """Token ids of each document followed by the end-of-text id (uint32 arrays).

    One ``encode_batch`` call per block: the Rust side parallelises over documents with its
    own thread pool, so the Python loop below only copies ids.
    """
    previous = tok.encode_special_tokens
    tok.encode_special_tokens = True  # a literal "<|endoftext|>" inside a document stays text
    try:
        encs = tok.encode_batch_fast(list(texts), add_special_tokens=False)
    finally:
        tok.encode_special_tokens = previous
    out = []
    for e in encs:
        ids = np.empty(len(e.ids) + 1, dtype=np.uint32)
        ids[:-1] = e.ids
        ids[-1] = eot
        out.append(ids)
    return out
