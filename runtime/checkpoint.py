"""Distributed checkpoints in a lineage under one URI (s3://bucket/prefix or a local directory).

Layout::

    <uri>/step_00000100/__0_0.distcp    rank 0's shards (torch.distributed.checkpoint)
    <uri>/step_00000100/__1_0.distcp    rank 1's shards
    <uri>/step_00000100/.metadata       DCP metadata, uploaded by rank 0 after every rank's shards
    <uri>/step_00000100/COMPLETE        completion marker (JSON), uploaded LAST by rank 0

A checkpoint without ``COMPLETE`` does not exist as far as loading is concerned. Each rank
writes into its own local staging directory and uploads its own files, so nothing relies on a
shared file system. Loading downloads ``.metadata`` and then only the shard files the rank's
read plan touches (a resharded load may touch several).

Integrity: the marker lists every file of the checkpoint with its size and sha256 (``files``),
gathered from all ranks; rank 0 writes it only after listing the store and finding each file
there at its size, and every load checks each downloaded file against it, so a corrupted or
replaced file is named (file and URI) and never loaded. Markers written before ``files`` existed
load unchecked.

S3 access goes through :func:`llmtrain.runtime.data.storage.s3_client` (botocore's ``standard``
retries: 503 SlowDown, resets) and :func:`~llmtrain.runtime.data.storage.read_retrying` for
bodies that break off; ``upload_file``/``download_file`` are s3transfer's, which retries a
broken download body itself.

Imports torch and the standard library; boto3 lazily, for s3:// only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

# torch is imported where a checkpoint is saved or loaded, not here: the driver reads the
# lineage (which steps are complete) before training without paying torch's import (about
# 1.5 s of the time to the first step).

MARKER = "COMPLETE"
METADATA = ".metadata"
_STEP_RE = re.compile(r"^step_(\d{8,})$")


class CheckpointCorruptError(RuntimeError):
    """A checkpoint file does not match the size/sha256 its COMPLETE marker lists."""


def file_digest(path: Path) -> dict[str, Any]:
    """``{"bytes": n, "sha256": hex}`` of a local file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def step_dir(step: int) -> str:
    return f"step_{step:08d}"


class Store(Protocol):
    """The few object-store operations a checkpoint lineage needs."""

    uri: str

    def put_file(self, local: Path, key: str) -> None: ...
    def get_file(self, key: str, local: Path) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes | None: ...
    def list_dirs(self) -> list[str]: ...
    def sizes(self, name: str) -> dict[str, int]: ...
    def delete_dir(self, name: str) -> None: ...


class LocalStore:
    def __init__(self, root: str) -> None:
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def put_file(self, local: Path, key: str) -> None:
        dest = self.root / key
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.copyfile(local, tmp)
        os.replace(tmp, dest)  # readers never see half a file

    def get_file(self, key: str, local: Path) -> None:
        shutil.copyfile(self.root / key, local)

    def put_bytes(self, key: str, data: bytes) -> None:
        dest = self.root / key
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, dest)

    def get_bytes(self, key: str) -> bytes | None:
        path = self.root / key
        return path.read_bytes() if path.is_file() else None

    def list_dirs(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def sizes(self, name: str) -> dict[str, int]:
        """Size of every file in the directory ``name`` (relative names)."""
        base = self.root / name
        return {p.name: p.stat().st_size for p in base.iterdir() if p.is_file()} if base.is_dir() else {}

    def delete_dir(self, name: str) -> None:
        shutil.rmtree(self.root / name, ignore_errors=True)


class S3Store:
    """s3://bucket/prefix at ``options``' endpoint and region (an ``S3Options``: a run passes
    spec.storage's). Without options, boto3's own defaults (AWS_ENDPOINT_URL(_S3),
    AWS_DEFAULT_REGION), as for the command-line tools run by hand."""

    def __init__(self, uri: str, options: Any = None) -> None:
        # lazily: the GPU benchmark machine has no boto3 and no s3:// checkpoints
        from llmtrain.runtime.data.storage import S3Options, s3_client

        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"{uri!r} has no bucket (spec.checkpoint.uri: s3://bucket/prefix)")
        self.uri = uri.rstrip("/")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        # No options (or no endpoint in them): boto3 takes AWS_ENDPOINT_URL(_S3) from the environment.
        self.options = options or S3Options(region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
        self.client = s3_client(self.options)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_file(self, local: Path, key: str) -> None:
        self.client.upload_file(str(local), self.bucket, self._key(key))

    def get_file(self, key: str, local: Path) -> None:
        self.client.download_file(self.bucket, self._key(key), str(local))

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_bytes(self, key: str) -> bytes | None:
        from llmtrain.runtime.data.storage import read_retrying

        def once() -> bytes:
            return bytes(self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read())

        try:
            return read_retrying(once, self.options.max_attempts, f"{self.uri}/{key}")
        except self.client.exceptions.NoSuchKey:
            return None

    def _objects(self, prefix: str, delimiter: str | None = None) -> Iterator[dict[str, Any]]:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        yield from self.client.get_paginator("list_objects_v2").paginate(**kwargs)

    def list_dirs(self) -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        names = []
        for page in self._objects(base, "/"):
            for cp in page.get("CommonPrefixes", []):
                names.append(cp["Prefix"][len(base) :].rstrip("/"))
        return sorted(names)

    def sizes(self, name: str) -> dict[str, int]:
        base = self._key(name) + "/"
        return {
            obj["Key"][len(base) :]: int(obj["Size"])
            for page in self._objects(base)
            for obj in page.get("Contents", [])
        }

    def delete_dir(self, name: str) -> None:
        keys = [
            {"Key": obj["Key"]}
            for page in self._objects(self._key(name) + "/")
            for obj in page.get("Contents", [])
        ]
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys[i : i + 1000]})


def open_store(uri: str, s3: Any = None) -> Store:
    """The store of a lineage; ``s3`` (``S3Options``: spec.storage's endpoint and region) is
    used for s3:// URIs."""
    if uri.startswith("s3://"):
        return S3Store(uri, s3)
    if "://" in uri:
        raise ValueError(
            f"unsupported checkpoint URI {uri!r} (spec.checkpoint.uri: s3://bucket/prefix or a path)"
        )
    return LocalStore(uri)


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    uri: str
    world_size: int
    meta: dict[str, Any]


def _group() -> Any | None:
    """``torch.distributed`` when a process group is up, else None. A process that has not
    imported torch has no group: torch is not imported to find that out."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def _distributed() -> bool:
    return _group() is not None


def _world() -> tuple[int, int]:
    dist = _group()
    if dist is not None:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    dist = _group()
    if dist is not None:
        dist.barrier()


class Lineage:
    """The checkpoints of one run under ``uri``: save, find the newest complete, load, prune."""

    def __init__(self, uri: str, keep_last: int, s3: Any = None) -> None:
        if keep_last < 1:
            raise ValueError("spec.checkpoint.keepLast must be at least 1")
        self.store = open_store(uri, s3)
        self.keep_last = keep_last
        self.protected: int | None = None  # the checkpoint this run resumed from: never deleted

    def uri_of(self, step: int) -> str:
        return f"{self.store.uri}/{step_dir(step)}"

    def _steps(self) -> tuple[list[int], list[int]]:
        complete: list[int] = []
        incomplete: list[int] = []
        for name in self.store.list_dirs():
            m = _STEP_RE.match(name)
            if m is None:
                continue
            step = int(m.group(1))
            (complete if self.store.get_bytes(f"{name}/{MARKER}") is not None else incomplete).append(step)
        return sorted(complete), sorted(incomplete)

    def complete_steps(self) -> list[int]:
        return self._steps()[0]

    def info(self, step: int) -> CheckpointInfo:
        raw = self.store.get_bytes(f"{step_dir(step)}/{MARKER}")
        if raw is None:
            raise FileNotFoundError(f"{self.uri_of(step)} has no {MARKER} marker: it is incomplete")
        marker = json.loads(raw)
        return CheckpointInfo(step=step, uri=self.uri_of(step), world_size=marker["world_size"], meta=marker)

    def latest(self) -> CheckpointInfo | None:
        """Newest complete checkpoint, agreed by all ranks (rank 0 looks, then broadcasts).

        Rank 0 also deletes incomplete checkpoints newer than it: leftovers of a crashed save
        that this run is about to write again.
        """
        rank, _ = _world()
        found: list[int | None] = [None]
        if rank == 0:
            complete, incomplete = self._steps()
            found[0] = complete[-1] if complete else None
            for step in incomplete:
                if found[0] is None or step > found[0]:
                    self.store.delete_dir(step_dir(step))
        dist = _group()
        if dist is not None:
            dist.broadcast_object_list(found, src=0)
        return None if found[0] is None else self.info(found[0])

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> str:
        """Collective: every rank saves its shards, rank 0 writes metadata then the marker."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter

        rank, world_size = _world()
        name = step_dir(step)
        staging = Path(tempfile.mkdtemp(prefix=f"llmtrain-ckpt-{step}-r{rank}-"))
        try:
            dcp.save(
                state,
                storage_writer=FileSystemWriter(staging, single_file_per_rank=True),
                no_dist=not _distributed(),
            )
            files: dict[str, Any] = {}
            for path in sorted(staging.iterdir()):
                files[path.name] = file_digest(path)
                if path.name != METADATA:
                    self.store.put_file(path, f"{name}/{path.name}")
            everyone: list[Any] = [files]
            if _distributed():
                everyone = [None] * world_size
                _group().all_gather_object(everyone, files)  # type: ignore[union-attr]  # also the barrier: all shards uploaded
            if rank == 0:
                listed = {k: v for d in everyone for k, v in d.items()}
                self.store.put_file(staging / METADATA, f"{name}/{METADATA}")
                self._verify_uploaded(name, listed)
                marker = {
                    "step": step,
                    "world_size": world_size,
                    "time": time.time(),
                    **meta,
                    "files": listed,
                }
                self.store.put_bytes(f"{name}/{MARKER}", json.dumps(marker, sort_keys=True).encode())
                self._prune(step)
            _barrier()  # the marker exists before anyone moves on
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.uri_of(step)

    def _verify_uploaded(self, name: str, files: dict[str, Any]) -> None:
        """Every file of the checkpoint is in the store at its size, before the marker exists."""
        found = self.store.sizes(name)
        bad = sorted(f for f, d in files.items() if found.get(f) != d["bytes"])
        if bad:
            raise CheckpointCorruptError(
                f"{self.store.uri}/{name}: after upload {', '.join(bad)} "
                f"{'is' if len(bad) == 1 else 'are'} missing or of the wrong size in the store; "
                f"the checkpoint is left without its {MARKER} marker"
            )

    def _prune(self, newest: int) -> None:
        """Keep the newest ``keep_last`` complete checkpoints and the one resumed from."""
        complete, incomplete = self._steps()
        keep = set(complete[-self.keep_last :]) | {newest}
        if self.protected is not None:
            keep.add(self.protected)
        for step in complete:
            if step not in keep:
                self.store.delete_dir(step_dir(step))
        for step in incomplete:
            if step < newest:  # a crashed save older than a complete one
                self.store.delete_dir(step_dir(step))

    def load(self, info: CheckpointInfo, state: dict[str, Any]) -> None:
        """Fill ``state`` (a DCP state dict with placeholders) from a complete checkpoint."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        rank, _ = _world()
        name = step_dir(info.step)
        staging = Path(tempfile.mkdtemp(prefix=f"llmtrain-load-{info.step}-r{rank}-"))
        expected: dict[str, Any] | None = info.meta.get("files")
        try:
            self.store.get_file(f"{name}/{METADATA}", staging / METADATA)
            verify_file(staging / METADATA, expected, f"{self.uri_of(info.step)}/{METADATA}")
            reader = _downloading_reader(staging, self.store, name, expected, self.uri_of(info.step))
            try:
                dcp.load(state, storage_reader=reader, no_dist=not _distributed())
            except CheckpointException as e:
                # DCP wraps what its reader raised (a BaseException, per rank): a corrupt file
                # comes out as itself, naming the file, not as DCP's per-rank traceback dump.
                for failure in e.failures.values():
                    exc = failure[0] if isinstance(failure, tuple) else failure
                    if isinstance(exc, CheckpointCorruptError):
                        raise exc from e
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def verify_file(local: Path, expected: dict[str, Any] | None, uri: str) -> None:
    """Check a downloaded checkpoint file against the marker's ``files`` (when it has them)."""
    if expected is None:
        return  # a checkpoint from before the marker listed its files
    want = expected.get(local.name)
    if want is None:
        raise CheckpointCorruptError(f"{uri}: not listed in the checkpoint's {MARKER} marker")
    got = file_digest(local)
    if got != want:
        raise CheckpointCorruptError(
            f"{uri}: {got['bytes']} bytes, sha256 {got['sha256'][:16]}…, but the {MARKER} marker "
            f"lists {want['bytes']} bytes, sha256 {want['sha256'][:16]}…: corrupt or replaced "
            "checkpoint file; it was not loaded"
        )


def _downloading_reader(
    staging: Path, store: Store, name: str, expected: dict[str, Any] | None, uri: str
) -> Any:
    """A FileSystemReader that fetches from the store only the files its read plan needs,
    and checks each against the marker before DCP reads it."""
    return _reader_class()(staging, store, name, expected, uri)


@functools.cache
def _reader_class() -> type:
    """The reader's class, made on first use: this module imports without torch."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
    from torch.futures import Future

    class DownloadingReader(FileSystemReader):
        def __init__(
            self, staging: Path, store: Store, name: str, expected: dict[str, Any] | None, uri: str
        ) -> None:
            super().__init__(staging)
            self._staging, self._store, self._name = staging, store, name
            self._expected, self._uri = expected, uri

        def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
            needed = {self.storage_data[item.storage_index].relative_path for item in plan.items}
            for relative in sorted(needed):
                local = self._staging / relative
                if not local.exists():
                    self._store.get_file(f"{self._name}/{relative}", local)
                    verify_file(local, self._expected, f"{self._uri}/{relative}")
            return super().read_data(plan, planner)

    return DownloadingReader
