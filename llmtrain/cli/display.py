"""The terminal side of ``llmtrain run``: a live progress line per stage and a final report.

Imports the runtime lazily (torch, ray) so that the CLI module itself stays light.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from llmtrain.api.job import LLMTrainingJob
from llmtrain.api.progress import ProgressEvent, TuningInfo, format_eta, task_metric_line
from llmtrain.api.tuning import format_config

if TYPE_CHECKING:  # the runtime imports stay lazy (torch, ray)
    from llmtrain.runtime.run import RunSummary


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


_STATE_STYLE = {"running": "cyan", "completed": "green", "stopped": "yellow", "failed": "red"}


def trial_table(info: TuningInfo, *, title: str = "trials") -> Group:
    """The search's trial table: the best finished trials (best first), the running ones,
    and the counts; the best row in bold. The same rows as ``status.tuning.trials``."""
    table = Table(title=title, title_justify="left")
    for name, justify in (("trial", "right"), ("state", "left"), ("steps", "right"), (info.metric, "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    table.add_column("configuration")
    best = info.best.number if info.best is not None else None
    for t in info.trials:
        table.add_row(
            str(t.number),
            f"[{_STATE_STYLE.get(t.state, 'white')}]{t.state}[/]",
            str(t.steps),
            _fmt(t.metric, ".4f"),
            escape(format_config(t.config)),
            style="bold" if t.number == best else None,
        )
    counts = (
        f"{info.completed} completed, {info.stopped} stopped early, {info.failed} failed, "
        f"{info.running} running" + (f" of {info.planned}" if info.planned is not None else "")
    )
    # Below the table, not its caption: a caption wraps at the table's width.
    return Group(table, Text(counts))


def chosen_configuration(info: TuningInfo) -> str:
    """The best trial's configuration as spec paths, the line that ends a search."""
    if info.best is None:
        return "no trial finished with a " + info.metric
    values = ", ".join(f"{k}={v:.4g}" for k, v in info.best.config.items())
    return f"best trial {info.best.number} ({info.metric} {_fmt(info.best.metric, '.4f')}): {values}"


class Screen:
    """What ``llmtrain run`` keeps on screen: while the search runs its trial table above
    the progress bar (redrawn by rich's Live a few times a second), else the bar alone."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tuning: TuningInfo | None = None  # the search's latest state (kept for the end)
        self.searching = False

    def __rich__(self) -> RenderableType:
        if self.searching and self.tuning is not None:
            return Group(trial_table(self.tuning, title="tuning"), self.progress)
        return self.progress


def run_with_display(
    job: LLMTrainingJob,
    *,
    run_dir: Path | None,
    cpus: int | None,
    prompt: str | None,
    console: Console,
    debug: bool = False,
) -> int:
    from llmtrain.runtime.run import RunError, RunOptions, run_job
    from llmtrain.runtime.tune import watch

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[metrics]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    task = progress.add_task("training", total=None, metrics="", visible=False)
    screen = Screen(progress)
    # Validation/checkpoint events carry no speed: keep the last known figures on the bar.
    state: dict[str, float | None] = {"val_ppl": None, "tps": None, "eta": None, "loss": None}

    def on_stage(stage: str) -> None:
        if stage == "training":
            progress.update(task, visible=True)
        if stage in ("tuning", "training", "export", "done"):
            screen.searching = stage == "tuning"
        if stage != "done":
            console.log(f"stage: [bold]{stage}[/]")

    def on_event(e: ProgressEvent) -> None:
        if e.val_perplexity is not None:
            state["val_ppl"] = e.val_perplexity
            console.log(
                f"step {e.step}: val loss {_fmt(e.val_loss, '.3f')}, ppl {_fmt(e.val_perplexity, '.2f')}, "
                f"accuracy {_fmt(e.val_accuracy, '.3f')}"
                + (f", {task_line(e)}" if e.val_task_records else "")
            )
        if e.checkpoint_uri is not None:
            console.log(f"step {e.step}: checkpoint {e.checkpoint_uri}")
        if e.train_loss is not None:
            state["loss"] = e.train_loss
        if e.tokens_per_second is not None:
            state["tps"], state["eta"] = e.tokens_per_second, e.eta_seconds
        metrics = (
            f"loss {_fmt(state['loss'], '.3f')}  val ppl {_fmt(state['val_ppl'], '.2f')}  "
            f"{_fmt(state['tps'], ',.0f')} tok/s  ETA {format_eta(state['eta']) or '–'}"
        )
        progress.update(task, completed=e.step, total=e.total_steps, metrics=metrics)

    def on_tuning(info: TuningInfo) -> None:
        screen.tuning = info

    opts = RunOptions(run_dir=run_dir, num_cpus=cpus, sample_prompt=prompt)
    try:
        # One Live for the bar and the trial table (rich allows one live display at a time).
        with Live(screen, console=console, refresh_per_second=4), watch(on_tuning):
            summary = run_job(job, opts, on_event=on_event, on_stage=on_stage)
    except KeyboardInterrupt:
        console.print(
            "[yellow]Interrupted.[/] The newest complete checkpoint is kept; run the same command to resume."
        )
        return 130
    except RunError as e:
        if debug:  # the cause's traceback too: RunError wraps what a stage raised
            console.print("".join(traceback.format_exception(e)), markup=False, highlight=False)
        console.print(f"[red]✗ {escape(str(e))}[/]")
        return 1

    print_summary(summary, console)
    if screen.tuning is not None:
        print_tuning(screen.tuning, console)
    return 0


def print_tuning(info: TuningInfo, console: Console) -> None:
    """The search's final trial table and the configuration it chose."""
    console.print(trial_table(info))
    console.print(f"[bold]chosen configuration[/]: {escape(chosen_configuration(info))}")


def task_line(r: ProgressEvent | RunSummary) -> str:
    """spec.validation.task's result in words (a validation event or the summary)."""
    assert r.val_task_records is not None
    return task_metric_line(
        r.val_task_exact_match or 0.0, r.val_task_score or 0.0, r.val_task_records, r.val_task_checker or ""
    )


def print_summary(summary: RunSummary, console: Console) -> None:
    """The end-of-run report (``llmtrain run``, and ``llmtrain report`` from summary.json)."""
    table = Table(title=f"llmtrain run: {summary.job}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    ratio = summary.loss_ratio
    table.add_row(
        "validation loss",
        f"{_fmt(summary.val_loss, '.4f')}  (perplexity {_fmt(summary.val_perplexity, '.2f')}, "
        f"next-token accuracy {_fmt(summary.val_accuracy, '.3f')}, "
        f"{_fmt(summary.val_bits_per_byte, '.4f')} bits/byte)",
    )
    if summary.val_task_records:
        table.add_row("task metric", task_line(summary))
    if summary.validation_set:
        table.add_row("validation set", summary.validation_set)
    table.add_row(
        "unigram cross-entropy",
        f"{summary.unigram_cross_entropy:.4f} nats/token on the validation split"
        + (f"  → val loss is {ratio:.2f}× of it" if ratio is not None else ""),
    )
    if summary.startup_seconds is not None:
        table.add_row(
            "start-up",
            f"{summary.startup_seconds:.1f}s to the first step ("
            + ", ".join(f"{phase} {seconds:.1f}s" for phase, seconds in summary.startup.items())
            + ")",
        )
    table.add_row(
        "training",
        f"{summary.steps} steps, final train loss {_fmt(summary.final_train_loss, '.4f')}, "
        f"{_fmt(summary.tokens_per_second, ',.0f')} tokens/s, MFU "
        f"{_fmt(summary.mfu * 100 if summary.mfu is not None else None, '.1f')}{'%' if summary.mfu else ''}",
    )
    table.add_row(
        "data",
        f"{summary.train_tokens:,} train / {summary.val_tokens:,} validation tokens, vocab "
        f"{summary.vocab_size:,} ({'reused' if summary.data_reused else 'prepared'}) at {summary.data_uri}",
    )
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in summary.stage_seconds.items())
    if summary.resumed_from is not None:
        table.add_row("resumed", f"from the checkpoint of step {summary.resumed_from}")
    table.add_row("wall time", f"{summary.wall_seconds:.1f}s ({stages})")
    table.add_row("checkpoint", summary.checkpoint_uri or "–")
    table.add_row("model", summary.export_uri or "–")
    table.add_row("sample", repr(summary.sample))
    table.add_row("curves", summary.curves or "–")
    console.print(table)
