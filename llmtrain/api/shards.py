"""Contract (a): token shard files and ``manifest.json``.

Written by the data pipeline (``llmtrain.runtime.data.shard``), read by the loader.
Standard library only, so every process can parse shards without the pipeline's deps.

Shard file layout (little-endian), ``HEADER_SIZE`` = 256 bytes of header, then tokens::

    offset  size  field
    0       8     magic            b"LLMTSHRD"
    8       4     version          uint32 (= 1)
    12      4     dtype code       uint32 (1 = uint16, 2 = uint32)
    16      4     vocab size       uint32 (tokenizer vocabulary, not the padded table)
    20      4     end-of-text id   uint32
    24      8     token count      uint64
    32      224   zero padding     (room for later versions without moving the data)
    256     n·s   tokens           n = token count, s = 2 (uint16) or 4 (uint32)

Loss-mask shard (task data only), the same name with ``.mask`` for ``.bin``: ``HEADER_SIZE``
bytes of header (magic b"LLMTMASK", version uint32, token count uint64, zero padding), then one
uint8 per token of its token shard: 1 = the token is a target the loss covers (an assistant
turn's content and end of turn), 0 = context only (prompt, system, template markup, padding).
It is verified like a token shard (size, count, sha256 in the manifest's ``ShardInfo.mask``).
Plain-text data has no mask shards: every token counts.

The dtype is uint16 iff the highest id (vocab size − 1) ≤ 65535, else uint32. A file whose
size differs from ``HEADER_SIZE + n·s`` is truncated or corrupt. Every shard's sha256
(over the whole file) is listed in the manifest; ``manifest.json`` is written **last**,
so readers trust only the shards a manifest lists.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

MAGIC = b"LLMTSHRD"
FORMAT_VERSION = 1
HEADER_SIZE = 256
HEADER_STRUCT = struct.Struct("<8sIIIIQ")  # 32 bytes, then zero padding to HEADER_SIZE
DTYPE_CODES: dict[str, int] = {"uint16": 1, "uint32": 2}
DTYPE_SIZES: dict[str, int] = {"uint16": 2, "uint32": 4}
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
MANIFEST_VERSION = 1
MASK_MAGIC = b"LLMTMASK"
MASK_HEADER_STRUCT = struct.Struct("<8sIQ")  # 20 bytes, then zero padding to HEADER_SIZE
# Held-out task prompts (task data only): one JSON line per validation record,
# {"id": str, "messages": [the turns before the final assistant turn], "reference": str}.
TASK_EVAL_NAME = "task-eval.jsonl"

Split = Literal["train", "validation"]


class ShardFormatError(ValueError):
    """A shard or manifest does not match the documented format."""


def dtype_for_vocab(vocab_size: int) -> str:
    """uint16 iff every id (0 … vocab_size − 1) fits in 16 bits."""
    if vocab_size < 1:
        raise ShardFormatError(f"vocab size must be positive, got {vocab_size}")
    if vocab_size - 1 <= 0xFFFF:
        return "uint16"
    if vocab_size - 1 <= 0xFFFFFFFF:
        return "uint32"
    raise ShardFormatError(f"vocab size {vocab_size} does not fit in uint32 token ids")


@dataclass(frozen=True)
class ShardHeader:
    dtype: str
    vocab_size: int
    eot_id: int
    token_count: int
    version: int = FORMAT_VERSION

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def file_size(self) -> int:
        return HEADER_SIZE + self.token_count * self.itemsize

    def pack(self) -> bytes:
        if self.dtype not in DTYPE_CODES:
            raise ShardFormatError(f"unknown dtype {self.dtype!r}")
        if dtype_for_vocab(self.vocab_size) != self.dtype:
            raise ShardFormatError(
                f"vocab size {self.vocab_size} requires {dtype_for_vocab(self.vocab_size)}, not {self.dtype}"
            )
        head = HEADER_STRUCT.pack(
            MAGIC, self.version, DTYPE_CODES[self.dtype], self.vocab_size, self.eot_id, self.token_count
        )
        return head + b"\0" * (HEADER_SIZE - len(head))

    @classmethod
    def unpack(cls, data: bytes, *, name: str = "shard") -> ShardHeader:
        if len(data) < HEADER_SIZE:
            raise ShardFormatError(f"{name}: header is {len(data)} bytes, expected {HEADER_SIZE}")
        magic, version, code, vocab, eot, count = HEADER_STRUCT.unpack_from(data)
        if magic != MAGIC:
            raise ShardFormatError(f"{name}: bad magic {magic!r}, not an llmtrain shard")
        if version != FORMAT_VERSION:
            raise ShardFormatError(f"{name}: format version {version}, this reader knows {FORMAT_VERSION}")
        dtypes = {v: k for k, v in DTYPE_CODES.items()}
        if code not in dtypes:
            raise ShardFormatError(f"{name}: unknown dtype code {code}")
        return cls(dtype=dtypes[code], vocab_size=vocab, eot_id=eot, token_count=count, version=version)

    def check_size(self, actual_size: int, *, name: str = "shard") -> None:
        if actual_size != self.file_size:
            raise ShardFormatError(
                f"{name}: file is {actual_size} bytes but its header promises {self.file_size} "
                f"({self.token_count} tokens of {self.dtype}): truncated or corrupt"
            )


def mask_name(token_shard: str) -> str:
    """The loss-mask shard beside a token shard: ``train-00000.bin`` → ``train-00000.mask``."""
    return token_shard[: -len(".bin")] + ".mask" if token_shard.endswith(".bin") else token_shard + ".mask"


def pack_mask(mask: bytes) -> bytes:
    """Header + one byte (0/1) per token."""
    head = MASK_HEADER_STRUCT.pack(MASK_MAGIC, FORMAT_VERSION, len(mask))
    return head + b"\0" * (HEADER_SIZE - len(head)) + mask


def unpack_mask(data: bytes, *, name: str = "mask shard") -> bytes:
    """The mask bytes of a mask shard, after checking magic, version and size."""
    if len(data) < HEADER_SIZE:
        raise ShardFormatError(f"{name}: header is {len(data)} bytes, expected {HEADER_SIZE}")
    magic, version, count = MASK_HEADER_STRUCT.unpack_from(data)
    if magic != MASK_MAGIC:
        raise ShardFormatError(f"{name}: bad magic {magic!r}, not an llmtrain mask shard")
    if version != FORMAT_VERSION:
        raise ShardFormatError(f"{name}: format version {version}, this reader knows {FORMAT_VERSION}")
    if len(data) != HEADER_SIZE + count:
        raise ShardFormatError(
            f"{name}: file is {len(data)} bytes but its header promises {HEADER_SIZE + count} "
            f"({count} mask bytes): truncated or corrupt"
        )
    return data[HEADER_SIZE:]


@dataclass
class MaskInfo:
    path: str  # relative, mask_name(token shard path)
    bytes: int
    sha256: str
    targets: int  # tokens with mask 1 (what the loss covers)


@dataclass
class ShardInfo:
    path: str  # relative to the manifest's directory/prefix
    split: Split
    tokens: int
    documents: int
    bytes: int
    sha256: str
    mask: MaskInfo | None = None  # task data: the loss-mask shard beside this one


@dataclass
class SourceStats:
    name: str
    documents: int  # kept after cleaning/dedup
    tokens: int  # training tokens after mixture sampling
    target_fraction: float | None  # from the spec's weights; None = natural proportions
    realised_fraction: float
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. python version, corpus hash


@dataclass
class TokenizerInfo:
    path: str  # relative, normally TOKENIZER_NAME
    sha256: str
    vocab_size: int
    eot_id: int
    eot_token: str


@dataclass
class Manifest:
    fingerprint: str  # hash of sources, cleaning, tokenizer config and seed
    tokenizer: TokenizerInfo
    dtype: str
    shards: list[ShardInfo]
    sources: list[SourceStats]
    dropped: dict[str, int]  # cleaning step -> documents dropped
    seed: int
    version: int = MANIFEST_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def split_shards(self, split: Split) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]

    def split_tokens(self, split: Split) -> int:
        return sum(s.tokens for s in self.split_shards(split))

    @property
    def validation_set(self) -> str:
        """Which text the validation split holds, in words (manifests before validationSources
        only had the hash split)."""
        named = self.extra.get("validation_set")
        if named:
            return str(named)
        frac = self.extra.get("validation_fraction")
        return f"hash split: {frac:g} of sources" if isinstance(frac, int | float) else "hash split"

    @property
    def masked(self) -> bool:
        """Task data: the shards carry loss masks (all or none do)."""
        return any(s.mask is not None for s in self.shards)

    @property
    def task(self) -> dict[str, Any] | None:
        """Task data's summary (format, records, bad records by reason with examples, packing,
        context length); None for plain text."""
        got = self.extra.get("task")
        return dict(got) if isinstance(got, dict) else None

    @property
    def task_eval(self) -> dict[str, Any] | None:
        """``{"path": TASK_EVAL_NAME, "records": N}``: the held-out task prompts (task data only)."""
        got = self.extra.get("task_eval")
        return dict(got) if isinstance(got, dict) else None

    def to_json(self) -> str:
        raw = asdict(self)
        for shard in raw["shards"]:  # plain text: no mask key, the manifest reads as before
            if shard["mask"] is None:
                del shard["mask"]
        # sort_keys + fixed separators: byte-identical manifests for identical inputs.
        return json.dumps(raw, sort_keys=True, indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        try:
            raw = json.loads(text)
            if raw.get("version") != MANIFEST_VERSION:
                raise ShardFormatError(
                    f"manifest version {raw.get('version')}, this reader knows {MANIFEST_VERSION}"
                )
            return cls(
                fingerprint=raw["fingerprint"],
                tokenizer=TokenizerInfo(**raw["tokenizer"]),
                dtype=raw["dtype"],
                shards=[_shard_info(s) for s in raw["shards"]],
                sources=[SourceStats(**s) for s in raw["sources"]],
                dropped=dict(raw["dropped"]),
                seed=raw["seed"],
                version=raw["version"],
                extra=dict(raw.get("extra", {})),
            )
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ShardFormatError(f"manifest does not match the documented schema: {e}") from e


def _shard_info(raw: dict[str, Any]) -> ShardInfo:
    mask = raw.get("mask")
    return ShardInfo(**{**raw, "mask": MaskInfo(**mask) if mask is not None else None})
