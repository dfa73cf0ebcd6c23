"""The product's Grafana dashboard, defined in code with Grafana's own foundation SDK.

Why a library and not hand-kept JSON: Grafana's dashboard JSON is a large, versioned schema
(field configs, overrides, variable models) that drifts with each Grafana release; the SDK
is generated from that schema by Grafana, so the builders below are type-checked against it.
The JSON is generated into the Helm chart (``charts/llmtrain/update-crds.sh`` runs
``python -m llmtrain.dashboard``); ``tests/unit/test_dashboard.py`` fails when that copy is
stale, and ``tests/integration/test_prometheus.py`` sends every panel query to a real
Prometheus scraping a real training run and the real operator.

Series come from ``runtime/metrics.py`` (per worker: ``namespace``, ``job``, ``rank``
labels, scraped with ``honor_labels`` so those labels survive; the tuning stage's driver:
``llmtrain_tune_*`` with the same job labels), ``operator/metrics.py`` and
``runtime/serve/metrics.py`` (no job labels: the operator's and serving panels are fleet-wide).
Queries use only PromQL that Prometheus 2.42 understands. Imports neither torch nor ray.
"""

from __future__ import annotations

import json
from typing import Any

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm

UID = "llmtrain-overview"
TITLE = "llmtrain"
# A job's series: the selection of the dashboard's two variables.
SEL = 'namespace=~"$namespace", job=~"$job"'
# Aggregations keep one line per job (every rank reports the same all-reduced loss).
BY_JOB = "namespace, job"
DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
# The series that name a job's namespace and job for the variables: training's, and the
# search's (a job that is still tuning has trained nothing yet).
JOB_SERIES = "llmtrain_train_step|llmtrain_tune_trials"
# Panels that can have no data on a CPU-only run (MFU is unknown there, not guessed).
# tests/integration/test_prometheus.py still sends their queries, to prove they parse.
MAY_BE_EMPTY_ON_CPU = frozenset({"MFU"})
# Panels with data only for a job that sets spec.validation.task (task fine-tuning).
MAY_BE_EMPTY_WITHOUT_TASK = frozenset({"Task metric"})
# The data-wait ratio above which the input pipeline is worth a look (a threshold line).
DATA_WAIT_THRESHOLD = 0.01


def _q(expr: str, legend: str, ref: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DS)


def _steps(*steps: tuple[float | None, str]) -> db.ThresholdsConfig:
    return (
        db.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=v, color=c) for v, c in steps])
    )


def _series(
    title: str,
    description: str,
    unit: str,
    *queries: tuple[str, str],
    width: int = 12,
    minimum: float | None = None,
    maximum: float | None = None,
    threshold: float | None = None,
) -> timeseries.Panel:
    p = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .unit(unit)
        .span(width)
        .height(8)
        .line_width(2)
        .fill_opacity(10)
        .legend(
            cb.VizLegendOptions()
            .display_mode(cm.LegendDisplayMode.LIST)
            .placement(cm.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
        .tooltip(cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING))
    )
    if minimum is not None:
        p = p.min(minimum)
    if maximum is not None:
        p = p.max(maximum)
    if threshold is not None:
        p = p.thresholds(_steps((None, "green"), (threshold, "red"))).thresholds_style(
            cb.GraphThresholdsStyleConfig().mode(cm.GraphTresholdsStyleMode.LINE)
        )
    for i, (expr, legend) in enumerate(queries):
        p = p.with_target(_q(expr, legend, chr(ord("A") + i)))
    return p


def _stat(title: str, description: str, unit: str, *queries: tuple[str, str], width: int = 6) -> stat.Panel:
    p = (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .unit(unit)
        .span(width)
        .height(5)
        .graph_mode(cm.BigValueGraphMode.AREA)
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )
    for i, (expr, legend) in enumerate(queries):
        p = p.with_target(_q(expr, legend, chr(ord("A") + i)))
    return p


def _quantiles(metric: str, by: str, window: str, label: str = "") -> list[tuple[str, str]]:
    """p50 and p95 of a histogram, aggregated ``by`` (plus ``le``) over ``window``."""
    grouping = f"{by}, le" if by else "le"
    sel = f"{{{SEL}}}" if by else ""
    fn = "increase" if window == "$__range" else "rate"
    return [
        (
            f"histogram_quantile({q}, sum by ({grouping}) ({fn}({metric}_bucket{sel}[{window}])))",
            f"p{int(q * 100)} {label}".strip(),
        )
        for q in (0.5, 0.95)
    ]


def _label_variable(name: str, label: str, selector: str) -> db.QueryVariable:
    """A multi-select variable over the values of label ``name`` of the series ``selector`` picks."""
    return (
        db.QueryVariable(name)
        .label(label)
        .datasource(DS)
        .query(f"label_values({selector}, {name})")
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
        .include_all(True)
        .all_value(".*")
    )


def build() -> dm.Dashboard:
    training = [
        _series(
            "Loss",
            "Training loss at each log step and validation loss at each validation "
            "(mean token cross-entropy, nats).",
            "none",
            (f"max by ({BY_JOB}) (llmtrain_train_loss{{{SEL}}})", "train {{job}}"),
            (f"max by ({BY_JOB}) (llmtrain_val_loss{{{SEL}}})", "val {{job}}"),
        ),
        _series(
            "Validation perplexity",
            "exp(validation loss).",
            "none",
            (f"max by ({BY_JOB}) (llmtrain_val_perplexity{{{SEL}}})", "{{job}}"),
        ),
        _series(
            "Validation bits per byte",
            "Validation loss in bits per UTF-8 byte of the predicted text: comparable across "
            "tokenizers and vocabularies (lower is better).",
            "none",
            (f"max by ({BY_JOB}) (llmtrain_val_bits_per_byte{{{SEL}}})", "{{job}}"),
        ),
        _series(
            "Task metric",
            "Greedy answers to held-out task prompts at each validation (spec.validation.task): share "
            "equal to the reference, and share passing the named checker. Only task jobs have it.",
            "percentunit",
            (f"max by ({BY_JOB}) (llmtrain_val_task_exact_match_ratio{{{SEL}}})", "exact match {{job}}"),
            (
                f"max by ({BY_JOB}, checker) (llmtrain_val_task_score_ratio{{{SEL}}})",
                "{{checker}} {{job}}",
            ),
            minimum=0,
            maximum=1,
        ),
        _series(
            "Tokens/s",
            "Training tokens per second, all ranks, over each log window.",
            "short",
            (f"max by ({BY_JOB}) (llmtrain_train_tokens_per_second{{{SEL}}})", "{{job}}"),
            width=8,
        ),
        _series(
            "MFU",
            "Model FLOPs utilisation per device (6N + 12LdT FLOPs/token over the bf16 peak); "
            "GPU only: a CPU run has no such series.",
            "percentunit",
            (f"avg by ({BY_JOB}) (llmtrain_train_mfu_ratio{{{SEL}}})", "{{job}}"),
            width=8,
            minimum=0,
            maximum=1,
        ),
        _series(
            "Data wait",
            "Fraction of each log window spent waiting for batches, per rank. Above the 1 % line "
            "the input pipeline, not the model, sets the speed.",
            "percentunit",
            (f"max by ({BY_JOB}, rank) (llmtrain_train_data_wait_ratio{{{SEL}}})", "{{job}} rank {{rank}}"),
            width=8,
            minimum=0,
            threshold=DATA_WAIT_THRESHOLD,
        ),
        _series(
            "Step time",
            "Wall time of one optimizer step, p50 and p95 from the step-time histogram.",
            "s",
            *_quantiles("llmtrain_train_step_seconds", BY_JOB, "$__rate_interval", "{{job}}"),
        ),
        _series(
            "Peak memory by device",
            "Peak memory of each worker: the CUDA allocator's peak on GPU, max RSS on CPU.",
            "bytes",
            (
                f"max by ({BY_JOB}, rank, device) (llmtrain_train_peak_memory_bytes{{{SEL}}})",
                "{{job}} rank {{rank}} {{device}}",
            ),
        ),
    ]
    totals = [
        _stat(
            "Tokens trained",
            "Training tokens processed so far, all ranks.",
            "short",
            (f"max by ({BY_JOB}) (llmtrain_train_tokens_total{{{SEL}}})", "{{job}}"),
        ),
        _stat(
            "Step",
            "Optimizer steps completed.",
            "none",
            (f"max by ({BY_JOB}) (llmtrain_train_step{{{SEL}}})", "{{job}}"),
        ),
        _stat(
            "Epoch",
            "Epoch of the training data being read.",
            "none",
            (f"max by ({BY_JOB}) (llmtrain_train_epoch{{{SEL}}})", "{{job}}"),
        ),
        _stat(
            "Ray cluster restarts",
            "Ray clusters the operator recreated after a pod ended, over the time range "
            "(a lost head also starts a new attempt: status.attempt). Fleet-wide.",
            "none",
            ("sum(increase(llmtrain_operator_ray_cluster_restarts_total[$__range]))", "restarts"),
        ),
    ]
    # The search (spec.tuning), served by the driver while the tuning stage runs
    # (runtime/metrics.py: TuneMetrics); the trials themselves export no training series.
    tuning = [
        _series(
            "Best trial so far",
            "The tuning metric (spec.tuning.metric: valLoss, valPerplexity or valAccuracy) of "
            "the best finished trial, as the search goes on.",
            "none",
            (f"max by ({BY_JOB}, metric) (llmtrain_tune_best_metric{{{SEL}}})", "{{job}} best {{metric}}"),
            width=8,
        ),
        _series(
            "Trials by state",
            "Trials of the search running, completed (whole budget), stopped early (ASHA) and failed.",
            "none",
            (f"max by ({BY_JOB}, state) (llmtrain_tune_trials{{{SEL}}})", "{{job}} {{state}}"),
            width=8,
            minimum=0,
        ),
        _series(
            "Trial metric",
            "Each trial's tuning metric at its last validation: the best finished trials and the "
            "running ones (the rows of status.tuning.trials).",
            "none",
            (
                f"max by ({BY_JOB}, trial, metric) (llmtrain_tune_trial_metric{{{SEL}}})",
                "{{job}} trial {{trial}} {{metric}}",
            ),
            width=8,
        ),
    ]
    operator = [
        _series(
            "Jobs by phase",
            "LLMTrainingJobs by status.phase, as last reconciled. Fleet-wide.",
            "none",
            ("sum by (phase) (llmtrain_operator_jobs)", "{{phase}}"),
            width=8,
        ),
        _stat(
            "Apply → all pods Running",
            "From a job's pods' creation (start, resume or restart) until every pod is Running: "
            "p50 and p95 over the time range. Fleet-wide.",
            "s",
            *_quantiles("llmtrain_operator_provisioning_duration_seconds", "", "$__range"),
            width=4,
        ),
        _series(
            "Reconcile duration",
            "Time of one reconcile of one job, API calls included. Fleet-wide.",
            "s",
            *_quantiles("llmtrain_operator_reconcile_duration_seconds", "", "$__rate_interval"),
            width=6,
        ),
        _series(
            "Reconcile errors",
            "Failed reconciles per second by kind (http_<status>, connection, create); each is "
            "retried at the next resync. Fleet-wide.",
            "reqps",
            ("sum by (kind) (rate(llmtrain_operator_reconcile_errors_total[$__rate_interval]))", "{{kind}}"),
            width=6,
        ),
    ]

    # `llmtrain serve` (runtime/serve/metrics.py): its series carry no job labels (a server serves
    # an exported model, not a job), so these panels are fleet-wide like the operator's.
    serving = [
        _series(
            "Serving requests",
            "HTTP requests answered per second, by path and status code.",
            "reqps",
            (
                "sum by (path, code) (rate(llmtrain_serve_requests_total[$__rate_interval]))",
                "{{path}} {{code}}",
            ),
            width=8,
        ),
        _series(
            "Serving latency",
            "Completion requests, arrival to last byte, and time to the first token: p50 and p95.",
            "s",
            *_quantiles("llmtrain_serve_request_duration_seconds", "", "$__rate_interval", "request"),
            *_quantiles("llmtrain_serve_time_to_first_token_seconds", "", "$__rate_interval", "first token"),
            width=8,
        ),
        _series(
            "Serving throughput",
            "Tokens generated per second and sequences in the running batch.",
            "short",
            ("sum(llmtrain_serve_generation_tokens_per_second)", "tokens/s"),
            ("sum(llmtrain_serve_active_sequences)", "active sequences"),
            width=8,
        ),
    ]

    namespace = _label_variable("namespace", "Namespace", f'{{__name__=~"{JOB_SERIES}"}}')
    job = _label_variable("job", "Job", f'{{__name__=~"{JOB_SERIES}", namespace=~"$namespace"}}')
    d = (
        db.Dashboard(TITLE)
        .uid(UID)
        .description("LLMTrainingJobs: training progress per job, and the operator that runs them.")
        .tags(["llmtrain"])
        .editable()
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .with_variable(db.DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(namespace)
        .with_variable(job)
        .with_row(db.Row("Training"))
    )
    for p in training:
        d = d.with_panel(p)
    d = d.with_row(db.Row("Totals"))
    for s in totals:
        d = d.with_panel(s)
    d = d.with_row(db.Row("Tuning"))
    for p in tuning:
        d = d.with_panel(p)
    d = d.with_row(db.Row("Operator"))
    for o in operator:
        d = d.with_panel(o)
    d = d.with_row(db.Row("Serving"))
    for v in serving:
        d = d.with_panel(v)
    return d.build()


def dashboard_json() -> str:
    """The dashboard as Grafana imports it (stable text: the chart's copy is compared to it)."""
    return json.dumps(build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of every panel, rows' children included."""
    out: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            for t in p.get("targets") or []:
                out.append((str(p.get("title", "")), str(t["expr"])))
            walk(p.get("panels") or [])

    walk(dashboard.get("panels") or [])
    return out


if __name__ == "__main__":  # python -m llmtrain.dashboard > dashboard.json
    import sys

    sys.stdout.write(dashboard_json())
