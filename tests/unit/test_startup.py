"""Time to the first step: the breakdown of the start-up marks, the process clock, and the
driver's plan that lets a rerun of a finished run skip Ray altogether."""

from __future__ import annotations

import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from llmtrain.api.config import TrainConfig
from llmtrain.api.progress import STARTUP_MARKS, ProgressEvent, process_started_at, startup_breakdown


def test_the_breakdown_follows_the_marks_in_order_and_sums_to_the_total() -> None:
    names = [mark for mark, _ in STARTUP_MARKS]
    marks = {name: 100.0 + 2 * i for i, name in enumerate(names)}
    phases = startup_breakdown(marks)
    assert [p for p, _ in phases] == [label for _, label in STARTUP_MARKS[1:]]
    assert all(seconds == pytest.approx(2.0) for _, seconds in phases)
    assert sum(s for _, s in phases) == pytest.approx(marks["step"] - marks["process"])


def test_a_missing_mark_joins_its_phase_to_the_next_and_an_early_one_counts_no_negative_time() -> None:
    marks = {
        "process": 0.0,
        "driver": 1.0,
        "data": 2.0,
        "ray": 5.0,
        "launch": 6.0,
        "worker": 10.0,
        "step": 12.0,
    }
    # A worker process Ray started before the launch (ahead of time): reached at launch.
    marks["worker_process"] = 3.0
    phases = dict(startup_breakdown(marks))
    assert phases["worker process"] == 0.0
    assert phases["worker set-up"] == pytest.approx(4.0)  # launch → worker, not 3.0 → worker
    assert "model build" not in phases and phases["first step"] == pytest.approx(2.0)
    assert sum(phases.values()) == pytest.approx(12.0)


def test_the_process_start_is_read_from_proc_to_the_tick() -> None:
    before = time.time()
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from llmtrain.api.progress import process_started_at; print(process_started_at())",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    started = float(out.stdout)
    # The child started after `before` and before it printed (its imports take a while).
    assert before - 0.02 <= started <= time.time()
    assert (mine := process_started_at()) is not None and mine < before


def test_the_marks_travel_in_the_progress_event() -> None:
    event = ProgressEvent(step=1, startup={"worker": 1.5, "step": 2.5})
    assert ProgressEvent.from_json(event.to_json()).startup == {"worker": 1.5, "step": 2.5}
    assert "startup" not in str(event.status_patch())  # not a status field


@pytest.mark.parametrize(("duration", "steps"), [({"max_steps": 7}, 7), ({"max_tokens": 10_000}, 3)])
def test_planned_steps_without_reading_data(duration: dict[str, int], steps: int) -> None:
    from llmtrain.runtime.driver import planned_steps

    train = TrainConfig(global_batch_size=8, micro_batch_size=8, world_size=1, **duration)  # type: ignore[arg-type]
    cfg = SimpleNamespace(train=train, model=SimpleNamespace(context_length=512))
    assert planned_steps(cfg, "/nonexistent", None) == steps  # type: ignore[arg-type]
