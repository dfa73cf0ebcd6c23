"""An output prefix has one owner (issue 26 item 2): the OWNER record (runtime/owner.py) and a
lineage that deletes only what its job wrote (runtime/checkpoint.py), on a local directory.
The same on moto's S3: tests/integration/test_checkpoint_lineage.py."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from llmtrain.runtime.checkpoint import MARKER, WRITER, Lineage, step_dir
from llmtrain.runtime.owner import (
    LOCAL_UID_FILE,
    OWNER,
    Owner,
    PrefixInUseError,
    claim,
    claim_outputs,
    job_owner,
    read_owner,
)
from llmtrain.runtime.store import LocalStore

from llmtrain.api.job import LLMTrainingJob

A = Owner("ns1", "demo", "uid-a")
B = Owner("ns1", "demo", "uid-b")  # the same name created again: another owner


def state(value: float) -> dict[str, Any]:
    return {"model": {"w": torch.full((2, 2), value)}}


def record(store: LocalStore) -> dict[str, Any]:
    return dict(json.loads(store.get(OWNER)))


# ------------------------------------------------------------------------------ the record


def test_first_use_writes_the_record_and_the_same_job_claims_again(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "ckpt")
    assert claim(store, A) is None
    first = record(store)
    assert {k: first[k] for k in ("namespace", "name", "uid")} == {
        "namespace": "ns1",
        "name": "demo",
        "uid": "uid-a",
    }
    assert claim(store, A) is None  # a rerun, a new attempt: the record stays as it was
    assert record(store) == first


def test_another_owner_fails_naming_the_prefix_and_the_owner(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "ckpt")
    claim(store, A)
    with pytest.raises(PrefixInUseError) as e:
        claim(store, B)
    msg = str(e.value)
    assert f"output prefix {store.uri} belongs to LLMTrainingJob ns1/demo (uid uid-a)" in msg
    assert "uid uid-b" in msg and "spec.checkpoint.takeOver" in msg and "spec.model.init.checkpoint" in msg
    assert read_owner(store) == A  # the loser wrote nothing
    # The same uid under another name (two local jobs of one run directory) is another job too.
    with pytest.raises(PrefixInUseError):
        claim(store, Owner("ns1", "other", "uid-a"))


def test_take_over_names_the_new_owner_and_keeps_the_previous(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "ckpt")
    claim(store, A)
    assert claim(store, B, take_over=True) == A
    doc = record(store)
    assert doc["uid"] == "uid-b" and [p["uid"] for p in doc["previous"]] == ["uid-a"]
    assert claim(store, B, take_over=True) is None  # already B's: nothing changes
    with pytest.raises(PrefixInUseError, match="uid uid-b"):
        claim(store, A)  # the old owner, back, is refused in its turn


def test_an_unreadable_record_is_nobodys(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "ckpt")
    store.put_bytes(OWNER, b"{not json")
    with pytest.raises(PrefixInUseError, match="unreadable"):
        claim(store, A)
    assert claim(store, A, take_over=True) is not None and read_owner(store) == A


def test_create_is_atomic_one_of_many_racing_writers_wins(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "p")
    won: list[int] = []
    barrier = threading.Barrier(8)

    def race(i: int) -> None:
        barrier.wait()
        if store.create("OWNER", f"{i}".encode()):
            won.append(i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and store.get("OWNER") == f"{won[0]}".encode()
    assert not store.create("OWNER", b"late") and store.get("OWNER") == f"{won[0]}".encode()
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["OWNER"]  # no temporary left


class IgnoresIfNoneMatch(LocalStore):
    """A store whose conditional create overwrites (an S3 server that ignores If-None-Match)."""

    def create(self, key: str, data: bytes) -> bool:
        self.put_bytes(key, data)
        return True


def test_a_store_without_conditional_writes_still_never_replaces_a_record(tmp_path: Path) -> None:
    store = IgnoresIfNoneMatch(tmp_path / "ckpt")
    claim(store, A)
    with pytest.raises(PrefixInUseError, match="uid uid-a"):
        claim(store, B)  # read first: A's record is seen and left as it is
    assert read_owner(store) == A


def _job(name: str, uid: str | None = None) -> LLMTrainingJob:
    from llmtrain.runtime.synthetic import tiny_spec_dict

    meta: dict[str, Any] = {"name": name, "namespace": "ns1"}
    if uid:
        meta["uid"] = uid
    return LLMTrainingJob.model_validate(
        {
            "apiVersion": "llmtrain.dev/v1alpha1",
            "kind": "LLMTrainingJob",
            "metadata": meta,
            "spec": tiny_spec_dict(),
        }
    )


def test_who_a_job_is(tmp_path: Path) -> None:
    """metadata.uid on Kubernetes; locally the run directory's uid, the same on every rerun."""
    assert job_owner(_job("demo", "k8s-uid"), tmp_path / "run") == Owner("ns1", "demo", "k8s-uid")
    assert not (tmp_path / "run").exists()
    first = job_owner(_job("demo"), tmp_path / "run")
    assert first.uid.startswith("local-") and (tmp_path / "run" / LOCAL_UID_FILE).exists()
    assert job_owner(_job("demo"), tmp_path / "run") == first  # a rerun: the same owner
    assert job_owner(_job("demo"), tmp_path / "other").uid != first.uid  # another run dir: not


def test_claim_outputs_claims_each_prefix_once(tmp_path: Path) -> None:
    ckpt, out = str(tmp_path / "out" / "checkpoints"), str(tmp_path / "out")
    assert claim_outputs([ckpt, out, ckpt], A, take_over=False) == []
    assert read_owner(LocalStore(ckpt)) == A and read_owner(LocalStore(out)) == A
    # B shares only the output prefix (its own checkpoint directory): still refused, naming it.
    with pytest.raises(PrefixInUseError, match=f"output prefix {out} belongs"):
        claim_outputs([str(tmp_path / "out" / "ckpt-b"), out], B, take_over=False)
    taken = claim_outputs([ckpt, out], B, take_over=True)
    assert [(u, o.uid) for u, o in taken] == [(ckpt, "uid-a"), (out, "uid-a")]


# ------------------------------------------------------------------------------ the lineage


def owned(tmp_path: Path, keep_last: int, steps: tuple[int, ...]) -> tuple[str, Lineage]:
    """A's lineage at <tmp>/ckpt, claimed, with ``steps`` saved."""
    uri = str(tmp_path / "ckpt")
    claim(LocalStore(uri), A)
    lineage = Lineage(uri, keep_last=keep_last, owner=A.key)
    for step in steps:
        lineage.save(step, state(float(step)), {})
    return uri, lineage


def test_the_same_jobs_rerun_resumes_and_prunes_its_own(tmp_path: Path) -> None:
    uri, first = owned(tmp_path, 2, (1, 2))
    assert json.loads(first.store.get(f"{step_dir(2)}/{MARKER}"))["owner"] == A.key
    assert first.store.get(f"{step_dir(2)}/{WRITER}") == A.key.encode()
    claim(LocalStore(uri), A)  # the rerun claims again: its own record
    rerun = Lineage(uri, keep_last=2, owner=A.key)
    info = rerun.latest()
    assert info is not None and info.step == 2
    rerun.save(3, state(3.0), {})
    assert rerun.complete_steps() == [2, 3]  # keepLast 2 pruned its own step 1


def test_a_lineage_taken_over_stops_before_it_publishes_or_deletes(tmp_path: Path) -> None:
    uri, a = owned(tmp_path, 1, (1,))
    claim(LocalStore(uri), B, take_over=True)
    with pytest.raises(PrefixInUseError, match="belongs to LLMTrainingJob ns1/demo \\(uid uid-b\\)"):
        a.save(2, state(2.0), {})
    assert a.complete_steps() == [1]  # no marker for step 2, and step 1 not pruned
    with pytest.raises(PrefixInUseError):
        a.latest()  # a restarted worker of the old owner stops too
    # Negative control: the owner it names saves.
    Lineage(uri, keep_last=1, owner=B.key).save(3, state(3.0), {})


def test_pruning_and_cleanup_touch_only_what_this_job_wrote(tmp_path: Path) -> None:
    uri, a = owned(tmp_path, 3, (1, 2))
    # A crashed save of A's at step 9 (its WRITER, no marker), and one from before owner records.
    a.store.put_bytes(f"{step_dir(9)}/{WRITER}", A.key.encode())
    a.store.put_bytes(f"{step_dir(9)}/__0_0.distcp", b"partial")
    a.store.put_bytes(f"{step_dir(8)}/__0_0.distcp", b"partial, no writer")
    claim(LocalStore(uri), B, take_over=True)
    b = Lineage(uri, keep_last=1, owner=B.key)
    info = b.latest()
    assert info is not None and info.step == 2  # B continues A's lineage...
    assert {step_dir(8), step_dir(9)} <= set(b.store.list_dirs())  # ...but clears none of A's leftovers
    b.protected = info.step
    for step in (3, 4, 5):
        b.save(step, state(step), {})
    # keepLast 1 counts B's own: 3 and 4 went; A's 1 and 2 stay, and so do A's partial saves.
    assert b.complete_steps() == [1, 2, 5]
    assert {step_dir(8), step_dir(9)} <= set(b.store.list_dirs())
    # B's own crashed save is B's to clear.
    b.store.put_bytes(f"{step_dir(7)}/{WRITER}", B.key.encode())
    b.save(6, state(6.0), {})
    assert step_dir(7) in b.store.list_dirs()  # newer than the newest: latest() clears it, not prune
    b.latest()
    assert step_dir(7) not in b.store.list_dirs() and step_dir(9) in b.store.list_dirs()


def test_negative_control_an_unowned_lineage_prunes_everything(tmp_path: Path) -> None:
    """Without an owner (a tuning trial's lineage, every lineage before owner records) the
    same files are deleted: what the ownership checks above keep is theirs to keep."""
    uri = str(tmp_path / "ckpt")
    a = Lineage(uri, keep_last=1, owner=A.key)
    a.save(1, state(1.0), {})
    a.store.put_bytes(f"{step_dir(9)}/{WRITER}", A.key.encode())
    unowned = Lineage(uri, keep_last=1)
    assert unowned.latest() is not None
    assert step_dir(9) not in unowned.store.list_dirs()
    unowned.save(2, state(2.0), {})
    assert unowned.complete_steps() == [2]


def test_reading_another_jobs_lineage_writes_nothing(tmp_path: Path) -> None:
    """spec.model.init.checkpoint and the export resolve a lineage read only: no record, no delete."""
    from llmtrain.runtime.export import resolve_checkpoint

    uri, a = owned(tmp_path, 3, (1,))
    a.store.put_bytes(f"{step_dir(2)}/{WRITER}", A.key.encode())  # A saving right now
    before = sorted(a.store.list_keys())
    ref = resolve_checkpoint(uri)
    assert ref.step == 1 and sorted(a.store.list_keys()) == before and read_owner(a.store) == A
