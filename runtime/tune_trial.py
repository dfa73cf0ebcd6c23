"""One tuning trial, in its Tune actor: validate the sampled configuration, train it through the
shared launch path, and free its workers at once when the search stops it.

Tune only stops a trial's actor, which would leave the trial's Train run (and the run's
placement group) behind, so the trial's rank 0 is told to stop at its next log step
(:class:`StopRequests`) and the actor waits for the run to end (:meth:`TrialRun.stop`).
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from llmtrain.runtime.failures import short_error

from llmtrain.api.config import runtime_config_from_spec
from llmtrain.api.job import LLMTrainingJob
from llmtrain.api.s3 import S3Options
from llmtrain.api.tuning import job_document, trial_job
from llmtrain.api.validate import trial_problems

if TYPE_CHECKING:
    from llmtrain.runtime.trainer import LaunchOptions


class TrialStopped(RuntimeError):
    """Raised on a trial's rank 0 when Tune stopped the trial: ends its Train run early."""


class StopRequests:
    """ "Stop now" from a trial's actor to its rank 0 (a Ray queue actor, like the driver's
    checkpoint requests); rank 0 polls it at each log step through ``checkpoint_requested``."""

    def __init__(self) -> None:
        from ray.util.queue import Queue

        self.queue = Queue(maxsize=1, actor_options={"num_cpus": 0})

    def ask(self) -> None:
        from ray.util.queue import Full

        try:
            self.queue.put_nowait(True)
        except Full:
            pass


def _stop_requested(q: Any) -> bool:
    # Runs on the trial's rank 0 at each log step: a stop ends the run by raising (the run
    # is a trial; what it trained is of no further use), which Ray Train sees as a failed
    # worker group and tears down, placement group included.
    from ray.util.queue import Empty

    try:
        q.get_nowait()
    except Empty:
        return False
    raise TrialStopped("the search stopped this trial")


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs, pickled to the trial actors."""

    job: LLMTrainingJob  # spec.tuning included
    data_uri: str
    storage_options: S3Options
    vocab_size: int
    trials_prefix: str  # <output prefix>/tune/trials: one checkpoint prefix per trial below it
    options: LaunchOptions


class TrialRun:
    """One trial's run, owned by its Tune actor (one trial per actor: Tune reuses none):
    :meth:`train` runs on the trial's training thread, :meth:`stop` on the actor's own when
    Tune stops the trial. The stop request and the "stopped by the search" mark live here,
    per trial, where both threads see them."""

    def __init__(self, ctx: TrialContext) -> None:
        self.ctx = ctx
        self.stop_requests: StopRequests | None = None
        self.stopping = False

    def train(self, config: dict[str, Any]) -> None:
        """Validate the configuration, then train it through the shared launch path, every
        validation reported to Tune."""
        from llmtrain.runtime.stage import make_shard_loader
        from llmtrain.runtime.trainer import launch
        from ray import tune
        from ray.tune.integration.ray_train import TuneReportCallback

        ctx = self.ctx
        trial_id = tune.get_context().get_trial_id()
        problems = trial_problems(job_document(ctx.job), config)
        if problems:
            raise ValueError("invalid configuration: " + "; ".join(problems))
        trial = trial_job(ctx.job, config, checkpoint_uri=f"{ctx.trials_prefix}/{trial_id}")
        cfg = runtime_config_from_spec(trial.spec, vocab_size=ctx.vocab_size)
        self.stop_requests = StopRequests()
        try:
            launch(
                cfg,
                functools.partial(make_shard_loader, ctx.data_uri, ctx.storage_options),
                checkpoint_requested=functools.partial(_stop_requested, self.stop_requests.queue),
                options=replace(
                    ctx.options,
                    run_name=f"trial-{trial_id}",
                    max_failures=0,  # a failed trial is a data point, not something to retry
                    callbacks=(TuneReportCallback(),),
                ),
            )
        except Exception as e:
            if self.stopping:
                return  # stopped by the search (ASHA): not a failure
            raise RuntimeError(short_error(e)) from e

    def stop(self) -> None:
        """When Tune stops the trial: ask rank 0 to stop, wait for the run (bounded)."""
        from ray.tune.trainable.function_trainable import get_session

        session = get_session()
        thread = getattr(session, "training_thread", None) if session is not None else None
        if thread is not None and thread.is_alive() and self.stop_requests is not None:
            self.stopping = True
            self.stop_requests.ask()
            _join_draining(thread, getattr(session, "_inter_actor_queue", None), timeout=120)


def _join_draining(thread: Any, reports: Any, timeout: float) -> None:
    """Wait for the trial's run while throwing away its reports.

    Ray Train's controller hands each report to this actor through a one-slot Ray queue
    (``TuneReportCallback``) and blocks while the slot is full; once Tune stops a trial nothing
    reads that queue, so the controller would block there forever, never see rank 0 stop, and
    keep the trial's workers (and their CPUs/GPUs) from the next trial."""
    from ray.util.queue import Empty

    deadline = time.monotonic() + timeout
    while thread.is_alive() and time.monotonic() < deadline:
        if reports is not None:
            with contextlib.suppress(Empty):
                reports.get_nowait()
        thread.join(timeout=0.2)


def trainable(ctx: TrialContext) -> Any:
    """The Tune trainable: a function trainable whose actor owns one :class:`TrialRun`, and
    when Tune stops it first stops the trial's Train run and waits for it (bounded), so its
    workers are free for the next trial.

    Tune pickles this class by value (it is defined here, not importable), ``ctx`` with it;
    the trial's state is made in the actor (:meth:`~ray.tune.Trainable.setup`), on the
    instance, so no copy of it travels and nothing is shared between trials."""
    from ray import tune
    from ray.tune.result import RESULT_DUPLICATE
    from ray.tune.trainable.function_trainable import FunctionTrainable, get_session

    class Trial(FunctionTrainable):
        # Tune's name for the trainable (trial names, and what a restored experiment must
        # match): the name the search has always had.
        _name = "trial"

        def setup(self, config: dict[str, Any]) -> None:
            self.run = TrialRun(ctx)
            super().setup(config)

        def _trainable_func(self, config: dict[str, Any]) -> None:
            # Runs on the trial's training thread (FunctionTrainable's hook for the function).
            self.run.train(config)
            # How a function trainable ends (as Tune's own wrap_function does): the last
            # result stands, marked done, without being logged twice.
            session = get_session()
            assert session is not None  # set up by FunctionTrainable.setup, for this trial
            session.report({RESULT_DUPLICATE: True})

        def cleanup(self) -> None:
            self.run.stop()
            super().cleanup()

    # The trial's actor only waits on its Train run, whose workers hold the CPUs/GPUs. Tune
    # cannot place an empty bundle: one byte of memory stands for nothing.
    return tune.with_resources(Trial, {"CPU": 0, "memory": 1})
