"""The training run on a Ready Ray cluster: this attempt's Ray job submitted once
(``<job>-<attempt>``), polled, the driver's snapshot mirrored into status; an ended Ray job
ends the attempt — success, a permanent failure (no retry), or a restart as attempt N+1
from the newest checkpoint. A head that does not answer ends it only after
``head_timeout_seconds``."""

from __future__ import annotations

from typing import Any

from llmtrain.operator import manifests as m
from llmtrain.operator import rayjobs as rj
from llmtrain.operator.children import ensure_static_children
from llmtrain.operator.diagnose import ClusterState
from llmtrain.operator.effects import create, owner_uids, ray_token
from llmtrain.operator.kube import ApiError
from llmtrain.operator.mirror import mirror, set_stage
from llmtrain.operator.outcome import Event, parse_time, rfc3339
from llmtrain.operator.rayjobs import HeadError, JobInfo
from llmtrain.operator.recovery import restart
from llmtrain.operator.tick import Stop, Tick

from llmtrain.api.progress import RunSnapshot, snapshot_from_log
from llmtrain.api.status import ConditionType, Phase, Reason

# Ray's dashboard answers ~5-20 s after the head pod runs: a Jobs API that is silent
# longer than this is worth a word in the Running condition.
JOBS_API_GRACE_SECONDS = 30.0
# A progress endpoint that answers for another Ray job this long is worth the Running
# condition (shorter: one poll that raced a restart); its figures are never written.
FOREIGN_GRACE_SECONDS = 15.0


def run(t: Tick) -> Stop | None:
    """8. The cluster is Ready (and the job not failed): submit this attempt's Ray job once,
    poll it, mirror the driver's snapshot; an ended Ray job ends the attempt."""
    if t.diagnosis.state == ClusterState.Ready and Phase(t.st["phase"]) != Phase.Failed:
        _run_attempt(t)
    return None


def _run_attempt(t: Tick) -> None:
    job, st = t.job, t.st
    sid = rj.submission_id(job.name, int(st.get("attempt") or 1))
    head = rj.head_of(t.rec.settings, job.namespace, job.name)
    ray_job: dict[str, Any] = dict(st.get("rayJob") or {})
    if ray_job.get("submissionId") != sid:  # a new attempt: nothing submitted yet
        ray_job = {"submissionId": sid}
    try:
        token = ray_token(t.rec, job.namespace, job.name, t.uid)
        if not ray_job.get("status"):  # status is set once the head took the job
            _submit(t, head, token, sid)
            return
        info = t.rec.ray.status(head, token, sid)
    except (HeadError, ApiError) as e:
        _unreachable(t, ray_job, str(e))
        return
    ray_job.pop("unreachableSince", None)
    if info is None:
        # The head does not know the job (deleted by hand, or lost): submit it again under
        # the same id, as KubeRay's HTTP mode does; the driver resumes from the newest
        # checkpoint. A lost head *pod* is the recover step's business (a new attempt).
        st["rayJob"] = {"submissionId": sid}
        t.out.requeue = f"the Ray head does not know Ray job {sid}: submitting it again"
        return
    ray_job["status"] = info.status
    st["rayJob"] = ray_job
    if info.status not in rj.TERMINAL:
        _poll_progress(t, head, token, ray_job)
        return
    ray_job.pop("foreignProgressSince", None)  # no more polls: a mark that cannot clear
    _ended(t, head, token, sid, info)


def _submit(t: Tick, head: rj.Head, token: str, sid: str) -> None:
    """The attempt's Ray job, submitted once the spec ConfigMap holds the current spec
    (raises HeadError or ApiError as the submission does)."""
    job, rec = t.job, t.rec
    text = m.spec_text(t.model())
    if not _spec_configmap_current(t, text):
        return
    body = rj.submission(
        text,
        job.namespace,
        job.name,
        sid,
        rec.settings.progress_port,
        m.driver_spec_path(rec.settings, job.namespace, job.name),
    )
    created = rec.ray.submit(head, token, body)
    t.st["rayJob"] = {"submissionId": sid, "status": "PENDING"}
    what = "submitted" if created else "found already submitted"
    t.out.events.append(Event("Normal", "RayJobSubmitted", f"Ray job {sid} {what} to {head.dashboard}"))
    set_stage(t, "starting", f"Ray job {sid} {what}; the driver starts")
    t.out.requeue = f"Ray job {sid} submitted"


def _ended(t: Tick, head: rj.Head, token: str, sid: str, info: JobInfo) -> None:
    """The Ray job ended: the attempt succeeded, failed for good (a permanent failure the
    driver reported), or is restarted."""
    st, conds, out = t.st, t.conds, t.out
    text, snap = _final_snapshot(t, head, token, sid)
    if snap is not None:
        mirror(t, snap)
    tail = rj.log_tail(text)
    if info.status == "SUCCEEDED":
        st["phase"] = Phase.Succeeded.value
        st["completionTime"] = rfc3339(t.now)
        msg = f"Ray job {sid} succeeded" + (
            f"; model exported to {st['exportUri']}" if st.get("exportUri") else ""
        )
        conds.set(ConditionType.Succeeded, True, Reason.Completed, msg)
        conds.set(ConditionType.Running, False, Reason.Completed, msg)
        out.events.append(Event("Normal", Reason.Completed.value, msg))
        return
    failure = snap.failure if snap is not None else None
    why = failure.message if failure is not None else (info.message or f"Ray job {sid} {info.status}")
    if failure is not None and failure.permanent:
        reason = Reason(failure.reason) if failure.reason in Reason.__members__ else Reason.RunFailed
        t.fail(reason, f"{why}\n--- driver log, last lines ---\n{tail}")
        return
    restart(t, f"Ray job {sid} {info.status.lower()}: {why}", Reason.RunFailed)


def _final_snapshot(t: Tick, head: rj.Head, token: str, sid: str) -> tuple[str, RunSnapshot | None]:
    """The ended Ray job's log and the driver's final snapshot in it (its last line), if
    that is this attempt's: another run's (its failure reason included) is not kept."""
    try:
        # Its tail goes into status and an Event: the job's own Ray token never does
        # (the driver masks it in its log; this holds for any other line that prints it).
        text = t.rec.ray.logs(head, token, sid).replace(token, "<redacted>")
    except HeadError as e:
        text = f"(the driver's log could not be read: {e})"
    snap = snapshot_from_log(text)
    if snap is not None and snap.submission_id != sid:
        t.out.foreign.append(("log", snap.submission_id or ""))
        return text, None
    return text, snap


def _poll_progress(t: Tick, head: rj.Head, token: str, ray_job: dict[str, Any]) -> None:
    """The running driver's snapshot into status, if it is this attempt's driver."""
    try:
        snap = t.rec.ray.progress(head, token, ray_job["submissionId"])
    except rj.ForeignSnapshot as e:
        _foreign_progress(t, head, ray_job, e)
        return
    except HeadError as e:  # the driver is starting, or busy: the next poll will tell
        t.out.requeue = f"no progress from the driver yet: {e}"
        return
    ray_job.pop("foreignProgressSince", None)
    mirror(t, snap)


def _foreign_progress(t: Tick, head: rj.Head, ray_job: dict[str, Any], e: rj.ForeignSnapshot) -> None:
    """The driver that answered the progress poll runs another Ray job: nothing of its
    snapshot goes into status; counted (``Outcome.foreign``), and the Running condition
    says so (``ForeignProgress``) once it has lasted FOREIGN_GRACE_SECONDS."""
    conds, out, now = t.conds, t.out, t.now
    out.foreign.append((e.source, e.found or ""))
    since = parse_time(ray_job.get("foreignProgressSince"))
    if since is None:
        since = now
        ray_job["foreignProgressSince"] = rfc3339(now)
    t.st["rayJob"] = ray_job
    why = (
        f"the progress endpoint {head.progress} answers for Ray job {e.found or '(unnamed)'}, not "
        f"this attempt's {e.expected}, since {ray_job['foreignProgressSince']}: none of its figures "
        "are written into status (a head Service that selects another job's head pod, or a stale "
        "endpoint?)"
    )
    if (now - since).total_seconds() >= FOREIGN_GRACE_SECONDS:
        if (conds.get(ConditionType.Running) or {}).get("reason") != Reason.ForeignProgress.value:
            out.events.append(Event("Warning", Reason.ForeignProgress.value, why))
        conds.set(ConditionType.Running, True, Reason.ForeignProgress, why)
    out.requeue = why


def _unreachable(t: Tick, ray_job: dict[str, Any], error: str) -> None:
    """A failed poll is not a failed job: the attempt ends only after
    ``head_timeout_seconds`` of failed polls (KubeRay's 300 s)."""
    st, conds, out, now = t.st, t.conds, t.out, t.now
    since = parse_time(ray_job.get("unreachableSince")) or now
    waited = (now - since).total_seconds()
    limit = t.rec.settings.head_timeout_seconds
    if waited >= limit:
        restart(
            t,
            f"the Ray head did not answer for {waited:.0f}s (limit {limit:.0f}s): {error}",
            Reason.HeadUnreachable,
        )
        return
    if "unreachableSince" not in ray_job:
        ray_job["unreachableSince"] = rfc3339(now)
    if waited >= JOBS_API_GRACE_SECONDS and t.rec._rechecked.get(t.uid) != ray_job["unreachableSince"]:
        # Silent past Ray's start-up: a Service or Secret deleted by hand is one reason.
        # Checked once per silence (made again if missing: the Service at once restores
        # the head's name), not on every new head's first polls (at 1000 jobs, 8000 calls).
        t.rec._rechecked[t.uid] = ray_job["unreachableSince"]
        t.rec._children_made.discard(t.uid)
        ensure_static_children(t, t.model())
    st["rayJob"] = ray_job
    # Stable while it lasts (no seconds counter): a waiting job costs no status write per tick.
    why = (
        f"the Ray head has not answered since {ray_job['unreachableSince']} (the attempt ends "
        f"{limit:.0f}s after): {error}"
    )
    if ray_job.get("status"):
        conds.set(ConditionType.Running, False, Reason.HeadUnreachable, why)
    elif waited >= JOBS_API_GRACE_SECONDS:  # before that, Ray is still starting: no news
        conds.set(ConditionType.Running, False, Reason.Provisioning, f"Ray cluster ready; but {why}")
    out.requeue = f"{why} ({waited:.0f}s so far)"


def _spec_configmap_current(t: Tick, text: str) -> bool:
    """The spec ConfigMap (what the driver reads) says what the spec says now: the mutable
    fields may have changed since the pods were made. False if it cannot be made."""
    ns, name, out, api = t.job.namespace, t.job.name, t.out, t.rec.api
    generation = t.meta.get("generation")
    if t.rec._spec_synced.get(t.uid) == generation:  # checked for this spec: no GET per tick
        return True
    cm_name = m.spec_configmap_name(name)
    cm = api.get("ConfigMap", ns, cm_name)
    if cm is None:  # deleted by hand: made again (a kubelet re-syncs the pods' copy)
        before = out.error
        create(t, m.spec_configmap(t.model()))
        if out.error != before:
            out.requeue = out.error
            return False
        return True
    if t.meta.get("uid") not in owner_uids(cm):  # never write into someone else's ConfigMap
        out.error = f"ConfigMap {cm_name} is not owned by this job: delete it, or rename the job"
        out.events.append(Event("Warning", "NameConflict", out.error))
        out.requeue = out.error
        return False
    if (cm.get("data") or {}).get(m.SPEC_FILE) != text:
        api.patch("ConfigMap", ns, cm_name, {"data": {m.SPEC_FILE: text}})
        out.events.append(Event("Normal", "SpecUpdated", f"ConfigMap {cm_name} updated to the current spec"))
    t.rec._spec_synced[t.uid] = generation
    return True
