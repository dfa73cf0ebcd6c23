"""An Event per finished trial: the operator compares the status' tuning counts with the
driver's snapshot and names the trials that finished since, a few per reconcile at most."""

from __future__ import annotations

from llmtrain.operator.reconcile import Reconciler

from llmtrain.api.progress import RunSnapshot, TrialRecord, TuningInfo, summarize
from tests.unit.test_operator_run import running

LR = "training.optimizer.lr"


class Search:
    """A search as the driver's tracker sees it: trials start, then finish in order."""

    def __init__(self, planned: int) -> None:
        self.planned = planned
        self.trials: dict[int, TrialRecord] = {}
        self.clock = 1.8e9

    def start(self, n: int) -> None:
        self.trials[n] = TrialRecord(n, "running", {LR: 1e-3 * n})

    def finish(self, n: int, state: str, metric: float | None = None, message: str | None = None) -> None:
        self.clock += 1
        steps = 6 if state == "completed" else 2
        self.trials[n] = TrialRecord(n, state, {LR: 1e-3 * n}, metric, steps, message, ended=self.clock)

    def info(self) -> TuningInfo:
        return summarize(
            list(self.trials.values()), search="random", metric="valLoss", mode="min", planned=self.planned
        )

    def snapshot(self) -> RunSnapshot:
        return RunSnapshot(stage="tuning", submission_id="demo-1", tuning=self.info())


def trial_events(h: object, out: object) -> list[tuple[str, str, str]]:
    return [(e.type, e.reason, e.message) for e in out.events if e.reason.startswith("Trial")]  # type: ignore[attr-defined]


def test_each_finished_trial_gets_one_event_and_a_repeated_snapshot_none() -> None:
    h = running()
    h.tick(1)
    h.ray.jobs["demo-1"] = h.ray.JobInfo("RUNNING")
    search = Search(planned=3)
    for n in (1, 2, 3):
        search.start(n)
    h.ray.snapshot = search.snapshot()
    assert trial_events(h, h.tick(5)) == []  # running is not finished
    assert h.status["phase"] == "Tuning"
    running_cond = next(c for c in h.status["conditions"] if c["type"] == "Running")
    assert running_cond["reason"] == "TuningRunning", running_cond

    search.finish(2, "stopped", 5.75)
    h.ray.snapshot = search.snapshot()
    assert trial_events(h, h.tick(5)) == [
        ("Normal", "TrialStopped", "trial 2 stopped early after 2 steps, valLoss 5.7500; lr=0.002")
    ]
    assert trial_events(h, h.tick(5)) == []  # the same snapshot again: nothing new

    search.finish(1, "completed", 4.5)
    search.finish(3, "failed", message="CUDA out of memory")
    h.ray.snapshot = search.snapshot()
    assert trial_events(h, h.tick(5)) == [
        ("Warning", "TrialFailed", "trial 3 failed: CUDA out of memory; lr=0.003"),
        ("Normal", "TrialFinished", "trial 1 completed 6 steps, valLoss 4.5000; lr=0.001"),
    ]
    tuning = h.status["tuning"]
    assert (tuning["completed"], tuning["stopped"], tuning["failed"]) == (1, 1, 1)
    assert "recent" not in tuning  # the snapshot's list, not status
    assert trial_events(h, h.tick(5)) == []


def test_a_thousand_trials_between_two_polls_are_a_few_events() -> None:
    """A burst of finished trials costs at most MAX_TRIAL_EVENTS named Events plus one that
    counts the rest, and the snapshot stays small."""
    h = running()
    h.tick(1)
    h.ray.jobs["demo-1"] = h.ray.JobInfo("RUNNING")
    search = Search(planned=1000)
    for n in range(1, 1001):
        search.start(n)
        search.finish(n, "completed" if n % 3 else "stopped", 4.0 + (n % 97) / 100)
    h.ray.snapshot = search.snapshot()
    assert len(search.snapshot().to_json()) < 16 * 1024
    out = h.tick(5)
    events = trial_events(h, out)
    assert len(events) == Reconciler.MAX_TRIAL_EVENTS + 1
    assert [e[2].split()[1] for e in events[:3]] == ["1000", "999", "998"]  # the newest first
    assert events[-1][1] == "TrialsFinished"
    assert events[-1][2].startswith("997 more trials finished since the last update (1000 of 1000 so far")
    assert "best so far trial 97, valLoss 4.0000" in events[-1][2]
    assert trial_events(h, h.tick(5)) == []


def test_a_restored_search_announces_no_trial_twice() -> None:
    """The driver restarted (a new attempt) and restored the search: its first snapshot
    already counts the trials announced before, so no Event repeats them."""
    h = running()
    h.tick(1)
    h.ray.jobs["demo-1"] = h.ray.JobInfo("RUNNING")
    search = Search(planned=4)
    for n in (1, 2):
        search.start(n)
        search.finish(n, "completed", 5.0 - n)
    h.ray.snapshot = search.snapshot()
    assert len(trial_events(h, h.tick(5))) == 2
    # A new driver: the same finished trials (seeded, with new end times) and a new one.
    restored = Search(planned=4)
    restored.clock = 1.9e9
    for n in (2, 1, 3):
        restored.start(n)
        restored.finish(n, "completed", 5.0 - n)
    h.ray.snapshot = restored.snapshot()
    assert [e[2].split()[1] for e in trial_events(h, h.tick(5))] == ["3"]
