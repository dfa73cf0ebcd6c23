"""The Grafana dashboard (llmtrain/dashboard.py) and its copy in the Helm chart, without Prometheus.

* The chart's copy is the generated JSON (a stale copy is reported, like the CRD's).
* Every metric a panel query names is one the code exports: the names are read from fresh
  registries of ``runtime/metrics.py`` and ``operator/metrics.py``, never restated here.
* Variables, units and thresholds the issue asks for.
* ``dashboard.enabled`` renders a ConfigMap the Grafana sidecar picks up.

tests/integration/test_prometheus.py then runs every query against a real Prometheus.
Each checker returns its problems and has a negative control.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from llmtrain.dashboard import DATA_WAIT_THRESHOLD, MAY_BE_EMPTY_ON_CPU, dashboard_json, panel_queries
from tests.unit.test_helm_chart import CHART, needs_helm, of_kind, render

CHART_COPY = CHART / "dashboards" / "llmtrain.json"
# PromQL words that look like metric names but are not.
_PROMQL_WORDS = {
    "sum",
    "max",
    "min",
    "avg",
    "by",
    "rate",
    "increase",
    "histogram_quantile",
    "label_values",
    "namespace",
    "job",
    "le",
    "rank",
    "device",
    "phase",
    "kind",
    "path",
    "code",
    "state",
    "trial",
    "metric",
    "checker",
}


def exported_metric_names() -> set[str]:
    """Every sample name the code's registries expose (counters with _total, histograms with
    _bucket/_sum/_count), MFU included (created on first use, so one GPU-like window is logged)."""
    from llmtrain.operator.metrics import OperatorMetrics
    from llmtrain.runtime.metrics import MetricLabels, TrainMetrics, TuneMetrics

    from llmtrain.api.progress import TrialRecord, summarize

    train = TrainMetrics(MetricLabels("ns", "j", 0))
    train.log_window(
        loss=1.0,
        steps=1,
        tokens=1,
        seconds=1.0,
        data_wait_seconds=0.0,
        mfu=0.5,
        peak_memory_bytes=1,
        device="cuda",
        step=1,
        epoch=0,
    )
    train.validation(loss=1.0, perplexity=2.7, bits_per_byte=1.4)  # bits/byte: labelled on first use
    train.task(exact_match=0.5, score=0.5, checker="identifier")  # labelled on first use
    tune = TuneMetrics("ns", "j", "valLoss")
    trials = [TrialRecord(1, "completed", {}, 4.5, 6)]
    tune.update(summarize(trials, search="grid", metric="valLoss", mode="min", planned=1))
    op = OperatorMetrics()
    op.reconcile_errors.labels(kind="x").inc()  # a labelled counter shows no sample before use
    from llmtrain.runtime.serve import EngineStats, ServeMetrics

    # The server's gauges read its engine at scrape time: an engine's counters stand in.
    engine = SimpleNamespace(stats=EngineStats(), active_count=0, waiting_count=0)
    serve = ServeMetrics(engine)
    serve.requests.labels(path="/v1/completions", code="200").inc()
    names: set[str] = set()
    for registry in (train.registry, tune.registry, op.registry, serve.registry):
        for family in registry.collect():
            names |= {s.name for s in family.samples}
    return names


def metric_name_problems(queries: list[tuple[str, str]], known: set[str]) -> list[str]:
    problems = []
    for title, expr in queries:
        # Drop label matchers and Grafana variables, then every remaining identifier that is
        # not a PromQL word must be an exported metric.
        bare = re.sub(r"\{[^}]*\}|\[[^]]*\]|\$\w+", "", expr)
        for word in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare):
            if word not in _PROMQL_WORDS and word not in known:
                problems.append(f"{title}: {word} is not exported")
    return problems


def dashboard_copy_problems(path: Path) -> list[str]:
    if not path.exists():
        return [f"{path.name} is missing"]
    if path.read_text() != dashboard_json():
        return [f"{path.name} differs from `python -m llmtrain.dashboard`"]
    return []


def dashboard() -> dict[str, Any]:
    out: dict[str, Any] = json.loads(dashboard_json())
    return out


def panels(d: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["title"]: p for p in d["panels"] if p["type"] != "row"}


# ------------------------------------------------------------------------------- the tests


def test_chart_copy_is_the_generated_dashboard(tmp_path: Path) -> None:
    problems = dashboard_copy_problems(CHART_COPY)
    assert problems == [], "; ".join(problems) + ": regenerate with charts/llmtrain/update-crds.sh"
    # Negative control: one changed query makes the copy stale.
    stale = tmp_path / "llmtrain.json"
    stale.write_text(CHART_COPY.read_text().replace("llmtrain_train_loss", "llmtrain_train_los", 1))
    assert dashboard_copy_problems(stale) == ["llmtrain.json differs from `python -m llmtrain.dashboard`"]


def test_every_query_names_an_exported_metric() -> None:
    queries = panel_queries(dashboard())
    known = exported_metric_names()
    assert "llmtrain_train_mfu_ratio" in known and "llmtrain_operator_reconcile_errors_total" in known
    assert "llmtrain_serve_requests_total" in known
    assert metric_name_problems(queries, known) == []
    # Negative control: a misspelt metric is reported with its panel.
    bad = [("Loss", 'max by (namespace, job) (llmtrain_train_los{namespace=~"$namespace"})')]
    assert metric_name_problems(bad, known) == ["Loss: llmtrain_train_los is not exported"]


def test_variables_units_and_thresholds() -> None:
    d = dashboard()
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert set(variables) == {"datasource", "namespace", "job"}
    assert variables["namespace"]["query"].startswith("label_values(")
    # A job that is still tuning has trained nothing: the search's series name it too.
    assert variables["job"]["query"] == (
        'label_values({__name__=~"llmtrain_train_step|llmtrain_tune_trials", namespace=~"$namespace"}, job)'
    )
    p = panels(d)
    assert set(MAY_BE_EMPTY_ON_CPU) <= set(p)
    for title in (
        "Jobs by phase",
        "Apply → all pods Running",
        "Reconcile duration",
        "Reconcile errors",
        "Ray cluster restarts",
        "Loss",
        "Validation perplexity",
        "Tokens/s",
        "MFU",
        "Data wait",
        "Step time",
        "Peak memory by device",
        "Tokens trained",
        "Serving requests",
        "Serving latency",
        "Validation bits per byte",
        "Best trial so far",
        "Trials by state",
        "Trial metric",
    ):
        assert title in p, title
    defaults = {t: q["fieldConfig"]["defaults"] for t, q in p.items()}
    assert defaults["MFU"]["unit"] == "percentunit" and defaults["MFU"]["max"] == 1
    assert defaults["Data wait"]["unit"] == "percentunit"
    steps = defaults["Data wait"]["thresholds"]["steps"]
    assert [s["value"] for s in steps] == [None, DATA_WAIT_THRESHOLD] == [None, 0.01]
    assert defaults["Data wait"]["custom"]["thresholdsStyle"]["mode"] == "line"
    assert defaults["Step time"]["unit"] == "s" and defaults["Peak memory by device"]["unit"] == "bytes"
    # Step time's p50/p95 come from the histogram, not from a gauge.
    exprs = [e for t, e in panel_queries(d) if t == "Step time"]
    assert len(exprs) == 2 and all("llmtrain_train_step_seconds_bucket" in e for e in exprs)
    # Every training panel follows the two variables.
    for title, expr in panel_queries(d):
        if "llmtrain_train_" in expr or "llmtrain_val_" in expr or "llmtrain_tune_" in expr:
            assert 'namespace=~"$namespace"' in expr and 'job=~"$job"' in expr, title
    # Each panel reads the selected data source.
    assert all(q["datasource"]["uid"] == "${datasource}" for q in p.values())


@needs_helm
def test_dashboard_configmap_for_the_grafana_sidecar() -> None:
    assert of_kind(render(), "ConfigMap") == []  # off by default
    docs = render("--set", "dashboard.enabled=true", "--set", "dashboard.annotations.grafana_folder=LLM")
    (cm,) = of_kind(docs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    assert json.loads(cm["data"]["llmtrain.json"]) == dashboard()
    (other,) = of_kind(
        render("--set", "dashboard.enabled=true", "--set", "dashboard.namespace=monitoring"), "ConfigMap"
    )
    assert other["metadata"]["namespace"] == "monitoring"


@pytest.mark.parametrize("title", sorted(MAY_BE_EMPTY_ON_CPU))
def test_allowlist_names_real_panels(title: str) -> None:
    """The allowlist of panels that may be empty on CPU stays short and names real panels."""
    assert len(MAY_BE_EMPTY_ON_CPU) <= 2
    assert title in panels(dashboard())
