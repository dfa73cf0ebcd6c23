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
  to stop at its next log step and the actor waits for the run to end (``runtime/tune_trial.py``);
* the experiment under ``<output prefix>/tune/search`` (S3 on a cluster), restored when a
  rerun finds it: finished trials are not rerun;
* the trials, counted and ranked (:class:`TrialTracker` → ``RunSnapshot.tuning``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from llmtrain.runtime.failures import short_error
from llmtrain.runtime.tune_trial import TrialContext, trainable

from llmtrain.api.job import LLMTrainingJob
from llmtrain.api.progress import TrialRecord, TuningInfo, better, summarize
from llmtrain.api.s3 import S3Options
from llmtrain.api.spec import SearchAlgorithm, TuningSpec
from llmtrain.api.tuning import (
    apply_configuration,
    format_config,
    grid_configs,
    job_document,
    trial_steps,
    typed_config,
)
from llmtrain.api.validate import trial_problems

if TYPE_CHECKING:
    from llmtrain.runtime.metrics import TuneMetrics
    from llmtrain.runtime.stage import Place, Reporter
    from llmtrain.runtime.trainer import LaunchOptions

log = logging.getLogger("llmtrain.tune")

# Ray Train's report keys for each spec.tuning.metric.
METRIC_KEYS = {
    "valLoss": "val_loss",
    "valPerplexity": "val_perplexity",
    "valAccuracy": "val_accuracy",
    "valTaskScore": "val_task_score",  # spec.validation.task (validation requires it)
}
EXPERIMENT = "search"


class TuningError(RuntimeError):
    """The search cannot run or produced nothing usable; the message says why."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


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


# ------------------------------------------------------------------- bookkeeping


def _number(trial: Any, grid: bool) -> int:
    # Tune's experiment tag starts with the trial's counter (0-based for grids, 1-based for
    # searchers); shown 1-based, stable across a restore.
    head = str(getattr(trial, "experiment_tag", "") or "").split("_", 1)[0]
    return int(head) + (1 if grid else 0) if head.isdigit() else 0


class TrialTracker:
    """Tune's view of the trials → :class:`TrialRecord` per trial → ``report.snapshot.tuning``,
    and one line per finished trial on stdout (the driver's log; the terminal locally).

    Each change goes to the run's :class:`Reporter`, the search's metrics and every watcher
    (:func:`watch`). Tune pickles its callbacks with the experiment: the callback
    (:func:`_callback`) finds the live tracker in :data:`LIVE` rather than holding it, so a
    restored experiment reports here too."""

    def __init__(
        self,
        job: LLMTrainingJob | dict[str, Any],  # the job (or its manifest), spec.tuning included
        planned: int | None,
        *,
        report: Reporter | None = None,
        metrics: TuneMetrics | None = None,
    ) -> None:
        self.job = job if isinstance(job, LLMTrainingJob) else LLMTrainingJob.model_validate(job)
        tuning = self.job.spec.tuning
        assert tuning is not None
        self.search = tuning.search.value
        self.metric = tuning.metric.value
        self.mode = tuning.resolved_mode.value
        self.key = METRIC_KEYS[self.metric]
        self.planned = planned
        self.report = report
        self.metrics = metrics
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
        full = trial_steps(self.job, dict(trial.config))
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
        if self.report is not None:
            self.report.update(tuning=info)
        if self.metrics is not None:
            self.metrics.update(info)
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


@dataclass
class LiveSearch:
    """The search running in this process, where Tune's callbacks find it: Tune pickles its
    callbacks with the experiment (and a restored experiment brings back those pickles, not
    new ones), so a callback cannot hold the tracker (nor its Reporter, which holds a lock)."""

    tracker: TrialTracker | None = None

    @contextlib.contextmanager
    def running(self, tracker: TrialTracker) -> Iterator[TrialTracker]:
        self.tracker = tracker
        try:
            yield tracker
        finally:
            self.tracker = None

    def forward(self, event: str, trial: Any, *args: Any) -> None:
        if self.tracker is not None:
            getattr(self.tracker, event)(trial, *args)


# The one per process: a search runs at a time (the driver's tuning stage).
LIVE = LiveSearch()
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
    # Module-level: Tune's pickle of the callback (its class is pickled by value) names this
    # function instead of copying what it reads, so the callback reaches the live LIVE.
    LIVE.forward(event, trial, *args)


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
    storage_options: S3Options,
    vocab_size: int,
    place: Place,
    report: Reporter,
    options: LaunchOptions,
) -> TuneOutcome:
    """Run (or resume) the search; the best configuration and where its trial's checkpoint is."""
    from ray import tune

    tuning = job.spec.tuning
    assert tuning is not None
    plan = _plan(job, tuning)
    prefix = f"{place.output_prefix}/tune"
    # Tune's own console output (an experiment banner, trial tables) would interleave with
    # ours: the tracker prints the trials, and Tune's legacy reporter at verbose=0 prints nothing.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # The experiment's state is saved at most a second after a trial ends (Tune's default
    # adapts up to minutes): an interrupted search then reruns no finished trial.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    ctx = TrialContext(
        job=job,
        data_uri=data_uri,
        storage_options=storage_options,
        vocab_size=vocab_size,
        trials_prefix=f"{prefix}/trials",
        options=options,
    )
    place.connect()
    path = f"{prefix}/{EXPERIMENT}"
    before = _live_placement_groups()
    tracker = TrialTracker(job, plan.planned, report=report, metrics=_serve_metrics(job, options))
    try:
        with LIVE.running(tracker):
            if tune.Tuner.can_restore(path):
                tuner = _restore(path, ctx, tracker, report)
            else:
                tuner = _tuner(tuning, plan, ctx, prefix)
            tracker.publish()
            tuner.fit()
    finally:
        if tracker.metrics is not None:
            tracker.metrics.update(tracker.info())
            # Once a scraper has seen the end of the search (when anyone scrapes): the final
            # run's rank 0 serves on the same port.
            tracker.metrics.close()
        _release_leftovers(before)
    info = tracker.info()
    report.update(tuning=info)
    for watcher in list(_watchers):
        watcher(info)
    if not _watchers:
        print("llmtrain tune: trials\n" + trial_table(info), flush=True)
    return _outcome(job, tracker, ctx)


@dataclass(frozen=True)
class SearchPlan:
    """How Tune searches ``spec.tuning``: what it samples or expands, and when it stops a trial."""

    planned: int | None  # trials to run (a grid's size, numTrials)
    param_space: dict[str, Any]
    search_alg: Any  # OptunaSearch, or None for a grid
    num_samples: int
    scheduler: Any  # ASHA with earlyStopping, else FIFO


def _plan(job: LLMTrainingJob, tuning: TuningSpec) -> SearchPlan:
    """The search's plan; a grid's every configuration checked first (before Ray is joined)."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    if tuning.search == SearchAlgorithm.grid:
        doc = job_document(job)
        configs = grid_configs(tuning)
        problems = [p for c in configs for p in trial_problems(doc, c)]
        if problems:
            raise TuningError(
                f"{len(problems)} problem(s) in the grid of spec.tuning.space: " + "; ".join(problems[:5]),
                permanent=True,
            )
        space = {p: tune.grid_search(list(d.choice or [])) for p, d in tuning.space.items()}
        return SearchPlan(len(configs), space, None, 1, _scheduler(job, tuning))
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per study otherwise
    search_alg = OptunaSearch(
        space=optuna_space(tuning),
        metric=METRIC_KEYS[tuning.metric.value],
        mode=tuning.resolved_mode.value,
        sampler=sampler(tuning),
    )
    return SearchPlan(tuning.num_trials, {}, search_alg, tuning.num_trials or 1, _scheduler(job, tuning))


def _scheduler(job: LLMTrainingJob, tuning: TuningSpec) -> Any:
    """ASHA over the trials' steps with spec.tuning.earlyStopping, else every trial runs its budget."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if tuning.early_stopping is None:
        return FIFOScheduler()
    full = trial_steps(job, {})
    return ASHAScheduler(
        time_attr="step",
        max_t=max(full, tuning.early_stopping.grace_period_steps),
        grace_period=tuning.early_stopping.grace_period_steps,
        reduction_factor=tuning.early_stopping.reduction_factor,
    )


def _tuner(tuning: TuningSpec, plan: SearchPlan, ctx: TrialContext, prefix: str) -> Any:
    """A new experiment under ``<prefix>/search``."""
    from ray import tune

    return tune.Tuner(
        trainable(ctx),
        param_space=plan.param_space,
        tune_config=tune.TuneConfig(
            metric=METRIC_KEYS[tuning.metric.value],
            mode=tuning.resolved_mode.value,
            search_alg=plan.search_alg,
            scheduler=plan.scheduler,
            num_samples=plan.num_samples,
            max_concurrent_trials=tuning.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=prefix, verbose=0, callbacks=[_callback()]),
    )


def _restore(path: str, ctx: TrialContext, tracker: TrialTracker, report: Reporter) -> Any:
    """A rerun: Tune brings back the searcher's state and every trial; finished ones are not
    rerun, unfinished ones start again (from their own checkpoints, if any)."""
    from ray import tune

    if report.on_stage is not None:
        report.on_stage(f"resume the search at {path}")
    tuner = tune.Tuner.restore(path, trainable=trainable(ctx), resume_unfinished=True, resume_errored=False)
    # Seeded quietly, then published once: a snapshot with the counts at zero and then
    # climbing back would look like trials finishing again (the operator posts an Event per
    # newly finished trial).
    tracker.seeding = True
    for trial in tune.ExperimentAnalysis(path).trials:
        tracker.seed(trial)
    tracker.seeding = False
    return tuner


def _outcome(job: LLMTrainingJob, tracker: TrialTracker, ctx: TrialContext) -> TuneOutcome:
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
    final = apply_configuration(job, best.config)
    print(
        f"llmtrain tune: best trial {best.number}, {tracker.metric} {best.metric:.4f}: {format_config(best.config)}",
        flush=True,
    )
    return TuneOutcome(
        job=final, best=best, checkpoint_uri=f"{ctx.trials_prefix}/{best_id}", train_final=tuning.final.train
    )
