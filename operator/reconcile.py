"""The level-based reconcile of one ``LLMTrainingJob``: observe → ordered idempotent steps →
status computed from observation.

:meth:`Reconciler.reconcile` is a plain function of (job body, the job's pods from the
pod index, now) over an injected :class:`~llmtrain.operator.kube.KubeApi`. It returns an
:class:`~llmtrain.operator.outcome.Outcome` — the status patch (only the fields the
operator owns, only when they change), annotations for the job, the Events to emit and
the reason to look again — which the controller writes. Every step is idempotent, so the
same call after an operator crash, a lost watch event or a duplicate resync converges to
the same objects and status.

The steps are :data:`STEPS`, in order, KubeRay-style: each is ``step(tick) -> Stop | None``
in the module that owns what it does (:mod:`~llmtrain.operator.lifecycle`,
:mod:`~llmtrain.operator.serving`, :mod:`~llmtrain.operator.recovery`,
:mod:`~llmtrain.operator.children`, :mod:`~llmtrain.operator.provisioning`,
:mod:`~llmtrain.operator.attempt`); they share :class:`~llmtrain.operator.tick.Tick`, the
tick's working set. A new step goes into the list where it belongs; a step that ends the
tick returns a :class:`~llmtrain.operator.tick.Stop`, and always says in
``Outcome.requeue`` why the job needs another look, if it does.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from llmtrain.operator import (
    attempt,
    children,
    disruption,
    kueue,
    lifecycle,
    mirror,
    provisioning,
    recovery,
    serving,
)
from llmtrain.operator.diagnose import PodView
from llmtrain.operator.effects import stop_for_deletion
from llmtrain.operator.outcome import Outcome
from llmtrain.operator.tick import ReconcilerState, Step, Tick

STEPS: tuple[Step, ...] = (
    # 1. the spec, validated (invalid → Failed/InvalidSpec); status fields this code cannot
    #    read were already read as absent when the tick opened (UnreadableStatus)
    lifecycle.parse,
    # 2. a finished job: leftover pods deleted, the Ray cluster ttlSecondsAfterFinished later
    lifecycle.finished,
    # 2a. a finished job's Kueue Workload marked Finished (its quota released)
    kueue.release,
    # 2b. a finished job's model server (spec.serve); a finished job's tick ends here
    serving.serve,
    # 3. suspend: a last checkpoint, then the pods go, status kept; resume: a new attempt
    lifecycle.suspend,
    # 4. activeDeadlineSeconds (suspended time not counted)
    lifecycle.deadline,
    # 4a. spec.resources.queueName: nothing is made before Kueue admits the job's Workload;
    #     evicted by Kueue: a last checkpoint, the pods go, the quota is handed back
    kueue.admit,
    # 4b. a node of the job's pods is drained: a just-in-time checkpoint, then a new attempt
    #     elsewhere (the job's PodDisruptionBudget holds the drain until then)
    disruption.drain,
    # 5. a Ray node ended: the whole Ray cluster restarted (or the lost worker made again),
    #    up to backoffLimit; pods stuck with an old image made again
    recovery.recover,
    # 6. what is missing made: Secret, ConfigMap, Service, NetworkPolicy, then the pods
    children.create_missing,
    # 7. phase and conditions from the pods' diagnosis; preRunningDeadlineSeconds
    provisioning.diagnose,
    # 8. the cluster is Ready: the attempt's Ray job submitted, polled, mirrored into status
    attempt.run,
    # 9. ended this tick: the pods go; a Ray job that may run: the finalizer
    lifecycle.finalizer,
)


class Reconciler(ReconcilerState):
    """Reconciles jobs over an injected API; stateless between calls (all state is on the
    objects; the only memory is :class:`~llmtrain.operator.tick.ReconcilerState`'s)."""

    MAX_TRIAL_EVENTS = mirror.MAX_TRIAL_EVENTS

    def reconcile(self, body: Mapping[str, Any], pods: Mapping[str, PodView], now: dt.datetime) -> Outcome:
        tick = Tick.open(self, body, pods, now)
        for step in STEPS:
            if step(tick) is not None:
                break
        return tick.finish()

    def stop_for_deletion(self, body: Mapping[str, Any]) -> Outcome:
        """The job is being deleted: stop its Ray job (best effort) so the run ends before
        the garbage collector takes the pods; the caller then removes the finalizer."""
        return stop_for_deletion(self, body)
