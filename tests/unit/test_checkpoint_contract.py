"""``status.checkpointContract`` (llmtrain/api/contract.py): the pure computation, the
no-churn rule, and the block the operator renders into status. Read from the API server
during a run: tests/integration/test_operator_drain.py."""

from __future__ import annotations

import datetime as dt

from llmtrain.api.contract import checkpoint_contract, latest_checkpoint, settle
from llmtrain.api.progress import CheckpointEntry
from llmtrain.api.status import CheckpointContract, LLMTrainingJobStatus
from tests.unit.test_operator_fakes import NOW
from tests.unit.test_operator_run import running, snapshot

LINEAGE = {
    "latestUri": "s3://b/ck/step_40",
    "latestStep": 40,
    "lineage": [
        {"uri": "s3://b/ck/step_20", "step": 20, "time": "2026-11-26T11:50:00Z"},
        {"uri": "s3://b/ck/step_40", "step": 40, "time": "2026-11-26T11:58:00Z"},
    ],
}


def status(**over: object) -> dict[str, object]:
    st: dict[str, object] = {
        "phase": "Training",
        "attempt": 2,
        "attemptStartTime": "2026-11-26T11:40:00Z",
        "progress": {"step": 52},
        "checkpoint": LINEAGE,
    }
    st.update(over)
    return st


def contract(st: dict[str, object], now: dt.datetime = NOW) -> dict[str, object]:
    out = checkpoint_contract(st, now, checkpoint_on_disruption=True, disruption_checkpoint_seconds=60.0)
    CheckpointContract.model_validate(out)  # the shape the CRD's status schema allows
    return out


def test_training_job_states_its_latest_checkpoint_and_the_work_at_risk() -> None:
    assert contract(status()) == {
        "version": "v1",
        "attempt": 2,
        "training": True,
        "checkpointOnDisruption": True,
        "disruptionCheckpointSeconds": 60,
        "latestCheckpoint": {"step": 40, "uri": "s3://b/ck/step_40", "time": "2026-11-26T11:58:00Z"},
        "atRiskSince": "2026-11-26T11:58:00Z",
        "workAtRiskSeconds": 120,
        "stepsAtRisk": 12,
        "asOf": "2026-11-26T12:00:00Z",
    }


def test_an_attempt_started_after_its_checkpoint_risks_only_its_own_time() -> None:
    # Resumed at 11:59 from the 11:58 checkpoint: the minute between was not work.
    out = contract(status(attemptStartTime="2026-11-26T11:59:00Z"))
    assert out["atRiskSince"] == "2026-11-26T11:59:00Z" and out["workAtRiskSeconds"] == 60


def test_no_checkpoint_yet_risks_everything_since_the_attempt() -> None:
    out = contract(status(checkpoint={}))
    assert "latestCheckpoint" not in out
    assert out["atRiskSince"] == "2026-11-26T11:40:00Z" and out["workAtRiskSeconds"] == 1200
    assert out["stepsAtRisk"] == 52


def test_a_job_not_training_has_nothing_at_risk() -> None:
    for phase in ("Suspended", "Pending", "Succeeded", "Provisioning"):
        out = contract(status(phase=phase))
        assert out["training"] is False and out["workAtRiskSeconds"] == 0 and out["stepsAtRisk"] == 0
        assert "atRiskSince" not in out and out["latestCheckpoint"]["step"] == 40  # type: ignore[index]


def test_latest_checkpoint_time_from_the_lineage_or_the_resumed_one() -> None:
    ck = {
        "latestUri": "s3://b/ck/step_40",
        "latestStep": 40,
        "resumedFrom": {"uri": "u", "step": 40, "time": "T"},
    }
    assert latest_checkpoint({"checkpoint": ck}) == {"step": 40, "uri": "s3://b/ck/step_40", "time": "T"}
    assert latest_checkpoint({"checkpoint": {"latestStep": 3}}) is None  # no URI: not a checkpoint to name
    assert latest_checkpoint({}) is None


def test_settle_never_makes_a_status_write_of_its_own() -> None:
    old = contract(status())
    later = contract(status(), NOW + dt.timedelta(seconds=30))
    assert later["workAtRiskSeconds"] == 150
    # Nothing else changed: the stored contract stays (readers compute now - atRiskSince).
    assert settle(old, later, status_changed=False) == old
    # Something else is written anyway: the seconds are refreshed with it.
    assert settle(old, later, status_changed=True) == later
    # A stable field changed (a new checkpoint): always written.
    moved = contract(status(attempt=3), NOW + dt.timedelta(seconds=30))
    assert settle(old, moved, status_changed=False) == moved
    assert settle(None, later, status_changed=False) == later


def test_the_operator_renders_the_contract_into_status() -> None:
    h = running(checkpoint={"uri": "s3://bucket/ck", "everySteps": 2})
    h.tick(1)
    h.ray.jobs["demo-1"] = h.ray.JobInfo("RUNNING")
    h.ray.snapshot = snapshot(6)
    h.ray.snapshot.add_checkpoint(CheckpointEntry(4, "s3://bucket/ck/step_4", NOW.timestamp() + 2))
    h.tick(5)
    c = h.status["checkpointContract"]
    LLMTrainingJobStatus.model_validate(h.status)
    assert c["version"] == "v1" and c["attempt"] == 1 and c["training"] is True
    assert c["latestCheckpoint"] == {
        "step": 4,
        "uri": "s3://bucket/ck/step_4",
        "time": "2026-11-26T12:00:02Z",
    }
    assert c["atRiskSince"] == "2026-11-26T12:00:02Z" and c["workAtRiskSeconds"] == 4
    assert (
        c["stepsAtRisk"] == 2
        and c["checkpointOnDisruption"] is True
        and c["disruptionCheckpointSeconds"] == 60
    )
    # A resync with nothing new writes nothing (the contract's seconds do not force a write).
    out = h.tick(5)
    assert out.status is None
    # Suspended: nothing at risk.
    h.body["spec"]["suspend"] = True
    h.tick(2)  # the last checkpoint asked for, at step 6
    h.ray.snapshot = snapshot(8)
    h.ray.snapshot.add_checkpoint(CheckpointEntry(8, "s3://bucket/ck/step_8", NOW.timestamp() + 20))
    h.tick(2)
    c = h.status["checkpointContract"]
    assert h.status["phase"] == "Suspended" and c["training"] is False and c["workAtRiskSeconds"] == 0
    assert c["latestCheckpoint"]["step"] == 8
