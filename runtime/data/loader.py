"""Stream shards back to training ranks: the :class:`~llmtrain.api.loader.TokenLoader` protocol.

Construct one per rank (torch + standard library only; boto3 is imported lazily for s3://)::

    loader = ShardLoader(
        uri_or_dir,                 # directory or s3://bucket/prefix holding manifest.json
        split="train",              # or "validation"
        rank=0, world_size=1,       # this rank / all ranks (spec.resources.workers)
        micro_batch=16,             # sequences per yielded batch
        context_length=256,         # batches are int64 [micro_batch, context_length + 1]
        seed=0,                     # shuffle seed (spec.training.seed)
        storage=None,               # a Store, or S3Options (endpoint/region) for s3:// URIs
        prefetch_batches=16,        # bounded queue filled by one background thread
    )
    for batch in loader: ...        # the rest of the current epoch; iter() again: next epoch
    loader.state_dict()             # {"rank_<r>": {...}} counting batches *yielded*
    open_loader(...)                # same arguments, returns a ShardLoader

Windows: every shard of the split is cut into ``(tokens − 1) // context_length``
non-overlapping windows of ``context_length + 1`` tokens (the last token of a window is the
first of the next: each token is predicted once). Documents are packed across EOT boundaries.

Global window stream, per epoch: train — the shard order is a seeded permutation of
(seed, epoch), and each shard's windows a seeded permutation of (seed, epoch, shard);
validation — manifest order, no shuffle, and every ``iter()`` starts again at the first
window (the same first windows every time). Global step ``b`` takes stream positions
``[b·W·mb, (b+1)·W·mb)``; rank ``r`` gets the ``r``-th slice of ``mb``. So every rank yields
exactly ``steps_per_epoch = N // (W·mb)`` batches, ranks are disjoint, and the last
``dropped_windows = N − steps·W·mb`` windows of each epoch are dropped (and reported).

Resume: the state records the global position ``batches·W·mb``. A loader with another world
size continues from exactly that position when it is a multiple of its ``W'·mb``; otherwise
it raises :class:`LoaderResumeError` naming ``spec.resources.workers``.

Task data (shards with loss masks, runtime/data/task.py): each batch is a pair ``(tokens,
mask)`` of the same shape, ``mask`` bool, True where the token is a target the loss covers (the
training loop uses ``mask[:, 1:]`` beside ``targets = tokens[:, 1:]``). The mask shard of each
token shard is downloaded and verified with it. Plain-text data yields the tokens alone.

Threads, not processes: one producer thread gathers batches into a bounded queue and asks a
second (download) thread for the *next* shard while the current one is being consumed, so a
shard download overlaps training. Shards are verified (size from the header, sha256 from the
manifest) as they arrive; a bad shard raises in the training loop, naming the object.
"""

from __future__ import annotations

import array
import hashlib
import queue
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from llmtrain.runtime.store import ObjectMissing, StorageError, Store, open_store

from llmtrain.api.loader import LoaderResumeError, rank_key
from llmtrain.api.s3 import S3Options
from llmtrain.api.shards import (
    HEADER_SIZE,
    MANIFEST_NAME,
    Manifest,
    ShardFormatError,
    ShardHeader,
    ShardInfo,
    dtype_for_vocab,
    unpack_mask,
)

_STOP = object()


class LoaderError(RuntimeError):
    """The data cannot feed this loader configuration; the message names the spec field."""


@dataclass(frozen=True)
class _Shard:
    index: int  # position in the split's manifest list
    info: ShardInfo
    windows: int


def _decode_tokens(payload: bytes, dtype: str) -> torch.Tensor:
    """Little-endian ids → int32 (uint16 shards) or int64 (uint32 shards) tensor."""
    code = "H" if dtype == "uint16" else "I"
    if sys.byteorder != "little":  # pragma: no cover - x86/arm64 are little-endian
        arr = array.array(code, payload)
        arr.byteswap()
        payload = arr.tobytes()
    raw = torch.frombuffer(bytearray(payload), dtype=torch.uint16 if dtype == "uint16" else torch.uint32)
    # Index-gather is not implemented for unsigned tensors: widen once per shard.
    return raw.to(torch.int32 if dtype == "uint16" else torch.int64)


def read_verified_shard(storage: Store, info: ShardInfo, manifest: Manifest) -> torch.Tensor:
    """Download one shard, check size, header and sha256 against the manifest; return its ids."""
    name = storage.describe(info.path)
    data = storage.get(info.path)
    header = ShardHeader.unpack(data, name=name)
    header.check_size(len(data), name=name)
    if len(data) != info.bytes or header.token_count != info.tokens:
        raise ShardFormatError(
            f"{name}: {len(data)} bytes / {header.token_count} tokens, but the manifest lists "
            f"{info.bytes} bytes / {info.tokens} tokens: the shard was replaced or truncated"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != info.sha256:
        raise ShardFormatError(
            f"{name}: sha256 {digest[:16]}… does not match the manifest's {info.sha256[:16]}…: "
            "corrupt or replaced shard; re-run `llmtrain data prepare --overwrite`"
        )
    if header.dtype != manifest.dtype or header.eot_id != manifest.tokenizer.eot_id:
        raise ShardFormatError(
            f"{name}: header (dtype {header.dtype}, eot {header.eot_id}) disagrees with the manifest"
        )
    if (
        header.vocab_size != manifest.tokenizer.vocab_size
        or dtype_for_vocab(header.vocab_size) != header.dtype
    ):
        raise ShardFormatError(
            f"{name}: vocab size {header.vocab_size} (manifest: {manifest.tokenizer.vocab_size}) does not fit "
            f"dtype {header.dtype}: the ids cannot be read; re-run `llmtrain data prepare --overwrite` "
            "(spec.data.tokenizer)"
        )
    return _decode_tokens(data[HEADER_SIZE:], header.dtype)


def read_verified_mask(storage: Store, info: ShardInfo) -> torch.Tensor:
    """The loss-mask shard beside ``info``, checked against the manifest; bool per token."""
    assert info.mask is not None
    name = storage.describe(info.mask.path)
    data = storage.get(info.mask.path)
    body = unpack_mask(data, name=name)
    if len(data) != info.mask.bytes or len(body) != info.tokens:
        raise ShardFormatError(
            f"{name}: {len(data)} bytes / {len(body)} mask entries, but the manifest lists "
            f"{info.mask.bytes} bytes for {info.tokens} tokens: the mask shard was replaced or truncated"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != info.mask.sha256:
        raise ShardFormatError(
            f"{name}: sha256 {digest[:16]}… does not match the manifest's {info.mask.sha256[:16]}…: "
            "corrupt or replaced mask shard; re-run `llmtrain data prepare --overwrite`"
        )
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).bool()


def _read_shard(storage: Store, info: ShardInfo, manifest: Manifest) -> Any:
    """A shard's ids, or (ids, mask) for task data."""
    tokens = read_verified_shard(storage, info, manifest)
    return tokens if info.mask is None else (tokens, read_verified_mask(storage, info))


def _seeded_perm(n: int, *parts: int) -> torch.Tensor:
    """A permutation of range(n) that depends only on ``parts`` (same on every machine)."""
    seed = int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2**63 - 1)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)


_TOKEN_BYTES: dict[str, list[int]] = {}  # tokenizer sha256 → bytes per id


class ShardLoader:
    """One rank's view of a split. See the module docstring for the window stream."""

    def __init__(
        self,
        uri_or_dir: str,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        micro_batch: int = 1,
        context_length: int = 256,
        seed: int = 0,
        storage: Store | S3Options | None = None,
        *,
        prefetch_batches: int = 16,
        shuffle: bool | None = None,
    ) -> None:
        if split not in ("train", "validation"):
            raise ValueError(f"split must be 'train' or 'validation', not {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if micro_batch < 1 or context_length < 1:
            raise ValueError("micro_batch and context_length must be positive")
        self.uri = uri_or_dir
        self.split = split
        self.rank = rank
        self.world_size = world_size
        self.micro_batch = micro_batch
        self.context_length = context_length
        self.seed = seed
        self.shuffle = (split == "train") if shuffle is None else shuffle
        # Validation restarts at the first window on every iter(): the same windows each time.
        self.restart_each_iter = split == "validation"
        self.prefetch_batches = max(1, prefetch_batches)
        self.storage = storage if isinstance(storage, Store) else open_store(uri_or_dir, storage)
        try:
            self.manifest = Manifest.from_json(self.storage.get(MANIFEST_NAME))
        except StorageError as e:
            if isinstance(e, ObjectMissing):
                raise LoaderError(
                    f"no {MANIFEST_NAME} at {self.storage.describe(MANIFEST_NAME)}: run `llmtrain data "
                    f"prepare` for spec.data.outputUri first ({e})"
                ) from e
            # Present but unreadable (retries spent on a broken connection, access denied):
            # "run prepare first" would send the user the wrong way.
            raise LoaderError(f"cannot read the data manifest: {e}") from e
        self.masked = self.manifest.masked
        task = self.manifest.task
        if task is not None and task.get("context_length") != context_length:
            raise LoaderError(
                f"{self.uri} holds task records packed for contextLength {task.get('context_length')}, not "
                f"{context_length}: re-run `llmtrain data prepare` for this spec.model.architecture.contextLength"
            )
        self.shards = [
            _Shard(i, s, max(0, (s.tokens - 1) // context_length))
            for i, s in enumerate(self.manifest.split_shards(split))  # type: ignore[arg-type]
        ]
        self.total_windows = sum(s.windows for s in self.shards)
        per_step = world_size * micro_batch
        self._steps = self.total_windows // per_step
        if self._steps == 0:
            raise LoaderError(
                f"the {split} split of {self.uri} has {self.total_windows} windows of "
                f"{context_length}+1 tokens, fewer than workers × microBatchSize = {per_step}: add data, "
                "raise spec.data.validationFraction (validation), or lower spec.resources.workers / "
                "spec.training.batch.microBatchSize"
            )
        self.dropped_windows = self.total_windows - self._steps * per_step
        self._epoch = 0
        self._batches = 0  # yielded to the caller in the current epoch
        self._generation = 0  # bumps to retire a running producer
        self.wait_seconds = 0.0  # time the caller spent blocked on the queue
        self.batches_served = 0
        self._queue: queue.Queue[Any] | None = None  # the running producer's queue (tests peek)

    # ------------------------------------------------------------------ protocol

    @property
    def steps_per_epoch(self) -> int:
        return self._steps

    @property
    def epoch(self) -> int:
        return self._epoch + 1 if self._batches >= self._steps else self._epoch

    @property
    def vocab_size(self) -> int:
        return self.manifest.tokenizer.vocab_size

    def token_bytes(self) -> list[int] | None:
        """UTF-8 bytes per token id, for bits per byte (cached per tokenizer: a validation
        loader is made at every validation); None when the data has no tokenizer file
        (shards written by hand, as the benches do)."""
        key = self.manifest.tokenizer.sha256
        if key not in _TOKEN_BYTES:
            from llmtrain.runtime.data.tokenize import token_byte_lengths

            try:
                text = self.storage.get(self.manifest.tokenizer.path).decode()
            except StorageError:
                return None
            _TOKEN_BYTES[key] = token_byte_lengths(text)
        return _TOKEN_BYTES[key]

    def state_dict(self) -> dict[str, Any]:
        return {
            rank_key(self.rank): {
                "epoch": self._epoch,
                "batches": self._batches,
                "global_windows": self._batches * self.world_size * self.micro_batch,
                "world_size": self.world_size,
                "micro_batch": self.micro_batch,
                "context_length": self.context_length,
                "seed": self.seed,
                "split": self.split,
                "fingerprint": self.manifest.fingerprint,
            }
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        entry = state.get(rank_key(self.rank))
        if entry is None:  # a rank that did not exist at save time: every rank's entry agrees
            entries = [v for k, v in state.items() if k.startswith("rank_")]
            if not entries:
                raise LoaderResumeError("loader state has no rank_<r> entry")
            entry = entries[0]
        for name, mine, field_name in (
            ("fingerprint", self.manifest.fingerprint, "spec.data"),
            ("context_length", self.context_length, "spec.model.architecture.contextLength"),
            ("seed", self.seed, "spec.training.seed"),
            ("split", self.split, "split"),
        ):
            if entry.get(name) != mine:
                raise LoaderResumeError(
                    f"loader state was saved with {name}={entry.get(name)!r}, this loader has {mine!r}: "
                    f"{field_name} changed since the checkpoint"
                )
        consumed = int(entry["global_windows"])
        per_step = self.world_size * self.micro_batch
        if consumed % per_step:
            raise LoaderResumeError(
                f"the checkpoint stopped after {consumed} windows (world size {entry['world_size']} × "
                f"micro batch {entry['micro_batch']} × {entry['batches']} batches), not a multiple of "
                f"this run's {self.world_size} × {self.micro_batch}: the data position cannot continue "
                "exactly; resume with the original spec.resources.workers "
                f"({entry['world_size']}) or restart from a checkpoint at a compatible step"
            )
        self._retire()
        self._epoch = int(entry["epoch"])
        self._batches = consumed // per_step

    def __iter__(self) -> Iterator[Any]:  # tokens, or (tokens, mask) for task data
        if self.restart_each_iter:
            self._batches = 0
        if self._batches >= self._steps:
            self._epoch += 1
            self._batches = 0
        self._retire()
        generation = self._generation
        epoch, start = self._epoch, self._batches
        q: queue.Queue[Any] = queue.Queue(maxsize=self.prefetch_batches)
        self._queue = q
        stop = threading.Event()
        producer = threading.Thread(
            target=self._produce, args=(epoch, start, q, stop), daemon=True, name=f"loader-r{self.rank}"
        )
        producer.start()
        try:
            for _ in range(start, self._steps):
                t0 = time.perf_counter()
                item = q.get()
                self.wait_seconds += time.perf_counter() - t0
                if isinstance(item, BaseException):
                    raise item
                if generation != self._generation:  # load_state_dict() was called meanwhile
                    return
                self._batches += 1  # counted when handed over, so state_dict() right after is exact
                self.batches_served += 1
                yield item
        finally:
            stop.set()
            while producer.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    producer.join(timeout=0.05)

    # ------------------------------------------------------------------ stream

    def _retire(self) -> None:
        self._generation += 1

    def epoch_order(self, epoch: int) -> list[tuple[_Shard, torch.Tensor]]:
        """The epoch's global window stream as (shard, window-index order) segments."""
        if not self.shuffle:
            return [(s, torch.arange(s.windows)) for s in self.shards]
        order = _seeded_perm(len(self.shards), self.seed, epoch)
        return [
            (self.shards[int(i)], _seeded_perm(self.shards[int(i)].windows, self.seed, epoch, int(i)))
            for i in order
        ]

    def rank_positions(self, batch: int) -> range:
        """Global stream positions of this rank's ``batch``-th batch in an epoch."""
        base = batch * self.world_size * self.micro_batch + self.rank * self.micro_batch
        return range(base, base + self.micro_batch)

    def _produce(self, epoch: int, start: int, q: queue.Queue[Any], stop: threading.Event) -> None:
        """Producer thread: gather this rank's batches [start, steps) of ``epoch`` into ``q``."""
        segments = self.epoch_order(epoch)
        seg_start = []
        acc = 0
        for s, _ in segments:
            seg_start.append(acc)
            acc += s.windows
        loaded: dict[int, Any] = {}  # a shard's ids, or (ids, mask) for task data
        pending: dict[int, Future[Any]] = {}
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"shard-dl-r{self.rank}")

        def fetch(seg: int) -> Future[Any]:
            if seg not in pending:
                info = segments[seg][0].info
                pending[seg] = pool.submit(_read_shard, self.storage, info, self.manifest)
            return pending[seg]

        try:
            seg = 0
            L = self.context_length
            offsets = torch.arange(L + 1)
            for b in range(start, self._steps):
                if stop.is_set():
                    return
                rows = []
                masks = []
                for pos in self.rank_positions(b):
                    while pos >= seg_start[seg] + segments[seg][0].windows:
                        seg += 1
                    if seg not in loaded:
                        loaded[seg] = fetch(seg).result()
                        for old in [k for k in loaded if k < seg]:  # never needed again this epoch
                            del loaded[old]
                            pending.pop(old, None)
                        if seg + 1 < len(segments):
                            fetch(seg + 1)  # the next shard downloads while this one is consumed
                    w = int(segments[seg][1][pos - seg_start[seg]])
                    if self.masked:
                        rows.append(loaded[seg][0][w * L + offsets])
                        masks.append(loaded[seg][1][w * L + offsets])
                    else:
                        rows.append(loaded[seg][w * L + offsets])
                tokens = torch.stack(rows).to(torch.int64)
                batch = (tokens, torch.stack(masks)) if self.masked else tokens
                while not stop.is_set():
                    try:
                        q.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # surfaces in the training loop, not a silent dead thread
            if not stop.is_set():
                q.put(e)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ helpers

    def windows_of_epoch(self, epoch: int) -> list[tuple[int, int]]:
        """(shard index, window index) of this rank's windows in an epoch, in yield order (tests)."""
        segments = self.epoch_order(epoch)
        flat = [(s.index, int(w)) for s, perm in segments for w in perm]
        return [flat[p] for b in range(self._steps) for p in self.rank_positions(b)]

    def stats(self) -> dict[str, float]:
        return {"llmtrain_data_wait_seconds": self.wait_seconds, "batches": float(self.batches_served)}


def open_loader(
    uri_or_dir: str,
    split: str = "train",
    rank: int = 0,
    world_size: int = 1,
    micro_batch: int = 1,
    context_length: int = 256,
    seed: int = 0,
    storage: Store | S3Options | None = None,
    **kwargs: Any,
) -> ShardLoader:
    """Factory with :class:`ShardLoader`'s signature (what the training loop calls)."""
    return ShardLoader(
        uri_or_dir, split, rank, world_size, micro_batch, context_length, seed, storage, **kwargs
    )
