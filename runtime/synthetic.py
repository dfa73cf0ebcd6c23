"""A synthetic token loader honouring :mod:`llmtrain.api.loader`, for tests and benchmarks.

Every window is an arithmetic progression ``(start + stride·t) mod vocab`` drawn from a
generator seeded by (seed, split, window index): learnable, cheap, and identical wherever it
is generated. Global order follows the real loader's contract: epoch ``e`` is a permutation
of the windows seeded by (seed, e); micro batch ``j`` of rank ``r`` holds windows
``order[(j·world_size + r)·micro_batch : … + micro_batch]``, so the windows of one optimizer
step are the same set whatever the world size / micro batch split.

Imports only torch and the standard library.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from llmtrain.api.loader import LoaderResumeError, rank_key


class SyntheticLoader:
    def __init__(
        self,
        split: str,
        rank: int,
        world_size: int,
        micro_batch: int,
        context_length: int,
        seed: int,
        *,
        vocab_size: int = 64,
        windows: int = 64,
    ) -> None:
        if split not in ("train", "validation"):
            raise ValueError(f"unknown split {split!r}")
        self.split, self.rank, self.world_size = split, rank, world_size
        self.micro_batch, self.context_length, self.seed = micro_batch, context_length, seed
        self.vocab_size, self.windows = vocab_size, windows
        self._epoch = 0
        self._yielded = 0  # micro batches of the current epoch handed to the caller
        self.dropped_windows = windows % (world_size * micro_batch)
        # Window i is (start_i + stride_i·t) mod vocab; drawn once for all windows of the split,
        # from a generator of (seed, split) — crc32, not hash(): str hashes are salted per process.
        g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{split}".encode()))
        self._start = torch.randint(vocab_size, (windows,), generator=g)
        self._stride = torch.randint(1, 5, (windows,), generator=g)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{windows} windows cannot fill one micro batch on {world_size} ranks")

    @property
    def steps_per_epoch(self) -> int:
        return self.windows // (self.world_size * self.micro_batch)

    @property
    def epoch(self) -> int:
        return self._epoch

    def window(self, index: int) -> Tensor:
        return self._windows(torch.tensor([index]))[0]

    def _windows(self, indices: Tensor) -> Tensor:
        steps = torch.arange(self.context_length + 1)
        return (self._start[indices, None] + self._stride[indices, None] * steps) % self.vocab_size

    def _order(self, epoch: int) -> Tensor:
        return torch.randperm(self.windows, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))

    def __iter__(self) -> Iterator[Tensor]:
        if self._yielded >= self.steps_per_epoch:  # the previous epoch was exhausted
            self._epoch, self._yielded = self._epoch + 1, 0
        order = self._order(self._epoch)
        while self._yielded < self.steps_per_epoch:
            first = (self._yielded * self.world_size + self.rank) * self.micro_batch
            batch = self._windows(order[first : first + self.micro_batch])
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {
            rank_key(self.rank): {
                "epoch": self._epoch,
                "yielded": self._yielded,
                "world_size": self.world_size,
                "micro_batch": self.micro_batch,
            }
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = state.get(rank_key(self.rank))
        if (
            mine is not None
            and mine["world_size"] == self.world_size
            and mine["micro_batch"] == self.micro_batch
        ):
            self._epoch, self._yielded = mine["epoch"], mine["yielded"]
            return
        # Another layout: continue from the same global window position if it is one of ours.
        saved = state.get(rank_key(0))
        if saved is None:
            raise LoaderResumeError(f"loader state has no {rank_key(0)} entry")
        position = saved["yielded"] * saved["world_size"] * saved["micro_batch"]
        per_step = self.world_size * self.micro_batch
        if position % per_step:
            raise LoaderResumeError(
                f"saved position {position} windows is not a multiple of {per_step}: resume with the "
                f"saved spec.resources.workers ({saved['world_size']})"
            )
        self._epoch, self._yielded = saved["epoch"], position // per_step


def tiny_spec_dict(**overrides: Any) -> dict[str, Any]:
    """A minimal valid ``spec`` (camelCase) for a tiny model; ``overrides`` deep-merge into it,
    keyed by dotted camelCase paths, e.g. ``tiny_spec_dict(**{"model.architecture.ropeTheta": 500.0})``."""
    spec: dict[str, Any] = {
        "data": {
            "sources": [{"name": "stdlib", "pythonStdlib": {}}],
            "tokenizer": {"train": {"vocabSize": 300}},
            "outputUri": "/tmp/llmtrain-unused",
        },
        "model": {
            "architecture": {"layers": 2, "dModel": 32, "heads": 4, "contextLength": 16, "multipleOf": 16},
            "init": {"random": {"seed": 0}},
        },
        "training": {
            "batch": {"globalBatchSize": 4, "microBatchSize": 2},
            "duration": {"maxSteps": 4},
            "logEverySteps": 1,
        },
        "metrics": {"enabled": False},
        "resources": {"workers": 1},
    }
    for path, value in overrides.items():
        node = spec
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return spec


# --------------------------------------------------------------------------------------
# A local multi-process harness (gloo on 127.0.0.1): what torchrun does, small enough for
# tests. A rank that dies takes the others down, as a real launcher would.


def loopback_interface() -> str:
    """Name of the loopback network interface (lo on Linux, lo0 on macOS)."""
    import socket

    names = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    return names[0] if names else "lo"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(
    rank: int, world_size: int, port: int, fn: Any, args: tuple[Any, ...], out: str, env: dict[str, str]
) -> None:
    import os
    import pickle
    import sys
    import traceback

    import torch.distributed as dist

    os.environ.update(env)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    try:
        if world_size > 1:
            dist.init_process_group(
                "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
            )
        value, error = fn(*args), None
    except BaseException as e:  # reported to the parent, which re-raises
        value, error = None, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    with open(f"{out}/rank_{rank}.pkl", "wb") as f:
        pickle.dump((value, error), f)
    if world_size > 1 and dist.is_initialized():
        if error is None:
            dist.destroy_process_group()
        else:
            os._exit(1)  # peers may be stuck in a collective; don't wait for them
    # The result is on disk, so skip interpreter finalization: under load, gloo's C++ threads
    # can still be unwinding while Python tears down, and the rank then dies with SIGABRT
    # ("terminate called without an active exception") after having succeeded (pytorch#179291).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if error is None else 1)


class RankFailure(RuntimeError):
    def __init__(self, message: str, exitcodes: list[int | None], errors: list[str | None]) -> None:
        super().__init__(message)
        self.exitcodes, self.errors = exitcodes, errors


def run_ranks(
    world_size: int, fn: Any, *args: Any, env: dict[str, str] | None = None, timeout: float = 300
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` spawned ranks in one gloo group; their return values.

    ``fn`` must be importable (module level). Raises :class:`RankFailure` with each rank's
    exit code and error text when any rank fails or is killed.
    """
    import multiprocessing as mp
    import pickle
    import tempfile
    import time

    ctx = mp.get_context("spawn")
    port = _free_port()
    # gloo otherwise binds each pair to the address of the host name (a private-range IP).
    env = {"GLOO_SOCKET_IFNAME": loopback_interface(), **(env or {})}
    with tempfile.TemporaryDirectory(prefix="llmtrain-ranks-") as out:
        procs = [
            ctx.Process(target=_rank_main, args=(r, world_size, port, fn, args, out, env), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        failed_at: float | None = None
        while any(p.is_alive() for p in procs):
            if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
                failed_at = time.monotonic()
            if time.monotonic() > deadline or (failed_at is not None and time.monotonic() - failed_at > 5):
                for p in procs:
                    if p.is_alive():
                        p.kill()
            time.sleep(0.05)
        for p in procs:
            p.join()
        values, errors = [], []
        for r in range(world_size):
            try:
                with open(f"{out}/rank_{r}.pkl", "rb") as f:
                    value, error = pickle.load(f)
            except FileNotFoundError:
                value, error = None, f"rank {r} exited with {procs[r].exitcode} and no result"
            values.append(value)
            errors.append(error)
        codes = [p.exitcode for p in procs]
        if any(errors) or any(c != 0 for c in codes):
            first = next((e for e in errors if e), "")
            raise RankFailure(f"ranks failed (exit codes {codes}): {first}", codes, errors)
        return values


def train_worker(
    cfg: dict[str, Any],
    loader_kwargs: dict[str, Any] | None = None,
    ctx_kwargs: dict[str, Any] | None = None,
    events: str | None = None,
    loader_factory: Any = None,
) -> Any:
    """Run :func:`llmtrain.runtime.train.train` with the synthetic loader, or ``loader_factory``
    (picklable, e.g. ``functools.partial(ShardLoader, data_dir)``), as a ``run_ranks`` target.

    ``events``: a file that rank 0 appends every ProgressEvent to, as JSON lines.
    """
    import functools

    from llmtrain.runtime.train import RunContext, train

    from llmtrain.api.config import RuntimeConfig
    from llmtrain.api.progress import ProgressEvent

    def record(event: ProgressEvent) -> None:
        if events is not None:
            with open(events, "a") as f:
                f.write(event.to_json() + "\n")

    factory = loader_factory or functools.partial(SyntheticLoader, **(loader_kwargs or {}))
    return train(
        RuntimeConfig.from_dict(cfg),
        factory,
        on_progress=record,
        ctx=RunContext(metrics_addr="127.0.0.1", **(ctx_kwargs or {})),
    )


class AskOnCall:
    """A picklable ``RunContext.checkpoint_requested`` that answers True on its ``n``-th call
    only (rank 0 polls it once per log step): "checkpoint now", as a suspend asks."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls == self.n


class JsonlSink:
    """A picklable ``on_progress`` that appends each ProgressEvent to a JSON-lines file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, event: Any) -> None:
        with open(self.path, "a") as f:
            f.write(event.to_json() + "\n")


class PickleSink:
    """A picklable ``on_result`` that writes the TrainResult to a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, result: Any) -> None:
        import pickle

        with open(self.path, "wb") as f:
            pickle.dump(result, f)
