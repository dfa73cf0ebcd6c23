"""The tuning stage: a hyperparameter search (``spec.tuning``) with Ray Tune over Ray Train.

Each trial is a Tune function trainable that trains the job's model on the already prepared
data with one sampled configuration, through the same launch path as the final run
(:func:`llmtrain.runtime.trainer.launch` → ``TorchTrainer.fit()`` → ``train.train``); Train V2's
``TuneReportCallback`` forwards every validation report to Tune, so ASHA can stop a trial
at a rung. What the search needs beyond that:

* the search space translated once (:func:`optuna_space`) and sampled by Optuna — TPE for
  bayesian (seeded, ``initialRandomTrials`` as ``n_startup_trials``), its random sampler for
  random — or expanded into Tune's grid (:func:`grid_configs`);
* every configuration validated by the full spec rules (schema and CEL, :func:`trial_problems`)
  before it launches: a grid's up front, a sampled one in its trial (reported with the path);
* a stopped trial frees its workers at once: Tune only stops the trial's actor, which would
  leave its Train run (and the run's placement group) behind, so the trial's rank 0 is told
  to stop at its next log step (:class:`StopRequests`) and the actor waits for the run to end;
* the experiment under ``<output prefix>/tune/search`` (S3 on a cluster), restored when a
  rerun finds it: finished trials are not rerun;
* the trials, counted and ranked (:class:`TrialTracker` → ``RunSnapshot.tuning``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from llmtrain.runtime.failures import short_error

from llmtrain.api.job import LLMTrainingJob
from llmtrain.api.progress import TrialRecord, TuningInfo, better, summarize
from llmtrain.api.spec import SearchAlgorithm, TuningSpec
from llmtrain.api.tuning import (
    final_document,
    format_config,
    grid_configs,
    job_document,
    trial_document,
    typed_config,
)
from llmtrain.api.validate import trial_problems

if TYPE_CHECKING:
    from llmtrain.runtime.stage import Place, Reporter
    from llmtrain.runtime.trainer import LaunchOptions

log = logging.getLogger("llmtrain.tune")

# Ray Train's report keys for each spec.tuning.metric.
METRIC_KEYS = {"valLoss": "val_loss", "valPerplexity": "val_perplexity", "valAccuracy": "val_accuracy"}
EXPERIMENT = "search"


class TuningError(RuntimeError):
    """The search cannot run or produced nothing usable; the message says why."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


class TrialStopped(RuntimeError):
    """Raised on a trial's rank 0 when Tune stopped the trial: ends its Train run early."""


# ----------------------------------------------------------------- configurations
# The pure helpers live in the API (``llmtrain validate`` expands a grid with them too).


def optuna_space(tuning: TuningSpec) -> dict[str, Any]:
    """The search space as Optuna distributions (random and bayesian search)."""
    import optuna

    out: dict[str, Any] = {}
    for path, dist in tuning.space.items():
        if dist.choice is not None:
            out[path] = optuna.distributions.CategoricalDistribution(list(dist.choice))
        elif dist.uniform is not None:
            out[path] = optuna.distributions.FloatDistribution(dist.uniform[0], dist.uniform[1])
        else:
            assert dist.log_uniform is not None
            out[path] = optuna.distributions.FloatDistribution(
                dist.log_uniform[0], dist.log_uniform[1], log=True
            )
    return out


def startup_trials(tuning: TuningSpec) -> int:
    """Random trials before TPE models the results: initialRandomTrials, else half the
    search up to Optuna's 10 (its default of 10 would make a search of ≤ 10 trials random)."""
    if tuning.initial_random_trials is not None:
        return tuning.initial_random_trials
    return max(1, min(10, (tuning.num_trials or 2) // 2))


def sampler(tuning: TuningSpec) -> Any:
    """The seeded Optuna sampler of a random or bayesian search."""
    import optuna

    if tuning.search == SearchAlgorithm.bayesian:
        return optuna.samplers.TPESampler(seed=tuning.seed, n_startup_trials=startup_trials(tuning))
    return optuna.samplers.RandomSampler(seed=tuning.seed)


def budget_steps(doc: dict[str, Any], config: dict[str, Any]) -> int:
    """Optimizer steps a trial with ``config`` trains (its budget in steps or tokens)."""
    spec = final_document(doc, config)["spec"]
    budget = doc["spec"]["tuning"]["trialBudget"]
    if budget.get("maxSteps") is not None:
        return int(budget["maxSteps"])
    tokens_per_step = (
        spec["training"]["batch"]["globalBatchSize"] * spec["model"]["architecture"]["contextLength"]
    )
    return math.ceil(int(budget["maxTokens"]) / tokens_per_step)


# ------------------------------------------------------------------------- trials


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


# This actor's trial (one trial per actor: actors are not reused). Read only by module-level
# functions: Tune pickles the trainable's class by value, with copies of the globals it names.
_TRIAL: dict[str, Any] = {}


def _stop_trial() -> None:
    """In the trial's actor, when Tune stops the trial: ask rank 0 to stop, wait for the run."""
    from ray.tune.trainable.function_trainable import get_session

    session = get_session()
    thread = getattr(session, "training_thread", None) if session is not None else None
    stop = _TRIAL.get("stop")
    if thread is not None and thread.is_alive() and stop is not None:
        _TRIAL["stopping"] = True
        stop.ask()
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


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs, pickled to the trial actors."""

    doc: dict[str, Any]  # the job manifest, spec.tuning included
    data_uri: str
    storage_options: Any
    vocab_size: int
    trials_prefix: str  # <output prefix>/tune/trials: one checkpoint prefix per trial below it
    options: LaunchOptions


def run_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """One trial: validate its configuration, then train it through the shared launch path,
    every validation reported to Tune."""
    from llmtrain.runtime.stage import make_shard_loader
    from llmtrain.runtime.trainer import launch
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from llmtrain.api.config import runtime_config_from_spec

    trial_id = tune.get_context().get_trial_id()
    problems = trial_problems(ctx.doc, config)
    if problems:
        raise ValueError("invalid configuration: " + "; ".join(problems))
    doc = trial_document(ctx.doc, config, checkpoint_uri=f"{ctx.trials_prefix}/{trial_id}")
    spec = LLMTrainingJob.model_validate(doc).spec
    cfg = runtime_config_from_spec(spec, vocab_size=ctx.vocab_size)
    stop = StopRequests()
    _TRIAL["stop"] = stop
    try:
        launch(
            cfg,
            functools.partial(make_shard_loader, ctx.data_uri, ctx.storage_options),
            checkpoint_requested=functools.partial(_stop_requested, stop.queue),
            options=replace(
                ctx.options,
                run_name=f"trial-{trial_id}",
                max_failures=0,  # a failed trial is a data point, not something to retry
                callbacks=(TuneReportCallback(),),
            ),
        )
    except Exception as e:
        if _TRIAL.get("stopping"):
            return  # stopped by the search (ASHA): not a failure
        raise RuntimeError(short_error(e)) from e


def trainable(ctx: TrialContext) -> Any:
    """The Tune trainable: :func:`run_trial` whose actor, when Tune stops it, first stops the
    trial's Train run and waits for it (bounded), so its workers are free for the next trial."""
    from ray import tune
    from ray.tune.trainable.function_trainable import wrap_function

    def trial(config: dict[str, Any]) -> None:
        run_trial(config, ctx)

    class Trial(wrap_function(trial)):  # type: ignore[misc]
        def cleanup(self) -> None:
            _stop_trial()
            super().cleanup()

    # The trial's actor only waits on its Train run, whose workers hold the CPUs/GPUs. Tune
    # cannot place an empty bundle: one byte of memory stands for nothing.
    return tune.with_resources(Trial, {"CPU": 0, "memory": 1})


# ------------------------------------------------------------------- bookkeeping


def _number(trial: Any, grid: bool) -> int:
    # Tune's experiment tag starts with the trial's counter (0-based for grids, 1-based for
    # searchers); shown 1-based, stable across a restore.
    head = str(getattr(trial, "experiment_tag", "") or "").split("_", 1)[0]
    return int(head) + (1 if grid else 0) if head.isdigit() else 0


class TrialTracker:
    """Tune's view of the trials → :class:`TrialRecord` per trial → ``report.snapshot.tuning``,
    and one line per finished trial on stdout (the driver's log; the terminal locally).

    Tune pickles its callbacks with the experiment: the callback (:func:`_callback`) finds the
    live tracker in ``_active`` rather than holding it, so a restored experiment reports here too."""

    def __init__(self, doc: dict[str, Any], planned: int | None) -> None:
        tuning = doc["spec"]["tuning"]
        self.doc = doc
        self.search = tuning["search"]
        self.metric = tuning.get("metric", "valLoss")
        self.mode = TuningSpec.model_validate(tuning).resolved_mode.value
        self.key = METRIC_KEYS[self.metric]
        self.planned = planned
        self.records: dict[str, TrialRecord] = {}
        self.seeding = False

    def _update(self, trial: Any, **changes: Any) -> TrialRecord:
        tid = str(trial.trial_id)
        old = self.records.get(tid) or TrialRecord(
            number=_number(trial, self.search == "grid"),
            state="running",
            config=dict(typed_config(dict(trial.config))),
        )
        new = replace(old, **changes)
        self.records[tid] = new
        return new

    def start(self, trial: Any) -> None:
        self._update(trial, state="running")
        self.publish()

    def result(self, trial: Any, result: dict[str, Any]) -> None:
        value = result.get(self.key)
        steps = int(result.get("step") or 0)
        self._update(trial, metric=float(value) if value is not None else None, steps=steps)
        self.publish()

    def complete(self, trial: Any, *, quiet: bool = False) -> None:
        record = self.records.get(str(trial.trial_id))
        steps = record.steps if record is not None else 0
        full = budget_steps(self.doc, dict(trial.config))
        state = "completed" if steps >= full else "stopped"
        record = self._update(trial, state=state, ended=time.time())
        if not quiet:
            self._line(record, f"{state} after {steps}/{full} steps")
        self.publish()

    def error(self, trial: Any, *, quiet: bool = False) -> None:
        err = trial.get_error()
        message = short_error(err) if err is not None else "failed"
        record = self._update(trial, state="failed", message=message, ended=time.time())
        if not quiet:
            self._line(record, f"failed: {message}")
        self.publish()

    def info(self) -> TuningInfo:
        return summarize(
            list(self.records.values()),
            search=self.search,
            metric=self.metric,
            mode=self.mode,
            planned=self.planned,
        )

    def publish(self) -> None:
        if self.seeding:  # a restored search is published once, whole (see tune_stage)
            return
        info = self.info()
        report = _active.get("report")
        if report is not None:
            report.update(tuning=info)
        metrics = _active.get("metrics")
        if metrics is not None:
            metrics.update(info)
        for watcher in list(_watchers):
            watcher(info)

    def seed(self, trial: Any) -> None:
        """A trial of a restored experiment (Tune replays none of it): finished ones are
        counted as they ended; unfinished ones run again and report afresh."""
        if trial.status not in ("TERMINATED", "ERROR"):
            return
        metrics = dict(trial.last_result or {})
        if metrics.get(self.key) is not None:
            self._update(trial, metric=float(metrics[self.key]), steps=int(metrics.get("step") or 0))
        if trial.status == "ERROR":
            self.error(trial, quiet=True)
        else:
            self.complete(trial, quiet=True)

    def _line(self, record: TrialRecord, what: str) -> None:
        metric = f"{self.metric} {record.metric:.4f}" if record.metric is not None else f"{self.metric} –"
        print(
            f"llmtrain tune: trial {record.number} {what}, {metric}  {format_config(record.config)}",
            flush=True,
        )


# The running stage's Reporter and tracker (a Reporter holds a lock: not picklable).
_active: dict[str, Any] = {}
# Terminal displays following the search (``llmtrain run``'s live trial table): each gets
# every TuningInfo the stage publishes, on the driver's thread (keep them quick).
_watchers: list[Callable[[TuningInfo], None]] = []


@contextlib.contextmanager
def watch(callback: Callable[[TuningInfo], None]) -> Iterator[None]:
    """Call ``callback`` with the search's state on each change, while the block runs. A
    watched search leaves its final table to the watcher (the driver's log prints it)."""
    _watchers.append(callback)
    try:
        yield
    finally:
        _watchers.remove(callback)


def _forward(event: str, trial: Any, *args: Any) -> None:
    tracker = _active.get("tracker")
    if tracker is not None:
        getattr(tracker, event)(trial, *args)


def _callback() -> Any:
    from ray.tune import Callback

    class Forward(Callback):
        def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            _forward("start", trial)

        def on_trial_result(
            self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
        ) -> None:
            _forward("result", trial, result)

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            _forward("complete", trial)

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            _forward("error", trial)

    return Forward()


def trial_table(info: TuningInfo) -> str:
    """The trial table, plain text, for the driver's log (``llmtrain run`` draws the same
    rows with rich: ``llmtrain.cli.display.trial_table``)."""
    rows = [("trial", "state", "steps", info.metric, "configuration")]
    for t in info.trials:
        metric = f"{t.metric:.4f}" if t.metric is not None else "–"
        rows.append((str(t.number), t.state, str(t.steps), metric, format_config(t.config)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4] for r in rows]
    counts = (
        f"{info.completed} completed, {info.stopped} stopped early, {info.failed} failed, {info.running} running"
        + (f" of {info.planned}" if info.planned is not None else "")
    )
    return "\n".join([*lines, counts])


# ----------------------------------------------------------------------- the stage


def _live_placement_groups() -> set[str]:
    from ray.util.placement_group import placement_group_table

    return {pg_id for pg_id, pg in placement_group_table().items() if pg.get("state") != "REMOVED"}


def _release_leftovers(before: set[str]) -> None:
    """Remove the placement groups the search left behind. When the experiment ends Tune
    kills the actors of trials still stopping (after 10 s); a trial's Train controller dies
    with its actor and cannot remove its placement group, and Ray Train's detached cleaner
    needs the dashboard's state API, which a local cluster does not run. The final run would
    otherwise wait for CPUs that nothing holds any more."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    left = _live_placement_groups() - before
    for pg_id in left:
        remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg_id)))
    if left:
        log.info("released %d placement group(s) left by stopped trials", len(left))


@dataclass(frozen=True)
class TuneOutcome:
    job: LLMTrainingJob  # the job with the best configuration applied (full duration)
    best: TrialRecord
    checkpoint_uri: str  # the best trial's checkpoint prefix
    train_final: bool  # spec.tuning.final.train


def _serve_metrics(job: LLMTrainingJob, options: LaunchOptions) -> Any:
    """The search's series on ``spec.metrics.port`` (:class:`TuneMetrics`), or None when
    metrics are off or the port is taken (the search matters more than its metrics)."""
    if not job.spec.metrics.enabled:
        return None
    from llmtrain.runtime.metrics import TuneMetrics

    assert job.spec.tuning is not None
    metrics = TuneMetrics(options.namespace, options.job, job.spec.tuning.metric.value)
    try:
        metrics.serve(job.spec.metrics.port, options.metrics_addr)
    except OSError as e:
        log.warning("tuning metrics not served on port %d: %s", job.spec.metrics.port, e)
        return None
    return metrics


def tune_stage(
    job: LLMTrainingJob,
    data_uri: str,
    storage_options: Any,
    vocab_size: int,
    place: Place,
    report: Reporter,
    options: LaunchOptions,
) -> TuneOutcome:
    """Run (or resume) the search; the best configuration and where its trial's checkpoint is."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    tuning = job.spec.tuning
    assert tuning is not None
    doc = job_document(job)
    grid = tuning.search == SearchAlgorithm.grid
    if grid:
        configs = grid_configs(tuning)
        problems = [p for c in configs for p in trial_problems(doc, c)]
        if problems:
            raise TuningError(
                f"{len(problems)} problem(s) in the grid of spec.tuning.space: " + "; ".join(problems[:5]),
                permanent=True,
            )
        planned: int | None = len(configs)
        param_space: dict[str, Any] = {
            p: tune.grid_search(list(d.choice or [])) for p, d in tuning.space.items()
        }
        search_alg = None
        num_samples = 1
    else:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per study otherwise
        planned = tuning.num_trials
        param_space = {}
        mode = tuning.resolved_mode.value
        search_alg = OptunaSearch(
            space=optuna_space(tuning),
            metric=METRIC_KEYS[tuning.metric.value],
            mode=mode,
            sampler=sampler(tuning),
        )
        num_samples = tuning.num_trials or 1
    key = METRIC_KEYS[tuning.metric.value]
    scheduler: Any = FIFOScheduler()
    if tuning.early_stopping is not None:
        full = budget_steps(doc, {})
        scheduler = ASHAScheduler(
            time_attr="step",
            max_t=max(full, tuning.early_stopping.grace_period_steps),
            grace_period=tuning.early_stopping.grace_period_steps,
            reduction_factor=tuning.early_stopping.reduction_factor,
        )
    prefix = f"{place.output_prefix}/tune"
    # Tune's own console output (an experiment banner, trial tables) would interleave with
    # ours: the tracker prints the trials, and Tune's legacy reporter at verbose=0 prints nothing.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # The experiment's state is saved at most a second after a trial ends (Tune's default
    # adapts up to minutes): an interrupted search then reruns no finished trial.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    ctx = TrialContext(
        doc=doc,
        data_uri=data_uri,
        storage_options=storage_options,
        vocab_size=vocab_size,
        trials_prefix=f"{prefix}/trials",
        options=options,
    )
    tracker = TrialTracker(doc, planned)
    place.connect()
    path = f"{prefix}/{EXPERIMENT}"
    before = _live_placement_groups()
    _active.update(report=report, tracker=tracker, metrics=_serve_metrics(job, options))
    try:
        if tune.Tuner.can_restore(path):
            # A rerun: Tune brings back the searcher's state and every trial; finished ones
            # are not rerun, unfinished ones start again (from their own checkpoints, if any).
            if report.on_stage is not None:
                report.on_stage(f"resume the search at {path}")
            tuner = tune.Tuner.restore(
                path, trainable=trainable(ctx), resume_unfinished=True, resume_errored=False
            )
            # Seeded quietly, then published once: a snapshot with the counts at zero
            # and then climbing back would look like trials finishing again (the operator
            # posts an Event per newly finished trial).
            tracker.seeding = True
            for trial in tune.ExperimentAnalysis(path).trials:
                tracker.seed(trial)
            tracker.seeding = False
        else:
            tuner = tune.Tuner(
                trainable(ctx),
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    metric=key,
                    mode=tuning.resolved_mode.value,
                    search_alg=search_alg,
                    scheduler=scheduler,
                    num_samples=num_samples,
                    max_concurrent_trials=tuning.max_concurrent_trials,
                ),
                run_config=tune.RunConfig(
                    name=EXPERIMENT,
                    storage_path=prefix,
                    verbose=0,
                    callbacks=[_callback()],
                ),
            )
        tracker.publish()
        tuner.fit()
    finally:
        metrics = _active.get("metrics")
        if metrics is not None:
            metrics.update(tracker.info())
            # Once a scraper has seen the end of the search (when anyone scrapes): the final
            # run's rank 0 serves on the same port.
            metrics.close()
        _active.clear()
        _release_leftovers(before)
    info = tracker.info()
    report.update(tuning=info)
    for watcher in list(_watchers):
        watcher(info)
    if not _watchers:
        print("llmtrain tune: trials\n" + trial_table(info), flush=True)
    return _outcome(job, doc, tracker, ctx)


def _outcome(
    job: LLMTrainingJob, doc: dict[str, Any], tracker: TrialTracker, ctx: TrialContext
) -> TuneOutcome:
    tuning = job.spec.tuning
    assert tuning is not None
    mode = tuning.resolved_mode.value
    # final.train: false exports a trial's checkpoint: only trials that ran their budget wrote one.
    states = ("completed", "stopped") if tuning.final.train else ("completed",)
    best_id, best = None, None
    for tid, r in tracker.records.items():
        if r.state in states and r.metric is not None and math.isfinite(r.metric):
            if best is None or better(r.metric, best.metric or 0.0, mode):
                best_id, best = tid, r
    if best is None or best_id is None:
        failures = [r.message for r in tracker.records.values() if r.message]
        invalid = bool(failures) and all("invalid configuration" in m for m in failures if m)
        raise TuningError(
            "no trial of the search finished with a "
            + tracker.metric
            + (f": {failures[0]}" if failures else ""),
            permanent=invalid,
        )
    final = LLMTrainingJob.model_validate(final_document(doc, best.config))
    print(
        f"llmtrain tune: best trial {best.number}, {tracker.metric} {best.metric:.4f}: {format_config(best.config)}",
        flush=True,
    )
    return TuneOutcome(
        job=final, best=best, checkpoint_uri=f"{ctx.trials_prefix}/{best_id}", train_final=tuning.final.train
    )
