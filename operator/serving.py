"""``spec.serve``: a Succeeded job's model server (NetworkPolicy, Service, Deployment),
kept to the spec, its readiness in ``status.serving`` and the Serving condition."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from llmtrain.operator import manifests as m
from llmtrain.operator import rayjobs as rj
from llmtrain.operator import references as refs
from llmtrain.operator.diagnose import pod_view, server_trouble
from llmtrain.operator.effects import CRASH_LOG_LINES, create, owner_uids
from llmtrain.operator.kube import ApiError
from llmtrain.operator.outcome import Event, merge_patch
from llmtrain.operator.tick import Stop, Tick

from llmtrain.api.job import LLMTrainingJob
from llmtrain.api.status import ConditionType, Phase, Reason


def serve(t: Tick) -> Stop | None:
    """2b. A finished job's model server: made for ``spec.serve`` on a Succeeded job with an
    export, kept to the spec; ``serve: null`` (or no export) removes it. A serving job costs
    one GET (its Deployment's readiness) per resync. The end of a finished job's tick."""
    if not t.finished:
        return None
    job, st, conds = t.job, t.st, t.conds
    model_uri = st.get("exportUri")
    if job.serve_replicas is None or st.get("phase") != Phase.Succeeded.value or not model_uri:
        if st.get("serving") is not None or conds.get(ConditionType.Serving) is not None:
            _remove_server(t)
            st["serving"] = None
            conds.drop(ConditionType.Serving)
        return Stop("finished")
    generation = t.meta.get("generation")
    if t.rec._serve_synced.get(t.uid) != generation:
        model = t.model()
        if _references_missing(t, model):
            return Stop("finished; the model server waits for a Secret or ConfigMap")
        objs = m.serving_objects(model, t.rec.settings, model_uri)
        if not _ensure_server(t, objs):
            return Stop("finished; the model server could not be made")
        t.rec._serve_synced[t.uid] = generation
    dep = t.rec.api.get("Deployment", job.namespace, m.serve_name(job.name))
    if dep is None or t.uid not in owner_uids(dep):  # deleted by hand (or replaced): made again
        t.rec._serve_synced.pop(t.uid, None)
        t.out.requeue = f"Deployment {m.serve_name(job.name)} is missing: making it again"
        return Stop("finished; the model server is missing")
    _serving_status(t, model_uri, int((dep.get("status") or {}).get("readyReplicas") or 0))
    return Stop("finished")


def _references_missing(t: Tick, model: LLMTrainingJob) -> bool:
    """Before the serving objects are made or patched: a Secret (key) or ConfigMap the server
    pods need is missing? Then nothing is made or changed (a server already running keeps its
    old spec), the Serving condition and one Event name it with its spec field, and the next
    resync looks again. True if one is missing."""
    absent = refs.first_missing(t.rec.api.get, t.job.namespace, refs.serve_references(model))
    if absent is None:
        return False
    msg = absent.message(t.job.namespace, "the model server is not made or changed")
    old = t.conds.get(ConditionType.Serving) or {}
    t.conds.set(ConditionType.Serving, False, absent.reason, msg)
    if old.get("reason") != absent.reason.value or old.get("message") != msg:
        t.out.events.append(Event("Warning", absent.reason.value, msg))
    t.out.requeue = f"model server: waiting for {absent.ref.kind} {absent.ref.name}"
    return True


def _serving_status(t: Tick, model_uri: str, ready: int) -> None:
    """``status.serving`` and the Serving condition from the Deployment's ready replicas."""
    job, st, conds, out = t.job, t.st, t.conds, t.out
    ns, name, want = job.namespace, job.name, job.serve_replicas
    st["serving"] = {
        "url": m.serve_url(ns, name, job.serve_port, t.rec.settings),
        "modelName": name,
        "modelUri": model_uri,
        "replicas": want,
        "readyReplicas": ready,
    }
    if want == 0:
        conds.set(ConditionType.Serving, False, Reason.ServerScaledToZero, "spec.serve.replicas is 0")
    elif ready == 0:
        trouble = _server_trouble(t)
        if trouble is not None:
            if (conds.get(ConditionType.Serving) or {}).get("reason") != Reason.ServerFailing.value:
                out.events.append(Event("Warning", Reason.ServerFailing.value, trouble))
            conds.set(ConditionType.Serving, False, Reason.ServerFailing, trouble)
            out.requeue = f"model server: {trouble.splitlines()[0]}"
        else:
            msg = f"0 of {want} server replicas ready: loading {model_uri}"
            conds.set(ConditionType.Serving, False, Reason.ServerStarting, msg)
            out.requeue = f"model server: {msg}"
    else:
        if not conds.is_true(ConditionType.Serving):
            out.events.append(
                Event("Normal", Reason.ServerReady.value, f"serving {name} at {st['serving']['url']}")
            )
        conds.set(
            ConditionType.Serving,
            True,
            Reason.ServerReady,
            f"{ready} of {want} replicas ready at {st['serving']['url']}",
        )


def _server_trouble(t: Tick) -> str | None:
    """Why no server replica is ready when a container cannot start or crash-loops: the
    kubelet's words, and a crash-looping container's last log lines (of the instance that
    crashed). One LIST (and one log GET) per resync, only while no replica is ready."""
    api, ns = t.rec.api, t.job.namespace
    try:
        pods = api.list_pods(ns, f"{m.LABEL_SERVE}={t.job.name}")
    except ApiError:
        return None
    found = server_trouble(pod_view(p) for p in pods)
    if found is None:
        return None
    text, looping = found
    if looping is None:
        return text
    try:
        log = api.pod_log(ns, *looping, tail_lines=CRASH_LOG_LINES, previous=True)
    except (ApiError, OSError) as e:
        return f"{text}\n(its log could not be read: {e})"
    tail = rj.log_tail(log, lines=CRASH_LOG_LINES)
    return (
        f"{text}\n--- pod {looping[0]}, container {looping[1]}, last log lines ---\n{tail}" if tail else text
    )


def _ensure_server(t: Tick, objs: list[dict[str, Any]]) -> bool:
    """Create each serving object, or patch it when it was made from another spec; never
    touch one the job does not own."""
    api, out = t.rec.api, t.out
    made = []
    for obj in objs:
        kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
        live = api.get(kind, ns, name)
        if live is None:
            before = out.error
            if create(t, obj):
                made.append(kind)
            if out.error != before:
                out.requeue = out.error
                return False
            continue
        if t.meta.get("uid") not in owner_uids(live):
            out.error = f"{kind} {name} exists and is not owned by this job: delete it, or rename the job"
            out.events.append(Event("Warning", "NameConflict", out.error))
            out.requeue = out.error
            return False
        want = obj["metadata"]["annotations"][m.ANN_SERVE_HASH]
        if ((live.get("metadata") or {}).get("annotations") or {}).get(m.ANN_SERVE_HASH) != want:
            api.patch(
                kind,
                ns,
                name,
                {"metadata": {"annotations": {m.ANN_SERVE_HASH: want}}, "spec": replacing(live, obj)},
            )
            out.events.append(Event("Normal", "ServerUpdated", f"{kind} {name} updated to spec.serve"))
    if made:
        out.events.append(Event("Normal", "ServerCreated", f"created the model server's {', '.join(made)}"))
    return True


def replacing(live: Mapping[str, Any], want: Mapping[str, Any]) -> dict[str, Any]:
    """The spec to merge-patch onto ``live`` so that what the operator sets in a pod template
    becomes exactly ``want``'s. A merge patch keeps keys it does not name and merges maps, so
    a nodeSelector, toleration list, service account or volume that spec.serve no longer
    asks for would have stayed on the Deployment: those keys are sent as null (removed), and
    the nodeSelector map as the patch from the live one to the wanted one."""
    spec = copy.deepcopy(dict(want["spec"]))
    pod = (spec.get("template") or {}).get("spec")
    live_pod = ((live.get("spec") or {}).get("template") or {}).get("spec") or {}
    if pod is None:
        return spec  # a Service or NetworkPolicy: every key it has is always sent
    for key in m.SERVE_POD_KEYS:
        if key not in pod and key in live_pod:
            pod[key] = None
    if isinstance(pod.get("nodeSelector"), dict) and isinstance(live_pod.get("nodeSelector"), dict):
        pod["nodeSelector"] = merge_patch(live_pod["nodeSelector"], pod["nodeSelector"])
    return spec


def _remove_server(t: Tick) -> None:
    ns, name = t.job.namespace, t.job.name
    for kind in m.SERVE_KINDS:
        live = t.rec.api.get(kind, ns, m.serve_name(name))
        if live is not None and t.uid in owner_uids(live):
            t.rec.api.delete(kind, ns, m.serve_name(name), uid=live["metadata"].get("uid"))
    t.rec._serve_synced.pop(t.uid, None)
    t.out.events.append(Event("Normal", "ServerDeleted", "spec.serve unset: the model server is deleted"))
