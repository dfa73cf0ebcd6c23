"""Bad objects and hand edits: the reconcile never raises on a job it cannot read, ends in a
clear condition or Event, makes deleted children again, never adopts (or trusts) someone
else's. The controller's part (counted once, backed off, others go on) is in
test_operator_controller.py; on the real control plane: tests/integration/test_operator_stored.py."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from llmtrain.operator.tick import ANN_ATTEMPT_STARTED, ANN_SUSPENDED_SECONDS

from llmtrain.api.status import ConditionType, Phase
from tests.unit.test_operator_fakes import set_all, views
from tests.unit.test_operator_reconcile import Harness
from tests.unit.test_operator_run import TOKEN, running


@pytest.mark.parametrize(
    "status",
    [
        {"restarts": "lots", "attempt": -1},
        {"conditions": ["Running"], "phase": "Training"},
        {"conditions": [{"type": "Running", "status": "Maybe"}]},
        {"rayJob": "demo-1", "startTime": 1234},
        {"checkpoint": {"latestStep": "forty"}, "progress": []},
    ],
)
def test_a_stored_status_this_code_cannot_read_is_rewritten_not_a_crash(status: dict[str, Any]) -> None:
    h = Harness()
    h.body["status"] = dict(status)
    h.body["metadata"]["resourceVersion"] = "5"
    out = h.tick()  # Harness.tick: the status written must fit the CRD's status schema
    assert [e for e in out.events if e.reason == "UnreadableStatus"]
    bad = {e.message for e in out.events if e.reason == "UnreadableStatus"}.pop()
    assert all(f"status.{k}" in bad for k in status if k != "phase")
    assert h.status["phase"] == Phase.Provisioning and h.api.names("Pod")
    assert not [e for e in h.tick(1).events if e.reason == "UnreadableStatus"]  # said once


def test_unreadable_annotations_read_as_absent() -> None:
    h = Harness()
    h.body["metadata"]["annotations"].update(
        {ANN_SUSPENDED_SECONDS: "a while", ANN_ATTEMPT_STARTED: "yesterday"}
    )
    h.body["spec"]["preRunningDeadlineSeconds"] = 60
    h.body["spec"]["activeDeadlineSeconds"] = 3600
    h.tick()
    assert h.status["phase"] == Phase.Provisioning
    h.tick(61)  # the pre-running clock falls back to startTime
    assert h.cond(ConditionType.Failed)["reason"] == "PreRunningDeadlineExceeded"


def test_users_cannot_switch_the_deadlines_off_with_annotations() -> None:
    """The deadlines' clocks are in status. Annotations saying the job was suspended for 1e9 s
    or its attempt started in the future are ignored for a job this operator started."""
    h = Harness()
    h.body["spec"]["activeDeadlineSeconds"] = 100
    h.body["spec"]["preRunningDeadlineSeconds"] = 60
    h.tick()
    h.body["metadata"]["annotations"].update(
        {ANN_SUSPENDED_SECONDS: "1e9", ANN_ATTEMPT_STARTED: "2099-01-01T00:00:00Z"}
    )
    assert h.status["suspendedSeconds"] == 0
    h.tick(61)
    assert h.cond(ConditionType.Failed)["reason"] == "PreRunningDeadlineExceeded"


def test_an_older_operators_clock_annotations_are_read_once_within_what_can_be_true() -> None:
    """A job started by an operator that kept the clocks in annotations: they move into status
    once, each held to what is possible (never more suspended time than the job has existed)."""
    h = Harness()
    h.body["spec"]["activeDeadlineSeconds"] = 100
    h.tick()
    for key in ("suspendedSeconds", "attemptStartTime"):
        h.body["status"].pop(key)  # as an older operator left it
    h.body["metadata"]["annotations"][ANN_SUSPENDED_SECONDS] = "1e9"
    h.tick(50)
    assert h.status["suspendedSeconds"] == 50  # at most the 50 s the job has existed
    assert h.status["attemptStartTime"] == h.status["startTime"]  # none given: the start
    h.body["metadata"]["annotations"][ANN_SUSPENDED_SECONDS] = "1e9"
    h.tick(99)  # active 149 - 50 = 99 s: not yet
    assert h.status["phase"] != Phase.Failed
    h.tick(1)
    assert h.cond(ConditionType.Failed)["reason"] == "DeadlineExceeded"


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ("oops", "spec"),
        ({"resources": {"workers": "many"}}, "spec.resources.workers"),
        ({"resources": {"gpuz": 1}}, "spec.resources.gpuz"),
    ],
)
def test_a_stored_spec_the_current_schema_rejects_fails_naming_the_field(spec: Any, field: str) -> None:
    h = Harness()
    if isinstance(spec, dict):
        for k, v in spec.items():
            h.body["spec"][k] = {**h.body["spec"].get(k, {}), **v}
    else:
        h.body["spec"] = spec
    h.tick()
    failed = h.cond(ConditionType.Failed)
    assert failed["reason"] == "InvalidSpec" and f"{field}:" in failed["message"], failed
    assert not h.api.names("Pod")
    assert not h.tick(5).events  # said once; no further work


# ------------------------------------------------------------------------- children


def _foreign(h: Harness, kind: str, name: str, **extra: Any) -> dict[str, Any]:
    obj = {
        "kind": kind,
        "metadata": {
            "name": name,
            "namespace": "ns1",
            "uid": "theirs",
            "ownerReferences": [{"uid": "theirs"}],
        },
        **extra,
    }
    h.api.objects[(kind, "ns1", name)] = obj
    return obj


@pytest.mark.parametrize(("kind", "name"), [("Secret", "demo-ray-auth"), ("ConfigMap", "demo-spec")])
def test_no_pods_beside_someone_elses_secret_or_configmap(kind: str, name: str) -> None:
    h = Harness()
    theirs = _foreign(h, kind, name, data={"token": base64.b64encode(b"k" * 64).decode()})
    out = h.tick()
    assert not h.api.names("Pod"), "pods would use their token or spec"
    assert "NameConflict" in h.event_reasons() and f"{kind} {name} exists and is not owned" in (
        out.requeue or ""
    )
    assert h.api.objects[(kind, "ns1", name)] is theirs  # untouched
    del h.api.objects[(kind, "ns1", name)]  # they delete it: ours is made, then the pods
    h.tick(5)
    assert h.api.names("Pod") and h.api.objects[(kind, "ns1", name)]["metadata"]["ownerReferences"]


def test_the_ray_token_is_never_read_from_someone_elses_secret() -> None:
    h = running()
    h.tick(1)
    assert h.ray.tokens[-1] == TOKEN
    h.rec._tokens.clear()  # a restarted operator
    _foreign(h, "Secret", "demo-ray-auth", data={"token": base64.b64encode(b"k" * 64).decode()})
    h.tick(5)
    assert ("k" * 64) not in h.ray.tokens
    assert "Secret demo-ray-auth is not owned by this job: not using its token" in (h.outs[-1].requeue or "")


def test_a_secret_deleted_by_hand_is_made_again_with_a_new_token_for_the_next_attempt() -> None:
    h = running(backoffLimit=2)
    h.tick(1)
    del h.api.objects[("Secret", "ns1", "demo-ray-auth")]
    h.rec._tokens.clear()  # an operator restart: the token is gone with it
    h.rec.token = lambda: "n" * 64
    h.tick(5)  # no token: the head cannot be asked …
    out = h.tick(301)  # … until the attempt ends
    assert out.restarted and h.status["attempt"] == 2
    h.tick(5, pods={})  # the old pods gone
    secret = h.api.objects[("Secret", "ns1", "demo-ray-auth")]
    assert base64.b64decode(secret["data"]["token"]).decode() == "n" * 64
    set_all(h.api, "running")
    h.tick(1)
    assert h.ray.tokens[-1] == "n" * 64 and h.ray.posts[-1] == "demo-2"


@pytest.mark.parametrize(("kind", "name"), [("Service", "demo-head-svc"), ("NetworkPolicy", "demo-ray")])
def test_a_service_or_policy_deleted_while_running_is_made_again_when_the_head_goes_silent(
    kind: str, name: str
) -> None:
    h = running()
    h.tick(1)
    del h.api.objects[(kind, "ns1", name)]
    h.ray.down = True  # no Service: the head's name resolves to nothing
    h.tick(5)
    assert (kind, "ns1", name) not in h.api.objects  # not on the first failed poll (Ray may be starting)
    h.tick(31)
    assert (kind, "ns1", name) in h.api.objects
    n = len(h.api.verbs("create"))
    h.tick(5)
    assert len(h.api.verbs("create")) == n  # once per silence


def test_a_pod_whose_labels_were_edited_by_hand_gets_them_back() -> None:
    h = Harness()
    h.tick()
    set_all(h.api, "running")
    pod = h.api.objects[("Pod", "ns1", "demo-worker-0")]
    del pod["metadata"]["labels"]["llmtrain.dev/job"]  # now invisible to the pod index
    h.rec.clock = lambda: 1e9  # long after it was made: not index lag
    index = {n: v for n, v in views(h.api).items() if n != "demo-worker-0"}  # selects on the label
    out = h.tick(5, pods=index)
    assert pod["metadata"]["labels"]["llmtrain.dev/job"] == "demo"
    assert "PodRelabeled" in [e.reason for e in out.events] and h.api.verbs("create", "Pod")[3:] == [
        "demo-worker-0"
    ]
    out = h.tick(1)  # seen again: nothing more to do
    assert "PodRelabeled" not in [e.reason for e in out.events]
