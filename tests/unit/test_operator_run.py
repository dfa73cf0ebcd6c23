"""Reconcile step 8 — the training run as a Ray job — over the in-memory API and Jobs API,
and the requests it sends (pure functions). The real head: tests/integration/test_operator_run.py."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import pytest
import yaml
from llmtrain.operator import manifests as m
from llmtrain.operator import rayjobs as rj
from llmtrain.operator.manifests import OperatorSettings

from llmtrain.api.progress import (
    RESULT_PREFIX,
    CheckpointEntry,
    DataInfo,
    ProgressEvent,
    RunFailure,
    RunSnapshot,
    snapshot_from_log,
)
from llmtrain.api.status import ConditionType, Phase
from tests.unit.test_operator_fakes import JOB_UID, job_body, set_all, set_status, views
from tests.unit.test_operator_reconcile import Harness

TOKEN = "t" * 64


def running(**top: object) -> Harness:
    """A job whose Ray cluster is Ready and whose head answers (the storage Secret it
    references made first, as a user does)."""
    h = Harness(**top)
    ref = (top.get("storage") or {}).get("secretRef")  # type: ignore[attr-defined]
    if ref:
        h.api.put("Secret", "ns1", ref["name"], {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"})
    h.tick()
    set_all(h.api, "running")
    h.ray.down = False
    return h


def snapshot(step: int, stage: str = "training", **kw: object) -> RunSnapshot:
    snap = RunSnapshot(stage=stage, submission_id="demo-1", keep_last=2)
    snap.data = DataInfo("s3://bucket/data/manifest.json", 1000, 50, 512)
    snap.absorb(
        ProgressEvent(
            step=step,
            total_steps=10,
            tokens=step * 100,
            train_loss=3.0,
            tokens_per_second=99.0,
            eta_seconds=60.0,
            time=1.8e9,
        )
    )
    for k, v in kw.items():
        setattr(snap, k, v)
    return snap


# --------------------------------------------------------------------------- submit


def test_ready_cluster_submits_one_ray_job_with_the_jobs_token() -> None:
    h = running()
    out = h.tick(1)
    assert h.ray.posts == ["demo-1"]
    assert h.ray.tokens == [TOKEN]  # read from the job's Secret, not invented
    body = h.ray.bodies["demo-1"]
    # The driver reads the spec ConfigMap's mount, and knows the exact content to expect.
    text = h.api.objects[("ConfigMap", "ns1", "demo-spec")]["data"]["job.yaml"]
    digest = hashlib.sha256(text.encode()).hexdigest()
    assert body["entrypoint"] == (
        f"llmtrain driver --spec /etc/llmtrain/job.yaml --spec-sha256 {digest} "
        "--submission-id demo-1 --progress-port 8266"
    )
    doc = yaml.safe_load(text)
    # The uid names the job in the OWNER record at its output prefix (runtime/owner.py).
    assert doc["metadata"] == {"name": "demo", "namespace": "ns1", "uid": JOB_UID}
    assert doc["spec"]["resources"]["workers"] == 2
    assert "LLMTRAIN_SPEC" not in body["runtime_env"]["env_vars"]  # the spec travels one way only
    assert h.status["rayJob"] == {"submissionId": "demo-1", "status": "PENDING"}
    assert h.status["attempt"] == 1 and h.status["phase"] == Phase.Preprocessing
    assert "RayJobSubmitted" in [e.reason for e in out.events]
    for _ in range(3):
        h.tick(1)
    assert h.ray.posts == ["demo-1"]  # submitted once, then polled


def test_a_spec_edited_after_the_pods_were_made_reaches_the_configmap_before_submission() -> None:
    h = running()
    h.body["spec"]["training"]["logEverySteps"] = 7  # mutable: edited while the cluster came up
    out = h.tick(1)
    text = h.api.objects[("ConfigMap", "ns1", "demo-spec")]["data"]["job.yaml"]
    assert yaml.safe_load(text)["spec"]["training"]["logEverySteps"] == 7
    assert hashlib.sha256(text.encode()).hexdigest() in h.ray.bodies["demo-1"]["entrypoint"]
    assert h.api.verbs("patch", "ConfigMap") == ["demo-spec"]
    assert "SpecUpdated" in [e.reason for e in out.events]
    h.tick(1)
    assert h.api.verbs("patch", "ConfigMap") == ["demo-spec"]  # unchanged: not patched again


def test_a_deleted_spec_configmap_is_made_again_and_a_foreign_one_is_never_written() -> None:
    h = running()
    del h.api.objects[("ConfigMap", "ns1", "demo-spec")]
    h.tick(1)
    assert h.api.names("ConfigMap") == {"demo-spec"} and h.ray.posts == ["demo-1"]

    h = running()
    foreign = h.api.objects[("ConfigMap", "ns1", "demo-spec")]
    foreign["metadata"]["ownerReferences"] = [{"uid": "someone-else"}]
    foreign["data"] = {"job.yaml": "theirs"}
    out = h.tick(1)
    assert h.ray.posts == [] and foreign["data"] == {"job.yaml": "theirs"}
    assert "NameConflict" in [e.reason for e in out.events] and "not owned by this job" in (out.requeue or "")


def test_an_operator_restart_between_post_and_status_write_submits_nothing_new() -> None:
    h = running()
    h.tick(1)
    h.body["status"].pop("rayJob")  # the status write was lost with the operator
    h.rec = type(h.rec)(h.api, OperatorSettings(), token=lambda: "x" * 64, ray=h.ray)  # type: ignore[arg-type]
    out = h.tick(1)
    assert h.ray.posts == ["demo-1", "demo-1"] and list(h.ray.jobs) == ["demo-1"]
    assert any("found already submitted" in e.message for e in out.events)


def test_progress_is_mirrored_into_status() -> None:
    h = running()
    h.tick(1)
    h.ray.jobs["demo-1"] = h.ray.JobInfo("RUNNING")
    snap = snapshot(4)
    snap.add_checkpoint(CheckpointEntry(2, "s3://b/ck/step_2", 1.8e9, 3.5))
    h.ray.snapshot = snap
    h.tick(5)
    st = h.status
    assert st["phase"] == Phase.Training
    assert st["progress"] == {
        "step": 4,
        "epoch": 0,
        "tokensSeen": 400,
        "totalSteps": 10,
        "percent": 40.0,
        "eta": "1m00s",
    }
    assert st["metrics"]["trainLoss"] == 3.0 and st["metrics"]["tokensPerSecond"] == 99.0
    assert st["checkpoint"]["latestStep"] == 2 and st["checkpoint"]["lineage"][0]["valLoss"] == 3.5
    assert st["data"]["trainTokens"] == 1000
    assert h.cond(ConditionType.DataReady)["reason"] == "DataPrepared"
    assert h.cond(ConditionType.Running)["reason"] == "TrainingRunning"
    assert "step 4/10" in h.cond(ConditionType.Running)["message"]
    h.ray.snapshot = snapshot(8)
    h.tick(5)
    assert h.status["progress"]["step"] == 8


def test_success_keeps_the_final_snapshot_and_frees_the_pods() -> None:
    h = running()
    h.tick(1)
    final = snapshot(10, stage="done", export_uri="s3://b/model")
    h.ray.end("demo-1", "SUCCEEDED", "line 1\n" + RESULT_PREFIX + final.to_json() + "\n")
    out = h.tick(5)
    assert h.status["phase"] == Phase.Succeeded
    assert h.status["exportUri"] == "s3://b/model" and h.status["progress"]["step"] == 10
    assert h.cond(ConditionType.Succeeded)["status"] == "True"
    assert h.api.names("Pod") == set()
    assert "Completed" in [e.reason for e in out.events]


def test_permanent_failure_fails_at_once_with_the_reason_and_log_tail() -> None:
    h = running(backoffLimit=3)
    h.tick(1)
    failed = RunSnapshot(
        stage="failed",
        submission_id="demo-1",
        failure=RunFailure("DataError", "data: no objects under s3://x/", True),
    )
    log = "\n".join(f"log line {i}" for i in range(40)) + "\n" + RESULT_PREFIX + failed.to_json()
    h.ray.end("demo-1", "FAILED", log)
    h.tick(5)
    assert h.status["phase"] == Phase.Failed and h.status["restarts"] == 0
    msg = h.cond(ConditionType.Failed)["message"]
    assert h.cond(ConditionType.Failed)["reason"] == "DataError"
    assert (
        msg.startswith("data: no objects under s3://x/") and "log line 39" in msg and "log line 19" not in msg
    )
    assert RESULT_PREFIX not in msg
    assert h.ray.posts == ["demo-1"]


def test_a_prefix_owned_by_another_job_fails_at_once_with_output_prefix_in_use(tmp_path: Path) -> None:
    """Two jobs on one prefix (issue 26 item 2): the driver of the second finds the first's OWNER
    record and reports OutputPrefixInUse, permanent; the job fails at once with that reason,
    naming the prefix and the owner, and a Warning Event. The driver's side, with the job as
    the spec ConfigMap gives it (its uid), is the real one."""
    from llmtrain.runtime.owner import Owner, PrefixInUseError, claim, job_owner
    from llmtrain.runtime.store import LocalStore

    from llmtrain.api.job import LLMTrainingJob

    h = running(backoffLimit=3)
    h.tick(1)
    text = h.api.objects[("ConfigMap", "ns1", "demo-spec")]["data"]["job.yaml"]
    me = job_owner(LLMTrainingJob.model_validate(yaml.safe_load(text)), tmp_path / "run")
    assert me == Owner("ns1", "demo", JOB_UID)
    prefix = LocalStore(tmp_path / "ckpt")
    first = Owner("ns1", "demo", "0a0a0a0a-old-job-deleted-since")  # the same name, created before
    claim(prefix, first)
    with pytest.raises(PrefixInUseError) as e:
        claim(prefix, me)
    failed = RunSnapshot(
        stage="failed", submission_id="demo-1", failure=RunFailure("OutputPrefixInUse", str(e.value), True)
    )
    h.ray.end("demo-1", "FAILED", "llmtrain driver: OutputPrefixInUse\n" + RESULT_PREFIX + failed.to_json())
    out = h.tick(5)
    cond = h.cond(ConditionType.Failed)
    assert h.status["phase"] == Phase.Failed and h.status["restarts"] == 0  # no retry: it cannot help
    assert (
        cond["reason"] == "OutputPrefixInUse"
        and h.cond(ConditionType.Running)["reason"] == "OutputPrefixInUse"
    )
    assert cond["message"].startswith(
        f"output prefix {prefix.uri} belongs to LLMTrainingJob ns1/demo (uid 0a0a0a0a-old-job-deleted-since), "
        f"not to this job, LLMTrainingJob ns1/demo (uid {JOB_UID})"
    )
    assert [(e.type, e.reason) for e in out.events if e.reason == "OutputPrefixInUse"] == [
        ("Warning", "OutputPrefixInUse")
    ]


def test_retriable_failure_is_a_new_attempt_until_the_backoff_limit() -> None:
    h = running(backoffLimit=1)
    h.tick(1)
    h.ray.end("demo-1", "FAILED", "Traceback ...\nRuntimeError: worker died\n")
    out = h.tick(5)
    assert out.restarted and h.status["attempt"] == 2 and h.status["restarts"] == 1
    assert h.cond(ConditionType.Running)["reason"] == "Restarting"
    assert h.api.names("Pod") == set()
    h.tick(1)
    set_all(h.api, "running")
    h.tick(1)
    assert h.ray.posts == ["demo-1", "demo-2"]
    h.ray.end("demo-2", "FAILED", "again\n")
    h.tick(5)
    assert h.status["phase"] == Phase.Failed
    assert h.cond(ConditionType.Failed)["reason"] == "RunFailed"
    assert "spec.backoffLimit=1" in h.cond(ConditionType.Failed)["message"]


def test_a_failed_poll_is_not_a_failed_job_until_the_timeout() -> None:
    h = running()
    h.tick(1)
    h.ray.down = True
    out = h.tick(5)
    assert h.status["phase"] == Phase.Preprocessing and h.status["rayJob"]["unreachableSince"]
    assert out.requeue and "has not answered since" in out.requeue
    assert h.cond(ConditionType.Running)["reason"] == "HeadUnreachable"
    h.tick(200)
    assert h.status["attempt"] == 1
    h.ray.down = False
    h.tick(5)  # it answers again: the clock resets
    assert "unreachableSince" not in h.status["rayJob"]
    h.ray.down = True
    h.tick(5)
    out = h.tick(301)
    assert out.restarted and h.status["attempt"] == 2
    assert "did not answer for 301s" in h.cond(ConditionType.Running)["message"]


def test_a_jobs_api_that_never_answers_is_said_after_a_grace_then_ends_the_attempt() -> None:
    h = Harness()
    h.tick()
    set_all(h.api, "running")
    h.tick(1)  # down: nothing submitted
    assert h.cond(ConditionType.Running)["message"].startswith("Ray cluster ready: 1 head + 2 workers")
    h.tick(31)
    assert "Ray Jobs API" not in h.cond(ConditionType.Running)["message"]
    assert "has not answered since" in h.cond(ConditionType.Running)["message"]
    out = h.tick(300)
    assert out.restarted and h.status["attempt"] == 2


def test_a_job_the_head_does_not_know_is_submitted_again_under_its_id() -> None:
    h = running()
    h.tick(1)
    h.ray.jobs.clear()  # deleted by hand through the Jobs API
    out = h.tick(5)
    assert not out.restarted and h.status["attempt"] == 1
    h.tick(1)
    assert h.ray.posts == ["demo-1", "demo-1"] and "demo-1" in h.ray.jobs


def test_suspend_stops_the_ray_job_before_deleting_pods_and_resume_is_a_new_attempt() -> None:
    h = running()
    h.tick(1)
    h.ray.jobs["demo-1"] = h.ray.JobInfo("RUNNING")
    h.body["spec"]["suspend"] = True
    h.tick(1)
    assert h.ray.stopped == ["demo-1"] and h.api.names("Pod") == set()
    h.body["spec"]["suspend"] = False
    h.tick(1)
    assert h.status["attempt"] == 2
    set_all(h.api, "running")
    h.tick(1)
    assert h.ray.posts == ["demo-1", "demo-2"]


def training(step: int) -> Harness:
    h = running()
    h.tick(1)
    h.ray.jobs["demo-1"] = h.ray.JobInfo("RUNNING")
    h.ray.snapshot = snapshot(step)
    h.tick(5)
    assert h.status["phase"] == Phase.Training
    return h


def test_suspend_during_training_waits_for_a_last_checkpoint_then_deletes_the_pods() -> None:
    h = training(4)
    h.body["spec"]["suspend"] = True
    out = h.tick(1)
    assert h.ray.checkpoints_asked == 1 and h.ray.stopped == [] and h.api.names("Pod")
    assert h.status["rayJob"]["checkpointAskedStep"] == 4 and out.requeue
    assert "last checkpoint was asked for at step 4" in h.cond(ConditionType.Running)["message"]
    h.ray.snapshot.add_checkpoint(CheckpointEntry(4, "s3://b/ck/step_4"))  # predates the ask
    h.tick(5)
    assert h.ray.stopped == [] and h.ray.checkpoints_asked == 1  # asked once, still waiting
    h.ray.snapshot = snapshot(6)
    h.ray.snapshot.add_checkpoint(CheckpointEntry(6, "s3://b/ck/step_6"))
    out = h.tick(5)
    assert h.ray.stopped == ["demo-1"] and h.api.names("Pod") == set()
    assert h.status["phase"] == Phase.Suspended and h.status["checkpoint"]["latestStep"] == 6
    assert (
        "resumes from its newest checkpoint, step 6 when suspended"
        in h.cond(ConditionType.Suspended)["message"]
    )


def test_suspend_without_a_checkpoint_in_time_goes_ahead_with_a_warning() -> None:
    h = training(4)
    h.body["spec"]["suspend"] = True
    h.tick(1)
    h.tick(30)
    assert h.ray.stopped == []
    out = h.tick(31)  # 61 s after asking: over OperatorSettings.suspend_checkpoint_seconds
    assert h.ray.stopped == ["demo-1"] and h.status["phase"] == Phase.Suspended
    assert any(e.type == "Warning" and "no checkpoint within 60s" in e.message for e in out.events)


def test_worker_pod_failure_after_submission_still_restarts_when_the_head_fails() -> None:
    h = running(backoffLimit=2)
    h.tick(1)
    set_status(h.api.pods()["demo-head"], "failed", exit_code=137)
    out = h.tick(1)
    assert out.restarted and h.status["attempt"] == 2


# -------------------------------------------------------------------- pure functions


def test_requests_carry_the_token_and_deterministic_ids() -> None:
    head = rj.head_of(OperatorSettings(), "research", "big")
    assert head == rj.Head(
        "http://big-head-svc.research.svc.cluster.local:8265",
        "http://big-head-svc.research.svc.cluster.local:8266",
    )
    assert rj.head_of(
        OperatorSettings(head_host="127.0.0.1", dashboard_port=1, progress_port=2), "a", "b"
    ) == rj.Head("http://127.0.0.1:1", "http://127.0.0.1:2")
    body = rj.submission("kind: LLMTrainingJob\n", "research", "big", "big-3", 8266, "/etc/llmtrain/job.yaml")
    assert body["metadata"] == {"llmtrain.dev/job": "big", "llmtrain.dev/namespace": "research"}
    assert " --spec /etc/llmtrain/job.yaml --spec-sha256 " in body["entrypoint"]
    # A stand-in's per-job path (tests, k8s-demo): {namespace}/{name} filled in, quoted for the shell.
    settings = OperatorSettings(driver_spec_path="/tmp/my specs/{namespace}/{name}/job.yaml")
    assert m.driver_spec_path(settings, "research", "big") == "/tmp/my specs/research/big/job.yaml"
    assert "--spec '/tmp/my specs/x/y.yaml' " in rj.entrypoint("s", 1, "/tmp/my specs/x/y.yaml", "d")
    r = rj.submit_request(head, "secret", body)
    assert (r.method, r.url) == ("POST", "http://big-head-svc.research.svc.cluster.local:8265/api/jobs/")
    assert r.headers["Authorization"] == "Bearer secret"
    assert json.loads(r.body or b"")["submission_id"] == "big-3"
    assert rj.status_request(head, "s", "big-3").url.endswith("/api/jobs/big-3")
    assert rj.stop_request(head, "s", "big-3").method == "POST"
    assert (
        rj.progress_request(head, "s", "big-3").url
        == "http://big-head-svc.research.svc.cluster.local:8266/progress?submissionId=big-3"
    )
    assert rj.checkpoint_request(head, "s", "big-3").url.endswith("/checkpoint?submissionId=big-3")
    assert rj.already_submitted(
        500, "Job with submission_id big-3 already exists. Please use a different submission_id."
    )
    assert not rj.already_submitted(500, "internal error")


def test_job_info_and_log_tail_parsing() -> None:
    assert rj.parse_job_info('{"status": "RUNNING", "driver_exit_code": null}') == rj.JobInfo("RUNNING")
    assert rj.parse_job_info('{"status": "FAILED", "driver_exit_code": 2, "message": "m"}').exit_code == 2
    with pytest.raises(rj.HeadError):
        rj.parse_job_info('{"detail": "nope"}')
    tail = rj.log_tail("\n".join(str(i) for i in range(100)) + "\n" + RESULT_PREFIX + "{}", lines=3)
    assert tail == "97\n98\n99"


# ---------------------------------------------------------------------- the snapshot


def test_snapshot_merges_events_bounds_lineage_and_round_trips() -> None:
    snap = RunSnapshot(keep_last=2)
    snap.absorb(ProgressEvent(step=5, train_loss=2.0, time=1.0))
    snap.absorb(ProgressEvent(step=5, stage="validation", val_loss=1.5, val_perplexity=4.48, time=2.0))
    snap.absorb(ProgressEvent(step=5, stage="checkpoint", checkpoint_uri="u5", checkpoint_step=5, time=3.0))
    for s in (10, 15):
        snap.absorb(
            ProgressEvent(step=s, stage="checkpoint", checkpoint_uri=f"u{s}", checkpoint_step=s, time=s)
        )
    assert snap.progress is not None and snap.progress.train_loss == 2.0 and snap.progress.val_loss == 1.5
    assert [c.step for c in snap.checkpoints] == [10, 15]  # keepLast
    again = RunSnapshot.from_json(snap.to_json())
    assert again == snap
    patch = again.status_patch()
    assert patch["checkpoint"]["latestUri"] == "u15" and patch["metrics"]["bestValLoss"] == 1.5
    # The lineage says only what is complete: a checkpoint URI on a log event is not a record.
    assert (
        "latestUri"
        not in RunSnapshot(progress=ProgressEvent(step=1, checkpoint_uri="half")).status_patch()["checkpoint"]
    )


@pytest.mark.parametrize("bad", ["[]", '{"stage": "exploding"}', '{"progress": 3}', "x" * 70_000])
def test_snapshot_parsing_refuses_what_is_not_one(bad: str) -> None:
    with pytest.raises(ValueError):
        RunSnapshot.from_json(bad)


def test_snapshot_from_log_takes_the_last_result_line() -> None:
    a, b = RunSnapshot(stage="training"), RunSnapshot(stage="done")
    text = f"{RESULT_PREFIX}{a.to_json()}\nnoise\n{RESULT_PREFIX}{b.to_json()}\ntrailing\n"
    assert snapshot_from_log(text) == b
    assert snapshot_from_log("no result here") is None


# --------------------------------------------------------------- the driver's endpoint


def test_progress_server_answers_only_the_jobs_token_and_its_own_attempt() -> None:
    import urllib.error
    import urllib.request

    from llmtrain.runtime.progress_server import ProgressServer
    from llmtrain.runtime.stage import Reporter

    report = Reporter(RunSnapshot(submission_id="big-3"))
    report.event(ProgressEvent(step=3, total_steps=9, train_loss=1.0, time=time.time()))
    server = ProgressServer(report, TOKEN, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.port}/progress"
    try:
        codes = []
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5)
            codes.append(e.value.code)
        assert codes == [401, 403]
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            snap = RunSnapshot.from_json(r.read())
        assert snap.progress is not None and snap.progress.step == 3
        # The operator's client reads it the same way.
        head = rj.Head("http://unused", f"http://127.0.0.1:{server.port}")
        assert rj.RayJobs().progress(head, TOKEN, "big-3").progress == snap.progress
        with pytest.raises(rj.HeadError, match="token was refused"):
            rj.RayJobs().progress(head, "nope", "big-3")
        # Asked for another attempt, the driver refuses with its own id (409): the client
        # says whose snapshot it would have been, and nothing of it comes back.
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(
                urllib.request.Request(
                    f"{url}?submissionId=other-1", headers={"Authorization": f"Bearer {TOKEN}"}
                ),
                timeout=5,
            )
        assert e.value.code == 409 and json.loads(e.value.read())["submission_id"] == "big-3"
        with pytest.raises(rj.ForeignSnapshot) as foreign:
            rj.RayJobs().progress(head, TOKEN, "other-1")
        assert (foreign.value.expected, foreign.value.found, foreign.value.source) == (
            "other-1",
            "big-3",
            "progress",
        )
        # POST /checkpoint: refused while no training runs, then handed to rank 0's queue.
        with pytest.raises(rj.HeadError, match="HTTP 409"):
            rj.RayJobs().checkpoint(head, TOKEN, "big-3")
        asked: list[bool] = []
        report.ask_checkpoint = lambda: asked.append(True)
        with pytest.raises(rj.HeadError, match="token was refused"):
            rj.RayJobs().checkpoint(head, "nope", "big-3")
        with pytest.raises(rj.ForeignSnapshot):  # another run's driver never checkpoints for us
            rj.RayJobs().checkpoint(head, TOKEN, "other-1")
        assert asked == []
        assert rj.RayJobs().checkpoint(head, TOKEN, "big-3") == 3 and asked == [True]
    finally:
        server.close()


def test_a_lost_worker_is_recreated_and_the_attempt_goes_on() -> None:
    h = running(backoffLimit=2)
    h.tick(1)
    h.ray.jobs["demo-1"] = h.ray.JobInfo("RUNNING")
    h.tick(1)
    head_uid = h.api.pods()["demo-head"]["metadata"]["uid"]
    set_status(h.api.pods()["demo-worker-0"], "failed", exit_code=137)
    stale = views(h.api)
    out = h.tick(1)
    assert out.restarted and h.status["restarts"] == 1 and h.status["attempt"] == 1
    assert h.api.names("Pod") == {"demo-head", "demo-worker-1"}  # only the lost worker went
    assert "demo-worker-0 recreated" in h.cond(ConditionType.Running)["message"]
    h.tick(1, pods=stale)  # the index still shows the failed pod: counted once
    assert h.status["restarts"] == 1
    h.tick(1)
    assert h.api.names("Pod") == {"demo-head", "demo-worker-0", "demo-worker-1"}
    assert h.api.pods()["demo-head"]["metadata"]["uid"] == head_uid
    set_all(h.api, "running")
    h.tick(1)
    assert h.ray.posts == ["demo-1"] and h.ray.stopped == []  # the same Ray job goes on


def test_a_head_pod_deleted_under_the_run_is_a_new_attempt() -> None:
    """`kubectl delete pod <job>-head` on a real node: the pod shows deletionTimestamp, then
    is gone; it never shows an ended phase. Found on the real node: treated as merely missing,
    the head was made again in the same attempt and Ray job demo-1 submitted to the new head
    while the old worker died with the old GCS (negative control: without
    _deleted_under_the_run this test fails on attempt == 1)."""
    h = running(backoffLimit=2)
    h.tick(1)
    h.ray.jobs["demo-1"] = h.ray.JobInfo("RUNNING")
    h.tick(1)
    h.api.pods()["demo-head"]["metadata"]["deletionTimestamp"] = "2026-12-07T16:40:00Z"
    out = h.tick(1)
    assert out.restarted and h.status["attempt"] == 2 and h.status["restarts"] == 1
    assert "demo-head was deleted while Ray job demo-1 ran" in h.cond(ConditionType.Running)["message"]
    assert h.api.names("Pod") == {"demo-head"}  # the workers go too; the head is going already

    # Gone before the operator looked (no deleting state seen): the same.
    h = running(backoffLimit=2)
    h.tick(1)
    h.ray.jobs["demo-1"] = h.ray.JobInfo("RUNNING")
    h.tick(1)
    del h.api.objects[("Pod", "ns1", "demo-head")]
    out = h.tick(1)
    assert out.restarted and h.status["attempt"] == 2
    h.tick(1)
    set_all(h.api, "running")
    h.tick(1)
    assert h.ray.posts == ["demo-1", "demo-2"]  # attempt 2 is a new Ray job, on the new head


def test_a_worker_pod_deleted_under_the_run_counts_and_the_attempt_goes_on() -> None:
    h = running(backoffLimit=2)
    h.tick(1)
    h.ray.jobs["demo-1"] = h.ray.JobInfo("RUNNING")
    h.tick(1)
    h.api.pods()["demo-worker-0"]["metadata"]["deletionTimestamp"] = "2026-12-07T16:40:00Z"
    out = h.tick(1)
    assert out.restarted and h.status["restarts"] == 1 and h.status["attempt"] == 1
    assert "demo-worker-0 was deleted" in h.cond(ConditionType.Running)["message"]
    h.tick(1)
    assert h.status["restarts"] == 1  # counted once
    assert h.ray.posts == ["demo-1"]


def test_a_lost_worker_before_submission_restarts_the_whole_cluster() -> None:
    h = Harness(backoffLimit=2)
    h.tick()
    set_all(h.api, "running")
    set_status(h.api.pods()["demo-worker-0"], "failed", exit_code=1)
    out = h.tick(1)
    assert out.restarted and h.status["attempt"] == 2 and h.api.names("Pod") == set()


def test_a_running_ray_job_holds_a_finalizer_until_the_job_ends() -> None:
    from llmtrain.operator.tick import FINALIZER

    h = running()
    out = h.tick(1)
    assert out.finalizer is True  # submitted: from now on deletion stops the Ray job first
    h.body["metadata"]["finalizers"] = [FINALIZER]
    assert h.tick(1).finalizer is None  # there already
    h.ray.end("demo-1", "SUCCEEDED", RESULT_PREFIX + snapshot(10, stage="done").to_json())
    out = h.tick(1)
    assert h.status["phase"] == Phase.Succeeded and out.finalizer is False


def test_deleting_a_job_stops_its_ray_job_then_drops_the_finalizer() -> None:
    from llmtrain.operator.tick import FINALIZER

    from tests.unit.test_operator_controller import KEY, Setup
    from tests.unit.test_operator_fakes import FakeRayJobs, job_body

    s = Setup()
    ray = FakeRayJobs(down=False)
    ray.jobs["demo-1"] = ray.JobInfo("RUNNING")
    s.controller.reconciler.ray = ray  # type: ignore[assignment]
    body = job_body()
    body["metadata"].update(
        finalizers=["someone.else/keep", FINALIZER],
        deletionTimestamp="2026-11-26T12:00:00Z",
        resourceVersion="7",
    )
    body["status"] = {"phase": "Training", "rayJob": {"submissionId": "demo-1", "status": "RUNNING"}}
    import base64

    s.api.objects[("Secret", "ns1", "demo-ray-auth")] = {
        "metadata": {"name": "demo-ray-auth", "namespace": "ns1", "ownerReferences": [{"uid": JOB_UID}]},
        "data": {"token": base64.b64encode(TOKEN.encode()).decode()},
    }
    s.add(body, "MODIFIED")
    s.controller.reconcile_key(KEY)
    assert ray.stopped == ["demo-1"] and ray.tokens == [TOKEN]
    assert s.writer.patches[-1] == (
        "main",
        {"metadata": {"finalizers": ["someone.else/keep"], "resourceVersion": "7"}},
    )


def test_the_driver_waits_for_the_submitted_spec_and_names_a_stale_one(tmp_path: Path) -> None:
    from llmtrain.runtime.spec_file import load_job

    spec = tmp_path / "job.yaml"
    old = yaml.safe_dump(job_body())
    new = yaml.safe_dump(job_body(name="edited"))
    spec.write_text(old)
    digest = hashlib.sha256(new.encode()).hexdigest()
    # A kubelet syncing the ConfigMap a moment after the driver starts: the new spec is read.
    threading.Timer(0.5, spec.write_text, (new,)).start()
    assert load_job(str(spec), digest, wait_seconds=30).metadata.name == "edited"
    spec.write_text(old)  # never synced: a clear error, not a run of the old spec
    with pytest.raises(ValueError, match=r"--spec .*job.yaml: still not the submitted spec after 1 s"):
        load_job(str(spec), digest, wait_seconds=1)
    assert load_job(str(spec)).metadata.name == "demo"  # by hand: no digest, no wait


def test_a_new_operator_process_makes_a_deleted_network_policy_again() -> None:
    """Found on the real node: the job's NetworkPolicy deleted while no operator ran (scaled to
    0), every pod still there; the new operator pod left the head unfenced, because the
    children were checked only when a pod was missing. Negative control: without the once-per-
    process check in step 6 the policy stays gone."""
    h = running()
    h.tick(1)
    del h.api.objects[("NetworkPolicy", "ns1", "demo-ray")]
    h.tick(1)
    assert ("NetworkPolicy", "ns1", "demo-ray") not in h.api.objects  # the same process: no GET per tick
    h.rec._children_made.clear()  # a new operator process
    h.tick(1)
    assert ("NetworkPolicy", "ns1", "demo-ray") in h.api.objects
    calls = len(h.api.calls)
    h.tick(1)
    assert not [c for c in h.api.calls[calls:] if c[1] == "NetworkPolicy"]  # once per process


@pytest.mark.parametrize("timeout", [0.3, None])
def test_the_progress_server_drops_a_client_that_sends_nothing(timeout: float | None) -> None:
    """A connection that sends no request is closed after the socket timeout; without one
    (the negative control, timeout=None) it would be held open for ever."""
    import socket

    from llmtrain.runtime.progress_server import ProgressServer
    from llmtrain.runtime.stage import Reporter

    server = ProgressServer(
        Reporter(RunSnapshot(submission_id="s-1")), TOKEN, "127.0.0.1", 0, timeout=timeout
    )  # type: ignore[arg-type]
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as idle:
            idle.sendall(b"GET /progress HTTP/1.1\r\n")  # half a request, then silence
            idle.settimeout(2.0)
            if timeout is None:
                with pytest.raises(TimeoutError):
                    idle.recv(1)
            else:
                assert idle.recv(1) == b""  # closed by the server
    finally:
        server.close()
