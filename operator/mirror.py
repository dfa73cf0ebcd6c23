"""The driver's snapshot into status: the run's stage as phase and Running condition,
progress, metrics, lineage, data, export and the search, and an Event per trial finished
since the status was last written. Pure over the Tick: no API."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmtrain.operator.outcome import Event
from llmtrain.operator.tick import Tick

from llmtrain.api.progress import STAGE_PHASE, RunSnapshot, TrialRecord, TuningInfo
from llmtrain.api.status import ConditionType, Phase, Reason

STAGE_REASON = {
    "starting": Reason.PreparingData,
    "data": Reason.PreparingData,
    "tuning": Reason.TuningRunning,
    "training": Reason.TrainingRunning,
    "export": Reason.Exporting,
    "done": Reason.Exporting,
    "failed": Reason.TrainingRunning,
}
# Events per reconcile for finished trials: a search of 1,000 short trials may finish
# dozens between two polls; the rest are counted in one more Event, and status.tuning
# has every count.
MAX_TRIAL_EVENTS = 3


def set_stage(t: Tick, stage: str, message: str) -> None:
    t.st["phase"] = STAGE_PHASE.get(stage, Phase.Training.value)
    t.conds.set(ConditionType.Running, True, STAGE_REASON.get(stage, Reason.TrainingRunning), message)


def mirror(t: Tick, snap: RunSnapshot) -> None:
    """The driver's snapshot into status: progress, metrics, lineage, data, export,
    the search; an Event per trial finished since the status was last written."""
    st = t.st
    if snap.tuning is not None:
        t.out.events += trial_events(st.get("tuning"), snap.tuning)
    for key, value in snap.status_patch().items():
        st[key] = {**(st.get(key) or {}), **value} if isinstance(value, dict) else value
    p = snap.progress
    where = f"step {p.step}/{p.total_steps}" if p is not None and p.total_steps else snap.stage
    if snap.stage not in ("done", "failed"):
        set_stage(t, snap.stage, f"{snap.stage}: {where}")
    if snap.data is not None:
        reason = Reason.DataReused if snap.data.reused else Reason.DataPrepared
        t.conds.set(
            ConditionType.DataReady,
            True,
            reason,
            f"{snap.data.train_tokens:,} train / {snap.data.validation_tokens:,} validation tokens "
            f"at {snap.data.manifest_uri}"
            + (f" (validation set: {snap.data.validation_set})" if snap.data.validation_set else ""),
        )


def trial_events(old: Mapping[str, Any] | None, new: TuningInfo) -> list[Event]:
    """Events for the trials that finished since ``old`` (the status' tuning, as last
    written): as many as the finished count grew, newest first from the snapshot's
    ``recent`` list. Stateless like the rest: a repeated snapshot grows no count."""
    before = sum(int((old or {}).get(k) or 0) for k in ("completed", "stopped", "failed"))
    fresh = new.finished - before
    if fresh <= 0:
        return []
    named = list(reversed(new.recent[-fresh:]))[:MAX_TRIAL_EVENTS]
    events = [_trial_event(new, t) for t in named]
    if fresh > len(named):
        more = fresh - len(named)
        best = (
            f"; best so far trial {new.best.number}, {new.metric} {new.best.metric:.4f}"
            if (new.best is not None and new.best.metric is not None)
            else ""
        )
        events.append(
            Event(
                "Normal",
                "TrialsFinished",
                f"{more} more trial{'s' * (more != 1)} finished since the last update "
                f"({new.finished} of {new.planned if new.planned is not None else '?'} so far: "
                f"{new.completed} completed, {new.stopped} stopped early, {new.failed} failed){best}",
            )
        )
    return events


def _trial_event(new: TuningInfo, t: TrialRecord) -> Event:
    metric = f"{new.metric} {t.metric:.4f}" if t.metric is not None else f"no {new.metric}"
    config = " ".join(f"{k.rsplit('.', 1)[-1]}={v:.4g}" for k, v in t.config.items())
    if t.state == "failed":
        return Event("Warning", "TrialFailed", f"trial {t.number} failed: {t.message}; {config}")
    if t.state == "stopped":
        return Event(
            "Normal",
            "TrialStopped",
            f"trial {t.number} stopped early after {t.steps} steps, {metric}; {config}",
        )
    return Event("Normal", "TrialFinished", f"trial {t.number} completed {t.steps} steps, {metric}; {config}")
