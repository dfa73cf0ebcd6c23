"""``llmtrain run`` and ``llmtrain report``: the whole workflow on this machine, and its
report again (the screen itself is :mod:`llmtrain.cli.display`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from llmtrain.cli.consoles import console, err_console


def run(
    job_yaml: Annotated[
        Path, typer.Argument(help="File holding one LLMTrainingJob.", exists=True, dir_okay=False)
    ],
    run_dir: Annotated[Path | None, typer.Option(help="Run directory (default ./runs/<name>).")] = None,
    cpus: Annotated[int | None, typer.Option(help="CPUs of the local Ray cluster (default: all).")] = None,
    prompt: Annotated[
        str | None,
        typer.Option(
            help="Prompt of the sample printed at the end (default: spec.export.samplePrompt, "
            "else the first words of a validation document)."
        ),
    ] = None,
    debug: Annotated[
        bool, typer.Option(envvar="LLMTRAIN_DEBUG", help="Show the traceback behind an error.")
    ] = False,
) -> None:
    """Run the whole workflow locally: data → train → validate → checkpoint → export → sample.

    Running the same command again reuses the prepared data and resumes from the newest
    complete checkpoint.
    """
    from llmtrain.api.defaults import as_applied
    from llmtrain.api.job import LLMTrainingJob, read_manifests
    from llmtrain.api.validate import validate_object

    docs = [d for d in read_manifests(job_yaml) if d.get("kind") == "LLMTrainingJob"]
    if len(docs) != 1:
        err_console.print(f"{job_yaml}: expected exactly one LLMTrainingJob, found {len(docs)}")
        raise typer.Exit(2)
    problems = validate_object(docs[0])
    if problems:
        for p in problems:
            err_console.print(f"[red]✗[/] [bold]{escape(p.path)}[/]: {escape(p.message)}")
        raise typer.Exit(1)
    job = LLMTrainingJob.model_validate(as_applied(docs[0]))

    from llmtrain.cli.display import run_with_display

    raise typer.Exit(
        run_with_display(job, run_dir=run_dir, cpus=cpus, prompt=prompt, console=console, debug=debug)
    )


def report(
    run_dir: Annotated[
        Path, typer.Argument(help="A run directory of `llmtrain run`.", exists=True, file_okay=False)
    ],
) -> None:
    """Redraw RUN_DIR/curves.png from the run's recorded events and print its report again."""
    from llmtrain.api.progress import TuningInfo
    from llmtrain.cli.display import print_summary, print_tuning
    from llmtrain.runtime.curves import EVENTS, SUMMARY, redraw
    from llmtrain.runtime.run import summary_from_run_dir

    missing = [name for name in (SUMMARY, EVENTS) if not (run_dir / name).exists()]
    if missing:
        err_console.print(
            f"{run_dir}: no {' or '.join(missing)}: not a finished `llmtrain run` directory "
            "(a run writes them at its end)"
        )
        raise typer.Exit(2)
    summary = summary_from_run_dir(run_dir)
    summary.curves = str(redraw(run_dir.resolve(), f"llmtrain run: {summary.job}"))
    print_summary(summary, console)
    if (tuning := TuningInfo.from_dict(summary.tuning)) is not None:
        print_tuning(tuning, console)
