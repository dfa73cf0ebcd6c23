"""The objects a job's Ray cluster is made of: its Secret (the Ray token), ConfigMap (the
spec), Service and NetworkPolicy, then its pods — each created when missing, never beside
or instead of someone else's object of the same name, and never before the Secrets and
ConfigMaps the pods reference exist."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmtrain.operator import manifests as m
from llmtrain.operator import references as refs
from llmtrain.operator.diagnose import ClusterState, Diagnosis, PodView, diagnose
from llmtrain.operator.effects import create, create_or_existing
from llmtrain.operator.outcome import Event
from llmtrain.operator.provisioning import apply_diagnosis
from llmtrain.operator.tick import Stop, Tick

from llmtrain.api.job import LLMTrainingJob
from llmtrain.api.status import ConditionType, Phase

# A pod this process created is trusted to exist this long while the pod index lags.
RECENT_SECONDS = 60.0


def create_missing(t: Tick) -> Stop | None:
    """6. Create what is missing (children before pods: pods mount the ConfigMap and read
    the Secret). Skipped entirely while every pod exists: a steady job costs no API calls
    per tick. What was just made is diagnosed again, as waiting for the scheduler."""
    uid, live, expected = t.uid, t.live, t.job.pod_names
    for n in live:
        t.rec._recent.pop((uid, n), None)
    just_made = [n for n in expected if n not in live and _just_made(t, n)]
    missing = [n for n in expected if n not in live and n not in just_made]
    # Pods created but not in the index yet count as waiting for the scheduler, not
    # as "not created".
    seen = dict(live)
    for n in just_made:
        seen[n] = _just_created(t, n)
    if missing:
        model = t.model()
        if _references_missing(t, model, seen):
            return Stop("a Secret or ConfigMap the pods reference is missing")
        created = _ensure_children(t, model, missing)
        if t.out.error:
            t.out.requeue = t.out.error
        for n in created:
            seen[n] = _just_created(t, n)
    elif uid not in t.rec._children_made and not just_made:
        # Every pod exists, but this process has not yet seen the job's Secret, ConfigMap,
        # Service and NetworkPolicy: check them once (an operator restarted after one was
        # deleted makes it again; without it a job's pods stayed unfenced until a restart).
        ensure_static_children(t, t.model())
    if missing or just_made:
        t.diag = t.diagnose(seen)
    return None


def ensure_static_children(t: Tick, model: LLMTrainingJob) -> bool:
    """The Secret, ConfigMap, Service and NetworkPolicy exist and are this job's (checked
    once per process, again after each restart); False if one could not be made or is
    someone else's. A Secret made again (deleted by hand) holds a new token."""
    rec, uid = t.rec, t.uid
    if uid in rec._children_made:
        return True
    before = t.out.error
    for child in m.static_children(model, rec.settings, rec.token()):
        if create(t, child) and child["kind"] == "Secret":
            rec._tokens.pop(uid, None)
    if t.out.error != before:
        return False
    rec._children_made.add(uid)
    return True


def _just_made(t: Tick, name: str) -> bool:
    """Created by this process less than RECENT_SECONDS ago (so not yet in the index)."""
    recent, key = t.rec._recent, (t.uid, name)
    made = recent.get(key)
    if made is None:
        return False
    if t.rec.clock() - made > RECENT_SECONDS:
        del recent[key]  # the index should have it by now: look again
        return False
    return True


def _ensure_children(t: Tick, model: LLMTrainingJob, missing: list[str]) -> list[str]:
    """Create the children and the missing pods; the names of the pods created."""
    out = t.out
    if not ensure_static_children(t, model):
        # Never pods beside someone else's Secret or ConfigMap: they would run with its
        # Ray token (known to whoever made it) or its spec.
        out.requeue = out.error
        return []
    by_name = {p["metadata"]["name"]: p for p in m.pods(model, t.rec.settings)}
    created: list[str] = []
    for name in missing:
        if _in_the_way(t, name):
            continue
        made, existing = create_or_existing(t, by_name[name])
        if made:
            created.append(name)
            t.rec._recent[(t.uid, name)] = t.rec.clock()
        elif existing is not None:
            _relabel(t, by_name[name], existing)
    if created:
        out.events.append(Event("Normal", "PodsCreated", f"created {len(created)} Ray pods"))
        out.requeue = out.requeue or "pods created"
    return created


def _in_the_way(t: Tick, name: str) -> bool:
    """A pod of that name is still there (being deleted, someone else's, or a failure
    already counted): not made now."""
    out, p = t.out, t.pods.get(name)
    if p is not None and p.deleting:
        out.requeue = f"pod {name} is still being deleted"
        return True
    if p is not None and p.owner_uid != t.meta.get("uid"):
        # Usually the previous incarnation of a job with this name, on its way out
        # through the garbage collector; otherwise someone else's pod.
        out.error = (
            f"Pod {name} exists and is not owned by this job: waiting for it to be deleted "
            "(or delete it yourself)"
        )
        out.events.append(Event("Warning", "NameConflict", out.error))
        out.requeue = out.error
        return True
    if name in t.mine:  # a counted-and-handled failure not yet deleted: delete it again
        t.rec.api.delete("Pod", t.mine[name].namespace, name, uid=t.mine[name].uid)
        out.requeue = f"pod {name} is still being deleted"
        return True
    return False


def _relabel(t: Tick, want: Mapping[str, Any], live: Mapping[str, Any]) -> None:
    """Our pod exists but the pod index does not show it (it selects on the labels):
    labels edited by hand are put back, so the job sees its pod again instead of
    waiting for it for ever; a pod merely not indexed yet is left alone."""
    ns, name = want["metadata"]["namespace"], want["metadata"]["name"]
    labels = (live.get("metadata") or {}).get("labels") or {}
    wanted: dict[str, str] = want["metadata"]["labels"]
    if any(labels.get(k) != v for k, v in wanted.items()):
        t.rec.api.patch("Pod", ns, name, {"metadata": {"labels": wanted}})
        t.out.events.append(
            Event("Warning", "PodRelabeled", f"pod {name}'s labels were edited: the operator's are restored")
        )
        t.out.requeue = t.out.requeue or f"pod {name} relabeled"


def _references_missing(t: Tick, model: LLMTrainingJob, seen: Mapping[str, PodView]) -> bool:
    """6a. Before any pod: a Secret or ConfigMap the pods reference is missing (or lacks a
    key)? Then no pod is made; the condition and one Event name the object and the spec
    field. The resync looks again, so creating it lets the job go on;
    ``preRunningDeadlineSeconds`` still counts. True if one is missing."""
    absent = refs.first_missing(t.rec.api.get, t.job.namespace, refs.references(model))
    if absent is None:
        return False
    conds, out = t.conds, t.out
    msg = absent.message(t.job.namespace)
    old = conds.get(ConditionType.Running) or {}
    diag = diagnose(list(t.job.pod_names), seen)
    diag = Diagnosis(
        ClusterState.Waiting, f"{diag.message}: {msg}", diag.scheduled, diag.running, diag.expected
    )
    apply_diagnosis(t, diag)
    if Phase(t.st["phase"]) == Phase.Failed:  # the pre-running deadline passed
        return True
    conds.set(ConditionType.Running, False, absent.reason, msg)
    if old.get("reason") != absent.reason.value or old.get("message") != msg:
        out.events.append(Event("Warning", absent.reason.value, msg))
    out.requeue = f"waiting for {absent.ref.kind} {absent.ref.name}"
    return True


def _just_created(t: Tick, name: str) -> PodView:
    """A pod this process just made, as the index will show it: Pending, unscheduled."""
    return PodView(
        name=name,
        namespace=t.meta.get("namespace", ""),
        job=t.meta.get("name", ""),
        role="",
        uid="",
        owner_uid=t.meta.get("uid"),
        phase="Pending",
        created=None,
        deleting=False,
        node=None,
        scheduled=None,
        sched_reason=None,
        sched_message=None,
        gates=(),
        waiting=(),
        exit_code=None,
        exit_reason=None,
        running_since=None,
        annotations=(),
    )
