"""``llmtrain operator`` and ``llmtrain driver``: what the pods run (the operator's
Deployment; the Ray job the operator submits to each job's head)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from llmtrain.cli.consoles import err_console

# The operator's options, declared once here so that its signature reads in one screen
# (typer takes each flag's name from the parameter, its help from these).
Namespaces = Annotated[
    list[str] | None, typer.Option("--namespace", "-n", help="Watch only these namespaces (repeatable).")
]
Standalone = Annotated[
    bool, typer.Option("--standalone", help="No peering: for a single replica without the peering CRDs.")
]
Priority = Annotated[
    str,
    typer.Option(
        envvar="LLMTRAIN_OPERATOR_PRIORITY",
        help="Peering priority: an integer, or 'random' (one per replica: the highest acts).",
    ),
]
RayHeadHost = Annotated[
    str | None,
    typer.Option(
        help="Reach every job's Ray head at this host (a stand-in Ray cluster; default: its Service)."
    ),
]
RayTokenFile = Annotated[
    str | None, typer.Option(help="New jobs' Ray token from this file (a stand-in's fixed token).")
]
RayDriverSpecPath = Annotated[
    str,
    typer.Option(
        help="Where the driver on the head reads the job ({namespace}, {name} filled in; a stand-in's copy)."
    ),
]
ScrapeAnnotations = Annotated[
    bool, typer.Option(help="prometheus.io/scrape, /port, /path annotations on every Ray pod.")
]
PrometheusNamespaceLabels = Annotated[
    list[str] | None,
    typer.Option(help="KEY=VALUE (repeatable): Prometheus' namespace, admitted to the jobs' metrics ports."),
]
PrometheusPodLabels = Annotated[
    list[str] | None,
    typer.Option(help="KEY=VALUE (repeatable): Prometheus' pods, admitted to the jobs' metrics ports."),
]


def operator(
    namespace: Namespaces = None,
    liveness_port: Annotated[int, typer.Option(help="Port of /healthz.")] = 8080,
    metrics_port: Annotated[int, typer.Option(help="Port of the operator's /metrics.")] = 9090,
    interval: Annotated[float, typer.Option(help="Seconds between level-based reconciles of a job.")] = 5.0,
    standalone: Standalone = False,
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
    priority: Priority = "0",
    ray_head_host: RayHeadHost = None,
    ray_dashboard_port: Annotated[int, typer.Option(help="Port of the heads' Jobs API.")] = 8265,
    ray_progress_port: Annotated[int, typer.Option(help="Port of the drivers' progress endpoint.")] = 8266,
    ray_token_file: RayTokenFile = None,
    ray_driver_spec_path: RayDriverSpecPath = "/etc/llmtrain/job.yaml",
    prometheus_scrape_annotations: ScrapeAnnotations = False,
    prometheus_namespace_label: PrometheusNamespaceLabels = None,
    prometheus_pod_label: PrometheusPodLabels = None,
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
