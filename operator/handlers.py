"""Thin Kopf handlers: parse nothing, decide nothing — call the reconciler, write what it says.

* The job's pods come from a :class:`~llmtrain.operator.podwatch.PodStore` (the operator's
  own label-selected pod watch, a small PodView per pod), not from Kopf: a Kopf index over
  pods kept per-object state, a worker task and body copies for every pod, all on the event
  loop that also serves the jobs. Nothing writes to pods except the reconciler's own calls.
* ``reconcile_tick`` — the ONE timer, on the LLMTrainingJob: the level-based loop.
* ``on_job_event`` — a watch-event handler that reconciles at once when a job is new or
  its ``spec.suspend`` flipped (children created on create/resume without waiting for a
  tick), and forgets a deleted job's metrics. It is an ``on.event`` handler rather than
  ``on.create``/``on.update`` on purpose: change-detecting handlers make Kopf write its
  progress and last-handled-configuration annotations on every job (two more PATCHes and
  two more watch events per change), which at 1000 jobs doubled the operator's API calls.
  Deleting a job needs no handler: the children go through ownerReferences.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf
from llmtrain.operator.diagnose import PodView
from llmtrain.operator.kube import ApiError
from llmtrain.operator.metrics import OperatorMetrics
from llmtrain.operator.podwatch import PodStore
from llmtrain.operator.reconcile import Outcome, Reconciler

from llmtrain.api.spec import GROUP, PLURAL, VERSION

log = logging.getLogger("llmtrain.operator")

Clock = Callable[[], dt.datetime]
# Kopf's finalizer on the job (its timer needs one); main.configure sets it.
FINALIZER = "llmtrain.dev/kopf-finalizer"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


Emit = Callable[..., None]


def write_outcome(out: Outcome, body: Any, patch: Any, emit: Emit = kopf.event) -> None:
    """Put the outcome into Kopf's patch (applied once, after the handler) and post Events."""
    if out.status is not None:
        for key, value in out.status.items():
            # conditions is a list: a merge patch replaces it whole, as required.
            patch.status[key] = value
    for key, ann in out.annotations.items():
        patch.metadata.annotations[key] = ann
    for ev in out.events:
        emit(body, type=ev.type, reason=ev.reason, message=ev.message[:1024])


def needs_action_now(body: Mapping[str, Any]) -> bool:
    """Whether a watch event on a job asks for more than the next tick: a new job (no status
    yet) gets its Ray cluster at once, and so does a change of ``spec.suspend``. Everything
    else (including the echo of our own status writes) waits for the timer."""
    if (body.get("metadata") or {}).get("deletionTimestamp"):
        return False
    phase = (body.get("status") or {}).get("phase")
    if phase is None:
        return True
    if phase in ("Succeeded", "Failed"):
        return False
    return bool((body.get("spec") or {}).get("suspend")) != (phase == "Suspended")


def register(
    registry: kopf.OperatorRegistry,
    reconciler: Reconciler,
    metrics: OperatorMetrics,
    pods: PodStore,
    *,
    interval: float = 5.0,
    clock: Clock = _now,
    emit: Emit = kopf.event,
    threads: int = 16,
) -> None:
    """Register the handlers on ``registry`` (not the global one: tests build their own).

    The handlers are coroutines: the cheap parts (deciding whether an event needs a
    reconcile, reading the pod store) run on Kopf's event loop, and only the reconcile
    itself, which makes blocking API calls, goes to a thread pool of ``threads``.
    """
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="reconcile")
    store = pods

    def run(body: kopf.Body, patch: kopf.Patch, pods: dict[str, PodView], logger: Any) -> Outcome:
        ns = body.metadata.namespace or ""
        name = body.metadata.name or ""
        t0 = time.perf_counter()
        try:
            out = reconciler.reconcile(body, pods, clock())
        except ApiError as e:
            metrics.reconcile_errors.labels(kind=f"http_{e.status}").inc()
            # Kopf retries the handler after the delay; the status stays as last written.
            raise kopf.TemporaryError(f"API error while reconciling: {e}", delay=5) from e
        except OSError as e:  # connection refused/reset, timeouts
            metrics.reconcile_errors.labels(kind="connection").inc()
            raise kopf.TemporaryError(f"cannot reach the API server: {e}", delay=5) from e
        finally:
            metrics.reconcile_seconds.observe(time.perf_counter() - t0)
        write_outcome(out, body, patch, emit)
        if out.error:
            metrics.reconcile_errors.labels(kind="create").inc()
        metrics.set_phase(ns, name, out.phase)
        if out.provisioning_seconds is not None:
            metrics.provisioning_seconds.observe(out.provisioning_seconds)
        if out.restarted:
            metrics.restarts.inc()
        if out.requeue:
            logger.debug("requeue: %s", out.requeue)
        return out

    async def offload(body: kopf.Body, patch: kopf.Patch, logger: Any) -> None:
        # Until the first full pod list every job's pods would look missing (recreated as
        # 409s, the job reported Pending): wait for it.
        await store.wait_synced()
        pods = store.pods(body.metadata.namespace or "", body.metadata.name or "")
        # A copied context: kopf.event() finds Kopf's settings in a context variable.
        ctx = contextvars.copy_context()
        await asyncio.get_running_loop().run_in_executor(pool, ctx.run, run, body, patch, pods, logger)

    @kopf.on.event(GROUP, VERSION, PLURAL, id="react", registry=registry)
    async def on_job_event(
        body: kopf.Body, patch: kopf.Patch, type: str | None, logger: Any, **kwargs: Any
    ) -> None:
        if type == "DELETED":
            metrics.forget(body.metadata.namespace or "", body.metadata.name or "")
        elif needs_action_now(body):
            if FINALIZER not in (body.metadata.get("finalizers") or ()):
                # A new job: the pods are created now, but its first status waits for the
                # echo of Kopf's finalizer PATCH (the next event, moments later; it still
                # has no phase, so it reconciles again — without API calls: the reconciler
                # remembers what it just created). Written in this cycle, the status went
                # out as its own PATCH next to Kopf's, whose echo arrived without the
                # finalizer and made Kopf PATCH it again: 2 finalizer + 1 status PATCH
                # per job instead of 1 + 1 (measured at 50 jobs).
                patch = kopf.Patch()
            await offload(body, patch, logger)

    # The first tick waits one interval: on_job_event has just created the children, and
    # a tick racing it would repeat every create as a 409 + get (twice the API calls).
    @kopf.timer(
        GROUP, VERSION, PLURAL, id="reconcile", interval=interval, initial_delay=interval, registry=registry
    )
    async def reconcile_tick(body: kopf.Body, patch: kopf.Patch, logger: Any, **kwargs: Any) -> None:
        await offload(body, patch, logger)
