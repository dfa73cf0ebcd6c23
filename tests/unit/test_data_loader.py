"""ShardLoader: per-rank window partition, shuffles, exact resume, verification."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from llmtrain.runtime.data.loader import LoaderError, ShardLoader, open_loader
from llmtrain.runtime.store import LocalStore

from llmtrain.api.loader import LoaderResumeError, TokenLoader
from llmtrain.api.shards import MANIFEST_NAME, ShardFormatError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from datahelpers import make_shards

L = 16  # context length


def first_tokens(batches: list[torch.Tensor]) -> list[int]:
    return [int(x) for b in batches for x in b[:, 0]]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_shards(tmp_path, [1000, 700, 333])  # 62 + 43 + 20 = 125 windows


def test_satisfies_protocol_and_shapes(data: Path) -> None:
    loader = open_loader(str(data), "train", 0, 1, 4, L, 0)
    assert isinstance(loader, TokenLoader)
    b = next(iter(loader))
    assert b.shape == (4, L + 1) and b.dtype == torch.int64
    # a window is contiguous tokens of one shard, packed: row[i + 1] == row[i] + 1
    assert torch.all(b[:, 1:] - b[:, :-1] == 1)


def test_two_ranks_equal_batches_disjoint_windows(data: Path) -> None:
    mb, world = 3, 2
    loaders = [ShardLoader(str(data), "train", r, world, mb, L, seed=7) for r in range(world)]
    assert loaders[0].total_windows == 125
    assert [ld.steps_per_epoch for ld in loaders] == [20, 20]  # 125 // 6
    assert loaders[0].dropped_windows == 125 - 20 * 6 == 5
    seen = [first_tokens(list(ld)) for ld in loaders]
    assert [len(s) for s in seen] == [60, 60]
    assert not set(seen[0]) & set(seen[1])
    # union = every window of the epoch stream except the reported remainder at its end
    ld = loaders[0]
    stream = [s.index for s, perm in ld.epoch_order(0) for _ in perm]
    all_starts = []
    offsets = {0: 0, 1: 1000, 2: 1700}
    for s, perm in ld.epoch_order(0):
        all_starts += [offsets[s.index] + int(w) * L for w in perm]
    assert len(stream) == 125
    assert sorted(seen[0] + seen[1]) == sorted(all_starts[: 125 - 5])


def test_shuffle_depends_on_seed_and_epoch(data: Path) -> None:
    def epoch_windows(seed: int, epochs: int) -> list[list[int]]:
        ld = ShardLoader(str(data), "train", 0, 1, 5, L, seed=seed)
        return [first_tokens(list(ld)) for _ in range(epochs)]

    e0, e1 = epoch_windows(0, 2)
    assert e0 != e1 and sorted(e0) == sorted(e1)
    assert epoch_windows(0, 1)[0] == e0  # deterministic
    assert epoch_windows(1, 1)[0] != e0


def _take(loader: ShardLoader, n: int) -> tuple[list[torch.Tensor], Iterator[torch.Tensor]]:
    """n batches across epochs; the last iterator stays open (its producer keeps prefetching)."""
    got: list[torch.Tensor] = []
    it = iter(loader)
    while len(got) < n:
        try:
            got.append(next(it))
        except StopIteration:
            it = iter(loader)
    return got, it


def test_resume_across_shard_and_epoch_boundary_is_exact(data: Path) -> None:
    mb, total = 2, 130

    def loader() -> ShardLoader:
        return ShardLoader(str(data), "train", 0, 1, mb, L, seed=3, prefetch_batches=4)

    ref = loader()
    steps = ref.steps_per_epoch  # 62
    reference, _ = _take(ref, total)
    first_shard_batches = ref.epoch_order(0)[0][0].windows // mb
    for stop in (first_shard_batches + 3, steps, steps + 7):  # past a shard boundary; at/after an epoch end
        ld = loader()
        got, it = _take(ld, stop)
        time.sleep(0.3)  # the producer has filled the prefetch queue beyond what was yielded
        assert ld._queue is not None and ld._queue.full() == (stop != steps)  # nothing left at epoch end
        state = ld.state_dict()
        assert state["rank_0"]["batches"] == (stop if stop <= steps else stop - steps)  # yielded only
        resumed = loader()
        resumed.load_state_dict(state)
        rest, _ = _take(resumed, total - stop)
        assert all(torch.equal(a, b) for a, b in zip(got + rest, reference, strict=True)), stop
        # negative control: without restoring the state the sequence differs
        fresh, _ = _take(loader(), total - stop)
        assert not all(torch.equal(a, b) for a, b in zip(got + fresh, reference, strict=True))
        del it


def test_two_rank_resume_across_shard_and_epoch_boundary_is_exact(data: Path) -> None:
    """Per-rank: two ranks save (queues full) and merge their states as DCP does; each resumed rank
    continues its own uninterrupted sequence; without the state the sequences differ."""
    mb, world, total = 2, 2, 70

    def loaders() -> list[ShardLoader]:
        return [
            ShardLoader(str(data), "train", r, world, mb, L, seed=5, prefetch_batches=4) for r in range(world)
        ]

    refs = loaders()
    steps = refs[0].steps_per_epoch  # 125 // 4 = 31
    references = [_take(ld, total)[0] for ld in refs]
    first_shard_steps = refs[0].epoch_order(0)[0][0].windows // (mb * world)
    for stop in (first_shard_steps + 2, steps + 5):  # past a shard boundary; past an epoch end
        lds = loaders()
        taken = [_take(ld, stop) for ld in lds]
        time.sleep(0.3)
        assert all(ld._queue is not None and ld._queue.full() for ld in lds)
        merged = {k: v for ld in lds for k, v in ld.state_dict().items()}
        assert sorted(merged) == ["rank_0", "rank_1"]
        for r in range(world):
            resumed = loaders()[r]
            resumed.load_state_dict(merged)
            rest, _ = _take(resumed, total - stop)
            got = taken[r][0] + rest
            assert all(torch.equal(a, b) for a, b in zip(got, references[r], strict=True)), (r, stop)
            fresh, _ = _take(loaders()[r], total - stop)
            assert not all(torch.equal(a, b) for a, b in zip(taken[r][0] + fresh, references[r], strict=True))
        del taken


def test_epoch_counter_and_state_is_keyed_per_rank(data: Path) -> None:
    ld = ShardLoader(str(data), "train", 1, 2, 4, L, seed=0)
    assert ld.epoch == 0
    n = sum(1 for _ in ld)
    assert n == ld.steps_per_epoch and ld.epoch == 1
    st = ld.state_dict()
    assert list(st) == ["rank_1"] and st["rank_1"]["batches"] == n


def test_resume_on_another_world_size(data: Path) -> None:
    mb = 2
    two = [ShardLoader(str(data), "train", r, 2, mb, L, seed=0) for r in range(2)]
    its = [iter(ld) for ld in two]
    for _ in range(5):
        for it in its:
            next(it)
    merged = {**two[0].state_dict(), **two[1].state_dict()}  # what DCP stores
    one = ShardLoader(str(data), "train", 0, 1, mb, L, seed=0)
    one.load_state_dict(merged)  # no rank entry mismatch: 20 windows consumed, a multiple of 1 × 2
    rest = first_tokens(list(one))
    flat = [w for s, perm in one.epoch_order(0) for w in [(s.index, int(p)) for p in perm]]
    offsets = {0: 0, 1: 1000, 2: 1700}
    expected = [offsets[i] + w * L for i, w in flat[20 : one.steps_per_epoch * mb]]
    assert rest == expected
    four = ShardLoader(str(data), "train", 3, 4, mb, L, seed=0)  # 20 % (4 × 2) != 0
    with pytest.raises(LoaderResumeError, match=r"spec\.resources\.workers"):
        four.load_state_dict(merged)


def test_resume_rejects_changed_settings(data: Path) -> None:
    ld = ShardLoader(str(data), "train", 0, 1, 2, L, seed=0)
    state = ld.state_dict()
    with pytest.raises(LoaderResumeError, match="contextLength"):
        ShardLoader(str(data), "train", 0, 1, 2, 8, seed=0).load_state_dict(state)
    with pytest.raises(LoaderResumeError, match="seed"):
        ShardLoader(str(data), "train", 0, 1, 2, L, seed=1).load_state_dict(state)


def test_validation_yields_the_same_first_windows(data: Path) -> None:
    v = ShardLoader(str(data), "validation", 0, 1, 2, L, seed=0)
    a = [b for _, b in zip(range(3), v, strict=False)]
    b = [b for _, b in zip(range(3), v, strict=False)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert first_tokens(a) == [2033 + i * L for i in range(6)]  # in order: no shuffle


def test_corrupt_shard_raises_in_the_training_loop(data: Path) -> None:
    p = data / "train-00001.bin"
    raw = bytearray(p.read_bytes())
    raw[400] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.raises(ShardFormatError, match=r"train-00001\.bin: sha256"):
        for _ in ShardLoader(str(data), "train", 0, 1, 2, L, seed=0):
            pass


def test_missing_manifest_and_too_little_data(tmp_path: Path, data: Path) -> None:
    with pytest.raises(LoaderError, match="data prepare"):
        ShardLoader(str(tmp_path / "nothing"), "train", 0, 1, 2, L)
    with pytest.raises(LoaderError, match=r"spec\.resources\.workers"):
        ShardLoader(str(data), "train", 0, 64, 2, L)  # 125 windows < 64 × 2


def test_abandoned_iteration_stops_its_thread(data: Path) -> None:
    import threading

    ld = ShardLoader(str(data), "train", 0, 1, 1, L, prefetch_batches=2)
    it = iter(ld)
    next(it)
    it.close()
    time.sleep(0.2)
    assert not [t for t in threading.enumerate() if t.name.startswith("loader-r0")]
    assert ld.state_dict()["rank_0"]["batches"] == 1
    assert MANIFEST_NAME in LocalStore(data).list_keys()
