"""The types every reconcile step shares: one reconcile's working set (:class:`Tick`), what
the reconciler keeps between reconciles (:class:`ReconcilerState`), and the shape of a
step (:data:`Step`: ``step(tick) -> Stop | None``).

A step reads the job, its pods and the status being built from the Tick, and writes
what it decides onto it (status fields, conditions, the :class:`~llmtrain.operator.outcome.Outcome`);
it returns a :class:`Stop` when the tick ends there. The step modules import this one;
:mod:`llmtrain.operator.reconcile` imports the steps and runs them in order.
"""

from __future__ import annotations

import datetime as dt
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from llmtrain.operator import manifests as m
from llmtrain.operator.diagnose import Diagnosis, PodView, diagnose
from llmtrain.operator.kube import ApiError, KubeApi
from llmtrain.operator.outcome import Conditions, Event, Outcome, merge_patch, rfc3339
from llmtrain.operator.rayjobs import RayJobs
from pydantic import ValidationError

from llmtrain.api import contract
from llmtrain.api.job import LLMTrainingJob
from llmtrain.api.status import ConditionType, LLMTrainingJobStatus, Phase, Reason

# Job annotations: the operator's own memory, kept on the object so a restarted operator
# (or another replica) continues where the last one stopped.
# Read only from jobs last reconciled by an older operator (now status.attemptStartTime and
# status.suspendedSeconds, which users cannot write).
ANN_ATTEMPT_STARTED = "llmtrain.dev/attempt-started-at"
ANN_SUSPENDED_SECONDS = "llmtrain.dev/suspended-seconds"
ANN_RESTARTED_PODS = "llmtrain.dev/restarted-pod-uids"  # failures already counted
ANN_CLEANED_UP = "llmtrain.dev/cleaned-up-at"  # ttlSecondsAfterFinished done
# On a job while its Ray job may run (from the first submission to the end): deleting the
# job stops the Ray job before the garbage collector takes the pods.
FINALIZER = "llmtrain.dev/stop-ray-job"

OWNED_STATUS_FIELDS = (
    "phase",
    "conditions",
    "restarts",
    "attempt",
    "rayJob",
    "rayClusterName",
    "startTime",
    "attemptStartTime",
    "suspendedSeconds",
    "completionTime",
    "observedGeneration",
    # mirrored from the driver's RunSnapshot
    "progress",
    "metrics",
    "checkpoint",
    "data",
    "exportUri",
    "tuning",
    "serving",
    # the scheduler-facing summary (llmtrain/api/contract.py) and the latest node drain
    "checkpointContract",
    "disruption",
)


@dataclass(frozen=True, slots=True)
class JobFacts:
    """What a tick reads from a job's spec, cached per (uid, generation).

    Not the parsed :class:`LLMTrainingJob`: that is ~15 KB of pydantic objects per job
    (~15 MB at 1000 jobs, a tenth of the operator's memory budget), and a tick needs a
    handful of fields. The full model is parsed again only to build children, which a
    steady job never does.
    """

    namespace: str
    name: str
    suspend: bool
    active_deadline_seconds: int | None
    pre_running_deadline_seconds: int | None
    ttl_seconds_after_finished: int | None
    backoff_limit: int
    pod_names: tuple[str, ...]
    serve_replicas: int | None  # spec.serve (None: unset)
    serve_port: int
    image: str  # spec.resources.image: stuck pods made with another one are made again
    checkpoint_on_disruption: bool = True  # spec.checkpoint.onDisruption (operator/disruption.py)

    @classmethod
    def of(cls, job: LLMTrainingJob) -> JobFacts:
        s = job.spec
        return cls(
            namespace=job.metadata.namespace or "default",
            name=job.metadata.name,
            suspend=s.suspend,
            active_deadline_seconds=s.active_deadline_seconds,
            pre_running_deadline_seconds=s.pre_running_deadline_seconds,
            ttl_seconds_after_finished=s.ttl_seconds_after_finished,
            backoff_limit=s.backoff_limit,
            pod_names=tuple(m.pod_names(job)),
            serve_replicas=s.serve.replicas if s.serve else None,
            serve_port=s.serve.port if s.serve else 0,
            image=s.resources.image,
            checkpoint_on_disruption=s.checkpoint.on_disruption,
        )


def job_model(body: Mapping[str, Any]) -> LLMTrainingJob:
    """The job's full spec model, parsed from its body (not cached: see :class:`JobFacts`)."""
    return LLMTrainingJob.model_validate(
        {k: v for k, v in body.items() if k in ("apiVersion", "kind", "metadata", "spec")}
    )


def _adopt(obj: dict[str, Any], owner: Mapping[str, Any]) -> None:
    import kopf  # only when a child is made: a reconciler under test needs no Kopf

    kopf.adopt(obj, owner=dict(owner))  # type: ignore[arg-type]


class ReconcilerState:
    """What a reconciler holds: its API, settings and Ray client, and a small memory between
    ticks (all other state is on the objects). The step modules read and update it through
    :attr:`Tick.rec`: they are the reconciler's methods, split by what each owns."""

    CACHE_SIZE = 4096

    def __init__(
        self,
        api: KubeApi,
        settings: m.OperatorSettings | None = None,
        *,
        adopt: Callable[[dict[str, Any], Mapping[str, Any]], None] | None = None,
        token: Callable[[], str] = lambda: secrets.token_hex(32),
        ray: RayJobs | None = None,
    ) -> None:
        self.api = api
        self.settings = settings or m.OperatorSettings()
        self.adopt = adopt or _adopt
        self.token = token
        self.ray = ray if ray is not None else RayJobs()
        self._tokens: dict[str, str] = {}  # job uid → its Ray token (read once from its Secret)
        self._cache: dict[tuple[str, int | None], JobFacts] = {}
        # What this process created recently, by (job uid, pod name) → monotonic time, and
        # the jobs whose Secret/ConfigMap/Service/NetworkPolicy it made. The pod index lags
        # the API by seconds under load; without this memory every tick in that window
        # repeated each create as a 409 + GET, which at 1000 jobs slowed the API server
        # down enough to make the lag, and so the repeats, grow (a feedback loop).
        self._recent: dict[tuple[str, str], float] = {}
        self._children_made: set[str] = set()
        # uid → the resourceVersion whose status was last found readable.
        self._status_ok: dict[str, str] = {}
        # uid → the unreachableSince of the silence its children were checked again for.
        self._rechecked: dict[str, str] = {}
        # uid → the generation whose spec the spec ConfigMap was last checked to hold.
        self._spec_synced: dict[str, Any] = {}
        # uid → the generation the serving objects were last made or patched for.
        self._serve_synced: dict[str, Any] = {}
        # node name → (monotonic time read, why it is being drained or None): one node read
        # per few seconds, not per job and tick (operator/disruption.py).
        self._nodes: dict[str, tuple[float, str | None]] = {}
        self.clock: Callable[[], float] = time.monotonic

    def forget(self, uid: str) -> None:
        """A deleted job's memory goes with it: without this, creating and deleting jobs for
        a long time grew every per-uid dict and set here without bound."""
        self._tokens.pop(uid, None)
        self._children_made.discard(uid)
        for memo in (self._status_ok, self._rechecked, self._spec_synced, self._serve_synced):
            memo.pop(uid, None)
        for made in [k for k in self._recent if k[0] == uid]:
            del self._recent[made]
        for facts in [k for k in self._cache if k[0] == uid]:
            del self._cache[facts]

    def remember(self, cache: dict[Any, Any], key: Any, value: Any) -> None:
        """``cache[key] = value``, the oldest entry dropped first past CACHE_SIZE."""
        if len(cache) >= self.CACHE_SIZE:
            cache.pop(next(iter(cache)))
        cache[key] = value


@dataclass(frozen=True, slots=True)
class Stop:
    """A step's word that the tick ends here: what it decided is already on the Tick."""

    why: str


@dataclass
class Tick:
    """One reconcile's working set: the job, its pods, the status being built (``st``, its
    ``conds``) and what to write (``out``). Made by :meth:`open`, handed to each step."""

    rec: ReconcilerState
    body: Mapping[str, Any]
    meta: Mapping[str, Any]  # the body's metadata
    uid: str  # the job's (this incarnation's)
    pods: Mapping[str, PodView]  # the pods under the job's name (an older incarnation's too)
    mine: Mapping[str, PodView]  # this incarnation's
    st: dict[str, Any]
    conds: Conditions
    out: Outcome
    now: dt.datetime
    stored: dict[str, Any]  # the stored status' owned fields: the patch's base
    old_phase: Phase | None  # as stored, if readable
    annotations: Mapping[str, str]  # the job's, as stored
    handled: set[str]  # uids of pods whose end was already counted (a restart's, being deleted)
    live: dict[str, PodView]  # this incarnation's pods less those handled
    facts: JobFacts | None = None  # set by the parse step
    diag: Diagnosis | None = None  # the pods' diagnosis, once asked for
    suspended_seconds: float = 0.0  # set by the suspend step, read by the deadline step

    @classmethod
    def open(
        cls, rec: ReconcilerState, body: Mapping[str, Any], pods: Mapping[str, PodView], now: dt.datetime
    ) -> Tick:
        """The tick's status read from the stored one, as far as this code can read it."""
        meta = body.get("metadata") or {}
        uid: str = meta.get("uid", "")
        stored = body.get("status")
        old: dict[str, Any] = dict(stored) if isinstance(stored, Mapping) else {}
        # What is stored is the patch's base (so an unreadable field is overwritten or
        # removed); what the steps read is only what this code can read.
        old_owned = {k: old[k] for k in OWNED_STATUS_FIELDS if k in old}
        out = Outcome(status=None)
        bad = _unreadable_status(rec, uid, str(meta.get("resourceVersion") or ""), old_owned)
        if bad:
            for k in bad:
                old.pop(k, None)
            fields = ", ".join(f"status.{k}" for k in bad)
            out.events.append(
                Event(
                    "Warning",
                    "UnreadableStatus",
                    f"{fields} could not be read (written by another operator version, or by hand): "
                    "rewritten from what the operator observes",
                )
            )
        st: dict[str, Any] = {k: old[k] for k in OWNED_STATUS_FIELDS if k in old}
        conds = Conditions(list(old.get("conditions") or []), rfc3339(now), meta.get("generation"))
        st["observedGeneration"] = meta.get("generation")
        st["rayClusterName"] = meta["name"]
        st.setdefault("restarts", 0)
        old_phase = Phase(old["phase"]) if old.get("phase") in Phase.__members__ else None
        st.setdefault("phase", Phase.Pending.value)
        # Only this incarnation's pods: a job deleted and re-created under the same name
        # may still have pods being garbage-collected.
        mine = {n: p for n, p in pods.items() if p.owner_uid == uid}
        annotations = dict(meta.get("annotations") or {})
        handled = set(filter(None, annotations.get(ANN_RESTARTED_PODS, "").split(",")))
        live = {n: p for n, p in mine.items() if p.uid not in handled}
        return cls(
            rec=rec,
            body=body,
            meta=meta,
            uid=str(uid),
            pods=pods,
            mine=mine,
            st=st,
            conds=conds,
            out=out,
            now=now,
            stored=old_owned,
            old_phase=old_phase,
            annotations=annotations,
            handled=handled,
            live=live,
        )

    @property
    def job(self) -> JobFacts:
        """What the spec says; every step after the parse step may ask."""
        if self.facts is None:
            raise RuntimeError("the spec is read by the parse step, the first")
        return self.facts

    @property
    def finished(self) -> bool:
        """The job had finished (Succeeded or Failed) before this tick."""
        return self.old_phase is not None and self.old_phase.terminal

    @property
    def diagnosis(self) -> Diagnosis:
        """The live pods' diagnosis, made when first asked for (the recover step); the
        children step diagnoses again what it just made."""
        if self.diag is None:
            self.diag = self.diagnose(self.live)
        return self.diag

    def diagnose(self, pods: Mapping[str, PodView]) -> Diagnosis:
        """``pods`` against the pods the spec names; a pending pod's scheduler Events are
        read when its PodScheduled condition has no message yet."""

        def lookup(p: PodView) -> str | None:
            try:
                events = self.rec.api.scheduler_events(p.namespace or self.meta.get("namespace", ""), p.name)
            except ApiError:
                return None
            return events[-1].get("message") if events else None

        return diagnose(list(self.job.pod_names), pods, lookup)

    def model(self) -> LLMTrainingJob:
        return job_model(self.body)

    def fail(self, reason: Reason, message: str) -> None:
        """The job failed: Failed condition, phase and completion time, one Warning Event."""
        self.conds.set(ConditionType.Failed, True, reason, message)
        self.conds.set(ConditionType.Running, False, reason, message)
        self.st["phase"] = Phase.Failed.value
        self.st["completionTime"] = rfc3339(self.now)
        self.out.phase = Phase.Failed
        self.out.events.append(Event("Warning", reason.value, message))

    def finish(self) -> Outcome:
        """The outcome, with the status patch from the stored status to the one built."""
        self.st["conditions"] = self.conds.as_list()
        self._checkpoint_contract()
        new = {k: v for k, v in self.st.items() if v is not None}
        patch = merge_patch({k: v for k, v in self.stored.items() if v is not None}, new)
        if patch:
            self.out.status = patch
        self.out.phase = Phase(self.st["phase"])
        return self.out

    def _checkpoint_contract(self) -> None:
        """``status.checkpointContract`` from the status built (llmtrain/api/contract.py);
        its seconds refreshed only with another change (contract.settle)."""
        key = "checkpointContract"
        changed = any(v != self.stored.get(k) for k, v in self.st.items() if k != key and v is not None)
        new = contract.checkpoint_contract(
            self.st,
            self.now,
            checkpoint_on_disruption=self.facts.checkpoint_on_disruption if self.facts else False,
            disruption_checkpoint_seconds=self.rec.settings.suspend_checkpoint_seconds,
        )
        self.st[key] = contract.settle(self.stored.get(key), new, status_changed=changed)


# A reconcile step: reads and writes the Tick; a Stop ends the tick.
Step = Callable[[Tick], Stop | None]


def _unreadable_status(rec: ReconcilerState, uid: str, version: str, owned: Mapping[str, Any]) -> list[str]:
    """The operator's status fields that do not fit the status schema this code reads
    (stored under a looser CRD, by an older version, or edited by hand): read as
    absent, so the job goes on from what is observed instead of failing every tick.
    Checked once per resourceVersion."""
    if version and rec._status_ok.get(uid) == version:
        return []
    try:
        LLMTrainingJobStatus.model_validate({k: v for k, v in owned.items() if v is not None})
    except ValidationError as e:
        locs = {str(err["loc"][0]) for err in e.errors() if err["loc"]}
        return sorted(locs & set(owned)) or sorted(owned)
    if version:
        rec.remember(rec._status_ok, uid, version)
    return []
