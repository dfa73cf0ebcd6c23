"""Exports are published whole: written under a version of their own, verified, then published.

Layout of an export at ``<uri>`` (spec.export.uri; :mod:`llmtrain.runtime.export` writes it)::

    local directory                               s3://bucket/prefix
    <parent>/<name> -> .<name>.versions/<id>      <uri>/llmtrain-export.json   pointer, written last
    <parent>/.<name>.versions/<id>/               <uri>/versions/<id>/
        config.json, model.safetensors, …             config.json, model.safetensors, …
        llmtrain-export.json  (the manifest)          llmtrain-export.json  (the manifest)

Each attempt writes into a new ``<id>`` (UTC time + random, so they sort by age): every file is
read back and checked against its size and sha256 right after it is written, then the manifest
(every file's size and sha256) is written into the version, and only then is the version
published — locally by swapping the symlink ``<uri>`` (``os.replace``: atomic), on S3 by writing
the pointer ``<uri>/llmtrain-export.json`` (one PUT: S3 shows a reader the old object or the
new one, never part). A failed attempt never touches the published version; the one before the
current stays as well (a reader that resolved it just before a publish can still finish), older
ones and abandoned attempts are deleted by the next publish.

Why this layout: S3 has no rename, so no set of objects at one prefix can be replaced at once;
immutable versions and a pointer written last are the usual answer. Locally the published path
stays a directory (through the symlink) holding the files at its top, so
``LlamaForCausalLM.from_pretrained(<uri>)`` and ``AutoTokenizer.from_pretrained(<uri>)`` work
as before (tests/unit/test_export.py loads exports that way). On S3, transformers reads no
``s3://`` URIs anyway; a user copies ``<uri>/versions/<id>/`` (``id`` is in the pointer).

Readers (``llmtrain serve``, ``generate``, ``hf_import``, ``init.pretrained``) call
:func:`resolve_export` once: it pins the published version (the symlink's target, the pointer's
version) and every later read of that load goes to that version, checked against the manifest's
sha256, so files of two exports are never mixed. A directory with no manifest that is not ours
(a ``save_pretrained`` directory) is read as it is; one with unpublished attempts only is refused.

Retries: a write that fails (an S3 outage) is retried in place with backoff, for up to
:attr:`Backoff.budget_s`, before the export fails — an attempt of the whole job (every GPU pod
recreated) only to export again would cost far more. A loop of our own as in
:mod:`llmtrain.runtime.store` (no retry library is among the runtime's dependencies).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from llmtrain.runtime.store import LocalStore, ObjectMissing, StorageError, Store, join, open_store

from llmtrain.api.s3 import S3Options

MANIFEST_NAME = "llmtrain-export.json"
MANIFEST_FORMAT = "llmtrain-export/1"
VERSIONS_DIR = "versions"
_CHUNK = 64 << 20  # read-back verification reads this much at a time

log = logging.getLogger(__name__)
T = TypeVar("T")


class ExportError(ValueError):
    """The weights, config or destination cannot be exported as asked; the message says why."""


class ExportNotPublished(ExportError):
    """``uri`` holds export attempts but none has been published (in progress or failed)."""


class ExportCorrupt(ExportError):
    """A file differs from what the manifest records (size or sha256)."""


@dataclass(frozen=True)
class Backoff:
    """How long an export keeps retrying a failed write in place: ``first_s``, doubling up to
    ``max_s`` between tries, until ``budget_s`` have passed since the first failure."""

    first_s: float = 1.0
    max_s: float = 60.0
    budget_s: float = 900.0

    def run(self, op: Callable[[], T], what: str) -> T:
        start, delay = time.monotonic(), self.first_s
        while True:
            try:
                return op()
            except StorageError as e:
                waited = time.monotonic() - start
                if _permanent(e) or waited + delay > self.budget_s:
                    raise
                log.warning("export: %s failed (%s); retrying in %.1f s", what, e, delay)
                time.sleep(delay)
                delay = min(self.max_s, delay * 2)


def _permanent(e: BaseException) -> bool:
    """Denied, no credentials, no such bucket: no outage, waiting will not help."""
    cause = e.__cause__
    name = type(cause).__name__
    if name == "NoCredentialsError":
        return True
    code = str(getattr(cause, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "NoSuchBucket")


def sha256_of(store: Store, key: str, size: int) -> str:
    h = hashlib.sha256()
    for start in range(0, size, _CHUNK):
        h.update(store.get_range(key, start, min(_CHUNK, size - start)))
    return h.hexdigest()


def _entry(data: bytes) -> dict[str, Any]:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _local_path(uri: str) -> Path:
    return Path(uri).expanduser().absolute()


# ---------------------------------------------------------------------------- writing


class ExportWriter:
    """One export attempt at ``uri``: :meth:`put` each file, then :meth:`publish`."""

    def __init__(self, uri: str, s3: S3Options | None = None, backoff: Backoff | None = None) -> None:
        self.uri, self.s3 = uri, s3
        self.backoff = backoff or Backoff()
        self.id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(4)
        self.files: dict[str, dict[str, Any]] = {}
        if uri.startswith("s3://"):
            self.local: Path | None = None
            self.root: Store = open_store(uri, s3)
            self.versions = join(self.root.uri, VERSIONS_DIR)
        else:
            self.local = _local_path(uri)
            self.versions = str(self.local.parent / f".{self.local.name}.versions")
            self.root = LocalStore(self.local.parent)
            _check_destination(self.local)
        self.store = open_store(join(self.versions, self.id), s3)

    def put(self, name: str, data: bytes) -> None:
        """Write ``name`` into this attempt's version and check it (size, sha256), retrying."""
        self.files[name] = self._write(self.store, name, data)

    def _write(self, store: Store, name: str, data: bytes) -> dict[str, Any]:
        entry = _entry(data)

        def once() -> None:
            store.put(name, data)
            size = store.size(name)
            if size != entry["size"] or sha256_of(store, name, size) != entry["sha256"]:
                # A storage fault (retried, then the attempt fails), not a fault of the spec.
                raise StorageError(f"{store.describe(name)}: read back differs from what was written")

        self.backoff.run(once, f"writing {store.describe(name)}")
        return entry

    def manifest(self) -> dict[str, Any]:
        return {"format": MANIFEST_FORMAT, "id": self.id, "files": dict(self.files)}

    def publish(self) -> str:
        """Manifest into the version, then the pointer (S3) or the symlink (local); returns the
        published version's URI. Older versions but the one just replaced are then deleted."""
        manifest = self.manifest()  # the files, not the manifest itself
        self.put(MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n")
        if self.local is None:
            previous = _pointed_version(self.root)
            pointer = {**manifest, "version": f"{VERSIONS_DIR}/{self.id}"}
            data = json.dumps(pointer, indent=2, sort_keys=True).encode() + b"\n"
            self._write(self.root, MANIFEST_NAME, data)  # the publish: one PUT, checked
        else:
            previous = self._swap_symlink()
        self._prune(keep={self.id, previous})
        return self.store.uri

    def _swap_symlink(self) -> str | None:
        assert self.local is not None
        link = self.local
        previous = os.readlink(link).rsplit("/", 1)[-1] if link.is_symlink() else None
        if not link.is_symlink() and link.is_dir():
            if any(link.iterdir()):  # an export an older llmtrain wrote: kept among the versions
                previous = "legacy-" + self.id
                os.rename(link, Path(self.versions) / previous)
            else:
                link.rmdir()
        tmp = link.with_name(f".{link.name}.link-{self.id}")
        tmp.symlink_to(f".{link.name}.versions/{self.id}", target_is_directory=True)
        os.replace(tmp, link)  # atomic: readers see the old version or the new one
        return previous

    def _prune(self, keep: set[str | None]) -> None:
        """Delete every version but ``keep`` (best effort: the export is already published)."""
        try:
            versions = open_store(self.versions, self.s3)
            for name in versions.list_dirs():
                if name not in keep:
                    versions.delete_dir(name)
        except StorageError as e:
            log.warning("export: old versions under %s not deleted: %s", self.versions, e)

    def abandon(self) -> None:
        """A failed attempt: delete what it wrote (best effort; the next publish prunes it)."""
        try:
            if self.local is not None:
                shutil.rmtree(Path(self.versions) / self.id, ignore_errors=True)
            else:
                self.store.delete(self.store.list_keys())
        except StorageError as e:
            log.warning("export: attempt %s not deleted: %s", self.store.uri, e)


# What an older llmtrain's export (or save_pretrained of a Llama) holds at the top.
_EXPORT_FILE = re.compile(
    r"(config|generation_config|tokenizer|tokenizer_config|special_tokens_map)\.json"
    r"|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|" + re.escape(MANIFEST_NAME)
)


def _check_destination(path: Path) -> None:
    """Before anything is written: a local ``uri`` is new, ours (a symlink), or a directory of
    export files (moved among the versions at publish). Anything else is refused, not moved:
    ``--out .`` or a directory with other files in it must not disappear into ``.versions``."""
    if path.is_symlink() or not path.exists():
        return
    if not path.is_dir():
        raise ExportError(f"{path} exists and is not a directory: cannot export there")
    others = sorted(
        p.name for p in path.iterdir() if not _EXPORT_FILE.fullmatch(p.name.removesuffix(".part"))
    )
    if others:
        raise ExportError(
            f"{path} holds files that are not an exported model ({', '.join(others[:3])}…): export to a "
            "new directory (an export there becomes a symlink to its published version)"
        )


def _pointed_version(root: Store) -> str | None:
    raw = root.get_bytes(MANIFEST_NAME)
    if raw is None:
        return None
    version = json.loads(raw).get("version")
    return str(version).rsplit("/", 1)[-1] if version else None


# ---------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class PublishedExport:
    """A model directory pinned for one load: ``uri`` is the published version (or a foreign
    directory, ``manifest`` None); :meth:`read` checks each file against the manifest."""

    uri: str
    manifest: dict[str, Any] | None
    store: Store

    def has(self, name: str) -> bool:
        if self.manifest is not None:
            return name in self.manifest["files"]
        return self.store.exists(name)

    def read(self, name: str) -> bytes:
        if self.manifest is None:
            return self.store.get(name)
        try:
            data = self.store.get(name)
        except ObjectMissing as e:
            raise ExportCorrupt(f"{self.store.describe(name)} is in {MANIFEST_NAME} but missing: {e}") from e
        want = self.manifest["files"].get(name)
        if want is None:
            raise ExportCorrupt(f"{self.store.describe(name)} is not in the export's {MANIFEST_NAME}")
        if _entry(data) != {"size": want["size"], "sha256": want["sha256"]}:
            raise ExportCorrupt(
                f"{self.store.describe(name)}: size or sha256 differs from {MANIFEST_NAME} "
                f"({len(data)} bytes; the manifest says {want['size']}): the file was changed or is corrupt"
            )
        return data


def resolve_export(uri: str, s3: S3Options | None = None) -> PublishedExport:
    """The published version at ``uri`` (a symlink's target or the pointer's version), pinned.

    ``uri`` may also be a version itself (what this returns): resolving it again gives it back.
    """
    if uri.startswith("s3://"):
        store = open_store(uri, s3)
    else:
        path = _local_path(uri)
        store = LocalStore(path.resolve())  # the symlink read once: later publishes don't move us
        if not path.exists() and Path(path.parent / f".{path.name}.versions").is_dir():
            raise ExportNotPublished(
                f"no export has been published at {uri} yet: {path.parent}/.{path.name}.versions "
                "holds only unpublished attempts (one in progress, or failed)"
            )
    try:
        raw = store.get(MANIFEST_NAME)
    except ObjectMissing:
        if uri.startswith("s3://") and VERSIONS_DIR in store.list_dirs():
            raise ExportNotPublished(
                f"no export has been published at {uri} yet: {uri.rstrip('/')}/{VERSIONS_DIR}/ holds only "
                f"unpublished attempts (one in progress, or failed); {MANIFEST_NAME} is written last"
            ) from None
        return PublishedExport(store.uri, None, store)  # not ours (save_pretrained): as it is
    manifest = json.loads(raw)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ExportError(f"{store.describe(MANIFEST_NAME)}: format {manifest.get('format')!r} is not ours")
    version = manifest.get("version")
    if version:
        store = open_store(join(store.uri, str(version)), s3)
    return PublishedExport(store.uri, manifest, store)
