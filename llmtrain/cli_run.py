"""The terminal side of ``llmtrain run``: a live progress line per stage and a final report.

Imports the runtime lazily (torch, ray) so that the CLI module itself stays light.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from llmtrain.api.job import LLMTrainingJob
from llmtrain.api.progress import ProgressEvent, format_eta

if TYPE_CHECKING:  # the runtime imports stay lazy (torch, ray)
    from llmtrain.runtime.run import RunSummary


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


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
    # Validation/checkpoint events carry no speed: keep the last known figures on the bar.
    state: dict[str, float | None] = {"val_ppl": None, "tps": None, "eta": None, "loss": None}

    def on_stage(stage: str) -> None:
        if stage == "training":
            progress.update(task, visible=True)
        if stage != "done":
            console.log(f"stage: [bold]{stage}[/]")

    def on_event(e: ProgressEvent) -> None:
        if e.val_perplexity is not None:
            state["val_ppl"] = e.val_perplexity
            console.log(
                f"step {e.step}: val loss {_fmt(e.val_loss, '.3f')}, ppl {_fmt(e.val_perplexity, '.2f')}, "
                f"accuracy {_fmt(e.val_accuracy, '.3f')}"
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

    opts = RunOptions(run_dir=run_dir, num_cpus=cpus, sample_prompt=prompt)
    try:
        with progress:
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
    return 0


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
    if summary.validation_set:
        table.add_row("validation set", summary.validation_set)
    table.add_row(
        "unigram cross-entropy",
        f"{summary.unigram_cross_entropy:.4f} nats/token on the validation split"
        + (f"  → val loss is {ratio:.2f}× of it" if ratio is not None else ""),
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
