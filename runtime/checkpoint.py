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

Imports torch and the standard library; boto3 lazily, for s3:// only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.futures import Future

MARKER = "COMPLETE"
METADATA = ".metadata"
_STEP_RE = re.compile(r"^step_(\d{8,})$")


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

    def delete_dir(self, name: str) -> None:
        shutil.rmtree(self.root / name, ignore_errors=True)


class S3Store:
    """s3://bucket/prefix; the endpoint comes from AWS_ENDPOINT_URL(_S3) like any boto3 client."""

    def __init__(self, uri: str) -> None:
        import boto3  # lazily: the GPU benchmark machine has no boto3 and no s3:// checkpoints

        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"{uri!r} has no bucket (spec.checkpoint.uri: s3://bucket/prefix)")
        self.uri = uri.rstrip("/")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.client = boto3.client("s3")

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_file(self, local: Path, key: str) -> None:
        self.client.upload_file(str(local), self.bucket, self._key(key))

    def get_file(self, key: str, local: Path) -> None:
        self.client.download_file(self.bucket, self._key(key), str(local))

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return bytes(self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read())
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

    def delete_dir(self, name: str) -> None:
        keys = [
            {"Key": obj["Key"]}
            for page in self._objects(self._key(name) + "/")
            for obj in page.get("Contents", [])
        ]
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys[i : i + 1000]})


def open_store(uri: str) -> Store:
    if uri.startswith("s3://"):
        return S3Store(uri)
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


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _world() -> tuple[int, int]:
    if _distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class Lineage:
    """The checkpoints of one run under ``uri``: save, find the newest complete, load, prune."""

    def __init__(self, uri: str, keep_last: int) -> None:
        if keep_last < 1:
            raise ValueError("spec.checkpoint.keepLast must be at least 1")
        self.store = open_store(uri)
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
        if dist.is_available() and dist.is_initialized():
            dist.broadcast_object_list(found, src=0)
        return None if found[0] is None else self.info(found[0])

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> str:
        """Collective: every rank saves its shards, rank 0 writes metadata then the marker."""
        rank, world_size = _world()
        name = step_dir(step)
        staging = Path(tempfile.mkdtemp(prefix=f"llmtrain-ckpt-{step}-r{rank}-"))
        try:
            dcp.save(
                state,
                storage_writer=FileSystemWriter(staging, single_file_per_rank=True),
                no_dist=not _distributed(),
            )
            for path in sorted(staging.iterdir()):
                if path.name != METADATA:
                    self.store.put_file(path, f"{name}/{path.name}")
            _barrier()  # every rank's shards are uploaded
            if rank == 0:
                self.store.put_file(staging / METADATA, f"{name}/{METADATA}")
                marker = {"step": step, "world_size": world_size, "time": time.time(), **meta}
                self.store.put_bytes(f"{name}/{MARKER}", json.dumps(marker, sort_keys=True).encode())
                self._prune(step)
            _barrier()  # the marker exists before anyone moves on
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.uri_of(step)

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
        rank, _ = _world()
        name = step_dir(info.step)
        staging = Path(tempfile.mkdtemp(prefix=f"llmtrain-load-{info.step}-r{rank}-"))
        try:
            self.store.get_file(f"{name}/{METADATA}", staging / METADATA)
            dcp.load(
                state,
                storage_reader=_DownloadingReader(staging, self.store, name),
                no_dist=not _distributed(),
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)


class _DownloadingReader(FileSystemReader):
    """A FileSystemReader that fetches from the store only the files its read plan needs."""

    def __init__(self, staging: Path, store: Store, name: str) -> None:
        super().__init__(staging)
        self._staging, self._store, self._name = staging, store, name

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        needed = {self.storage_data[item.storage_index].relative_path for item in plan.items}
        for relative in sorted(needed):
            local = self._staging / relative
            if not local.exists():
                self._store.get_file(f"{self._name}/{relative}", local)
        return super().read_data(plan, planner)
