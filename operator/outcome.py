"""What one reconcile decides, as plain data: the :class:`Outcome` the controller writes,
its :class:`Event`\\ s, the status' :class:`Conditions`, and the JSON merge patches
between two statuses. Pure: no API, no clock (times are passed in)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from llmtrain.api.status import ConditionType, Phase, Reason


def rfc3339(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(s: str | None) -> dt.datetime | None:
    """An RFC 3339 time; None when absent or unreadable (an annotation edited by hand)."""
    if not s or not isinstance(s, str):
        return None
    try:
        t = dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Outcome:
    """What one reconcile decided; the handler writes it."""

    status: dict[str, Any] | None  # camelCase status patch, None when nothing changed
    annotations: dict[str, str | None] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    requeue: str | None = None  # why the job needs another look soon
    phase: Phase = Phase.Pending
    provisioning_seconds: float | None = None  # set once per attempt: created → all Running
    restarted: bool = False
    error: str | None = None  # an API failure worth a TemporaryError
    finalizer: bool | None = None  # add (True) or remove (False) FINALIZER
    # (source, the other Ray job's id) per snapshot refused as another run's this reconcile:
    # counted in llmtrain_operator_foreign_snapshots_total, logged once per other id.
    foreign: list[tuple[str, str]] = field(default_factory=list)


class Conditions:
    """The status' condition list, updated metav1-style: lastTransitionTime moves only when
    a condition's status changes. Types the operator does not own are kept as they are."""

    def __init__(self, current: list[dict[str, Any]], now: str, generation: int | None) -> None:
        self.by_type: dict[str, dict[str, Any]] = {c["type"]: dict(c) for c in current if "type" in c}
        self.order = [c["type"] for c in current if "type" in c]
        self.now = now
        self.generation = generation

    def get(self, t: ConditionType) -> dict[str, Any] | None:
        return self.by_type.get(t.value)

    def is_true(self, t: ConditionType) -> bool:
        c = self.get(t)
        return bool(c and c.get("status") == "True")

    def set(self, t: ConditionType, status: bool, reason: Reason, message: str) -> None:
        s = "True" if status else "False"
        old = self.by_type.get(t.value)
        cond: dict[str, Any] = {
            "type": t.value,
            "status": s,
            "reason": reason.value,
            "message": message[:32_000],
            "lastTransitionTime": self.now
            if not old or old.get("status") != s
            else old["lastTransitionTime"],
        }
        if self.generation is not None:
            cond["observedGeneration"] = self.generation
        if t.value not in self.by_type:
            self.order.append(t.value)
        self.by_type[t.value] = cond

    def drop(self, t: ConditionType) -> None:
        if self.by_type.pop(t.value, None) is not None:
            self.order.remove(t.value)

    def as_list(self) -> list[dict[str, Any]]:
        return [self.by_type[t] for t in self.order]


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns ``old`` into ``new``: changed keys, and
    ``None`` for a key ``new`` dropped — a merge patch keeps what it does not name, so a
    nested field left out (``rayJob.unreachableSince``) would otherwise live on. Lists and
    scalars are replaced whole."""
    patch: dict[str, Any] = {k: None for k in old if k not in new}
    for k, v in new.items():
        o = old.get(k)
        if isinstance(v, dict) and isinstance(o, dict):
            sub = merge_patch(o, v)
            if sub:
                patch[k] = sub
        elif v != o:
            patch[k] = v
    return patch


def apply_merge_patch(target: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """What the API server does with a merge patch (RFC 7386), in place; for tests and benches."""
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, dict):
            current = target.get(k)
            target[k] = apply_merge_patch(current if isinstance(current, dict) else {}, v)
        else:
            target[k] = v
    return target
