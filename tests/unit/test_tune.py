"""spec.tuning without a cluster: the API's rules, the search-space translation, trial and
final configurations, the bounded status, and that the Bayesian search really is one."""

from __future__ import annotations

import copy
import json
import math
import random
from typing import Any

import pytest
from llmtrain.runtime import tune as t

from llmtrain.api.job import LLMTrainingJob
from llmtrain.api.progress import MAX_SNAPSHOT_BYTES, STAGE_PHASE, RunSnapshot, TrialRecord, summarize
from llmtrain.api.spec import TUNABLE_PATHS, TuningSpec
from llmtrain.api.status import LLMTrainingJobStatus, Phase, TuningStatus
from llmtrain.api.tuning import final_document, trial_document, trial_steps
from llmtrain.api.validate import validate_object
from tests.manifests import TUNING, base, tuning_cases, with_tuning

optuna = pytest.importorskip("optuna")
optuna.logging.set_verbosity(optuna.logging.WARNING)


def tuned(**changes: Any) -> dict[str, Any]:
    doc = base()
    with_tuning(**changes)(doc["spec"])
    return doc


def tuning_of(**changes: Any) -> TuningSpec:
    return TuningSpec.model_validate(tuned(**changes)["spec"]["tuning"])


# ------------------------------------------------------------------------------ the API


def test_a_valid_search_is_accepted_and_mode_follows_the_metric() -> None:
    assert validate_object(tuned()) == []
    assert tuning_of().resolved_mode == "min"
    assert tuning_of(metric="valAccuracy").resolved_mode == "max"
    assert tuning_of(metric="valAccuracy", mode="min").resolved_mode == "min"


@pytest.mark.parametrize("case", tuning_cases(), ids=lambda c: c.id)
def test_invalid_searches_are_rejected_with_the_field_path(case: Any) -> None:
    paths = [p.path for p in validate_object(case.manifest)]
    assert case.path in paths


def test_the_space_key_is_named_where_the_apiserver_cannot() -> None:
    problems = [str(p) for p in validate_object(tuned(space={"training.gradClip": {"uniform": [2, 1]}}))]
    assert (
        "spec.tuning.space.training.gradClip: uniform is [low, high] with low < high; got [2, 1]" in problems
    )


# ------------------------------------------------------------------- configurations


def test_grid_is_every_combination_of_the_choices() -> None:
    tuning = tuning_of(
        search="grid",
        numTrials=None,
        initialRandomTrials=None,
        space={
            "training.optimizer.lr": {"choice": [1e-3, 2e-3, 3e-3]},
            "training.optimizer.weightDecay": {"choice": [0, 0.1]},
        },
    )
    configs = t.grid_configs(tuning)
    assert len(configs) == 3 * 2 * 2  # lr × weightDecay × microBatchSize
    assert len({json.dumps(c, sort_keys=True) for c in configs}) == 12
    assert {c["training.batch.microBatchSize"] for c in configs} == {2, 4}


def test_a_trial_trains_its_configuration_for_the_budget_on_its_workers() -> None:
    doc = tuned(trialBudget={"maxTokens": 32 * 512 * 5 + 1})
    config = {
        "training.optimizer.lr": 2e-3,
        "training.batch.microBatchSize": 3.7,
        "model.architecture.dropout": 0.2,
    }
    trial = trial_document(doc, config, checkpoint_uri="s3://b/tune/trials/x")["spec"]
    assert trial["training"]["optimizer"]["lr"] == 2e-3
    assert trial["training"]["batch"]["microBatchSize"] == 4  # an integer field: rounded
    assert trial["model"]["architecture"]["dropout"] == 0.2
    assert trial["training"]["duration"] == {"maxTokens": 32 * 512 * 5 + 1}
    assert trial["resources"]["workers"] == 1  # workersPerTrial
    assert trial["checkpoint"]["uri"] == "s3://b/tune/trials/x"
    assert "tuning" not in trial and "export" not in trial
    # Tokens rounded up to whole steps of 32 × 512.
    assert trial_steps(LLMTrainingJob.model_validate(doc), config) == 6
    final = final_document(doc, config)["spec"]
    assert final["training"]["duration"] == {"maxSteps": 100} and final["resources"]["workers"] == 2
    assert LLMTrainingJob.model_validate(final_document(doc, config)).spec.tuning is None


def test_an_invalid_sample_is_reported_with_its_path() -> None:
    """microBatchSize 3 does not divide globalBatchSize 32: the trial names the rule's path."""
    problems = t.trial_problems(tuned(), {"training.batch.microBatchSize": 3, "training.optimizer.lr": 1e-3})
    assert problems
    assert all("spec.training.batch.globalBatchSize" in p for p in problems)
    assert "training.batch.microBatchSize=3" in problems[0]
    assert t.trial_problems(tuned(), {"training.batch.microBatchSize": 4}) == []


def test_random_and_bayesian_samplers_are_seeded_and_startup_trials_are_passed() -> None:
    bayes = t.sampler(tuning_of(initialRandomTrials=2))
    assert isinstance(bayes, optuna.samplers.TPESampler) and bayes._n_startup_trials == 2
    # Unset: half of a small search, not Optuna's 10 (which would make it all random).
    assert t.startup_trials(tuning_of(initialRandomTrials=None)) == 3
    assert isinstance(
        t.sampler(tuning_of(search="random", initialRandomTrials=None)), optuna.samplers.RandomSampler
    )

    def samples(seed: int) -> list[dict[str, Any]]:
        tuning = tuning_of(seed=seed)
        study = optuna.create_study(sampler=t.sampler(tuning))
        out = []
        for _ in range(4):
            trial = study.ask(t.optuna_space(tuning))
            study.tell(trial, 1.0)
            out.append(trial.params)
        return out

    assert samples(1) == samples(1) and samples(1) != samples(2)


# --------------------------------------------------------------- Bayesian, really

OPTIMUM = {
    "training.optimizer.lr": 3e-3,
    "training.optimizer.weightDecay": 0.05,
    "training.batch.microBatchSize": 4,
}


def objective(config: dict[str, Any]) -> float:
    """Cheap stand-in for a validation loss: a bowl around OPTIMUM (lr in log space)."""
    return (
        (math.log10(config["training.optimizer.lr"]) - math.log10(3e-3)) ** 2
        + ((config["training.optimizer.weightDecay"] - 0.05) / 0.2) ** 2
        + 0.3 * (config["training.batch.microBatchSize"] != 4)
    )


def search(tuning: TuningSpec, trials: int) -> list[tuple[dict[str, Any], float]]:
    """The search through the stage's own translation (optuna_space, sampler), no training."""
    study = optuna.create_study(sampler=t.sampler(tuning), direction="minimize")
    out = []
    for _ in range(trials):
        trial = study.ask(t.optuna_space(tuning))
        value = objective(trial.params)
        study.tell(trial, value)
        out.append((trial.params, value))
    return out


def test_bayesian_search_concentrates_near_the_optimum_and_beats_random() -> None:
    """After its start-up trials TPE samples near the optimum, and over 20 seeds its best after
    24 trials beats random search's in most seeds. Fails if the searcher were random."""
    space = {
        "training.optimizer.lr": {"logUniform": [1e-5, 1e-1]},
        "training.optimizer.weightDecay": {"uniform": [0, 0.2]},
        "training.batch.microBatchSize": {"choice": [1, 2, 4, 8]},
    }
    n, startup = 24, 6
    wins = 0
    later_closer = 0
    for seed in range(20):
        bayes = search(tuning_of(space=space, numTrials=n, initialRandomTrials=startup, seed=seed), n)
        rand = search(
            tuning_of(space=space, search="random", numTrials=n, initialRandomTrials=None, seed=seed), n
        )
        wins += min(v for _, v in bayes) < min(v for _, v in rand)
        first = sorted(v for _, v in bayes[:startup])
        rest = sorted(v for _, v in bayes[startup:])
        later_closer += rest[len(rest) // 2] < first[len(first) // 2]
    assert wins >= 14, f"TPE beat random in {wins}/20 seeds"
    assert later_closer >= 16, f"TPE's samples after start-up were closer in {later_closer}/20 seeds"


# ----------------------------------------------------------------------- the status


def test_a_thousand_trials_keep_the_status_small() -> None:
    rng = random.Random(0)
    trials = [
        TrialRecord(
            number=i + 1,
            state=rng.choice(["completed", "stopped", "failed", "running"]),
            config={p: rng.uniform(0, 1) for p in TUNABLE_PATHS},
            metric=rng.uniform(2, 6),
            steps=rng.randint(1, 10_000),
            message="x" * 2000 if i % 7 == 0 else None,
        )
        for i in range(1000)
    ]
    info = summarize(trials, search="bayesian", metric="valLoss", mode="min", planned=1000)
    assert info.completed + info.stopped + info.failed + info.running == 1000
    finished = [r for r in trials if r.state in ("completed", "stopped")]
    assert info.best is not None and info.best.metric == min(r.metric or 0 for r in finished)
    assert len(info.trials) <= 20 and info.trials[0] == info.best
    snap = RunSnapshot(stage="tuning", tuning=info)
    text = snap.to_json()
    assert len(text) < MAX_SNAPSHOT_BYTES  # the operator reads it at all
    status = snap.status_patch()["tuning"]
    assert len(json.dumps(status)) < 64 * 1024
    TuningStatus.model_validate(status)  # fits the CRD's status schema
    LLMTrainingJobStatus.model_validate({"phase": STAGE_PHASE["tuning"], "tuning": status})
    assert Phase(STAGE_PHASE["tuning"]) == Phase.Tuning
    back = RunSnapshot.from_json(text)
    assert back.tuning is not None and back.tuning.best == info.best and back.tuning.trials == info.trials


def test_max_mode_ranks_the_highest_first() -> None:
    trials = [TrialRecord(i, "completed", {}, metric=m) for i, m in enumerate([0.2, 0.5, 0.3])]
    assert summarize(trials, search="grid", metric="valAccuracy", mode="max", planned=3).best == trials[1]
    assert summarize(trials, search="grid", metric="valLoss", mode="min", planned=3).best == trials[0]


def test_trial_table_shows_the_best_first_and_the_counts() -> None:
    trials = [
        TrialRecord(1, "completed", {"training.optimizer.lr": 3e-3}, 5.25, 6),
        TrialRecord(2, "stopped", {"training.optimizer.lr": 1e-6}, 5.75, 2),
        TrialRecord(3, "failed", {"training.optimizer.lr": 1e-1}, message="boom"),
    ]
    table = t.trial_table(summarize(trials, search="grid", metric="valLoss", mode="min", planned=3))
    lines = table.splitlines()
    assert lines[0].split() == ["trial", "state", "steps", "valLoss", "configuration"]
    assert lines[1].split() == ["1", "completed", "6", "5.2500", "lr=0.003"]
    assert lines[-1] == "1 completed, 1 stopped early, 1 failed, 0 running of 3"


def test_tuning_fixture_is_unchanged() -> None:
    # The cases above each change one thing of TUNING; it must itself stay valid.
    assert copy.deepcopy(TUNING) == TUNING and validate_object(tuned()) == []


def test_an_invalid_grid_fails_before_any_trial_starts(tmp_path: Any) -> None:
    """A grid point that breaks a spec rule stops the stage up front, naming the path, before
    Ray is even joined (no trial of a bad grid ever runs)."""
    from llmtrain.runtime.stage import Place, Reporter

    doc = tuned(
        search="grid",
        numTrials=None,
        initialRandomTrials=None,
        space={
            "training.optimizer.lr": {"choice": [1e-3]},
            "training.optimizer.weightDecay": {"choice": [0.1]},
            "training.batch.microBatchSize": {"choice": [4, 3]},
        },
    )
    job = LLMTrainingJob.model_validate(doc)

    def connect() -> None:
        raise AssertionError("joined Ray for an invalid grid")

    place = Place(run_dir=tmp_path, output_prefix=str(tmp_path), connect=connect, cpus_per_worker=1)
    with pytest.raises(
        t.TuningError, match=r"training\.batch\.microBatchSize=3.*spec\.training\.batch\.globalBatchSize"
    ) as e:
        t.tune_stage(job, "unused", None, 512, place, Reporter(), options=None)  # type: ignore[arg-type]
    assert e.value.permanent


# ------------------------------------------------------------- llmtrain validate: grids


GRID = {"search": "grid", "numTrials": None, "initialRandomTrials": None}


def grid_doc(micro_batches: list[int]) -> dict[str, Any]:
    return tuned(
        **GRID,
        space={
            "training.optimizer.lr": {"choice": [1e-3, 2e-3]},
            "training.optimizer.weightDecay": {"choice": [0]},
            "training.batch.microBatchSize": {"choice": micro_batches},
        },
    )


def test_validate_expands_a_grid_and_names_each_bad_configuration_with_its_path(tmp_path: Any) -> None:
    """microBatchSize 3 does not divide globalBatchSize 32: the schema and CEL pass (the
    apiserver cannot expand a grid), the grid layer names the first bad configuration, the
    rule's path and how many more configurations break it; `llmtrain validate` exits 1."""
    import yaml
    from typer.testing import CliRunner

    from llmtrain.cli import app

    assert validate_object(grid_doc([2, 4])) == []
    problems = validate_object(grid_doc([4, 3]))
    assert {(p.path, p.layer) for p in problems} == {("spec.training.batch.globalBatchSize", "tuning")}
    assert {p.message.split(": ", 1)[0] for p in problems} == {
        "grid configuration {training.optimizer.lr=0.001, training.batch.microBatchSize=3, "
        f"training.optimizer.weightDecay=0}} ({what}) (and 1 more configuration of the grid)"
        for what in ("trial", "final run")
    }
    # Random and bayesian samples are not known before the search: each trial checks its own.
    sampled = tuned(space={"training.batch.microBatchSize": {"choice": [4, 3]}})
    assert validate_object(sampled) == []
    f = tmp_path / "grid.yaml"
    f.write_text(yaml.safe_dump(grid_doc([4, 3])))
    r = CliRunner().invoke(app, ["validate", "--json", str(f)])
    assert r.exit_code == 1, r.output
    lines = [json.loads(line) for line in r.output.splitlines()]
    assert [(x["path"], x["layer"]) for x in lines] == [("spec.training.batch.globalBatchSize", "tuning")] * 2
    assert "microBatchSize=3" in lines[0]["message"]


# -------------------------------------------------------------------- the metrics


def test_tune_metrics_export_each_trial_the_best_and_the_counts_bounded_like_status() -> None:
    pytest.importorskip("prometheus_client")
    from llmtrain.runtime.metrics import TuneMetrics
    from prometheus_client import generate_latest

    def series(m: TuneMetrics) -> dict[str, float]:
        out = {}
        for line in generate_latest(m.registry).decode().splitlines():
            if line.startswith("llmtrain_tune_"):
                key, value = line.rsplit(" ", 1)
                out[key] = float(value)
        return out

    m = TuneMetrics("ns", "job", "valLoss")
    trials = [
        TrialRecord(1, "completed", {}, 4.5, 6),
        TrialRecord(2, "stopped", {}, 5.75, 2),
        TrialRecord(3, "failed", {}, message="boom"),
        TrialRecord(4, "running", {}, 5.0, 2),
    ]
    m.update(summarize(trials, search="grid", metric="valLoss", mode="min", planned=4))
    got = series(m)
    sel = 'job="job",metric="valLoss",namespace="ns"'
    assert got[f"llmtrain_tune_best_metric{{{sel}}}"] == 4.5
    assert {k: v for k, v in got.items() if "trial_metric" in k} == {
        f'llmtrain_tune_trial_metric{{{sel},trial="1"}}': 4.5,
        f'llmtrain_tune_trial_metric{{{sel},trial="2"}}': 5.75,
        f'llmtrain_tune_trial_metric{{{sel},trial="4"}}': 5.0,  # a running trial's last validation
    }
    for state, n in (("running", 1), ("completed", 1), ("stopped", 1), ("failed", 1)):
        assert got[f'llmtrain_tune_trials{{job="job",namespace="ns",state="{state}"}}'] == n
    # 1,000 trials: per-trial series only for the status' table (best 10 + running 10).
    many = [TrialRecord(i, "completed", {}, 10.0 - i / 1000, 6) for i in range(1, 1001)]
    m.update(summarize(many, search="grid", metric="valLoss", mode="min", planned=1000))
    per_trial = [k for k in series(m) if "trial_metric" in k]
    assert len(per_trial) == 10 and f'llmtrain_tune_trial_metric{{{sel},trial="1000"}}' in series(m)
    assert series(m)[f"llmtrain_tune_best_metric{{{sel}}}"] == 9.0


def test_tune_metrics_wait_for_a_scrape_of_the_final_state_before_closing() -> None:
    """The driver closes the port when the search ends: a scraper must have seen the end
    first (else the last trials and the final best never reach Prometheus); with nobody
    scraping, closing does not wait."""
    pytest.importorskip("prometheus_client")
    import socket
    import threading
    import time
    import urllib.request

    from llmtrain.runtime.metrics import TuneMetrics

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    unscraped = TuneMetrics("ns", "job", "valLoss")
    unscraped.serve(free_port(), "127.0.0.1")
    t0 = time.monotonic()
    unscraped.close(final_scrape_seconds=30)
    assert time.monotonic() - t0 < 5

    m = TuneMetrics("ns", "job", "valLoss")
    port = m.serve(free_port(), "127.0.0.1")

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    m.update(
        summarize(
            [TrialRecord(1, "running", {}, 5.0, 1)], search="grid", metric="valLoss", mode="min", planned=2
        )
    )
    assert 'state="running"} 1.0' in scrape()
    final = [TrialRecord(1, "completed", {}, 4.5, 2), TrialRecord(2, "completed", {}, 4.25, 2)]
    m.update(summarize(final, search="grid", metric="valLoss", mode="min", planned=2))
    closer = threading.Thread(target=m.close, kwargs={"final_scrape_seconds": 30})
    closer.start()
    time.sleep(0.5)
    assert closer.is_alive()  # still serving: nobody has seen the final state yet
    seen = scrape()
    closer.join(timeout=10)
    assert not closer.is_alive()
    assert 'state="completed"} 2.0' in seen and 'trial="2"} 4.25' in seen


def test_a_failed_trials_message_masks_the_pods_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The message becomes status.tuning and a TrialFailed Event: no credential in it."""
    from llmtrain.runtime.failures import short_error

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-CANARY-value")
    error = RuntimeError("upload failed: signature for s3cr3t-CANARY-value does not match")
    assert short_error(error) == "upload failed: signature for <redacted> does not match"
