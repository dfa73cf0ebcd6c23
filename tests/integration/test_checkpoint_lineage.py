"""The checkpoint lineage on moto's S3 server and on a local directory: the completion marker
is written last and required for loading, keepLast pruning never deletes the resumed-from
checkpoint, and leftovers of crashed saves are cleaned up."""

from __future__ import annotations

import pickle
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from llmtrain.runtime.checkpoint import MARKER, METADATA, Lineage, step_dir
from llmtrain.runtime.store import LocalStore

from tests.data.datahelpers import S3Server, s3_server  # noqa: F401 - the session fixture


@pytest.fixture(params=["local", "s3"])
def uri(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "local":
        return str(tmp_path / "ckpt")
    s3: S3Server = request.getfixturevalue("s3_server")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    bucket = s3.bucket(f"lineage-{zlib.crc32(request.node.name.encode())}")
    return f"s3://{bucket}/jobs/a"


def state(value: float) -> dict[str, Any]:
    return {"model": {"w": torch.full((4, 3), value)}, "train": pickle.dumps({"v": value})}


def template() -> dict[str, Any]:
    return {"model": {"w": torch.zeros(4, 3)}, "train": b""}


def test_save_load_roundtrip_and_marker_required(uri: str) -> None:
    lineage = Lineage(uri, keep_last=5)
    assert lineage.latest() is None
    for step in (1, 2, 3):
        assert lineage.save(step, state(float(step)), {"tokens": step * 10}) == f"{uri}/{step_dir(step)}"
    info = lineage.latest()
    assert info is not None and info.step == 3 and info.world_size == 1 and info.meta["tokens"] == 30
    loaded = template()
    lineage.load(info, loaded)
    assert torch.equal(loaded["model"]["w"], torch.full((4, 3), 3.0))
    assert pickle.loads(loaded["train"]) == {"v": 3.0}

    # Step 3 loses its marker (a save that crashed before the end): it no longer exists.
    lineage.store.delete_dir(step_dir(3))
    lineage.store.put_bytes(f"{step_dir(3)}/__0_0.distcp", b"partial")
    info = lineage.latest()
    assert info is not None and info.step == 2
    assert lineage.complete_steps() == [1, 2]
    # latest() cleared the newer incomplete leftover, which this run would write again.
    assert step_dir(3) not in lineage.store.list_dirs()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        lineage.info(3)


def test_keep_last_prunes_but_never_the_resumed_checkpoint(uri: str) -> None:
    """spec.checkpoint.keepLast."""
    lineage = Lineage(uri, keep_last=2)
    for step in (1, 2, 3, 4):
        lineage.save(step, state(float(step)), {})
    assert lineage.complete_steps() == [3, 4]
    resumed = Lineage(uri, keep_last=1)
    info = resumed.latest()
    assert info is not None
    resumed.protected = info.step  # what train() does after loading it
    resumed.save(5, state(5.0), {})
    resumed.save(6, state(6.0), {})
    assert resumed.complete_steps() == [4, 6]
    with pytest.raises(ValueError, match="keepLast"):
        Lineage(uri, keep_last=0)


class RecordingStore(LocalStore):
    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.puts: list[str] = []

    def put_file(self, local: Path, key: str) -> None:
        self.puts.append(key)
        super().put_file(local, key)

    def put_bytes(self, key: str, data: bytes) -> None:
        self.puts.append(key)
        super().put_bytes(key, data)


def test_marker_is_written_last(tmp_path: Path) -> None:
    lineage = Lineage(str(tmp_path), keep_last=3)
    store = RecordingStore(str(tmp_path))
    lineage.store = store
    lineage.save(7, state(7.0), {})
    names = [key.split("/", 1)[1] for key in store.puts]
    assert names[-1] == MARKER and names[-2] == METADATA
    assert any(n.endswith(".distcp") for n in names[:-2])


def test_unsupported_uri_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"spec\.checkpoint\.uri"):
        Lineage("gs://bucket/x", keep_last=1)


def test_one_owner_per_prefix(uri: str) -> None:
    """runtime/owner.py on both backends (S3: a conditional PUT, If-None-Match): of racing
    claims exactly one wins and the others are refused naming it; an owned lineage deletes only
    its own checkpoints. The details: tests/unit/test_checkpoint_owner.py."""
    import threading

    from llmtrain.runtime.owner import Owner, PrefixInUseError, claim, read_owner

    store = Lineage(uri, keep_last=1).store
    jobs = [Owner("ns", f"job-{i}", f"uid-{i}") for i in range(6)]
    refused: list[str] = []
    barrier = threading.Barrier(len(jobs))

    def race(me: Owner) -> None:
        barrier.wait()
        try:
            claim(store, me)
        except PrefixInUseError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=race, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winner = read_owner(store)
    assert winner in jobs and len(refused) == len(jobs) - 1
    assert all(f"output prefix {store.uri} belongs to {winner.describe()}" in m for m in refused)

    other = next(j for j in jobs if j != winner)
    Lineage(uri, keep_last=1, owner=winner.key).save(1, state(1.0), {})
    claim(store, other, take_over=True)
    taker = Lineage(uri, keep_last=1, owner=other.key)
    for step in (2, 3):
        taker.save(step, state(float(step)), {})
    assert taker.complete_steps() == [1, 3]  # its own step 2 pruned, the first owner's step 1 kept
