"""The ``llmtrain`` command line.

Every command imports what it needs inside its function, so ``llmtrain --help``,
``validate`` and ``crd`` never load torch or ray.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(
    name="llmtrain",
    help="Train a language model from raw text to an exported model, locally or on Kubernetes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


@app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(help="Manifests to check.", exists=True, dir_okay=False)],
    old: Annotated[
        Path | None,
        typer.Option(help="The stored version of the same jobs: also check the update (immutable fields)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print problems as JSON lines.")] = False,
) -> None:
    """Check LLMTrainingJob manifests with the schema and the CRD's own CEL rules; exit 1 on problems."""
    from llmtrain.api.validate import validate_file

    bad = 0
    for f in files:
        for result in validate_file(f, old):
            if as_json:
                for p in result.problems:
                    print(
                        json.dumps(
                            {
                                "file": result.file,
                                "name": result.name,
                                "path": p.path,
                                "message": p.message,
                                "layer": p.layer,
                            }
                        )
                    )
                bad += len(result.problems)
                continue
            if not result.problems:
                # One line per result whatever the width (rich wraps at 80 columns
                # when piped): scripts and CI grep these lines.
                console.print(
                    f"[green]✓[/] {escape(str(result.file))}: {escape(result.name)} is valid", soft_wrap=True
                )
                continue
            bad += len(result.problems)
            n = len(result.problems)
            console.print(
                f"[red]✗[/] {escape(str(result.file))}: {escape(result.name)}: {n} problem{'s' * (n != 1)}",
                soft_wrap=True,
            )
            for p in result.problems:
                console.print(f"    [bold]{escape(p.path)}[/]: {escape(p.message)}", soft_wrap=True)
    raise typer.Exit(1 if bad else 0)


@app.command()
def crd(
    check: Annotated[
        Path | None, typer.Option(help="Compare with this file instead of printing; exit 1 if it differs.")
    ] = None,
) -> None:
    """Print the LLMTrainingJob CustomResourceDefinition generated from llmtrain.api."""
    from llmtrain.api.crd import crd_yaml

    text = crd_yaml()
    if check is None:
        print(text, end="")
        return
    if not check.exists() or check.read_text() != text:
        err_console.print(f"{check} is stale: regenerate it with `llmtrain crd > {check}`")
        raise typer.Exit(1)
    console.print(f"{check} is up to date")


@app.command()
def operator(
    namespace: Annotated[
        list[str] | None, typer.Option("--namespace", "-n", help="Watch only these namespaces (repeatable).")
    ] = None,
    liveness_port: Annotated[int, typer.Option(help="Port of /healthz.")] = 8080,
    metrics_port: Annotated[int, typer.Option(help="Port of the operator's /metrics.")] = 9090,
    interval: Annotated[float, typer.Option(help="Seconds between level-based reconciles of a job.")] = 5.0,
    standalone: Annotated[
        bool, typer.Option("--standalone", help="No peering: for a single replica without the peering CRDs.")
    ] = False,
    kubeconfig: Annotated[
        str | None, typer.Option(help="Kubeconfig (default: in-cluster, then ~/.kube).")
    ] = None,
    operator_namespace: Annotated[
        str, typer.Option(help="Namespace the operator runs in.")
    ] = "llmtrain-system",
    bind_address: Annotated[
        str, typer.Option(help="Address of the liveness and metrics servers.")
    ] = "0.0.0.0",
    verbose: Annotated[bool, typer.Option("--verbose", help="Log every Kopf handler call.")] = False,
    priority: Annotated[
        str,
        typer.Option(
            envvar="LLMTRAIN_OPERATOR_PRIORITY",
            help="Peering priority: an integer, or 'random' (one per replica: the highest acts).",
        ),
    ] = "0",
    ray_head_host: Annotated[
        str | None,
        typer.Option(
            help="Reach every job's Ray head at this host (a stand-in Ray cluster; default: its Service)."
        ),
    ] = None,
    ray_dashboard_port: Annotated[int, typer.Option(help="Port of the heads' Jobs API.")] = 8265,
    ray_progress_port: Annotated[int, typer.Option(help="Port of the drivers' progress endpoint.")] = 8266,
    ray_token_file: Annotated[
        str | None, typer.Option(help="New jobs' Ray token from this file (a stand-in's fixed token).")
    ] = None,
    ray_driver_spec_path: Annotated[
        str,
        typer.Option(
            help="Where the driver on the head reads the job ({namespace}, {name} filled in; a stand-in's copy)."
        ),
    ] = "/etc/llmtrain/job.yaml",
    prometheus_scrape_annotations: Annotated[
        bool, typer.Option(help="prometheus.io/scrape, /port, /path annotations on every Ray pod.")
    ] = False,
    prometheus_namespace_label: Annotated[
        list[str] | None,
        typer.Option(
            help="KEY=VALUE (repeatable): Prometheus' namespace, admitted to the jobs' metrics ports."
        ),
    ] = None,
    prometheus_pod_label: Annotated[
        list[str] | None,
        typer.Option(help="KEY=VALUE (repeatable): Prometheus' pods, admitted to the jobs' metrics ports."),
    ] = None,
) -> None:
    """Run the LLMTrainingJob operator (Kopf) until SIGINT/SIGTERM."""
    import logging

    from llmtrain.operator import forgo_kubernetes_client

    forgo_kubernetes_client()
    from llmtrain.operator.main import (
        PEERING_NAME,
        JobMetricsOptions,
        RayHeadOptions,
        parse_labels,
        parse_priority,
        run,
    )

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        prio = parse_priority(priority)
    except ValueError as e:
        err_console.print(f"[red]--priority:[/] {escape(str(e))}")
        raise typer.Exit(2) from None
    try:
        job_metrics = JobMetricsOptions(
            prometheus_scrape_annotations,
            parse_labels(prometheus_namespace_label, "--prometheus-namespace-label"),
            parse_labels(prometheus_pod_label, "--prometheus-pod-label"),
        )
    except ValueError as e:
        err_console.print(f"[red]{escape(str(e))}[/]")
        raise typer.Exit(2) from None
    run(
        namespace,
        liveness_port,
        metrics_port,
        reconcile_interval=interval,
        peering_name=None if standalone else PEERING_NAME,
        kubeconfig=kubeconfig,
        operator_namespace=operator_namespace,
        bind_address=bind_address,
        verbose=verbose,
        priority=prio,
        ray=RayHeadOptions(
            ray_head_host, ray_dashboard_port, ray_progress_port, ray_token_file, ray_driver_spec_path
        ),
        job_metrics=job_metrics,
    )


@app.command()
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
    from llmtrain.api.job import LLMTrainingJob, read_manifests
    from llmtrain.api.validate import as_applied, validate_object

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

    from llmtrain.cli_run import run_with_display

    raise typer.Exit(
        run_with_display(job, run_dir=run_dir, cpus=cpus, prompt=prompt, console=console, debug=debug)
    )


@app.command()
def report(
    run_dir: Annotated[
        Path, typer.Argument(help="A run directory of `llmtrain run`.", exists=True, file_okay=False)
    ],
) -> None:
    """Redraw RUN_DIR/curves.png from the run's recorded events and print its report again."""
    from llmtrain.api.progress import TuningInfo
    from llmtrain.cli_run import print_summary, print_tuning
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


@app.command()
def driver(
    spec: Annotated[
        Path,
        typer.Option(help="File holding one LLMTrainingJob (on the cluster: the mounted spec ConfigMap)."),
    ],
    spec_sha256: Annotated[
        str | None,
        typer.Option(
            help="Wait (up to 180 s) until --spec holds exactly this content: the spec the operator submitted."
        ),
    ] = None,
    submission_id: Annotated[
        str | None, typer.Option(help="The Ray job's submission id (names the log copied to S3).")
    ] = None,
    progress_port: Annotated[
        int | None,
        typer.Option(help="Serve the run's progress here for the operator (behind $RAY_AUTH_TOKEN)."),
    ] = None,
    progress_host: Annotated[str, typer.Option(help="Address the progress endpoint binds.")] = "0.0.0.0",
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Run every stage of a job on the Ray cluster this process runs on (a Ray job).

    What the operator submits to the job's head through Ray's Jobs API; it works by hand on any Ray cluster too (`ray job submit -- llmtrain driver --spec job.yaml`).

    Prints the final snapshot as its last line; exits 0 on success, 2 on a permanent failure, 1 on a retriable one.
    """
    import logging

    from pydantic import ValidationError

    from llmtrain.api.progress import RESULT_PREFIX, RunFailure, RunSnapshot
    from llmtrain.api.status import Reason
    from llmtrain.runtime.spec_file import load_job
    from llmtrain.runtime.submitted import run_submitted

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        job = load_job(str(spec), spec_sha256)
    except (ValueError, OSError) as e:  # pydantic's ValidationError is a ValueError
        if debug:
            raise
        message = _spec_problem(e) if isinstance(e, ValidationError) else str(e)
        err_console.print(f"[red]✗[/] llmtrain driver: {escape(message)}")
        failure = RunFailure(Reason.InvalidSpec.value, message, permanent=True)
        print(
            RESULT_PREFIX
            + RunSnapshot(stage="failed", submission_id=submission_id, failure=failure).to_json()
        )
        raise typer.Exit(2) from None
    code = run_submitted(
        job, submission_id=submission_id, progress_host=progress_host, progress_port=progress_port
    )
    raise typer.Exit(code)


def _spec_problem(e: Exception) -> str:
    from pydantic import ValidationError

    assert isinstance(e, ValidationError)
    return "; ".join(
        "spec." + ".".join(str(x) for x in err["loc"]) + f": {err['msg']}" for err in e.errors()[:5]
    )


def _mount_subcommands() -> None:
    # Sub-apps keep their heavy imports inside their commands, so mounting them is cheap.
    from llmtrain.runtime.commands_model import export_cmd, generate_cmd, serve_cmd
    from llmtrain.runtime.data.commands import app as data_app

    app.add_typer(data_app, name="data")
    app.command("export")(export_cmd)
    app.command("generate")(generate_cmd)
    app.command("serve")(serve_cmd)


_mount_subcommands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
