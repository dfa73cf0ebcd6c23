"""What several reconcile steps do to the cluster: create a child (never adopting someone
else's), delete the job's pods, read the job's Ray token, stop its Ray job."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from llmtrain.operator import manifests as m
from llmtrain.operator import rayjobs as rj
from llmtrain.operator.diagnose import PodView
from llmtrain.operator.kube import ApiError
from llmtrain.operator.outcome import Event, Outcome
from llmtrain.operator.rayjobs import HeadError
from llmtrain.operator.tick import ReconcilerState, Tick

# The lines of a crashed container's log that go into a condition (as for a failed
# driver's log, rayjobs.log_tail).
CRASH_LOG_LINES = 20


def owner_uids(obj: Mapping[str, Any]) -> list[str]:
    return [o.get("uid") for o in (obj.get("metadata") or {}).get("ownerReferences") or []]


def create(t: Tick, obj: dict[str, Any]) -> bool:
    """Create if absent (True if this call created it); on 409 the existing object must
    be owned by this job."""
    return create_or_existing(t, obj)[0]


def create_or_existing(t: Tick, obj: dict[str, Any]) -> tuple[bool, dict[str, Any] | None]:
    """:func:`create`, and on 409 the existing object when it is this job's."""
    rec, out = t.rec, t.out
    rec.adopt(obj, t.body)
    kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
    try:
        rec.api.create(obj)
        return True, None
    except ApiError as e:
        if e.status != 409:
            out.error = f"creating {kind} {name} failed: {e.message}"
            out.events.append(Event("Warning", "CreateFailed", out.error))
            return False, None
    existing = rec.api.get(kind, ns, name)
    if existing is not None and t.meta.get("uid") not in owner_uids(existing):
        out.error = (
            f"{kind} {name} exists and is not owned by this job: waiting for it to be deleted "
            "(or delete it yourself)"
        )
        out.events.append(Event("Warning", "NameConflict", out.error))
        return False, None
    return False, existing


def delete_pods(t: Tick, pods: Mapping[str, PodView] | None = None, end_group: bool = True) -> None:
    """Delete the job's pods (``pods``, or all of this incarnation's; by uid: never a newer
    incarnation's). With Kueue, the group is first marked not retriable so Kueue ends it
    and frees its quota."""
    pods = t.mine if pods is None else pods
    for p in pods.values():
        t.rec._recent.pop((p.owner_uid or "", p.name), None)
    live = [p for p in pods.values() if not p.deleting]
    if not live:
        return
    for p in live:
        if end_group and p.annotation(m.KUEUE_TOTAL_COUNT_ANNOTATION) is not None:
            t.rec.api.annotate("Pod", p.namespace, p.name, {m.KUEUE_RETRIABLE_ANNOTATION: "false"})
        t.rec.api.delete("Pod", p.namespace, p.name, uid=p.uid)
    t.out.events.append(Event("Normal", "PodsDeleted", f"deleted {len(live)} Ray pods"))


def ray_token(rec: ReconcilerState, namespace: str, name: str, uid: str) -> str:
    """The job's Ray token, from the Secret this operator made (kept per job uid)."""
    token = rec._tokens.get(uid)
    if token is not None:
        return token
    secret = rec.api.get("Secret", namespace, m.auth_secret_name(name))
    if secret is not None and uid not in owner_uids(secret):
        # Someone else's Secret under our name: its token is known to whoever made it.
        raise HeadError(f"Secret {m.auth_secret_name(name)} is not owned by this job: not using its token")
    data = ((secret or {}).get("data") or {}).get(m.AUTH_TOKEN_KEY)
    if not data:
        raise HeadError(f"Secret {m.auth_secret_name(name)} holds no Ray token")
    token = base64.b64decode(data).decode()
    rec.remember(rec._tokens, uid, token)
    return token


def stop_ray_job(t: Tick) -> None:
    """Stop the running Ray job before its pods go (best effort: the pods go anyway)."""
    _stop(t.rec, t.meta, t.st, t.out)


def stop_for_deletion(rec: ReconcilerState, body: Mapping[str, Any]) -> Outcome:
    """The job is being deleted: stop its Ray job (best effort) so the run ends before
    the garbage collector takes the pods; the caller then removes the finalizer."""
    out = Outcome(status=None, finalizer=False)
    _stop(rec, body.get("metadata") or {}, body.get("status") or {}, out)
    return out


def _stop(rec: ReconcilerState, meta: Mapping[str, Any], st: Mapping[str, Any], out: Outcome) -> None:
    ray_job = st.get("rayJob") or {}
    if not ray_job.get("submissionId") or ray_job.get("status") in rj.TERMINAL:
        return
    ns, name = meta.get("namespace", ""), meta.get("name", "")
    try:
        token = ray_token(rec, ns, name, str(meta.get("uid", "")))
        rec.ray.stop(rj.head_of(rec.settings, ns, name), token, ray_job["submissionId"])
        out.events.append(Event("Normal", "RayJobStopped", f"Ray job {ray_job['submissionId']} stopped"))
    except (HeadError, ApiError):  # a head that is gone has stopped it: the pods go anyway
        pass
