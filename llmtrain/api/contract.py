"""The checkpoint contract (``status.checkpointContract``, version v1): what a scheduler or
tool needs to know about a job's checkpoints to decide whom to preempt or when to drain,
computed from the observed status alone (docs/checkpoint-contract.md).

Pure functions of (status, now): the operator writes the result into status at the end of
every reconcile (``operator/tick.py``), and any reader can recompute ``workAtRiskSeconds``
itself as ``now - atRiskSince``, which is exact between status writes too.

Why both a timestamp and a number: a number of seconds is stale the moment it is written
(status is written when something changes, not every second), so the stable field is
``atRiskSince``; ``workAtRiskSeconds`` with its ``asOf`` is the convenience for tools that
only read numbers (a scheduler's score, ``kubectl get -o wide``). To keep the number from
forcing a status write on every resync (at 1000 jobs, 1000 writes per resync for nothing),
:func:`settle` refreshes it only when another status field changes anyway (while training,
that is every progress poll) or the contract's stable fields change.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from llmtrain.api.status import CONTRACT_VERSION, Phase

# Refreshed with other status changes only (see settle); everything else is stable.
VOLATILE_FIELDS = ("workAtRiskSeconds", "stepsAtRisk", "asOf")


def _time(s: Any) -> dt.datetime | None:
    if not isinstance(s, str) or not s:
        return None
    try:
        t = dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


def _rfc3339(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def latest_checkpoint(status: Mapping[str, Any]) -> dict[str, Any] | None:
    """The newest complete checkpoint with its step, time and URI, from the lineage (the
    lineage record of ``latestUri`` holds the time; ``latestStep`` alone is enough)."""
    ck = status.get("checkpoint") or {}
    step, uri = ck.get("latestStep"), ck.get("latestUri")
    if step is None or not uri:
        return None
    out: dict[str, Any] = {"step": int(step), "uri": str(uri)}
    for rec in reversed(ck.get("lineage") or []):
        if rec.get("step") == step:
            if rec.get("time"):
                out["time"] = rec["time"]
            break
    else:
        resumed = ck.get("resumedFrom") or {}
        if resumed.get("step") == step and resumed.get("time"):
            out["time"] = resumed["time"]
    return out


def checkpoint_contract(
    status: Mapping[str, Any],
    now: dt.datetime,
    *,
    checkpoint_on_disruption: bool,
    disruption_checkpoint_seconds: float | None,
) -> dict[str, Any]:
    """``status.checkpointContract`` (camelCase, as stored) for a status and the time now.

    Work is at risk only while training: a suspended, pending or finished job has no run
    whose steps a disruption could lose. The at-risk window starts at the later of the
    newest checkpoint's completion and the current attempt's start (an attempt resumed from
    an old checkpoint re-did nothing before it started)."""
    latest = latest_checkpoint(status)
    training = status.get("phase") == Phase.Training.value
    out: dict[str, Any] = {
        "version": CONTRACT_VERSION,
        "attempt": int(status.get("attempt") or 0),
        "training": training,
        "checkpointOnDisruption": checkpoint_on_disruption,
        "workAtRiskSeconds": 0,
        "stepsAtRisk": 0,
        "asOf": _rfc3339(now),
    }
    if disruption_checkpoint_seconds is not None:
        out["disruptionCheckpointSeconds"] = round(disruption_checkpoint_seconds)
    if latest is not None:
        out["latestCheckpoint"] = latest
    if not training:
        return out
    starts = [t for t in (_time((latest or {}).get("time")), _time(status.get("attemptStartTime"))) if t]
    if starts:
        since = max(starts)
        out["atRiskSince"] = _rfc3339(since)
        out["workAtRiskSeconds"] = max(0, int((now - since).total_seconds()))
    step = int((status.get("progress") or {}).get("step") or 0)
    out["stepsAtRisk"] = max(0, step - (latest["step"] if latest is not None else 0))
    return out


def settle(old: Mapping[str, Any] | None, new: dict[str, Any], *, status_changed: bool) -> dict[str, Any]:
    """The contract to write: ``new``, except that when nothing else in status changed and
    only the volatile fields differ, the stored one (so the contract alone never causes a
    status write; readers compute ``now - atRiskSince`` for the exact figure)."""
    if old is None or status_changed:
        return new
    stable_old = {k: v for k, v in old.items() if k not in VOLATILE_FIELDS}
    stable_new = {k: v for k, v in new.items() if k not in VOLATILE_FIELDS}
    return dict(old) if stable_old == stable_new else new
