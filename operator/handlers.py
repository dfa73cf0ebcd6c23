"""The Kopf handlers: thin adapters from Kopf's job watch to the controller.

Kopf watches the LLMTrainingJobs (and does peering, login, liveness); the one handler
hands each event's body to :meth:`Controller.observe
<llmtrain.operator.controller.Controller.observe>` and returns at once. Everything else
— the level-based loop, the reconcile, the writes — is the controller's, on its own
threads (see :mod:`llmtrain.operator.controller` for why not a Kopf timer per job).

* It is an ``on.event`` handler rather than ``on.create``/``on.update`` on purpose:
  change-detecting handlers make Kopf write its progress and last-handled-configuration
  annotations on every job (two more PATCHes and two more watch events per change).
* No handler on pods: the operator's own pod watch (:mod:`llmtrain.operator.podwatch`)
  keeps a small view per pod; Kopf would keep per-object state for each.
* No timer, daemon or deletion handler: Kopf adds no finalizer to jobs (deleting a job
  needs none: the children go through ownerReferences).
"""

from __future__ import annotations

from typing import Any

import kopf
from llmtrain.operator.controller import Controller

from llmtrain.api.spec import GROUP, PLURAL, VERSION


def register(registry: kopf.OperatorRegistry, controller: Controller) -> None:
    """Register the handler on ``registry`` (not the global one: tests build their own)."""

    @kopf.on.event(GROUP, VERSION, PLURAL, id="observe", registry=registry)
    async def on_job_event(body: kopf.Body, type: str | None, **_: Any) -> None:
        controller.observe(type, body)
