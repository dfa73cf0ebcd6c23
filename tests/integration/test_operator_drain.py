# ruff: noqa: F811  (pytest fixtures imported from other modules are redefined as arguments)
"""``kubectl drain`` on the KWOK node hosting a training job's head: the job's
PodDisruptionBudget holds the drain, the operator takes a just-in-time checkpoint through
the suspend path, deletes the pods itself, and the new attempt resumes from that checkpoint
on another node (operator/disruption.py). The checkpoint contract
(``status.checkpointContract``, docs/checkpoint-contract.md) is read from the API server
while the job trains.

Real everything, as tests/integration/test_operator_run.py: the control plane with KWOK
nodes, the local Ray stand-in, moto's S3 server, the operator as a subprocess, the real
``kubectl drain``.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import time
from typing import Any

import controlplane  # tests/cluster, on the path through tests/integration/conftest.py
import pytest
from test_operator_lifecycle import Api, Operator, crds, serve  # noqa: F401 (fixtures)
from test_operator_run import (  # noqa: F401 (fixtures)
    _after_first_checkpoint,
    _succeeded,
    _why,
    api,
    corpus,
    long_job,
    run_operator,
    standin,
)

from tests.data.datahelpers import S3Server, s3_server  # noqa: F401 (fixture)
from tests.raystandin import RayStandIn

pytestmark = [pytest.mark.cluster, pytest.mark.ray]


def _time(s: str) -> dt.datetime:
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00"))


def _assert_contract(st: dict[str, Any]) -> dict[str, Any]:
    """The contract as a scheduler reads it: consistent with the rest of the status it
    was written with."""
    c: dict[str, Any] = st["checkpointContract"]
    assert c["version"] == "v1" and c["attempt"] == st["attempt"], c
    assert c["latestCheckpoint"]["step"] == st["checkpoint"]["latestStep"], (c, st["checkpoint"])
    assert c["latestCheckpoint"]["uri"] == st["checkpoint"]["latestUri"]
    if c["training"]:
        # The seconds are as of asOf, from atRiskSince: a reader computes now - atRiskSince.
        since, as_of = _time(c["atRiskSince"]), _time(c["asOf"])
        assert abs((as_of - since).total_seconds() - c["workAtRiskSeconds"]) <= 1, c
        assert since >= _time(c["latestCheckpoint"]["time"])
        assert c["stepsAtRisk"] == st["progress"]["step"] - c["latestCheckpoint"]["step"], (c, st["progress"])
    return c


def _drain_mid_training(api: Api, name: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Drain the node of the job's head between two periodic checkpoints; wait for the
    disruption to be handled. (the status just before, the status after, the drain's output)"""
    before = _after_first_checkpoint(api, name)
    # Between two periodic checkpoints (every 40 steps), so that steps are at risk.
    before = api.wait(
        lambda: (s := api.status(name))["progress"]["step"] % 40 >= 10 and s, f"{name}: steps at risk", 120
    )
    _assert_contract(before)
    node = next(p.spec.node_name for p in api.pods(name) if p.metadata.name == f"{name}-head")
    drain = subprocess.Popen(
        [
            str(controlplane.binaries()["kubectl"]),
            "drain",
            node,
            "--ignore-daemonsets",
            "--delete-emptydir-data",
            "--force",
            f"--pod-selector=llmtrain.dev/job={name}",
            "--timeout=150s",
        ],
        env=api.c.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        drained_at: dt.datetime | None = None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            st = api.status(name)
            d = st.get("disruption") or {}
            if drain.poll() is not None and drained_at is None:
                drained_at = dt.datetime.now(dt.UTC)
            if d.get("completionTime") and drained_at is not None:
                break
            time.sleep(0.2)
        out = drain.communicate(timeout=60)[0]
        assert drain.returncode == 0, out
        assert drained_at is not None and d.get("completionTime"), st
        # The budget held the drain until the operator let the pods go (its refusals are in
        # the drain's output when the checkpoint took longer than the drain's first try).
        assert drained_at >= _time(d["completionTime"]) - dt.timedelta(seconds=1), (drained_at, d, out)
        return before, st, out
    finally:
        if drain.poll() is None:
            drain.kill()
        api.c.kubectl("uncordon", node)


@pytest.mark.slow
def test_drain_takes_a_jit_checkpoint_and_resumes_from_it(
    api: Api, run_operator: Operator, standin: RayStandIn, corpus: str, s3_server: S3Server
) -> None:
    api.create(long_job("drain", corpus, s3_server.endpoint))
    before, st, _ = _drain_mid_training(api, "drain")
    d = st["disruption"]
    print(
        "status.checkpointContract before the drain:\n" + json.dumps(before["checkpointContract"], indent=2)
    )
    print("status.disruption:\n" + json.dumps(d, indent=2))
    assert d["justInTime"] and d["attempt"] == 1, _why(st, run_operator, api, "drain")
    # The just-in-time checkpoint holds every step done when the drain was noticed.
    assert d["checkpointStep"] >= d["step"] >= before["progress"]["step"], d
    assert d["checkpointStep"] > before["checkpoint"]["latestStep"]
    assert d["stepsLost"] == 0, d
    reasons = [e.reason for e in api.events("drain")]
    assert "Disrupted" in reasons
    st = _succeeded(api, "drain", run_operator)
    print("status.checkpointContract at the end:\n" + json.dumps(st["checkpointContract"], indent=2))
    # Not a failure: a new attempt, no restart counted against backoffLimit.
    assert st["attempt"] == 2 and st["restarts"] == 0, _why(st, run_operator, api, "drain")
    assert st["rayJob"]["submissionId"] == "drain-2"
    # The resumed run's first step is the checkpoint's + 1 (a periodic checkpoint may follow
    # it before Ray's stop lands, as with suspend: then it resumes from that newer one).
    assert st["checkpoint"]["resumedFrom"]["step"] >= d["checkpointStep"]
    assert st["progress"]["step"] == 240
    c = _assert_contract(st)
    assert c["training"] is False and c["workAtRiskSeconds"] == 0 and c["attempt"] == 2
    # The new attempt has its budget again (lifted for the drain, made with the new pods).
    assert api.c.kubectl("get", "pdb", "drain-ray", "-n", api.ns, "-o", "name").stdout.strip()
    print(api.c.kubectl("get", "ltj", "-n", api.ns, "-o", "wide").stdout)


@pytest.mark.slow
def test_drain_without_the_jit_checkpoint_loses_the_steps_since_the_periodic_one(
    api: Api, run_operator: Operator, standin: RayStandIn, corpus: str, s3_server: S3Server
) -> None:
    """spec.checkpoint.onDisruption: false — the negative control of the test above."""
    job = long_job("nojit", corpus, s3_server.endpoint)
    job["spec"]["checkpoint"]["onDisruption"] = False
    # Periodic checkpoints far apart (120, 240): between the drain and the run's stop (the
    # status lags the run; on a loaded machine by tens of steps) no periodic checkpoint may
    # land, or the run loses nothing and this control proves nothing (seen: drained at 80).
    job["spec"]["checkpoint"]["everySteps"] = 120
    api.create(job)
    before, st, _ = _drain_mid_training(api, "nojit")
    d = st["disruption"]
    print("status.disruption (no JIT checkpoint):\n" + json.dumps(d, indent=2))
    assert not d["justInTime"] and before["checkpointContract"]["checkpointOnDisruption"] is False
    assert d["checkpointStep"] == before["checkpoint"]["latestStep"] or d["checkpointStep"] % 40 == 0
    assert d["stepsLost"] == d["step"] - d["checkpointStep"] > 0, d
    st = _succeeded(api, "nojit", run_operator)
    # >=: the stand-in's Ray processes outlive the evicted KWOK pods until Ray's stop lands
    # (a real pod dies with its eviction), so a periodic checkpoint may follow, as with suspend.
    assert st["attempt"] == 2 and st["checkpoint"]["resumedFrom"]["step"] >= d["checkpointStep"]
    assert st["progress"]["step"] == 240
