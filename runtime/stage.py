"""What every stage gets (the driver's and the tuning stage's alike): where the run lives
(:class:`Place`), the run's snapshot and its displays (:class:`Reporter`), and the loader
factory handed to each training worker (:func:`make_shard_loader`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtrain.api.progress import ProgressEvent, RunSnapshot
from llmtrain.api.s3 import S3Options


@dataclass
class Place:
    """What differs between the launchers: where local files and defaults go, how Ray is
    reached, how much of each node a training worker takes."""

    run_dir: Path  # local scratch: Ray Train's run directory, logs
    output_prefix: str  # the default checkpoint/model location: <prefix>/checkpoints, /model
    connect: Callable[[], None]  # start or join Ray: called once, right before training
    cpus_per_worker: float
    metrics_addr: str = "0.0.0.0"
    # A one-worker training run may train in this process, without Ray
    # (trainer.launch_in_process): locally, Ray's cluster, actors and worker process cost
    # seconds and buy nothing a user sees. Tuning trials and every run on a cluster keep Ray Train.
    in_process: bool = False


@dataclass
class Reporter:
    """The run's snapshot, updated by the stages; callbacks for a terminal display."""

    snapshot: RunSnapshot = field(default_factory=RunSnapshot)
    on_event: Callable[[ProgressEvent], None] | None = None
    on_stage: Callable[[str], None] | None = None
    # Set while training runs: asks rank 0 for a checkpoint at its next log step.
    ask_checkpoint: Callable[[], None] | None = None
    # Start-up marks (unix seconds, llmtrain.api.progress.STARTUP_MARKS): the driver's, then
    # rank 0's from the first step of the first training launch.
    startup: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def stage(self, stage: str) -> None:
        with self.lock:
            self.snapshot.stage = stage
            self.snapshot.updated = time.time()
        if self.on_stage is not None:
            self.on_stage(stage)

    def event(self, event: ProgressEvent) -> None:
        with self.lock:
            if event.startup and "step" not in self.startup:
                self.startup.update(event.startup)
            self.snapshot.absorb(event)
        if self.on_event is not None:
            self.on_event(event)

    def update(self, **changes: Any) -> None:
        with self.lock:
            for k, v in changes.items():
                setattr(self.snapshot, k, v)
            self.snapshot.updated = time.time()

    def json(self) -> str:
        with self.lock:
            return self.snapshot.to_json()


def make_shard_loader(
    data_uri: str,
    storage_options: S3Options | None,
    *,
    split: str,
    rank: int,
    world_size: int,
    micro_batch: int,
    context_length: int,
    seed: int,
) -> Any:
    """The loader factory handed to every training worker (a module-level function: picklable)."""
    from llmtrain.runtime.data.loader import open_loader

    return open_loader(
        data_uri,
        split=split,
        rank=rank,
        world_size=world_size,
        micro_batch=micro_batch,
        context_length=context_length,
        seed=seed,
        storage=storage_options,
    )
