"""When a Ray node ends: the whole Ray cluster restarted as a new attempt (its GCS state and
the training group die with any one node), or a lost worker made again under the running
Ray job, up to ``spec.backoffLimit``; and pods stuck with an image the spec no longer
names made again with the new one."""

from __future__ import annotations

from collections.abc import Mapping

from llmtrain.operator import manifests as m
from llmtrain.operator import rayjobs as rj
from llmtrain.operator.diagnose import ClusterState, PodView
from llmtrain.operator.effects import CRASH_LOG_LINES, delete_pods, stop_ray_job
from llmtrain.operator.kube import ApiError
from llmtrain.operator.outcome import Event, rfc3339
from llmtrain.operator.tick import ANN_RESTARTED_PODS, Stop, Tick

from llmtrain.api.status import ConditionType, Phase, Reason


def recover(t: Tick) -> Stop | None:
    """5. A pod ended: a restart (or a new worker); pods stuck with an image the spec no
    longer names: made again. Either ends the tick."""
    diag, live = t.diagnosis, t.live
    in_flight = (t.st.get("rayJob") or {}).get("status") in ("PENDING", "RUNNING")
    lost = _deleted_under_the_run(t)
    if lost is not None:
        name, pod = lost
        why = f"pod {name} was deleted while Ray job {t.st['rayJob']['submissionId']} ran"
        if pod is not None and pod.role == m.ROLE_WORKER:
            _recreate_worker(t, pod, why)
        else:
            restart(t, why, Reason.BackoffLimitExceeded)
        return Stop(why)
    if diag.state == ClusterState.Failed:
        failed = live.get(diag.failed_pod or "")
        log = _crash_log(t, failed) if failed is not None else ""
        if failed is not None and failed.role == m.ROLE_WORKER and in_flight:
            # The head and the Ray job live on: a new pod for the lost worker, and Ray
            # Train's FailureConfig restarts the worker group from the newest checkpoint
            # in the same attempt.
            _recreate_worker(t, failed, diag.message, log)
        else:
            restart(t, diag.message, Reason.BackoffLimitExceeded, log)
        return Stop(diag.message)
    if diag.state == ClusterState.Stuck and _remake_stale(t, in_flight):
        return Stop("pods made again with the spec's image")
    return None


def restart(t: Tick, why: str, fail_reason: Reason, log: str = "", *, counted: bool = True) -> None:
    """A new attempt on a new Ray cluster (its GCS state and the training group die with
    any one node), resuming from the newest checkpoint; up to spec.backoffLimit times.
    ``log``: the crashed container's last lines, last in the message. ``counted=False``:
    a voluntary disruption (a node drain, operator/disruption.py), not a failure: not
    counted against spec.backoffLimit."""
    job, st, conds, out, now = t.job, t.st, t.conds, t.out, t.now
    restarts = int(st.get("restarts") or 0)
    if counted and restarts >= job.backoff_limit:
        t.fail(fail_reason, f"{why}; {restarts} restarts reached spec.backoffLimit={job.backoff_limit}{log}")
        delete_pods(t)
        return
    stop_ray_job(t)  # a head that still runs must not train on
    # The new Ray cluster's Secret, ConfigMap, Service and NetworkPolicy are checked
    # again (one may have been deleted by hand: that is often why the attempt failed).
    t.rec._children_made.discard(t.uid)
    t.rec._spec_synced.pop(t.uid, None)
    if counted:
        st["restarts"] = restarts + 1
    st["attempt"] = int(st.get("attempt") or 1) + 1
    out.restarted = True
    out.annotations[ANN_RESTARTED_PODS] = ",".join(sorted(p.uid for p in t.mine.values()))
    st["attemptStartTime"] = rfc3339(now)
    count = f" (restart {restarts + 1} of {job.backoff_limit})" if counted else ""
    msg = f"{why}; restarting the Ray cluster as attempt {st['attempt']}{count}{log}"
    delete_pods(t, end_group=False)
    out.events.append(Event("Warning", Reason.Restarting.value, msg))
    conds.set(ConditionType.Running, False, Reason.Restarting, msg)
    conds.set(ConditionType.Scheduled, False, Reason.WaitingForPods, "restarting: pods recreated")
    st["phase"] = Phase.Provisioning.value
    out.phase = Phase.Provisioning
    out.requeue = "restarting: waiting for the old pods to go"


def _deleted_under_the_run(t: Tick) -> tuple[str, PodView | None] | None:
    """A Ray pod someone else deleted (``kubectl delete pod``, a node drain, Kueue) while
    this attempt's Ray job runs: a deleted pod never shows an ended phase, and recreating
    it as merely missing would put a fresh head under a Ray job that died with the old
    GCS. (The pods this operator deletes are in ``handled``, so not in ``live``, or belong
    to an earlier attempt.) A head that is gone altogether counts too; a worker that is
    gone is simply made again (step 6), its loss already handled by Ray Train."""
    ray_job = t.st.get("rayJob") or {}
    sid = rj.submission_id(t.job.name, int(t.st.get("attempt") or 1))
    if ray_job.get("submissionId") != sid or ray_job.get("status") not in ("PENDING", "RUNNING"):
        return None
    for name in t.job.pod_names:
        pod = t.live.get(name)
        if pod is not None and pod.deleting:
            return name, pod
        if pod is None and name == m.head_name(t.job.name):
            return name, None
    return None


def _recreate_worker(t: Tick, failed: PodView, why: str, log: str = "") -> None:
    """A worker pod ended while its Ray job runs: delete it (the next tick creates it
    again, it rejoins the head); the run resumes in the same attempt. Counts against
    spec.backoffLimit like a cluster restart."""
    job, st, out = t.job, t.st, t.out
    restarts = int(st.get("restarts") or 0)
    if restarts >= job.backoff_limit:
        restart(t, why, Reason.BackoffLimitExceeded, log)
        return
    st["restarts"] = restarts + 1
    out.restarted = True
    out.annotations[ANN_RESTARTED_PODS] = ",".join(sorted(t.handled | {failed.uid}))
    t.rec.api.delete("Pod", failed.namespace, failed.name, uid=failed.uid)
    msg = (
        f"{why}; pod {failed.name} recreated, the run resumes from the newest checkpoint in attempt "
        f"{st.get('attempt') or 1} (restart {restarts + 1} of {job.backoff_limit}){log}"
    )
    out.events.append(Event("Warning", Reason.Restarting.value, msg))
    t.conds.set(ConditionType.Running, True, Reason.Restarting, msg)
    out.requeue = f"worker {failed.name} recreated"


def _crash_log(t: Tick, pod: PodView) -> str:
    """The last lines of a Ray container that exited with an error, for the condition; ''
    when it did not run in a container runtime (a KWOK pod: there is no log to ask the
    kubelet for) or ended cleanly. One GET per failed pod: the pod is deleted next."""
    if not pod.ran or not pod.exit_code:
        return ""
    try:
        text = t.rec.api.pod_log(pod.namespace, pod.name, m.RAY_CONTAINER, tail_lines=CRASH_LOG_LINES)
    except (ApiError, OSError) as e:
        return f"\n(its log could not be read: {e})"
    tail = rj.log_tail(text, lines=CRASH_LOG_LINES)
    return f"\n--- container {m.RAY_CONTAINER}, last log lines ---\n{tail}" if tail else ""


def _remake_stale(t: Tick, in_flight: bool) -> bool:
    """Pods stuck before their containers start were made from an older
    ``spec.resources.image`` (the user fixed a wrong one): delete them and the next
    reconcile makes them with the image the spec names now; otherwise the fix would never
    take (a pod's image is the one it was made with). Before the Ray job runs, every pod
    of the attempt goes (one image per Ray cluster); while it runs, only stuck ones.
    No restart is counted: nothing ran. True if pods were deleted."""
    image = t.job.image
    stale: Mapping[str, PodView] = {
        n: p
        for n, p in t.live.items()
        if p.image is not None and p.image != image and (not in_flight or p.waiting)
    }
    if not stale:
        return False
    # Handled (as the pods a restart deletes): while they are being deleted they are
    # neither "deleted under the run" nor live, just missing, and made again.
    t.out.annotations[ANN_RESTARTED_PODS] = ",".join(sorted(t.handled | {p.uid for p in stale.values()}))
    delete_pods(t, stale, end_group=False)
    msg = (
        f"spec.resources.image is now {image}: pods {', '.join(sorted(stale))} were made with "
        f"{', '.join(sorted({str(p.image) for p in stale.values()}))} and were stuck ({t.diagnosis.message}); "
        "they are made again with the new image"
    )
    t.out.events.append(Event("Normal", "PodsRecreated", msg))
    t.conds.set(ConditionType.Running, False, Reason.Provisioning, msg)
    t.st["phase"] = Phase.Provisioning.value
    t.out.phase = Phase.Provisioning
    t.out.requeue = f"recreating {len(stale)} pods with image {image}"
    return True
