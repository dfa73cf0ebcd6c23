"""Shard: pack token ids into binary shard files and write the manifest **last**.

The layout is :mod:`llmtrain.api.shards` (256-byte little-endian header, then ids as uint16
iff vocab size − 1 ≤ 65535, else uint32). Documents are concatenated in key order, each
already ending in the end-of-text id; a shard holds at most ``shardMaxTokens`` tokens, and a
document may continue into the next shard (the loader packs windows within a shard).
Shards above the multipart threshold go to S3 as multipart uploads (see runtime/store.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from llmtrain.runtime.store import Store

from llmtrain.api.shards import MANIFEST_NAME, Manifest, ShardHeader, ShardInfo, Split, dtype_for_vocab


@dataclass
class WrittenShard:
    info: ShardInfo
    etag: str | None  # S3 ETag ("…-N" for an N-part multipart upload); None locally


def shard_name(split: Split, index: int) -> str:
    return f"{split}-{index:05d}.bin"


def encode_shard(tokens: np.ndarray, vocab_size: int, eot_id: int) -> bytes:
    """Header + little-endian ids. Raises if an id does not fit the vocabulary."""
    dtype = dtype_for_vocab(vocab_size)
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise ValueError(f"token id {int(tokens.max())} ≥ vocab size {vocab_size}")
    header = ShardHeader(dtype=dtype, vocab_size=vocab_size, eot_id=eot_id, token_count=int(tokens.size))
    body = tokens.astype("<u2" if dtype == "uint16" else "<u4", copy=False).tobytes()
    return header.pack() + body


def _chunks(docs: Iterable[np.ndarray], max_tokens: int, eot_id: int) -> Iterator[tuple[np.ndarray, int]]:
    """Concatenate documents into ≤ max_tokens chunks; yields (tokens, documents ending here)."""
    buf: list[np.ndarray] = []
    n = 0
    for doc in docs:
        while doc.size:
            take = min(doc.size, max_tokens - n)
            buf.append(doc[:take])
            n += take
            doc = doc[take:]
            if n == max_tokens:
                chunk = np.concatenate(buf)
                yield chunk, int(np.count_nonzero(chunk == eot_id))
                buf, n = [], 0
    if n:
        chunk = np.concatenate(buf)
        yield chunk, int(np.count_nonzero(chunk == eot_id))


def write_split(
    storage: Store,
    split: Split,
    docs: Iterable[np.ndarray],
    *,
    vocab_size: int,
    eot_id: int,
    max_tokens: int,
) -> list[WrittenShard]:
    """Write one split's shards (``<split>-00000.bin`` …) and return their manifest entries.

    ``documents`` counts end-of-text ids in the shard: the documents that *end* there (a
    literal "<|endoftext|>" inside a document is encoded as text, so it never counts).
    """
    out = []
    for i, (tokens, ndocs) in enumerate(_chunks(docs, max_tokens, eot_id)):
        data = encode_shard(tokens, vocab_size, eot_id)
        name = shard_name(split, i)
        etag = storage.put(name, data)
        info = ShardInfo(
            path=name,
            split=split,
            tokens=int(tokens.size),
            documents=ndocs,
            bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )
        out.append(WrittenShard(info, etag))
    return out


def write_manifest(storage: Store, manifest: Manifest) -> str:
    """The commit point: readers trust only what a manifest lists, so this is written last."""
    storage.put(MANIFEST_NAME, manifest.to_json().encode("utf-8"))
    return storage.describe(MANIFEST_NAME)
