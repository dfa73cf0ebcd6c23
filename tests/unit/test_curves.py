"""curves.png and `llmtrain report`, from the events of real (tiny, in-process) training runs.

Two runs with different learning rates record their progress events the way ``llmtrain run``
does (runtime/curves.EventLog); each picture is a valid PNG, and the two differ pixel for
pixel where the losses differ. ``llmtrain report`` redraws the picture from a run directory
and prints the same report ``llmtrain run`` printed. tests/e2e/test_run.py checks both on a
real ``llmtrain run``.
"""

from __future__ import annotations

import functools
import io
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from llmtrain.runtime.curves import CURVES, EVENTS, Curves, EventLog, draw, read_events, write_summary
from llmtrain.runtime.run import RunSummary
from llmtrain.runtime.synthetic import SyntheticLoader, tiny_spec_dict
from llmtrain.runtime.train import RunContext, train
from rich.console import Console
from typer.testing import CliRunner

from llmtrain.api.config import runtime_config_from_spec
from llmtrain.api.spec import LLMTrainingJobSpec
from llmtrain.cli import app
from llmtrain.cli.display import print_summary

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LOADER = functools.partial(SyntheticLoader, vocab_size=60, windows=32)


def tiny_run(run_dir: Path, lr: float) -> list[float]:
    """12 steps, validation every 4, events into run_dir/events.jsonl; returns the losses."""
    spec = tiny_spec_dict(
        **{
            "training.duration.maxSteps": 12,
            "training.optimizer.lr": lr,
            "validation.everySteps": 4,
        }
    )
    cfg = runtime_config_from_spec(LLMTrainingJobSpec.model_validate(spec), vocab_size=60)
    result = train(cfg, LOADER, on_progress=EventLog(run_dir), ctx=RunContext(metrics_addr="127.0.0.1"))
    return result.losses


def pixels(path: Path) -> np.ndarray:
    import matplotlib.image

    return np.asarray(matplotlib.image.imread(path))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    a, b = tmp_path_factory.mktemp("run-a"), tmp_path_factory.mktemp("run-b")
    losses_a, losses_b = tiny_run(a, 3e-3), tiny_run(b, 3e-2)
    assert losses_a != losses_b
    return a, b


def test_curves_are_a_png_that_follows_the_losses(two_runs: tuple[Path, Path]) -> None:
    a, b = two_runs
    events = read_events(a)
    c = Curves.of(events)
    assert sorted(c.train) == list(range(1, 13))  # logEverySteps 1
    assert sorted(c.val) == [4, 8, 12]
    assert all(tokens > 0 for tokens, _ in c.train.values()) and len(c.speed) == 12
    for run in (a, b):
        path = draw(read_events(run), run / CURVES, "t")
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        assert pixels(path).shape == (420, 1500, 4)  # 15 × 4.2 inches at 100 dpi, RGBA
    # Different losses, different pictures; the same events, the same picture.
    assert not np.array_equal(pixels(a / CURVES), pixels(b / CURVES))
    again = draw(read_events(a), a / "again.png", "t")
    assert np.array_equal(pixels(a / CURVES), pixels(again))


def test_report_redraws_and_prints_the_runs_summary(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    a, _ = two_runs
    (a / CURVES).unlink(missing_ok=True)
    c = Curves.of(read_events(a))
    summary = RunSummary(
        job="tiny",
        run_dir=str(a),
        data_uri="/data",
        data_reused=False,
        train_tokens=1000,
        val_tokens=100,
        vocab_size=60,
        unigram_cross_entropy=4.0,
        steps=12,
        final_train_loss=c.train[12][1],
        val_loss=c.val[12][1],
        val_perplexity=2.5,
        tokens_per_second=c.speed[12],
        stage_seconds={"training": 1.5, "export": 0.25},  # not in alphabetical order
        wall_seconds=3.25,
        curves=str(a / CURVES),
        sample="def x",
    )
    write_summary(a, asdict(summary))
    console = Console(width=200, record=True, file=io.StringIO())
    print_summary(summary, console)
    printed_by_run = console.export_text()

    r = CliRunner().invoke(app, ["report", str(a)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert (a / CURVES).read_bytes()[:8] == PNG_SIGNATURE  # drawn again from events.jsonl
    for line in printed_by_run.splitlines():
        assert line.rstrip() in r.output, line
    assert "3.2s (training 1.5s, export 0.2s)" in r.output

    # Negative control: a directory without the run's records is refused, saying why.
    (tmp_path / EVENTS).write_text("")
    r = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert r.exit_code == 2 and "no summary.json" in r.output
