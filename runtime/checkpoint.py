"""Distributed checkpoints in a lineage under one URI (s3://bucket/prefix or a local directory).

Layout::

    <uri>/step_00000100/__0_0.distcp    rank 0's shards (torch.distributed.checkpoint)
    <uri>/step_00000100/__1_0.distcp    rank 1's shards
    <uri>/step_00000100/.metadata       DCP metadata, uploaded by rank 0 after every rank's shards
    <uri>/step_00000100/COMPLETE        completion marker (JSON), uploaded LAST by rank 0
    <uri>/step_00000100/WRITER          the job that saves it, uploaded FIRST by rank 0
    <uri>/OWNER                         the job the prefix belongs to (runtime/owner.py)

A checkpoint without ``COMPLETE`` does not exist as far as loading is concerned. Each rank
writes into its own local staging directory and uploads its own files, so nothing relies on a
shared file system. Loading downloads ``.metadata`` and then only the shard files the rank's
read plan touches (a resharded load may touch several).

Integrity: the marker lists every file of the checkpoint with its size and sha256 (``files``),
gathered from all ranks; rank 0 writes it only after listing the store and finding each file
there at its size, and every load checks each downloaded file against it, so a corrupted or
replaced file is named (file and URI) and never loaded. Markers written before ``files`` existed
load unchecked.

Ownership: a lineage opened with ``owner`` (the job, ``namespace/name/uid``) publishes and
deletes only as the owner of its prefix (the ``OWNER`` record, checked before each marker and
each clean-up), and deletes only what this job wrote: a complete checkpoint whose marker names it (``owner``), an
incomplete one whose ``WRITER`` does. Checkpoints of a job that owned the prefix before (one
this job took over) or from before owner records existed are resumed from but never deleted.
A lineage opened without ``owner`` (a tuning trial's, a read) is unchecked.

The files go through :mod:`llmtrain.runtime.store` (local or S3, with its retries), the store
the data and the exports use too.

Imports the standard library (torch where a checkpoint is saved or loaded); boto3 lazily, for
s3:// only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtrain.runtime.owner import check as check_owner
from llmtrain.runtime.store import LocalStore, S3Store, Store

from llmtrain.api.s3 import S3Options

# torch is imported where a checkpoint is saved or loaded, not here: the driver reads the
# lineage (which steps are complete) before training without paying torch's import (about
# 1.5 s of the time to the first step).

MARKER = "COMPLETE"
METADATA = ".metadata"
WRITER = "WRITER"
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


def open_lineage_store(uri: str, s3: S3Options | None = None) -> Store:
    """The store of a lineage (``s3``: spec.storage's settings, for s3:// URIs; None: the
    environment's). A local lineage is named by its absolute path; a URI the lineage cannot
    use is a ValueError that names spec.checkpoint.uri."""
    if uri.startswith("s3://"):
        if not uri.removeprefix("s3://").partition("/")[0]:
            raise ValueError(f"{uri!r} has no bucket (spec.checkpoint.uri: s3://bucket/prefix)")
        return S3Store(uri, s3)
    if "://" in uri:
        raise ValueError(
            f"unsupported checkpoint URI {uri!r} (spec.checkpoint.uri: s3://bucket/prefix or a path)"
        )
    return LocalStore(Path(uri).expanduser().resolve())


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

    def __init__(self, uri: str, keep_last: int, s3: S3Options | None = None, owner: str = "") -> None:
        if keep_last < 1:
            raise ValueError("spec.checkpoint.keepLast must be at least 1")
        self.store = open_lineage_store(uri, s3)
        self.keep_last = keep_last
        self.owner = owner  # the writing job's Owner.key; "": unchecked (a trial's lineage, a read)
        self.protected: int | None = None  # the checkpoint this run resumed from: never deleted

    def uri_of(self, step: int) -> str:
        return f"{self.store.uri}/{step_dir(step)}"

    def _scan(self) -> tuple[dict[int, bytes], list[int]]:
        """Complete steps → their marker's bytes; incomplete steps, sorted."""
        complete: dict[int, bytes] = {}
        incomplete: list[int] = []
        for name in self.store.list_dirs():
            m = _STEP_RE.match(name)
            if m is None:
                continue
            step = int(m.group(1))
            marker = self.store.get_bytes(f"{name}/{MARKER}")
            if marker is not None:
                complete[step] = marker
            else:
                incomplete.append(step)
        return dict(sorted(complete.items())), sorted(incomplete)

    def _steps(self) -> tuple[list[int], list[int]]:
        complete, incomplete = self._scan()
        return list(complete), incomplete

    def complete_steps(self) -> list[int]:
        return self._steps()[0]

    def _wrote(self, step: int, marker: bytes | None) -> bool:
        """Whether this job wrote checkpoint ``step`` (so may delete it): its marker's
        ``owner``, else (incomplete) its ``WRITER``, names this job. Unchecked: every step."""
        if not self.owner:
            return True
        if marker is not None:
            try:
                return bool(json.loads(marker).get("owner") == self.owner)
            except (ValueError, AttributeError):
                return False  # an unreadable marker is nobody's to delete
        writer = self.store.get_bytes(f"{step_dir(step)}/{WRITER}")
        return writer is not None and writer.decode(errors="replace").strip() == self.owner

    def _check_owner(self) -> None:
        """The prefix is still this job's (not taken over meanwhile): before a marker or a delete."""
        if self.owner:
            check_owner(self.store, self.owner)

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
            self._check_owner()
            complete, incomplete = self._steps()
            found[0] = complete[-1] if complete else None
            for step in incomplete:
                if (found[0] is None or step > found[0]) and self._wrote(step, None):
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
            if rank == 0 and self.owner:
                # First, so a save that crashes leaves a directory this job may clean up.
                self.store.put_bytes(f"{name}/{WRITER}", self.owner.encode())
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
                self._check_owner()
                marker = {
                    "step": step,
                    "world_size": world_size,
                    "time": time.time(),
                    **meta,
                    "files": listed,
                    **({"owner": self.owner} if self.owner else {}),
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
        """Keep the newest ``keep_last`` complete checkpoints of this job and the one resumed
        from; delete only what this job wrote."""
        complete, incomplete = self._scan()
        mine = [step for step, marker in complete.items() if self._wrote(step, marker)]
        keep = set(mine[-self.keep_last :]) | {newest}
        if self.protected is not None:
            keep.add(self.protected)
        for step in mine:
            if step not in keep:
                self.store.delete_dir(step_dir(step))
        for step in incomplete:
            if step < newest and self._wrote(step, None):  # a crashed save older than a complete one
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
