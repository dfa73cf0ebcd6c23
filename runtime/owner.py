"""An output prefix has one owner: the ``OWNER`` record a job writes at its checkpoint prefix
(and its output prefix) on first use.

Two jobs on one prefix would delete each other's checkpoints (``keepLast``, the clean-up of a
crashed save), overwrite them, or resume from them. So before anything is written the driver
claims each prefix it writes under (:func:`claim`): the record names the job (namespace, name,
uid) and is created only if absent (one atomic step on S3 and on a local disk, so of two jobs
starting at once one wins). A prefix whose record names another job is :class:`PrefixInUseError`
(the condition reason ``OutputPrefixInUse``), unless the spec takes it over
(``spec.checkpoint.takeOver``): the record then names this job and lists the ones before it.

Who a job is: on Kubernetes its ``metadata.uid`` (the operator passes it in the spec ConfigMap),
so a job deleted and created again under the same name is another owner. ``llmtrain run``
has no uid; its run directory keeps one (:func:`local_uid`), so a rerun of the same job (same
run directory) is the same owner and resumes.

Reading is not owning: ``spec.model.init.checkpoint`` and the export read any lineage and
never write this record.

Standard library and the store only (the lineage imports it where only torch is installed).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtrain.runtime.store import Store, open_store

from llmtrain.api.s3 import S3Options

if TYPE_CHECKING:  # pydantic and yaml: not on a machine that only trains (checkpoint.py imports this)
    from llmtrain.api.job import LLMTrainingJob

OWNER = "OWNER"  # <prefix>/OWNER
LOCAL_UID_FILE = "owner-uid"  # <run dir>/owner-uid: a local run's stand-in for metadata.uid
_READ_TRIES = 5  # a record being created by another writer right now may not be readable yet


@dataclass(frozen=True)
class Owner:
    """The job a prefix belongs to."""

    namespace: str
    name: str
    uid: str

    @property
    def key(self) -> str:
        """What a checkpoint's marker and ``WRITER`` name, and what is compared: the uid alone
        would make two local jobs of one run directory one owner."""
        return f"{self.namespace}/{self.name}/{self.uid}"

    def describe(self) -> str:
        return f"LLMTrainingJob {self.namespace}/{self.name} (uid {self.uid})"

    def record(self, previous: list[dict[str, Any]] | None = None) -> bytes:
        doc: dict[str, Any] = {
            "namespace": self.namespace,
            "name": self.name,
            "uid": self.uid,
            "claimed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if previous:
            doc["previous"] = previous
        return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


class PrefixInUseError(RuntimeError):
    """The prefix's ``OWNER`` record names another job: a permanent failure (no retry helps).
    One message argument, so it pickles (a training worker's error crosses Ray)."""

    @classmethod
    def of(cls, uri: str, found: Owner, me: Owner | None) -> PrefixInUseError:
        mine = f"this job, {me.describe()}" if me is not None else "this job"
        return cls(
            f"output prefix {uri} belongs to {found.describe()}, not to {mine}: two jobs on one "
            "prefix would delete, overwrite and resume each other's checkpoints. Give this job its "
            "own spec.checkpoint.uri; if that job is gone and this one is to continue its "
            "checkpoints, set spec.checkpoint.takeOver: true; to start from its weights, read them "
            "with spec.model.init.checkpoint (read only)"
        )


def parse(raw: bytes) -> tuple[Owner, dict[str, Any]]:
    """The owner a record names, and the record. An unreadable record names an unknown owner
    (never this job: a record is never taken for ours unless it says so)."""
    try:
        doc = json.loads(raw)
        return Owner(str(doc["namespace"]), str(doc["name"]), str(doc["uid"])), doc
    except (ValueError, KeyError, TypeError):
        return Owner("?", "?", f"unreadable {OWNER} record"), {}


def read_owner(store: Store) -> Owner | None:
    """The owner recorded at ``store``'s root, None where there is no record."""
    raw = store.get_bytes(OWNER)
    return None if raw is None else parse(raw)[0]


def claim(store: Store, me: Owner, *, take_over: bool = False) -> Owner | None:
    """Make ``store``'s prefix this job's, or raise :class:`PrefixInUseError`.

    Returns the owner taken over (``take_over``), else None. A record naming this job (a rerun,
    a new attempt) is left as it is.
    """
    for _ in range(_READ_TRIES):
        # Read first and read back: an S3 server that ignored If-None-Match would let create()
        # replace another job's record; then the record read back names whoever wrote last,
        # and a loser that got past this is stopped by the lineage's check before its marker.
        raw = store.get_bytes(OWNER)
        if raw is None:
            store.create(OWNER, me.record())
            raw = store.get_bytes(OWNER)
        if raw is not None:
            break
        time.sleep(0.2)  # created by a writer whose record is not readable yet
    else:
        raise PrefixInUseError.of(store.uri, Owner("?", "?", "a record that cannot be read"), me)
    found, doc = parse(raw)
    if found.key == me.key:
        return None
    if not take_over:
        raise PrefixInUseError.of(store.uri, found, me)
    previous = [
        *doc.get("previous", []),
        {k: doc[k] for k in ("namespace", "name", "uid", "claimed") if k in doc},
    ]
    store.put_bytes(OWNER, me.record(previous))
    return found


def job_owner(job: LLMTrainingJob, run_dir: Path) -> Owner:
    """Who ``job`` is: its ``metadata.uid`` (on Kubernetes), else its run directory's uid."""
    meta = job.metadata
    uid = (meta.model_extra or {}).get("uid") or local_uid(run_dir)
    return Owner(meta.namespace or "default", meta.name, str(uid))


def claim_outputs(
    uris: list[str], me: Owner, *, take_over: bool, s3: S3Options | None = None
) -> list[tuple[str, Owner]]:
    """:func:`claim` each prefix (in order, duplicates once); the (prefix, owner) pairs taken over."""
    taken = []
    for uri in dict.fromkeys(uris):
        store = open_store(uri if "://" in uri else str(Path(uri).expanduser().resolve()), s3)
        found = claim(store, me, take_over=take_over)
        if found is not None:
            taken.append((store.uri, found))
    return taken


def check(store: Store, key: str) -> None:
    """Raise :class:`PrefixInUseError` if the prefix's record names a job other than ``key``
    (taken over while this job ran): checked before a checkpoint is published or anything is
    deleted. No record: nothing to defend (the driver claims before training starts)."""
    raw = store.get_bytes(OWNER)
    if raw is None:
        return
    found, _ = parse(raw)
    if found.key != key:
        raise PrefixInUseError.of(store.uri, found, None)


def local_uid(run_dir: Path) -> str:
    """A local run's owner uid, kept in its run directory: the same job rerun from the same
    run directory is the same owner (and resumes); a new run directory is a new owner."""
    path = run_dir / LOCAL_UID_FILE
    try:
        uid = path.read_text().strip()
        if uid:
            return uid
    except FileNotFoundError:
        pass
    run_dir.mkdir(parents=True, exist_ok=True)
    uid = f"local-{uuid.uuid4()}"
    try:
        with path.open("x") as f:  # two runs starting at once in one run dir agree on one uid
            f.write(uid + "\n")
    except FileExistsError:
        return path.read_text().strip()
    return uid
