"""``llmtrain run``'s view of a search: a live trial table while it runs (rich Live, fed by
the tuning stage's watchers), then the final table and the chosen configuration."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from llmtrain.runtime import tune
from llmtrain.runtime.run import RunSummary
from rich.console import Console
from rich.progress import Progress

from llmtrain.api.job import LLMTrainingJob
from llmtrain.api.progress import TrialRecord, TuningInfo, summarize
from llmtrain.cli.display import Screen, chosen_configuration, run_with_display, trial_table
from tests.manifests import base, with_tuning

LR, MB = "training.optimizer.lr", "training.batch.microBatchSize"


def info(*trials: TrialRecord) -> TuningInfo:
    return summarize(list(trials), search="grid", metric="valLoss", mode="min", planned=4)


def text(renderable: Any) -> str:
    console = Console(width=160, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_the_table_ranks_the_finished_trials_then_the_running_ones_with_the_counts() -> None:
    shown = text(
        trial_table(
            info(
                TrialRecord(1, "completed", {LR: 3e-3, MB: 8}, 5.25, 6),
                TrialRecord(2, "stopped", {LR: 1e-6, MB: 8}, 5.75, 2),
                TrialRecord(3, "failed", {LR: 1e-1, MB: 8}, message="boom"),
                TrialRecord(4, "running", {LR: 1e-3, MB: 16}, 5.5, 4),
            )
        )
    )
    rows = [line.split() for line in shown.splitlines() if line.strip()[:1] in "│|" and "trial" not in line]
    numbers = [r[1] for r in rows if len(r) > 1 and r[1].isdigit()]
    assert numbers == ["1", "2", "4"], shown  # best first, then running; failed only counted
    assert "lr=0.003 microBatchSize=8" in shown and "5.2500" in shown
    assert "1 completed, 1 stopped early, 1 failed, 1 running of 4" in shown
    best = info(TrialRecord(1, "completed", {LR: 3e-3, MB: 8}, 5.25, 6))
    assert chosen_configuration(best) == (
        "best trial 1 (valLoss 5.2500): training.optimizer.lr=0.003, training.batch.microBatchSize=8"
    )
    assert chosen_configuration(info()) == "no trial finished with a valLoss"


def test_the_screen_shows_the_table_only_while_the_search_runs() -> None:
    screen = Screen(Progress())
    screen.tuning = info(TrialRecord(1, "running", {LR: 3e-3}, None, 0))
    assert "running" not in text(screen)
    screen.searching = True
    assert "1 running of 4" in text(screen)


def test_the_tracker_feeds_watchers_every_change() -> None:
    doc = base()
    with_tuning(search="grid", numTrials=None, initialRandomTrials=None, space={LR: {"choice": [1e-3]}})(
        doc["spec"]
    )
    for key in ("workersPerTrial", "earlyStopping"):
        doc["spec"]["tuning"].pop(key, None)
    doc = tune.job_document(LLMTrainingJob.model_validate(doc))
    tracker = tune.TrialTracker(doc, planned=2)
    trial = SimpleNamespace(trial_id="a", experiment_tag="0_lr=0.001", config={LR: 1e-3, MB: 2})
    seen: list[TuningInfo] = []
    with tune.watch(seen.append):
        tracker.start(trial)
        tracker.result(trial, {"val_loss": 5.0, "step": 20})
    tracker.start(trial)  # after the block: nobody watches
    assert [(i.running, i.trials[0].metric) for i in seen] == [(1, None), (1, 5.0)]
    assert tune._watchers == []


def test_a_restored_search_is_published_once_whole() -> None:
    """Seeding a restored experiment publishes nothing until every finished trial is in:
    counts that restart at zero and climb back would read as trials finishing again (the
    operator posts an Event per newly finished trial)."""
    doc = base()
    with_tuning(
        search="grid", numTrials=None, initialRandomTrials=None, space={LR: {"choice": [1e-3, 2e-3]}}
    )(doc["spec"])
    doc = tune.job_document(LLMTrainingJob.model_validate(doc))
    tracker = tune.TrialTracker(doc, planned=4)
    finished = [
        SimpleNamespace(
            trial_id=f"t{i}",
            experiment_tag=f"{i}_lr",
            config={LR: 1e-3 * (i + 1), MB: 2},
            status="TERMINATED",
            last_result={"val_loss": 5.0 - i, "step": 20},
        )
        for i in range(2)
    ]
    seen: list[TuningInfo] = []
    with tune.watch(seen.append):
        tracker.seeding = True
        for trial in finished:
            tracker.seed(trial)
        tracker.seeding = False
        tracker.publish()
    assert [(i.completed, i.running) for i in seen] == [(2, 0)]
    assert [t.number for t in seen[0].recent] == [1, 2]  # both ended, in the order seeded


def test_run_ends_with_the_trial_table_and_the_chosen_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run_with_display over a stand-in run_job that tunes (publishing as the stage does),
    then returns a summary: the live screen followed the search, the end shows the table."""
    from llmtrain.runtime import run

    states = [
        info(TrialRecord(1, "running", {LR: 3e-3}, None, 0)),
        info(TrialRecord(1, "completed", {LR: 3e-3}, 5.25, 6), TrialRecord(2, "running", {LR: 1e-3}, 5.9, 2)),
        info(
            TrialRecord(1, "completed", {LR: 3e-3}, 5.25, 6), TrialRecord(2, "stopped", {LR: 1e-3}, 5.75, 2)
        ),
    ]
    live: list[str] = []

    def fake_run_job(job: Any, opts: Any, *, on_event: Any, on_stage: Any) -> RunSummary:
        on_stage("data")
        on_stage("tuning")
        for s in states:
            for watcher in list(tune._watchers):
                watcher(s)
            live.append(text(screen_of(watcher)))
        on_stage("training")
        live.append(text(screen_of(watcher)))
        return RunSummary(
            job="t",
            run_dir=str(tmp_path),
            data_uri="/d",
            data_reused=False,
            train_tokens=1,
            val_tokens=1,
            vocab_size=60,
            unigram_cross_entropy=4.0,
        )

    def screen_of(watcher: Any) -> Screen:
        # on_tuning closes over the Screen: find it in the closure
        return next(c.cell_contents for c in watcher.__closure__ if isinstance(c.cell_contents, Screen))

    monkeypatch.setattr(run, "run_job", fake_run_job)
    console = Console(width=160, record=True, file=io.StringIO())
    job = LLMTrainingJob.model_validate(base())
    assert run_with_display(job, run_dir=tmp_path, cpus=1, prompt=None, console=console) == 0
    assert "1 running of 4" in live[0] and "1 completed, 0 stopped early, 0 failed, 1 running" in live[1]
    assert "valLoss" not in live[-1]  # training: the bar alone
    out = console.export_text()
    tail = out[out.index("llmtrain run: t") :]
    assert "1 completed, 1 stopped early, 0 failed, 0 running of 4" in tail
    assert "chosen configuration: best trial 1 (valLoss 5.2500): training.optimizer.lr=0.003" in tail


def test_report_prints_the_searchs_table_and_choice_again(tmp_path: Path) -> None:
    """`llmtrain report RUN_DIR` of a tuned run: the trial table and the chosen configuration
    from summary.json, as `llmtrain run` printed them at its end."""
    import dataclasses
    import json

    from typer.testing import CliRunner

    from llmtrain.cli import app

    search = info(
        TrialRecord(1, "completed", {LR: 3e-3, MB: 8}, 5.25, 6),
        TrialRecord(2, "stopped", {LR: 1e-6, MB: 8}, 5.75, 2),
    )
    summary = RunSummary(
        job="tuned",
        run_dir=str(tmp_path),
        data_uri="/data",
        data_reused=True,
        train_tokens=1,
        val_tokens=1,
        vocab_size=8,
        unigram_cross_entropy=1.0,
        tuning=dataclasses.asdict(search),
    )
    (tmp_path / "summary.json").write_text(json.dumps(dataclasses.asdict(summary)))
    (tmp_path / "events.jsonl").write_text("")
    r = CliRunner().invoke(app, ["report", str(tmp_path)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "chosen configuration" in r.output and chosen_configuration(search) in r.output, r.output
    assert "stopped" in r.output and "5.7500" in r.output, r.output
