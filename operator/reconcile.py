"""The level-based reconcile of one ``LLMTrainingJob``: observe → ordered idempotent steps →
status computed from observation.

:meth:`Reconciler.reconcile` is a plain function of (job body, the job's pods from the
pod index, now) over an injected :class:`~llmtrain.operator.kube.KubeApi`. It returns an
:class:`Outcome` — the status patch (only the fields the operator owns, only when they
change), annotations for the job, the Events to emit and the reason to look again —
which the controller writes. Every step is idempotent, so the same call after an
operator crash, a lost watch event or a duplicate resync converges to the same
objects and status.

Order of steps:

1. parse the spec (invalid → ``Failed/InvalidSpec``); status fields this code cannot read
   (an older version's, a hand edit's) are read as absent and rewritten (``UnreadableStatus``);
2. a finished job: delete leftover pods, then the Ray cluster ``ttlSecondsAfterFinished`` later;
3. ``suspend: true``: a last checkpoint (while training, at most ``suspend_checkpoint_seconds``),
   then delete the pods, keep status (``Suspended``); resuming is a new attempt, counts the time;
4. ``activeDeadlineSeconds`` (suspended time not counted);
5. a terminated pod: restart the whole Ray cluster (``status.restarts``) up to ``backoffLimit``;
6. create what is missing: Secret, ConfigMap, Service, NetworkPolicy, then the pods (none
   beside someone else's child of the same name; the children are checked again after a
   restart and when the head goes silent, so one deleted by hand is made again);
7. diagnose the pods → phase and conditions; ``preRunningDeadlineSeconds`` fails a job
   whose pods are not all Running in time, with the diagnosis as its message;
8. the cluster is Ready: submit the attempt's Ray job (once: ``<job>-<attempt>``), poll it,
   mirror the driver's snapshot into status; an ended Ray job ends the attempt — success,
   a permanent failure (no retry), or a restart as attempt N+1 from the newest checkpoint.
"""

from __future__ import annotations

import datetime as dt
import math
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from llmtrain.operator import manifests as m
from llmtrain.operator import rayjobs as rj
from llmtrain.operator import references as refs
from llmtrain.operator.diagnose import ClusterState, Diagnosis, PodView, diagnose, pod_view, server_trouble
from llmtrain.operator.kube import ApiError, KubeApi
from llmtrain.operator.rayjobs import HeadError, RayJobs
from pydantic import ValidationError

from llmtrain.api.job import LLMTrainingJob
from llmtrain.api.progress import STAGE_PHASE, RunSnapshot, TuningInfo, snapshot_from_log
from llmtrain.api.status import ConditionType, LLMTrainingJobStatus, Phase, Reason

# Job annotations: the operator's own memory, kept on the object so a restarted operator
# (or another replica) continues where the last one stopped.
ANN_ATTEMPT_STARTED = "llmtrain.dev/attempt-started-at"  # pre-running clock after resume/restart
ANN_SUSPENDED_SECONDS = "llmtrain.dev/suspended-seconds"  # excluded from activeDeadlineSeconds
ANN_RESTARTED_PODS = "llmtrain.dev/restarted-pod-uids"  # failures already counted
ANN_CLEANED_UP = "llmtrain.dev/cleaned-up-at"  # ttlSecondsAfterFinished done
# On a job while its Ray job may run (from the first submission to the end): deleting the
# job stops the Ray job before the garbage collector takes the pods.
FINALIZER = "llmtrain.dev/stop-ray-job"

# Phases written from the training run's snapshot (step 8).
RUN_PHASES = (Phase.Preprocessing, Phase.Training, Phase.Exporting)
OWNED_STATUS_FIELDS = (
    "phase",
    "conditions",
    "restarts",
    "attempt",
    "rayJob",
    "rayClusterName",
    "startTime",
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
)
STAGE_REASON = {
    "starting": Reason.PreparingData,
    "data": Reason.PreparingData,
    "tuning": Reason.TuningRunning,
    "training": Reason.TrainingRunning,
    "export": Reason.Exporting,
    "done": Reason.Exporting,
    "failed": Reason.TrainingRunning,
}
WARNING_REASONS = frozenset(
    {
        Reason.Unschedulable,
        Reason.Restarting,
        Reason.DeadlineExceeded,
        Reason.PreRunningDeadlineExceeded,
        Reason.BackoffLimitExceeded,
        Reason.InvalidSpec,
        Reason.WorkerFailed,
        Reason.InsufficientResources,
        Reason.HeadUnreachable,
        Reason.RunFailed,
        Reason.DataError,
        Reason.NonFiniteLoss,
        Reason.SecretNotFound,
        Reason.ConfigMapNotFound,
        Reason.ImagePullFailed,
        Reason.ContainerConfigError,
        Reason.ForeignProgress,
    }
)


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


def _seconds(s: str | None) -> float:
    """A seconds annotation; 0 when absent or unreadable."""
    try:
        v = float(s or 0)
    except ValueError:
        return 0.0
    return v if math.isfinite(v) and v >= 0 else 0.0


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


@dataclass
class Tick:
    """One reconcile's working set, handed to the steps that restart, recreate and run:
    the job, its pods, the status being built and what to write."""

    job: JobFacts
    body: Mapping[str, Any]
    mine: Mapping[str, PodView]
    st: dict[str, Any]
    conds: Conditions
    out: Outcome
    now: dt.datetime

    @property
    def meta(self) -> Mapping[str, Any]:
        return self.body.get("metadata") or {}


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
        )


class Reconciler:
    """Reconciles jobs over an injected API; stateless between calls (all state is on the
    objects; the only memory is a small cache of what each spec says, :class:`JobFacts`)."""

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
        self.clock: Callable[[], float] = time.monotonic

    # ------------------------------------------------------------------------ entry

    def reconcile(self, body: Mapping[str, Any], pods: Mapping[str, PodView], now: dt.datetime) -> Outcome:
        meta = body.get("metadata") or {}
        name: str = meta["name"]
        uid: str = meta.get("uid", "")
        annotations: dict[str, str] = dict(meta.get("annotations") or {})
        stored = body.get("status")
        old: dict[str, Any] = dict(stored) if isinstance(stored, Mapping) else {}
        # What is stored is the patch's base (so an unreadable field is overwritten or
        # removed); what the steps read is only what this code can read.
        old_owned = {k: old[k] for k in OWNED_STATUS_FIELDS if k in old}
        out = Outcome(status=None)
        bad = self._unreadable_status(uid, str(meta.get("resourceVersion") or ""), old_owned)
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
        st["rayClusterName"] = name
        st.setdefault("restarts", 0)
        old_phase = Phase(old["phase"]) if old.get("phase") in Phase.__members__ else None
        st.setdefault("phase", Phase.Pending.value)

        # Only this incarnation's pods: a job deleted and re-created under the same name
        # may still have pods being garbage-collected.
        mine = {n: p for n, p in pods.items() if p.owner_uid == uid}

        try:
            job = self._parse(body, uid, meta.get("generation"))
        except (ValidationError, m.ManifestError) as e:
            if old_phase != Phase.Failed:
                self._fail(st, conds, out, Reason.InvalidSpec, _spec_error(e), now)
                self._delete_pods(meta, mine, out)
            return self._finish(st, conds, old_owned, out)

        # 2. finished: nothing runs any more; TTL removes the Ray cluster, the CR stays.
        if old_phase is not None and old_phase.terminal:
            out.phase = old_phase
            if FINALIZER in (meta.get("finalizers") or ()):
                out.finalizer = False
            self._delete_pods(meta, mine, out)
            self._ttl(job, uid, old, annotations, out, now)
            self._serve(job, body, st, conds, out)
            return self._finish(st, conds, old_owned, out)

        # 3. suspend / resume
        if job.suspend:
            if mine and self._checkpoint_before_suspend(meta, st, conds, out, now):
                return self._finish(st, conds, old_owned, out)
            if mine:
                self._stop_ray_job(meta, st, out)
            self._delete_pods(meta, mine, out)
            latest = (st.get("checkpoint") or {}).get("latestStep")
            resumes = (
                f"resumes from its newest checkpoint, step {latest} when suspended"
                if latest is not None
                else "starts over"
            )
            if not conds.is_true(ConditionType.Suspended):
                out.events.append(
                    Event("Normal", Reason.SuspendedByUser.value, f"suspended: Ray pods deleted; {resumes}")
                )
            msg = (
                "suspended by spec.suspend: the Ray pods are deleted, status is kept; set suspend: false "
                f"to resume (the run {resumes})"
            )
            conds.set(ConditionType.Suspended, True, Reason.SuspendedByUser, msg)
            conds.set(ConditionType.Running, False, Reason.SuspendedByUser, msg)
            conds.set(ConditionType.Scheduled, False, Reason.WaitingForPods, "suspended: no pods")
            st["phase"] = Phase.Suspended.value
            out.phase = Phase.Suspended
            return self._finish(st, conds, old_owned, out)

        suspended_total = _seconds(annotations.get(ANN_SUSPENDED_SECONDS))
        if conds.is_true(ConditionType.Suspended):
            since = parse_time((conds.get(ConditionType.Suspended) or {}).get("lastTransitionTime")) or now
            suspended_total += max(0.0, (now - since).total_seconds())
            out.annotations[ANN_SUSPENDED_SECONDS] = f"{suspended_total:.0f}"
            out.annotations[ANN_ATTEMPT_STARTED] = rfc3339(now)
            conds.set(ConditionType.Suspended, False, Reason.Resumed, "resumed: Ray pods recreated")
            st["attempt"] = int(st.get("attempt") or 0) + 1
            out.events.append(Event("Normal", Reason.Resumed.value, "resumed: recreating the Ray pods"))

        if not st.get("startTime"):
            st["startTime"] = rfc3339(now)
        if not st.get("attempt"):
            st["attempt"] = 1

        # 4. activeDeadlineSeconds: wall time since start minus time suspended
        deadline = job.active_deadline_seconds
        start = parse_time(st["startTime"]) or now
        active = (now - start).total_seconds() - suspended_total
        if deadline is not None and active >= deadline:
            self._fail(
                st,
                conds,
                out,
                Reason.DeadlineExceeded,
                f"active for {active:.0f}s, over spec.activeDeadlineSeconds={deadline}",
                now,
            )
            self._stop_ray_job(meta, st, out)
            self._delete_pods(meta, mine, out)
            return self._finish(st, conds, old_owned, out)

        expected = list(job.pod_names)
        tick = Tick(job, body, mine, st, conds, out, now)
        handled = set(filter(None, annotations.get(ANN_RESTARTED_PODS, "").split(",")))
        live = {n: p for n, p in mine.items() if p.uid not in handled}

        # 5. a Ray node ended: the cluster is restarted as a whole (its GCS state and the
        # training group die with any one node), up to spec.backoffLimit times.
        diag = diagnose(expected, live, self._event_lookup(meta))
        if self._pods_ended_or_stale(tick, diag, live, handled):
            return self._finish(st, conds, old_owned, out)

        # 6. create what is missing (children before pods: pods mount the ConfigMap and
        # read the Secret). Skipped entirely while every pod exists: a steady job costs
        # no API calls per tick.
        for n in live:
            self._recent.pop((uid, n), None)
        just_made = [n for n in expected if n not in live and self._just_made(uid, n)]
        missing = [n for n in expected if n not in live and n not in just_made]
        # Pods created but not in the index yet count as waiting for the scheduler, not
        # as "not created".
        seen = dict(live)
        for n in just_made:
            seen[n] = _just_created(n, meta)
        if missing:
            model = self._model(body)
            if self._references_missing(tick, model, expected, seen, old_phase, annotations):
                return self._finish(st, conds, old_owned, out)
            created = self._ensure_children(model, body, mine, pods, missing, out)
            if out.error:
                out.requeue = out.error
            for n in created:
                seen[n] = _just_created(n, meta)
        elif uid not in self._children_made and not just_made:
            # Every pod exists, but this process has not yet seen the job's Secret, ConfigMap,
            # Service and NetworkPolicy: check them once (an operator restarted after one was
            # deleted makes it again; without it a job's pods stayed unfenced until a restart).
            self._ensure_static_children(self._model(body), body, out)
        if missing or just_made:
            diag = diagnose(expected, seen, self._event_lookup(meta))

        # 7. status from the diagnosis
        self._apply_diagnosis(job, diag, st, conds, old_phase, annotations, out, now)
        # 8. the training run on the Ready cluster
        if diag.state == ClusterState.Ready and Phase(st["phase"]) != Phase.Failed:
            self._run_attempt(tick)
        has_finalizer = FINALIZER in (meta.get("finalizers") or ())
        if Phase(st["phase"]).terminal:
            self._delete_pods(meta, mine, out)
            if has_finalizer:
                out.finalizer = False
        elif (st.get("rayJob") or {}).get("status") in ("PENDING", "RUNNING") and not has_finalizer:
            out.finalizer = True  # from now on, deleting the job stops its Ray job first
        return self._finish(st, conds, old_owned, out)

    # --------------------------------------------------------------------- steps

    def _unreadable_status(self, uid: str, version: str, owned: Mapping[str, Any]) -> list[str]:
        """The operator's status fields that do not fit the status schema this code reads
        (stored under a looser CRD, by an older version, or edited by hand): read as
        absent, so the job goes on from what is observed instead of failing every tick.
        Checked once per resourceVersion."""
        if version and self._status_ok.get(uid) == version:
            return []
        try:
            LLMTrainingJobStatus.model_validate({k: v for k, v in owned.items() if v is not None})
        except ValidationError as e:
            locs = {str(err["loc"][0]) for err in e.errors() if err["loc"]}
            return sorted(locs & set(owned)) or sorted(owned)
        if version:
            if len(self._status_ok) >= self.CACHE_SIZE:
                self._status_ok.pop(next(iter(self._status_ok)))
            self._status_ok[uid] = version
        return []

    def _parse(self, body: Mapping[str, Any], uid: str, generation: int | None) -> JobFacts:
        """What the spec says, validated, with its manifests buildable (an error names the
        spec field to fix). Cached per (uid, generation): the spec only changes with the
        generation, and a tick then costs no pydantic validation (at 1000 jobs, 200
        ticks/s)."""
        key = (uid, generation)
        hit = self._cache.get(key) if generation is not None else None
        if hit is not None:
            return hit
        job = self._model(body)
        m.pods(job, self.settings)
        m.network_policy(job, self.settings)
        facts = JobFacts.of(job)
        if generation is not None:
            if len(self._cache) >= self.CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = facts
        return facts

    @staticmethod
    def _model(body: Mapping[str, Any]) -> LLMTrainingJob:
        return LLMTrainingJob.model_validate(
            {k: v for k, v in body.items() if k in ("apiVersion", "kind", "metadata", "spec")}
        )

    RECENT_SECONDS = 60.0
    # Ray's dashboard answers ~5-20 s after the head pod runs: a Jobs API that is silent
    # longer than this is worth a word in the Running condition.
    JOBS_API_GRACE_SECONDS = 30.0

    def _just_made(self, uid: str, name: str) -> bool:
        """Created by this process less than RECENT_SECONDS ago (so not yet in the index)."""
        t = self._recent.get((uid, name))
        if t is None:
            return False
        if self.clock() - t > self.RECENT_SECONDS:
            del self._recent[(uid, name)]  # the index should have it by now: look again
            return False
        return True

    def _event_lookup(self, meta: Mapping[str, Any]) -> Callable[[PodView], str | None]:
        def lookup(p: PodView) -> str | None:
            try:
                events = self.api.scheduler_events(p.namespace or meta.get("namespace", ""), p.name)
            except ApiError:
                return None
            return events[-1].get("message") if events else None

        return lookup

    def _create(self, obj: dict[str, Any], body: Mapping[str, Any], out: Outcome) -> bool:
        """Create if absent (True if this call created it); on 409 the existing object must
        be owned by this job."""
        return self._create_or_existing(obj, body, out)[0]

    def _create_or_existing(
        self, obj: dict[str, Any], body: Mapping[str, Any], out: Outcome
    ) -> tuple[bool, dict[str, Any] | None]:
        """:meth:`_create`, and on 409 the existing object when it is this job's."""
        self.adopt(obj, body)
        kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
        try:
            self.api.create(obj)
            return True, None
        except ApiError as e:
            if e.status != 409:
                out.error = f"creating {kind} {name} failed: {e.message}"
                out.events.append(Event("Warning", "CreateFailed", out.error))
                return False, None
        existing = self.api.get(kind, ns, name)
        uid = (body.get("metadata") or {}).get("uid")
        if existing is not None and uid not in _owner_uids(existing):
            out.error = (
                f"{kind} {name} exists and is not owned by this job: waiting for it to be deleted "
                "(or delete it yourself)"
            )
            out.events.append(Event("Warning", "NameConflict", out.error))
            return False, None
        return False, existing

    def _ensure_static_children(self, job: LLMTrainingJob, body: Mapping[str, Any], out: Outcome) -> bool:
        """The Secret, ConfigMap, Service and NetworkPolicy exist and are this job's (checked
        once per process, again after each restart); False if one could not be made or is
        someone else's. A Secret made again (deleted by hand) holds a new token."""
        uid = (body.get("metadata") or {}).get("uid", "")
        if uid in self._children_made:
            return True
        before = out.error
        for child in m.static_children(job, self.settings, self.token()):
            if self._create(child, body, out) and child["kind"] == "Secret":
                self._tokens.pop(uid, None)
        if out.error != before:
            return False
        self._children_made.add(uid)
        return True

    def _ensure_children(
        self,
        job: LLMTrainingJob,
        body: Mapping[str, Any],
        mine: Mapping[str, PodView],
        all_pods: Mapping[str, PodView],
        missing: list[str],
        out: Outcome,
    ) -> list[str]:
        """Create the children and the missing pods; the names of the pods created."""
        uid = (body.get("metadata") or {}).get("uid", "")
        if not self._ensure_static_children(job, body, out):
            # Never pods beside someone else's Secret or ConfigMap: they would run with its
            # Ray token (known to whoever made it) or its spec.
            out.requeue = out.error
            return []
        by_name = {p["metadata"]["name"]: p for p in m.pods(job, self.settings)}
        created: list[str] = []
        for name in missing:
            p = all_pods.get(name)
            if p is not None and p.deleting:
                out.requeue = f"pod {name} is still being deleted"
                continue
            if p is not None and p.owner_uid != (body.get("metadata") or {}).get("uid"):
                # Usually the previous incarnation of a job with this name, on its way out
                # through the garbage collector; otherwise someone else's pod.
                out.error = (
                    f"Pod {name} exists and is not owned by this job: waiting for it to be deleted "
                    "(or delete it yourself)"
                )
                out.events.append(Event("Warning", "NameConflict", out.error))
                out.requeue = out.error
                continue
            if name in mine:  # a counted-and-handled failure not yet deleted: delete it again
                self.api.delete("Pod", mine[name].namespace, name, uid=mine[name].uid)
                out.requeue = f"pod {name} is still being deleted"
                continue
            made, existing = self._create_or_existing(by_name[name], body, out)
            if made:
                created.append(name)
                self._recent[(uid, name)] = self.clock()
            elif existing is not None:
                self._relabel(by_name[name], existing, out)
        if created:
            out.events.append(Event("Normal", "PodsCreated", f"created {len(created)} Ray pods"))
            out.requeue = out.requeue or "pods created"
        return created

    def _relabel(self, want: Mapping[str, Any], live: Mapping[str, Any], out: Outcome) -> None:
        """Our pod exists but the pod index does not show it (it selects on the labels):
        labels edited by hand are put back, so the job sees its pod again instead of
        waiting for it for ever; a pod merely not indexed yet is left alone."""
        ns, name = want["metadata"]["namespace"], want["metadata"]["name"]
        labels = (live.get("metadata") or {}).get("labels") or {}
        wanted: dict[str, str] = want["metadata"]["labels"]
        if any(labels.get(k) != v for k, v in wanted.items()):
            self.api.patch("Pod", ns, name, {"metadata": {"labels": wanted}})
            out.events.append(
                Event(
                    "Warning", "PodRelabeled", f"pod {name}'s labels were edited: the operator's are restored"
                )
            )
            out.requeue = out.requeue or f"pod {name} relabeled"

    def _pods_ended_or_stale(
        self, t: Tick, diag: Diagnosis, live: Mapping[str, PodView], handled: set[str]
    ) -> bool:
        """5. A pod ended: a restart (or a new worker); pods stuck with an image the spec no
        longer names: made again. True if either happened (the tick ends there)."""
        in_flight = (t.st.get("rayJob") or {}).get("status") in ("PENDING", "RUNNING")
        lost = self._deleted_under_the_run(t, live)
        if lost is not None:
            name, pod = lost
            why = f"pod {name} was deleted while Ray job {t.st['rayJob']['submissionId']} ran"
            if pod is not None and pod.role == m.ROLE_WORKER:
                self._recreate_worker(t, pod, why, handled)
            else:
                self._restart(t, why, Reason.BackoffLimitExceeded)
            return True
        if diag.state == ClusterState.Failed:
            failed = live.get(diag.failed_pod or "")
            log = self._crash_log(failed) if failed is not None else ""
            if failed is not None and failed.role == m.ROLE_WORKER and in_flight:
                # The head and the Ray job live on: a new pod for the lost worker, and Ray
                # Train's FailureConfig restarts the worker group from the newest checkpoint
                # in the same attempt.
                self._recreate_worker(t, failed, diag.message, handled, log)
            else:
                self._restart(t, diag.message, Reason.BackoffLimitExceeded, log)
            return True
        return diag.state == ClusterState.Stuck and self._remake_stale(t, live, in_flight, diag, handled)

    def _deleted_under_the_run(
        self, t: Tick, live: Mapping[str, PodView]
    ) -> tuple[str, PodView | None] | None:
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
            pod = live.get(name)
            if pod is not None and pod.deleting:
                return name, pod
            if pod is None and name == m.head_name(t.job.name):
                return name, None
        return None

    def _restart(self, t: Tick, why: str, fail_reason: Reason, log: str = "") -> None:
        """A new attempt on a new Ray cluster (its GCS state and the training group die with
        any one node), resuming from the newest checkpoint; up to spec.backoffLimit times.
        ``log``: the crashed container's last lines, last in the message."""
        job, meta, mine, st, conds, out, now = t.job, t.meta, t.mine, t.st, t.conds, t.out, t.now
        restarts = int(st.get("restarts") or 0)
        if restarts >= job.backoff_limit:
            self._fail(
                st,
                conds,
                out,
                fail_reason,
                f"{why}; {restarts} restarts reached spec.backoffLimit={job.backoff_limit}{log}",
                now,
            )
            self._delete_pods(meta, mine, out)
            return
        self._stop_ray_job(meta, st, out)  # a head that still runs must not train on
        # The new Ray cluster's Secret, ConfigMap, Service and NetworkPolicy are checked
        # again (one may have been deleted by hand: that is often why the attempt failed).
        uid = str(meta.get("uid", ""))
        self._children_made.discard(uid)
        self._spec_synced.pop(uid, None)
        st["restarts"] = restarts + 1
        st["attempt"] = int(st.get("attempt") or 1) + 1
        out.restarted = True
        out.annotations[ANN_RESTARTED_PODS] = ",".join(sorted(p.uid for p in mine.values()))
        out.annotations[ANN_ATTEMPT_STARTED] = rfc3339(now)
        msg = f"{why}; restarting the Ray cluster as attempt {st['attempt']} (restart {restarts + 1} of {job.backoff_limit}){log}"
        self._delete_pods(meta, mine, out, end_group=False)
        out.events.append(Event("Warning", Reason.Restarting.value, msg))
        conds.set(ConditionType.Running, False, Reason.Restarting, msg)
        conds.set(ConditionType.Scheduled, False, Reason.WaitingForPods, "restarting: pods recreated")
        st["phase"] = Phase.Provisioning.value
        out.phase = Phase.Provisioning
        out.requeue = "restarting: waiting for the old pods to go"

    def _recreate_worker(self, t: Tick, failed: PodView, why: str, handled: set[str], log: str = "") -> None:
        """A worker pod ended while its Ray job runs: delete it (the next tick creates it
        again, it rejoins the head); the run resumes in the same attempt. Counts against
        spec.backoffLimit like a cluster restart."""
        job, st, conds, out = t.job, t.st, t.conds, t.out
        restarts = int(st.get("restarts") or 0)
        if restarts >= job.backoff_limit:
            self._restart(t, why, Reason.BackoffLimitExceeded, log)
            return
        st["restarts"] = restarts + 1
        out.restarted = True
        out.annotations[ANN_RESTARTED_PODS] = ",".join(sorted(handled | {failed.uid}))
        self.api.delete("Pod", failed.namespace, failed.name, uid=failed.uid)
        msg = (
            f"{why}; pod {failed.name} recreated, the run resumes from the newest checkpoint in attempt "
            f"{st.get('attempt') or 1} (restart {restarts + 1} of {job.backoff_limit}){log}"
        )
        out.events.append(Event("Warning", Reason.Restarting.value, msg))
        conds.set(ConditionType.Running, True, Reason.Restarting, msg)
        out.requeue = f"worker {failed.name} recreated"

    # The lines of a crashed container's log that go into the condition (as for a failed
    # driver's log, rayjobs.log_tail).
    CRASH_LOG_LINES = 20

    def _crash_log(self, pod: PodView) -> str:
        """The last lines of a Ray container that exited with an error, for the condition; ''
        when it did not run in a container runtime (a KWOK pod: there is no log to ask the
        kubelet for) or ended cleanly. One GET per failed pod: the pod is deleted next."""
        if not pod.ran or not pod.exit_code:
            return ""
        try:
            text = self.api.pod_log(pod.namespace, pod.name, m.RAY_CONTAINER, tail_lines=self.CRASH_LOG_LINES)
        except (ApiError, OSError) as e:
            return f"\n(its log could not be read: {e})"
        tail = rj.log_tail(text, lines=self.CRASH_LOG_LINES)
        return f"\n--- container {m.RAY_CONTAINER}, last log lines ---\n{tail}" if tail else ""

    def _remake_stale(
        self, t: Tick, live: Mapping[str, PodView], in_flight: bool, diag: Diagnosis, handled: set[str]
    ) -> bool:
        """Pods stuck before their containers start were made from an older
        ``spec.resources.image`` (the user fixed a wrong one): delete them and the next
        reconcile makes them with the image the spec names now; otherwise the fix would never
        take (a pod's image is the one it was made with). Before the Ray job runs, every pod
        of the attempt goes (one image per Ray cluster); while it runs, only stuck ones.
        No restart is counted: nothing ran. True if pods were deleted."""
        image = t.job.image
        stale = {
            n: p
            for n, p in live.items()
            if p.image is not None and p.image != image and (not in_flight or p.waiting)
        }
        if not stale:
            return False
        # Handled (as the pods a restart deletes): while they are being deleted they are
        # neither "deleted under the run" nor live, just missing, and made again.
        t.out.annotations[ANN_RESTARTED_PODS] = ",".join(sorted(handled | {p.uid for p in stale.values()}))
        self._delete_pods(t.meta, stale, t.out, end_group=False)
        msg = (
            f"spec.resources.image is now {image}: pods {', '.join(sorted(stale))} were made with "
            f"{', '.join(sorted({str(p.image) for p in stale.values()}))} and were stuck ({diag.message}); "
            "they are made again with the new image"
        )
        t.out.events.append(Event("Normal", "PodsRecreated", msg))
        t.conds.set(ConditionType.Running, False, Reason.Provisioning, msg)
        t.st["phase"] = Phase.Provisioning.value
        t.out.phase = Phase.Provisioning
        t.out.requeue = f"recreating {len(stale)} pods with image {image}"
        return True

    def _references_missing(
        self,
        t: Tick,
        model: LLMTrainingJob,
        expected: list[str],
        seen: Mapping[str, PodView],
        old_phase: Phase | None,
        annotations: Mapping[str, str],
    ) -> bool:
        """6a. Before any pod: a Secret or ConfigMap the pods reference is missing (or lacks a
        key)? Then no pod is made; the condition and one Event name the object and the spec
        field. The resync looks again, so creating it lets the job go on;
        ``preRunningDeadlineSeconds`` still counts. True if one is missing."""
        absent = refs.first_missing(self.api.get, t.job.namespace, refs.references(model))
        if absent is None:
            return False
        conds, out = t.conds, t.out
        msg = absent.message(t.job.namespace)
        old = conds.get(ConditionType.Running) or {}
        diag = diagnose(expected, seen)
        diag = Diagnosis(
            ClusterState.Waiting, f"{diag.message}: {msg}", diag.scheduled, diag.running, diag.expected
        )
        self._apply_diagnosis(t.job, diag, t.st, conds, old_phase, annotations, out, t.now)
        if Phase(t.st["phase"]) == Phase.Failed:  # the pre-running deadline passed
            return True
        conds.set(ConditionType.Running, False, absent.reason, msg)
        if old.get("reason") != absent.reason.value or old.get("message") != msg:
            out.events.append(Event("Warning", absent.reason.value, msg))
        out.requeue = f"waiting for {absent.ref.kind} {absent.ref.name}"
        return True

    def _ray_token(self, namespace: str, name: str, uid: str) -> str:
        """The job's Ray token, from the Secret this operator made (kept per job uid)."""
        token = self._tokens.get(uid)
        if token is not None:
            return token
        secret = self.api.get("Secret", namespace, m.auth_secret_name(name))
        if secret is not None and uid not in _owner_uids(secret):
            # Someone else's Secret under our name: its token is known to whoever made it.
            raise HeadError(
                f"Secret {m.auth_secret_name(name)} is not owned by this job: not using its token"
            )
        data = ((secret or {}).get("data") or {}).get(m.AUTH_TOKEN_KEY)
        if not data:
            raise HeadError(f"Secret {m.auth_secret_name(name)} holds no Ray token")
        import base64

        token = base64.b64decode(data).decode()
        if len(self._tokens) >= self.CACHE_SIZE:
            self._tokens.pop(next(iter(self._tokens)))
        self._tokens[uid] = token
        return token

    def _run_attempt(self, t: Tick) -> None:
        """8. Submit this attempt's Ray job once, poll it, mirror the driver's snapshot;
        an ended Ray job ends the attempt."""
        job, body, meta, st, conds, out, now = t.job, t.body, t.meta, t.st, t.conds, t.out, t.now
        ns, name, uid = job.namespace, job.name, str(meta.get("uid", ""))
        sid = rj.submission_id(name, int(st.get("attempt") or 1))
        head = rj.head_of(self.settings, ns, name)
        ray_job: dict[str, Any] = dict(st.get("rayJob") or {})
        if ray_job.get("submissionId") != sid:  # a new attempt: nothing submitted yet
            ray_job = {"submissionId": sid}
        try:
            token = self._ray_token(ns, name, uid)
            if not ray_job.get("status"):  # status is set once the head took the job
                text = m.spec_text(self._model(body))
                if not self._spec_configmap_current(t, text):
                    return
                body_ = rj.submission(
                    text,
                    ns,
                    name,
                    sid,
                    self.settings.progress_port,
                    m.driver_spec_path(self.settings, ns, name),
                )
                created = self.ray.submit(head, token, body_)
                st["rayJob"] = {"submissionId": sid, "status": "PENDING"}
                what = "submitted" if created else "found already submitted"
                out.events.append(
                    Event("Normal", "RayJobSubmitted", f"Ray job {sid} {what} to {head.dashboard}")
                )
                self._set_stage(st, conds, "starting", f"Ray job {sid} {what}; the driver starts")
                out.requeue = f"Ray job {sid} submitted"
                return
            info = self.ray.status(head, token, sid)
        except (HeadError, ApiError) as e:
            self._unreachable(t, ray_job, str(e))
            return
        ray_job.pop("unreachableSince", None)
        if info is None:
            # The head does not know the job (deleted by hand, or lost): submit it again under
            # the same id, as KubeRay's HTTP mode does; the driver resumes from the newest
            # checkpoint. A lost head *pod* is step 5's business (a new attempt).
            st["rayJob"] = {"submissionId": sid}
            out.requeue = f"the Ray head does not know Ray job {sid}: submitting it again"
            return
        ray_job["status"] = info.status
        st["rayJob"] = ray_job
        if info.status not in rj.TERMINAL:
            self._poll_progress(t, head, token, ray_job)
            return
        ray_job.pop("foreignProgressSince", None)  # no more polls: a mark that cannot clear
        text, snap = self._final_snapshot(head, token, sid, out)
        if snap is not None:
            self._mirror(snap, st, conds, out)
        tail = rj.log_tail(text)
        if info.status == "SUCCEEDED":
            st["phase"] = Phase.Succeeded.value
            st["completionTime"] = rfc3339(now)
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
            self._fail(st, conds, out, reason, f"{why}\n--- driver log, last lines ---\n{tail}", now)
            return
        self._restart(t, f"Ray job {sid} {info.status.lower()}: {why}", Reason.RunFailed)

    def _final_snapshot(
        self, head: rj.Head, token: str, sid: str, out: Outcome
    ) -> tuple[str, RunSnapshot | None]:
        """The ended Ray job's log and the driver's final snapshot in it (its last line), if
        that is this attempt's: another run's (its failure reason included) is not kept."""
        try:
            # Its tail goes into status and an Event: the job's own Ray token never does
            # (the driver masks it in its log; this holds for any other line that prints it).
            text = self.ray.logs(head, token, sid).replace(token, "<redacted>")
        except HeadError as e:
            text = f"(the driver's log could not be read: {e})"
        snap = snapshot_from_log(text)
        if snap is not None and snap.submission_id != sid:
            out.foreign.append(("log", snap.submission_id or ""))
            return text, None
        return text, snap

    def _poll_progress(self, t: Tick, head: rj.Head, token: str, ray_job: dict[str, Any]) -> None:
        """The running driver's snapshot into status, if it is this attempt's driver."""
        try:
            snap = self.ray.progress(head, token, ray_job["submissionId"])
        except rj.ForeignSnapshot as e:
            self._foreign_progress(t, head, ray_job, e)
            return
        except HeadError as e:  # the driver is starting, or busy: the next poll will tell
            t.out.requeue = f"no progress from the driver yet: {e}"
            return
        ray_job.pop("foreignProgressSince", None)
        self._mirror(snap, t.st, t.conds, t.out)

    # A progress endpoint that answers for another Ray job this long is worth the Running
    # condition (shorter: one poll that raced a restart); its figures are never written.
    FOREIGN_GRACE_SECONDS = 15.0

    def _foreign_progress(
        self, t: Tick, head: rj.Head, ray_job: dict[str, Any], e: rj.ForeignSnapshot
    ) -> None:
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
        if (now - since).total_seconds() >= self.FOREIGN_GRACE_SECONDS:
            if (conds.get(ConditionType.Running) or {}).get("reason") != Reason.ForeignProgress.value:
                out.events.append(Event("Warning", Reason.ForeignProgress.value, why))
            conds.set(ConditionType.Running, True, Reason.ForeignProgress, why)
        out.requeue = why

    def _set_stage(self, st: dict[str, Any], conds: Conditions, stage: str, message: str) -> None:
        st["phase"] = STAGE_PHASE.get(stage, Phase.Training.value)
        conds.set(ConditionType.Running, True, STAGE_REASON.get(stage, Reason.TrainingRunning), message)

    def _serve(
        self, job: JobFacts, body: Mapping[str, Any], st: dict[str, Any], conds: Conditions, out: Outcome
    ) -> None:
        """2b. ``spec.serve`` on a Succeeded job: the model server (NetworkPolicy, Service,
        Deployment) made, kept to the spec, its readiness in ``status.serving`` and the Serving
        condition; ``serve: null`` (or no export) removes it. A serving job costs one GET (its
        Deployment's readiness) per resync."""
        meta = body.get("metadata") or {}
        uid, generation = str(meta.get("uid", "")), meta.get("generation")
        ns, name = job.namespace, job.name
        model_uri = st.get("exportUri")
        if job.serve_replicas is None or st.get("phase") != Phase.Succeeded.value or not model_uri:
            if st.get("serving") is not None or conds.get(ConditionType.Serving) is not None:
                self._remove_server(ns, name, uid, out)
                st["serving"] = None
                conds.drop(ConditionType.Serving)
            return
        if self._serve_synced.get(uid) != generation:
            objs = m.serving_objects(self._model(body), self.settings, model_uri)
            if not self._ensure_server(objs, body, out):
                return
            self._serve_synced[uid] = generation
        dep = self.api.get("Deployment", ns, m.serve_name(name))
        if dep is None or uid not in _owner_uids(dep):  # deleted by hand (or replaced): made again
            self._serve_synced.pop(uid, None)
            out.requeue = f"Deployment {m.serve_name(name)} is missing: making it again"
            return
        ready = int((dep.get("status") or {}).get("readyReplicas") or 0)
        want = job.serve_replicas
        st["serving"] = {
            "url": m.serve_url(ns, name, job.serve_port, self.settings),
            "modelName": name,
            "modelUri": model_uri,
            "replicas": want,
            "readyReplicas": ready,
        }
        if want == 0:
            conds.set(ConditionType.Serving, False, Reason.ServerScaledToZero, "spec.serve.replicas is 0")
        elif ready == 0:
            trouble = self._server_trouble(ns, name)
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

    def _server_trouble(self, ns: str, name: str) -> str | None:
        """Why no server replica is ready when a container cannot start or crash-loops: the
        kubelet's words, and a crash-looping container's last log lines (of the instance that
        crashed). One LIST (and one log GET) per resync, only while no replica is ready."""
        try:
            pods = self.api.list_pods(ns, f"{m.LABEL_SERVE}={name}")
        except ApiError:
            return None
        found = server_trouble(pod_view(p) for p in pods)
        if found is None:
            return None
        text, looping = found
        if looping is None:
            return text
        try:
            log = self.api.pod_log(ns, *looping, tail_lines=self.CRASH_LOG_LINES, previous=True)
        except (ApiError, OSError) as e:
            return f"{text}\n(its log could not be read: {e})"
        tail = rj.log_tail(log, lines=self.CRASH_LOG_LINES)
        return (
            f"{text}\n--- pod {looping[0]}, container {looping[1]}, last log lines ---\n{tail}"
            if tail
            else text
        )

    def _ensure_server(self, objs: list[dict[str, Any]], body: Mapping[str, Any], out: Outcome) -> bool:
        """Create each serving object, or patch it when it was made from another spec; never
        touch one the job does not own."""
        uid = (body.get("metadata") or {}).get("uid")
        made = []
        for obj in objs:
            kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
            live = self.api.get(kind, ns, name)
            if live is None:
                before = out.error
                if self._create(obj, body, out):
                    made.append(kind)
                if out.error != before:
                    out.requeue = out.error
                    return False
                continue
            if uid not in _owner_uids(live):
                out.error = f"{kind} {name} exists and is not owned by this job: delete it, or rename the job"
                out.events.append(Event("Warning", "NameConflict", out.error))
                out.requeue = out.error
                return False
            want = obj["metadata"]["annotations"][m.ANN_SERVE_HASH]
            if ((live.get("metadata") or {}).get("annotations") or {}).get(m.ANN_SERVE_HASH) != want:
                self.api.patch(
                    kind,
                    ns,
                    name,
                    {"metadata": {"annotations": {m.ANN_SERVE_HASH: want}}, "spec": obj["spec"]},
                )
                out.events.append(Event("Normal", "ServerUpdated", f"{kind} {name} updated to spec.serve"))
        if made:
            out.events.append(
                Event("Normal", "ServerCreated", f"created the model server's {', '.join(made)}")
            )
        return True

    def _remove_server(self, ns: str, name: str, uid: str, out: Outcome) -> None:
        for kind in m.SERVE_KINDS:
            live = self.api.get(kind, ns, m.serve_name(name))
            if live is not None and uid in _owner_uids(live):
                self.api.delete(kind, ns, m.serve_name(name), uid=live["metadata"].get("uid"))
        self._serve_synced.pop(uid, None)
        out.events.append(Event("Normal", "ServerDeleted", "spec.serve unset: the model server is deleted"))

    def _spec_configmap_current(self, t: Tick, text: str) -> bool:
        """The spec ConfigMap (what the driver reads) says what the spec says now: the mutable
        fields may have changed since the pods were made. False if it cannot be made."""
        ns, name = t.job.namespace, t.job.name
        key = (str(t.meta.get("uid", "")), t.meta.get("generation"))
        if self._spec_synced.get(key[0]) == key[1]:  # checked for this spec: no GET per tick
            return True
        cm_name = m.spec_configmap_name(name)
        cm = self.api.get("ConfigMap", ns, cm_name)
        if cm is None:  # deleted by hand: made again (a kubelet re-syncs the pods' copy)
            before = t.out.error
            self._create(m.spec_configmap(self._model(t.body)), t.body, t.out)
            if t.out.error != before:
                t.out.requeue = t.out.error
                return False
            return True
        if t.meta.get("uid") not in _owner_uids(cm):  # never write into someone else's ConfigMap
            t.out.error = f"ConfigMap {cm_name} is not owned by this job: delete it, or rename the job"
            t.out.events.append(Event("Warning", "NameConflict", t.out.error))
            t.out.requeue = t.out.error
            return False
        if (cm.get("data") or {}).get(m.SPEC_FILE) != text:
            self.api.patch("ConfigMap", ns, cm_name, {"data": {m.SPEC_FILE: text}})
            t.out.events.append(
                Event("Normal", "SpecUpdated", f"ConfigMap {cm_name} updated to the current spec")
            )
        self._spec_synced[key[0]] = key[1]
        return True

    def _mirror(self, snap: RunSnapshot, st: dict[str, Any], conds: Conditions, out: Outcome) -> None:
        """The driver's snapshot into status: progress, metrics, lineage, data, export,
        the search; an Event per trial finished since the status was last written."""
        if snap.tuning is not None:
            out.events += self._trial_events(st.get("tuning"), snap.tuning)
        for key, value in snap.status_patch().items():
            st[key] = {**(st.get(key) or {}), **value} if isinstance(value, dict) else value
        p = snap.progress
        where = f"step {p.step}/{p.total_steps}" if p is not None and p.total_steps else snap.stage
        if snap.stage not in ("done", "failed"):
            self._set_stage(st, conds, snap.stage, f"{snap.stage}: {where}")
        if snap.data is not None:
            reason = Reason.DataReused if snap.data.reused else Reason.DataPrepared
            conds.set(
                ConditionType.DataReady,
                True,
                reason,
                f"{snap.data.train_tokens:,} train / {snap.data.validation_tokens:,} validation tokens "
                f"at {snap.data.manifest_uri}"
                + (f" (validation set: {snap.data.validation_set})" if snap.data.validation_set else ""),
            )

    # Events per reconcile for finished trials: a search of 1,000 short trials may finish
    # dozens between two polls; the rest are counted in one more Event, and status.tuning
    # has every count.
    MAX_TRIAL_EVENTS = 3

    @classmethod
    def _trial_events(cls, old: Mapping[str, Any] | None, new: TuningInfo) -> list[Event]:
        """Events for the trials that finished since ``old`` (the status' tuning, as last
        written): as many as the finished count grew, newest first from the snapshot's
        ``recent`` list. Stateless like the rest: a repeated snapshot grows no count."""
        before = sum(int((old or {}).get(k) or 0) for k in ("completed", "stopped", "failed"))
        fresh = new.finished - before
        if fresh <= 0:
            return []
        named = list(reversed(new.recent[-fresh:]))[: cls.MAX_TRIAL_EVENTS]
        events = []
        for t in named:
            metric = f"{new.metric} {t.metric:.4f}" if t.metric is not None else f"no {new.metric}"
            config = " ".join(f"{k.rsplit('.', 1)[-1]}={v:.4g}" for k, v in t.config.items())
            if t.state == "failed":
                events.append(
                    Event("Warning", "TrialFailed", f"trial {t.number} failed: {t.message}; {config}")
                )
            elif t.state == "stopped":
                events.append(
                    Event(
                        "Normal",
                        "TrialStopped",
                        f"trial {t.number} stopped early after {t.steps} steps, {metric}; {config}",
                    )
                )
            else:
                events.append(
                    Event(
                        "Normal",
                        "TrialFinished",
                        f"trial {t.number} completed {t.steps} steps, {metric}; {config}",
                    )
                )
        if fresh > len(named):
            more = fresh - len(named)
            best = (
                f"; best so far trial {new.best.number}, {new.metric} {new.best.metric:.4f}"
                if (new.best is not None and new.best.metric is not None)
                else ""
            )
            events.append(
                Event(
                    "Normal",
                    "TrialsFinished",
                    f"{more} more trial{'s' * (more != 1)} finished since the last update "
                    f"({new.finished} of {new.planned if new.planned is not None else '?'} so far: "
                    f"{new.completed} completed, {new.stopped} stopped early, {new.failed} failed){best}",
                )
            )
        return events

    def _unreachable(self, t: Tick, ray_job: dict[str, Any], error: str) -> None:
        """A failed poll is not a failed job: the attempt ends only after
        ``head_timeout_seconds`` of failed polls (KubeRay's 300 s)."""
        st, conds, out, now = t.st, t.conds, t.out, t.now
        since = parse_time(ray_job.get("unreachableSince")) or now
        waited = (now - since).total_seconds()
        limit = self.settings.head_timeout_seconds
        if waited >= limit:
            self._restart(
                t,
                f"the Ray head did not answer for {waited:.0f}s (limit {limit:.0f}s): {error}",
                Reason.HeadUnreachable,
            )
            return
        if "unreachableSince" not in ray_job:
            ray_job["unreachableSince"] = rfc3339(now)
        uid = str(t.meta.get("uid", ""))
        if waited >= self.JOBS_API_GRACE_SECONDS and self._rechecked.get(uid) != ray_job["unreachableSince"]:
            # Silent past Ray's start-up: a Service or Secret deleted by hand is one reason.
            # Checked once per silence (made again if missing: the Service at once restores
            # the head's name), not on every new head's first polls (at 1000 jobs, 8000 calls).
            self._rechecked[uid] = ray_job["unreachableSince"]
            self._children_made.discard(uid)
            self._ensure_static_children(self._model(t.body), t.body, out)
        st["rayJob"] = ray_job
        # Stable while it lasts (no seconds counter): a waiting job costs no status write per tick.
        why = (
            f"the Ray head has not answered since {ray_job['unreachableSince']} (the attempt ends "
            f"{limit:.0f}s after): {error}"
        )
        if ray_job.get("status"):
            conds.set(ConditionType.Running, False, Reason.HeadUnreachable, why)
        elif waited >= self.JOBS_API_GRACE_SECONDS:  # before that, Ray is still starting: no news
            conds.set(ConditionType.Running, False, Reason.Provisioning, f"Ray cluster ready; but {why}")
        out.requeue = f"{why} ({waited:.0f}s so far)"

    def _checkpoint_before_suspend(
        self, meta: Mapping[str, Any], st: dict[str, Any], conds: Conditions, out: Outcome, now: dt.datetime
    ) -> bool:
        """3a. A suspended training run first takes a last checkpoint: the driver is asked for
        one (rank 0 saves at its next log step) and the pods stay until the lineage holds a
        checkpoint past the step the run had reached, at most ``suspend_checkpoint_seconds``.
        True while waiting. No driver to ask, or no answer: suspend with what exists."""
        ray_job: dict[str, Any] = dict(st.get("rayJob") or {})
        if ray_job.get("status") != "RUNNING" or st.get("phase") != Phase.Training.value:
            return False
        ns, name = meta.get("namespace", ""), meta.get("name", "")
        head = rj.head_of(self.settings, ns, name)
        limit = self.settings.suspend_checkpoint_seconds
        try:
            token = self._ray_token(ns, name, str(meta.get("uid", "")))
            sid = str(ray_job.get("submissionId") or "")
            if not ray_job.get("checkpointAskedAt"):
                step = self.ray.checkpoint(head, token, sid)
                ray_job.update(checkpointAskedAt=rfc3339(now), checkpointAskedStep=step)
                st["rayJob"] = ray_job
            else:
                self._mirror(self.ray.progress(head, token, sid), st, conds, out)
        except rj.ForeignSnapshot as e:  # another run's driver: suspend with what exists
            out.foreign.append((e.source, e.found or ""))
            return False
        except (HeadError, ApiError):
            return False
        asked_at = parse_time(ray_job["checkpointAskedAt"]) or now
        asked_step = int(ray_job.get("checkpointAskedStep") or 0)
        latest = (st.get("checkpoint") or {}).get("latestStep")
        # Strictly past it: the snapshot's step S was reported after rank 0 polled at S, so
        # the asked-for checkpoint comes at a later log step (one at S may predate the ask).
        if latest is not None and int(latest) > asked_step:
            return False
        waited = (now - asked_at).total_seconds()
        if waited >= limit:
            out.events.append(
                Event(
                    "Warning",
                    Reason.SuspendedByUser.value,
                    f"no checkpoint within {limit:.0f}s of asking (step {asked_step}): suspending anyway",
                )
            )
            return False
        why = (
            f"suspending: a last checkpoint was asked for at step {asked_step} "
            f"({ray_job['checkpointAskedAt']}); the Ray pods go once it is complete, or {limit:.0f}s after"
        )
        conds.set(ConditionType.Running, True, Reason.SuspendedByUser, why)
        out.requeue = "suspending: waiting for the last checkpoint"
        return True

    def stop_for_deletion(self, body: Mapping[str, Any]) -> Outcome:
        """The job is being deleted: stop its Ray job (best effort) so the run ends before
        the garbage collector takes the pods; the caller then removes FINALIZER."""
        out = Outcome(status=None, finalizer=False)
        self._stop_ray_job(body.get("metadata") or {}, body.get("status") or {}, out)
        return out

    def _stop_ray_job(self, meta: Mapping[str, Any], st: Mapping[str, Any], out: Outcome) -> None:
        """Stop the running Ray job before its pods go (best effort: the pods go anyway)."""
        ray_job = st.get("rayJob") or {}
        if not ray_job.get("submissionId") or ray_job.get("status") in rj.TERMINAL:
            return
        ns, name = meta.get("namespace", ""), meta.get("name", "")
        try:
            token = self._ray_token(ns, name, str(meta.get("uid", "")))
            self.ray.stop(rj.head_of(self.settings, ns, name), token, ray_job["submissionId"])
            out.events.append(Event("Normal", "RayJobStopped", f"Ray job {ray_job['submissionId']} stopped"))
        except (HeadError, ApiError):  # a head that is gone has stopped it: the pods go anyway
            pass

    def _delete_pods(
        self, meta: Mapping[str, Any], pods: Mapping[str, PodView], out: Outcome, end_group: bool = True
    ) -> None:
        """Delete the job's pods (by uid: never a newer incarnation). With Kueue, the group is
        first marked not retriable so Kueue ends it and frees its quota."""
        for p in pods.values():
            self._recent.pop((p.owner_uid or "", p.name), None)
        live = [p for p in pods.values() if not p.deleting]
        if not live:
            return
        for p in live:
            if end_group and p.annotation(m.KUEUE_TOTAL_COUNT_ANNOTATION) is not None:
                self.api.annotate("Pod", p.namespace, p.name, {m.KUEUE_RETRIABLE_ANNOTATION: "false"})
            self.api.delete("Pod", p.namespace, p.name, uid=p.uid)
        out.events.append(Event("Normal", "PodsDeleted", f"deleted {len(live)} Ray pods"))

    def _ttl(
        self,
        job: JobFacts,
        uid: str,
        old: Mapping[str, Any],
        annotations: Mapping[str, str],
        out: Outcome,
        now: dt.datetime,
    ) -> None:
        ttl = job.ttl_seconds_after_finished
        if ttl is None or ANN_CLEANED_UP in annotations:
            return
        done = parse_time(old.get("completionTime")) or now
        left = (done - now).total_seconds() + ttl
        if left > 0:
            out.requeue = f"ttlSecondsAfterFinished: Ray cluster deleted in {left:.0f}s"
            return
        ns, name = job.namespace, job.name
        self._children_made.discard(uid)
        self._spec_synced.pop(uid, None)
        for kind, child in (
            ("Service", m.service_name(name)),
            ("NetworkPolicy", m.network_policy_name(name)),
            ("ConfigMap", m.spec_configmap_name(name)),
            ("Secret", m.auth_secret_name(name)),
        ):
            self.api.delete(kind, ns, child)
        out.annotations[ANN_CLEANED_UP] = rfc3339(now)
        out.events.append(
            Event("Normal", "RayClusterDeleted", f"ttlSecondsAfterFinished={ttl} passed: Ray cluster deleted")
        )

    def _fail(
        self,
        st: dict[str, Any],
        conds: Conditions,
        out: Outcome,
        reason: Reason,
        message: str,
        now: dt.datetime,
    ) -> None:
        conds.set(ConditionType.Failed, True, reason, message)
        conds.set(ConditionType.Running, False, reason, message)
        st["phase"] = Phase.Failed.value
        st["completionTime"] = rfc3339(now)
        out.phase = Phase.Failed
        out.events.append(Event("Warning", reason.value, message))

    def _apply_diagnosis(
        self,
        job: JobFacts,
        diag: Diagnosis,
        st: dict[str, Any],
        conds: Conditions,
        old_phase: Phase | None,
        annotations: Mapping[str, str],
        out: Outcome,
        now: dt.datetime,
    ) -> None:
        old_running = conds.get(ConditionType.Running) or {}
        old_sched_reason = (conds.get(ConditionType.Scheduled) or {}).get("reason")
        scheduled = diag.state in (ClusterState.Starting, ClusterState.Ready) or (
            diag.state == ClusterState.Stuck and diag.scheduled == diag.expected
        )
        if scheduled:
            conds.set(
                ConditionType.Scheduled,
                True,
                Reason.AllPodsScheduled,
                f"all {diag.expected} pods scheduled",
            )
        elif diag.state == ClusterState.Queued:
            conds.set(ConditionType.Scheduled, False, Reason.QueuedByKueue, diag.message)
        elif diag.state == ClusterState.Unschedulable:
            conds.set(ConditionType.Scheduled, False, Reason.Unschedulable, diag.message)
        else:
            conds.set(ConditionType.Scheduled, False, Reason.WaitingForPods, diag.message)

        if diag.state == ClusterState.Ready:
            if old_phase in RUN_PHASES:
                st["phase"] = old_phase.value if old_phase else Phase.Provisioning.value
            else:
                st["phase"] = Phase.Provisioning.value
                conds.set(
                    ConditionType.Running,
                    False,
                    Reason.Provisioning,
                    f"{diag.message}; waiting for the training run to be submitted",
                )
            was_ready = str(old_running.get("message", "")).startswith("Ray cluster ready")
            if not was_ready and old_phase not in RUN_PHASES:
                started = _attempt_started(annotations, out, st)
                if started is not None:
                    out.provisioning_seconds = max(0.0, (now - started).total_seconds())
                out.events.append(Event("Normal", "RayClusterReady", diag.message))
        else:
            reason = _not_ready_reason(diag, old_running, out)
            # Pending: waiting for capacity (unschedulable, queued by Kueue); otherwise the
            # pods are on their way (being created, scheduled or started): Provisioning.
            waiting_for_capacity = diag.state in (ClusterState.Unschedulable, ClusterState.Queued)
            st["phase"] = Phase.Pending.value if waiting_for_capacity else Phase.Provisioning.value
            conds.set(ConditionType.Running, False, reason, diag.message)
            limit = job.pre_running_deadline_seconds
            started = _attempt_started(annotations, out, st)
            if limit is not None and started is not None:
                waited = (now - started).total_seconds()
                if waited >= limit:
                    self._fail(
                        st,
                        conds,
                        out,
                        Reason.PreRunningDeadlineExceeded,
                        f"pods not all Running within spec.preRunningDeadlineSeconds={limit}: {diag.message}",
                        now,
                    )
                    return
                out.requeue = out.requeue or f"{diag.message} (pre-running deadline in {limit - waited:.0f}s)"
            else:
                out.requeue = out.requeue or diag.message
        new_sched = conds.get(ConditionType.Scheduled) or {}
        ready_event = any(e.reason == "RayClusterReady" for e in out.events)
        if (
            new_sched.get("reason") != old_sched_reason
            and new_sched.get("reason") != Reason.WaitingForPods
            and not ready_event  # "all scheduled" is implied by "all Running": one Event, not two
        ):
            kind = "Warning" if new_sched.get("reason") in WARNING_REASONS else "Normal"
            out.events.append(Event(kind, str(new_sched.get("reason")), str(new_sched.get("message"))))
        out.phase = Phase(st["phase"])

    def _finish(
        self, st: dict[str, Any], conds: Conditions, old_owned: Mapping[str, Any], out: Outcome
    ) -> Outcome:
        st["conditions"] = conds.as_list()
        new = {k: v for k, v in st.items() if v is not None}
        patch = merge_patch({k: v for k, v in old_owned.items() if v is not None}, new)
        if patch:
            out.status = patch
        out.phase = Phase(st["phase"])
        return out


def _not_ready_reason(diag: Diagnosis, old_running: Mapping[str, Any], out: Outcome) -> Reason:
    """The Running condition's reason while the pods are not all Running; a container that
    cannot start gets one Event per kind of trouble (the kubelet alternates ErrImagePull and
    ImagePullBackOff: not an Event each time), naming the image and the error."""
    reason = diag.reason or {
        ClusterState.Queued: Reason.QueuedByKueue,
        ClusterState.Unschedulable: Reason.Unschedulable,
    }.get(diag.state, Reason.Provisioning)
    if diag.state == ClusterState.Stuck and old_running.get("reason") != reason.value:
        kind = "Warning" if reason in WARNING_REASONS else "Normal"
        out.events.append(Event(kind, reason.value, diag.message))
    return reason


def _owner_uids(obj: Mapping[str, Any]) -> list[str]:
    return [o.get("uid") for o in (obj.get("metadata") or {}).get("ownerReferences") or []]


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


def _attempt_started(
    annotations: Mapping[str, str], out: Outcome, st: Mapping[str, Any]
) -> dt.datetime | None:
    """When the current set of pods was asked for: the start, or the last resume/restart
    (an unreadable annotation falls back to the start: a deadline is never lost to it)."""
    for s in (
        out.annotations.get(ANN_ATTEMPT_STARTED),
        annotations.get(ANN_ATTEMPT_STARTED),
        st.get("startTime"),
    ):
        t = parse_time(s)
        if t is not None:
            return t
    return None


def _just_created(name: str, meta: Mapping[str, Any]) -> PodView:
    return PodView(
        name=name,
        namespace=meta.get("namespace", ""),
        job=meta.get("name", ""),
        role="",
        uid="",
        owner_uid=meta.get("uid"),
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


def _adopt(obj: dict[str, Any], owner: Mapping[str, Any]) -> None:
    import kopf

    kopf.adopt(obj, owner=dict(owner))  # type: ignore[arg-type]


def _spec_error(e: Exception) -> str:
    if isinstance(e, ValidationError):
        parts = []
        for err in e.errors()[:5]:
            loc = ".".join(str(x) for x in err["loc"])
            parts.append(f"{loc}: {err['msg']}")
        return "invalid spec: " + "; ".join(parts)
    return f"invalid spec: {e}"
