"""Rank 0 ↔ the driver during training: progress events up, "checkpoint now" down, through
one small Ray actor (:class:`RunChannel`)."""

from __future__ import annotations

import time
from typing import Any

from llmtrain.api.progress import ProgressEvent


class _Channel:
    """The actor behind :class:`RunChannel` (plain Python: Ray runs it in its own process)."""

    def __init__(self, max_events: int) -> None:
        self.events: list[str] = []
        self.max_events = max_events
        self.checkpoint = False

    def put(self, event: str) -> None:
        if len(self.events) < self.max_events:  # a driver that stopped draining: drop, not grow
            self.events.append(event)

    def drain(self) -> list[str]:
        out, self.events = self.events, []
        return out

    def ask(self) -> None:
        self.checkpoint = True

    def take(self) -> bool:
        asked, self.checkpoint = self.checkpoint, False
        return asked


class RunChannel:
    """Rank 0 ↔ this process through one small Ray actor (works across nodes): progress
    events up, "checkpoint now" down (the operator asks before it suspends a job, so the
    suspended run loses no finished steps). One actor of ours rather than two
    ``ray.util.queue`` queues: every actor is a process whose start (about a second of CPU)
    falls inside the time to the first step."""

    def __init__(self) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On this process's node (the head, on Kubernetes), not wherever Ray finds room: the
        # head runs no tasks (num-cpus 0), so an unpinned actor lands on a worker node, and
        # losing that worker pod killed the channel and with it the whole Ray job, where Ray
        # Train would have restarted the worker group (seen on the real node).
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        self.actor: Any = ray.remote(num_cpus=0)(_Channel).options(scheduling_strategy=here).remote(10_000)

    def drain(self, timeout: float) -> list[ProgressEvent]:
        """The events so far; waits ``timeout`` seconds first when there are none."""
        import ray

        raw = ray.get(self.actor.drain.remote())
        if not raw:
            time.sleep(timeout)
        return [ProgressEvent.from_json(r) for r in raw]

    def ask(self) -> None:
        import ray

        ray.get(self.actor.ask.remote())


def put_event(actor: Any, event: ProgressEvent) -> None:
    # Runs on rank 0: one small actor round trip per log/validation/checkpoint step (waited
    # for, so that no event is still in flight when the worker exits).
    import ray

    ray.get(actor.put.remote(event.to_json()))


def take_checkpoint_request(actor: Any) -> bool:
    # Runs on rank 0 at each log step: one actor round trip (about a millisecond, beside the
    # log step's own host sync).
    import ray

    return bool(ray.get(actor.take.remote()))
