"""Every panel of the Grafana dashboard, queried against a real Prometheus with real data.

Debian's ``prometheus`` 2.42 (fetched with ``apt-get download`` and unpacked with
``dpkg-deb``, cached in ~/.cache/llmtrain, like tests/data/janeausten.py) runs on 127.0.0.1
with a generated config that scrapes, every second:

* a live training run's ``/metrics``: ``train()`` on the tiny model with the synthetic
  loader, whose batches take a few milliseconds to arrive (so data wait is measured, not 0),
  labelled with the namespace and name of job A below;
* a live search's ``/metrics``: the driver's tuning stage (a two-point grid of two-step
  trials on the tiny model and a little real text, Ray Tune over Ray Train on a local Ray,
  in a subprocess), labelled like the training run: what a job shows while it tunes;
* ``llmtrain serve`` (test_serve.py's tiny exported model) answering completion requests
  that arrive a few a second;
* the operator's ``/metrics``: ``llmtrain operator`` reconciling two jobs on the test
  control plane. Job A gets its head and worker pods Running (KWOK), which observes the
  provisioning histogram; a ResourceQuota of two pods makes the apiserver refuse job B's
  pods, which counts real reconcile errors.

Then every query of the generated dashboard (the JSON the chart ships), with Grafana's
variables substituted as Grafana would, goes to Prometheus' HTTP API: each must return at
least one series with a finite value, except the panels on ``MAY_BE_EMPTY_ON_CPU`` (MFU),
which must still parse. A misspelt metric and a broken expression are reported (negative
controls). Nothing is fabricated: no series is pushed or recorded by the test itself.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from tests.integration.test_serve import Served, exported, http_request, served  # noqa: E402, F401
from tests.manifests import gpu_job  # noqa: E402
from tests.unit.test_export import tokenizer  # noqa: E402, F401

Cluster = Any  # conftest.Cluster (tests/integration is not a package)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(480)]

GROUP, VERSION, PLURAL = "llmtrain.dev", "v1alpha1", "llmtrainingjobs"
PROMETHEUS_VERSION = "2.42"
SCRAPE_SECONDS = 1
# Grafana's $__rate_interval: max($__interval + scrape interval, 4 × scrape interval).
RATE_INTERVAL = f"{4 * SCRAPE_SECONDS}s"
STEP_SECONDS = 1


# ------------------------------------------------------------------------------ prometheus


def prometheus_binary() -> Path:
    """Debian's prometheus binary, fetched once into ~/.cache/llmtrain (no install, no root)."""
    cache = Path(
        os.environ.get("LLMTRAIN_PROMETHEUS_CACHE", Path.home() / ".cache" / "llmtrain" / "prometheus")
    )
    binary = cache / "usr" / "bin" / "prometheus"
    if binary.exists():
        return binary
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        pytest.skip("prometheus is not cached and apt-get/dpkg-deb are missing to fetch Debian's")
    with tempfile.TemporaryDirectory() as tmp:
        for attempt in (1, 2):
            r = subprocess.run(["apt-get", "download", "prometheus"], cwd=tmp, capture_output=True, text=True)
            debs = list(Path(tmp).glob("prometheus_*.deb"))
            if debs:
                break
            if attempt == 1:  # a fresh machine has no package lists yet
                subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False)
        else:
            pytest.fail(f"`apt-get download prometheus` failed: {r.stderr.strip()[-500:]}")
        part = cache.with_name(cache.name + ".part")
        shutil.rmtree(part, ignore_errors=True)
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(part)], check=True)
        shutil.rmtree(cache, ignore_errors=True)
        part.replace(cache)
    return binary


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 5) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode())


def terminate(proc: subprocess.Popen[Any] | None) -> None:
    """SIGTERM, then SIGKILL after 30 s: a child process of the test, gone."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class Prometheus:
    def __init__(self, binary: Path, workdir: Path, targets: dict[str, tuple[str, bool]]) -> None:
        """``targets``: scrape job name → (host:port, honor_labels)."""
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        config = {
            "global": {"scrape_interval": f"{SCRAPE_SECONDS}s", "scrape_timeout": f"{SCRAPE_SECONDS}s"},
            "scrape_configs": [
                # honor_labels as the chart's PodMonitor and ServiceMonitor set it: the training
                # series' own `job` and `namespace` labels must survive the scrape.
                {"job_name": name, "honor_labels": honor, "static_configs": [{"targets": [target]}]}
                for name, (target, honor) in targets.items()
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = workdir / "prometheus.log"
        self.proc = subprocess.Popen(
            [
                str(binary),
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )

    def ready(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def query_range(self, expr: str, start: float, end: float) -> dict[str, Any]:
        params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": STEP_SECONDS})
        try:
            out: dict[str, Any] = _get(f"{self.url}/api/v1/query_range?{params}")
        except urllib.error.HTTPError as e:  # a bad query is a 400 with the parser's message
            out = json.loads(e.read().decode())
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def grafana_expr(expr: str, variables: dict[str, str], range_seconds: int) -> str:
    """``expr`` as Grafana sends it: its built-in interval variables and the dashboard's."""
    subs = {
        "$__rate_interval": RATE_INTERVAL,
        "$__interval": f"{STEP_SECONDS}s",
        "$__range": f"{range_seconds}s",
        **{f"${k}": v for k, v in variables.items()},
    }
    for key in sorted(subs, key=len, reverse=True):  # $__rate_interval before $__range
        expr = expr.replace(key, subs[key])
    assert "$" not in expr, f"an unsubstituted variable in {expr}"
    return expr


@dataclass
class Answer:
    title: str
    expr: str
    series: int = 0
    finite: int = 0  # samples that are numbers (histogram_quantile of nothing is NaN)
    error: str | None = None


def ask(
    prom: Prometheus, queries: list[tuple[str, str]], variables: dict[str, str], start: float, end: float
) -> list[Answer]:
    out = []
    range_seconds = math.ceil(end - start)
    for title, raw in queries:
        expr = grafana_expr(raw, variables, range_seconds)
        r = prom.query_range(expr, start, end)
        a = Answer(title, expr)
        if r.get("status") != "success":
            a.error = f"{r.get('errorType')}: {r.get('error')}"
        else:
            result = r["data"]["result"]
            a.series = len(result)
            a.finite = sum(1 for s in result for _, v in s["values"] if math.isfinite(float(v)))
        out.append(a)
    return out


def answer_problems(answers: list[Answer], may_be_empty: frozenset[str]) -> list[str]:
    problems = []
    for a in answers:
        if a.error is not None:
            problems.append(f"{a.title}: {a.expr}: {a.error}")
        elif a.title not in may_be_empty and (a.series == 0 or a.finite == 0):
            problems.append(f"{a.title}: {a.expr}: {a.series} series, {a.finite} finite samples")
    return problems


# ------------------------------------------------------------------------- the live sources


class SlowLoader:
    """The synthetic loader with batches that take a few ms to arrive, as from storage."""

    def __init__(self, delay: float, **kw: Any) -> None:
        from llmtrain.runtime.synthetic import SyntheticLoader

        self.inner = SyntheticLoader(**kw, vocab_size=60, windows=32)
        self.delay = delay

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def token_bytes(self) -> list[int]:
        # Each synthetic token stands for one byte of text, so validation measures bits per
        # byte (loss / ln 2) as it does on real data, where the tokenizer says the lengths.
        return [1] * 60

    def __iter__(self) -> Iterator[Any]:
        for batch in self.inner:
            time.sleep(self.delay)
            yield batch


@dataclass
class TrainingRun:
    port: int
    namespace: str
    job: str
    thread: threading.Thread | None = None
    error: list[BaseException] = field(default_factory=list)

    def start(self) -> None:
        from llmtrain.runtime.synthetic import tiny_spec_dict
        from llmtrain.runtime.train import RunContext, train

        from llmtrain.api.config import runtime_config_from_spec
        from llmtrain.api.spec import LLMTrainingJobSpec

        spec = tiny_spec_dict(
            **{
                "metrics.enabled": True,
                "metrics.port": self.port,
                "training.duration.maxSteps": 160,
                "training.logEverySteps": 4,
                "validation.everySteps": 30,
            }
        )
        cfg = runtime_config_from_spec(LLMTrainingJobSpec.model_validate(spec), vocab_size=60)
        ctx = RunContext(metrics_addr="127.0.0.1", namespace=self.namespace, job=self.job)
        make_loader = functools.partial(SlowLoader, 0.02)

        def main() -> None:
            try:
                train(cfg, make_loader, ctx=ctx)
            except BaseException as e:  # reported by the test
                self.error.append(e)

        self.thread = threading.Thread(target=main, name="training-run", daemon=True)
        self.thread.start()

    def join(self, timeout: float) -> None:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the training run did not finish"
        assert not self.error, repr(self.error[0])


TUNE_DRIVER = """
import json, sys
from pathlib import Path
from llmtrain.api.job import LLMTrainingJob
from llmtrain.runtime import driver
from llmtrain.runtime.ray_local import init_local_ray

job = LLMTrainingJob.model_validate(json.loads(Path(sys.argv[1]).read_text()))
out = Path(sys.argv[2])
init_local_ray(2, temp_dir=sys.argv[3])
place = driver.Place(
    run_dir=out / "run", output_prefix=str(out / "out"), connect=lambda: None, cpus_per_worker=2,
    metrics_addr="127.0.0.1",
)
report = driver.Reporter()
data_uri, storage, _ = driver.prepare_data(job, report)
driver.tune(job, data_uri, storage, report.snapshot.data.vocab_size, place, report)
print("TUNED " + json.dumps(report.snapshot.tuning.status()), flush=True)
"""


@dataclass
class TuningRun:
    """The driver's tuning stage in a subprocess (its own local Ray): the search's series on
    the job's metrics port while it runs. Two trials of two steps: the cheapest search that
    has a best trial, trials in more than one state over time, and a series per trial."""

    port: int
    namespace: str
    job: str
    tmp: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import sysconfig

        stdlib = Path(sysconfig.get_paths()["stdlib"])
        doc = {
            "apiVersion": "llmtrain.dev/v1alpha1",
            "kind": "LLMTrainingJob",
            "metadata": {"name": self.job, "namespace": self.namespace},
            "spec": {
                "data": {
                    "sources": [
                        {"name": "json", "local": {"glob": str(stdlib / "json" / "*.py"), "textUnit": "file"}}
                    ],
                    "tokenizer": {"train": {"vocabSize": 300}},
                    "outputUri": str(self.tmp / "data"),
                    "validationFraction": 0.2,
                },
                "model": {"architecture": {"layers": 1, "dModel": 32, "heads": 2, "contextLength": 32}},
                "training": {
                    "schedule": {"warmupSteps": 1, "decay": "constant"},
                    "batch": {"globalBatchSize": 8, "microBatchSize": 8},
                    "duration": {"maxSteps": 2},
                    "logEverySteps": 1,
                },
                "validation": {"everySteps": 1, "batches": 1},
                "checkpoint": {"uri": str(self.tmp / "ckpt"), "everySteps": 2, "keepLast": 1},
                "metrics": {"enabled": True, "port": self.port},
                "resources": {"workers": 1},
                "tuning": {
                    "search": "grid",
                    "trialBudget": {"maxSteps": 2},
                    "space": {"training.optimizer.lr": {"choice": [3e-3, 1e-3]}},
                },
            },
        }
        (self.tmp / "job.json").write_text(json.dumps(doc))
        ray_tmp = tempfile.mkdtemp(prefix="ray-")  # short: unix socket paths stay < 108 bytes
        self.log_path = self.tmp / "tune.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-c", TUNE_DRIVER, str(self.tmp / "job.json"), str(self.tmp), ray_tmp],
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
            cwd=self.tmp,  # not the repository root: its operator/ folder would shadow the stdlib's
        )

    def join(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"the search did not finish in {timeout:.0f}s:\n{self.log_path.read_text()[-3000:]}")
        text = self.log_path.read_text(errors="replace")
        assert self.proc.returncode == 0, text[-3000:]
        line = next(x for x in text.splitlines() if x.startswith("TUNED "))
        tuning: dict[str, Any] = json.loads(line[len("TUNED ") :])
        return tuning

    def stop(self) -> None:
        terminate(self.proc)


class OperatorProcess:
    def __init__(self, cluster: Cluster, namespace: str, tmp: Path) -> None:
        self.cluster, self.namespace, self.tmp = cluster, namespace, tmp
        self.metrics_port = _free_port()
        self.log_path = tmp / "operator.log"
        self.live_port = live = _free_port()
        args = [sys.executable, "-m", "llmtrain.operator", "--namespace", namespace, "--interval", "0.5"]
        args += ["--liveness-port", str(live), "--metrics-port", str(self.metrics_port)]
        args += ["--bind-address", "127.0.0.1", "--kubeconfig", str(cluster.kubeconfig), "--standalone"]
        # The jobs' Ray heads: a closed port on 127.0.0.1 (no Ray here; never a pod IP).
        args += ["--ray-head-host", "127.0.0.1", "--ray-dashboard-port", str(_free_port())]
        # Not from the repository root: its operator/ folder would shadow the stdlib's.
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            args, stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT, env=cluster.env, cwd=tmp
        )

        def alive() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{live}/healthz", timeout=1) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        cluster.wait_for(alive, timeout=60, what="operator liveness endpoint")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as r:
            return str(r.read().decode())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None


def _apply_crds(cluster: Cluster) -> None:
    from llmtrain.api.crd import crd_yaml

    r = cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", "-", input=crd_yaml(), check=False
    )
    assert r.returncode == 0, r.stderr

    def established() -> bool:
        crd = cluster.apiext.read_custom_resource_definition("llmtrainingjobs.llmtrain.dev")
        return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])

    cluster.wait_for(established, timeout=30, what="the LLMTrainingJob CRD Established")


def _metric_value(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ------------------------------------------------------------------------------- the tests


@dataclass
class Scraped:
    prom: Prometheus
    start: float
    end: float
    variables: dict[str, str]
    operator: OperatorProcess
    tuning: dict[str, Any]  # the search's status.tuning, as the driver ended it


class Clients:
    """Completion requests to `llmtrain serve`, a few a second, until stopped."""

    def __init__(self, server: Served) -> None:
        self.served = server
        self.stop = threading.Event()
        self.answered = 0
        self.thread = threading.Thread(target=self._loop, name="serve-clients", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        body = json.dumps({"model": self.served.model, "prompt": "ACEG", "max_tokens": 8}).encode()
        while not self.stop.wait(0.25):
            status, _ = http_request(self.served.port, "POST", "/v1/completions", body)
            assert status == 200
            self.answered += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


@pytest.fixture(scope="module")
def scraped(cluster: Cluster, served: Served, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scraped]:  # noqa: F811
    pytest.importorskip("ray")  # the search runs on a local Ray
    binary = prometheus_binary()
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True).stdout
    assert f"version {PROMETHEUS_VERSION}." in version, version
    tmp = tmp_path_factory.mktemp("prometheus")
    _apply_crds(cluster)
    ns = f"t-prom-{uuid.uuid4().hex[:6]}"
    cluster.core.create_namespace({"metadata": {"name": ns, "labels": {"llmtrain.dev/test": "true"}}})
    # Two pods in the namespace at most: job A's head and worker fit, job B's are refused by
    # the apiserver's ResourceQuota admission (no quota controller runs here, so the test
    # writes the quota's status; admission keeps `used` up to date itself).
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "two-pods", "namespace": ns},
        "spec": {"hard": {"pods": "2"}},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(quota))
    cluster.kubectl(
        "patch",
        "resourcequota",
        "two-pods",
        "-n",
        ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"hard": {"pods": "2"}, "used": {"pods": "0"}}}),
    )
    operator = OperatorProcess(cluster, ns, tmp)
    run = TrainingRun(port=_free_port(), namespace=ns, job="prom-a")
    (tmp / "search").mkdir()  # beside Prometheus' own data/
    search = TuningRun(port=_free_port(), namespace=ns, job="prom-a", tmp=tmp / "search")
    prom = Prometheus(
        binary,
        tmp,
        {
            "llmtrain-operator": (f"127.0.0.1:{operator.metrics_port}", True),
            "llmtrain-train": (f"127.0.0.1:{run.port}", True),
            "llmtrain-tune": (f"127.0.0.1:{search.port}", True),
            "llmtrain-serve": (f"127.0.0.1:{served.port}", False),
        },
    )
    clients: Clients | None = None
    try:
        cluster.wait_for(prom.ready, timeout=30, what="Prometheus ready")
        start = time.time()

        def operator_scraped() -> bool:
            up = _get(
                f"{prom.url}/api/v1/query?query=" + urllib.parse.quote('up{job="llmtrain-operator"} == 1')
            )
            return bool(up["data"]["result"])

        # The operator's histograms are seen at zero before anything happens, so their
        # increase over the range is the test's own activity.
        cluster.wait_for(operator_scraped, timeout=30, what="a first scrape of the operator")
        search.start()  # first: it takes longest (a local Ray, then two trials)
        run.start()
        clients = Clients(served)
        cluster.custom.create_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, gpu_job("prom-a", resources={"workers": 1})
        )
        try:
            cluster.wait_for(
                lambda: (
                    _metric_value(operator.metrics(), "llmtrain_operator_provisioning_duration_seconds_count")
                    >= 1
                ),
                timeout=60,
                what="job A's pods all Running",
            )
        except pytest.fail.Exception as e:
            pytest.fail(f"{e}\noperator log:\n{operator.log()}")
        cluster.custom.create_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, gpu_job("prom-b", resources={"workers": 1})
        )
        cluster.wait_for(
            lambda: _metric_value(operator.metrics(), "llmtrain_operator_reconcile_errors_total") >= 3,
            timeout=60,
            what="reconcile errors from job B's refused pods",
        )
        run.join(timeout=120)
        tuning = search.join(timeout=300)
        clients.close()
        assert clients.answered >= 5, clients.answered
        time.sleep(2 * SCRAPE_SECONDS)  # the operator's newest counts reach Prometheus
        errors = [
            line
            for line in operator.metrics().splitlines()
            if line.startswith("llmtrain_operator_reconcile_errors_total{")
        ]
        print(f"\nthe operator's reconcile errors: {errors}")
        yield Scraped(prom, start, time.time(), {"namespace": ns, "job": "prom-a"}, operator, tuning)
    finally:
        search.stop()
        if clients is not None:
            clients.close()
        prom.stop()
        cluster.kubectl("delete", PLURAL, "--all", "-n", ns, "--wait=true", "--timeout=60s", check=False)
        operator.stop()
        cluster.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)


def test_every_dashboard_query_returns_data_from_a_real_prometheus(scraped: Scraped) -> None:
    from llmtrain.dashboard import MAY_BE_EMPTY_ON_CPU, MAY_BE_EMPTY_WITHOUT_TASK, panel_queries

    shipped = json.loads((ROOT / "charts" / "llmtrain" / "dashboards" / "llmtrain.json").read_text())
    queries = panel_queries(shipped)
    assert len(queries) >= 15
    answers = ask(scraped.prom, queries, scraped.variables, scraped.start, scraped.end)
    report = "\n".join(f"  {a.series:3d} series {a.finite:5d} finite  {a.title}: {a.expr}" for a in answers)
    print(f"\nPrometheus {PROMETHEUS_VERSION}, {scraped.end - scraped.start:.0f} s of data:\n{report}")
    # The scraped job sets no spec.validation.task: the task panel parses but has no series.
    assert answer_problems(answers, MAY_BE_EMPTY_ON_CPU | MAY_BE_EMPTY_WITHOUT_TASK) == [], report
    # The allowlisted panels parsed; on CPU MFU really has no series (unknown, not guessed).
    assert all(a.series == 0 for a in answers if a.title in MAY_BE_EMPTY_ON_CPU)
    # The training series kept their own job/namespace labels through the scrape.
    by_title = {a.title: a for a in answers}
    assert by_title["Loss"].series == 1 and by_title["Data wait"].series == 1
    # The search: a series per trial, one per state, and the best is the driver's best.
    tuning = scraped.tuning
    assert tuning["completed"] == 2 and tuning["planned"] == 2
    assert by_title["Trial metric"].series == 2 and by_title["Trials by state"].series == 4
    r = scraped.prom.query_range(
        f'llmtrain_tune_best_metric{{namespace="{scraped.variables["namespace"]}"}}',
        scraped.start,
        scraped.end,
    )
    (series,) = r["data"]["result"]
    assert round(float(series["values"][-1][1]), 4) == tuning["best"]["metric"]
    # Bits per byte was measured, not a placeholder (a loader without byte counts has none).
    bpb = ask(scraped.prom, [("bpb", "llmtrain_val_bits_per_byte > 0")], {}, scraped.start, scraped.end)
    assert bpb[0].series == 1 and bpb[0].finite > 0


def test_the_variables_list_the_job_from_its_training_and_its_search(scraped: Scraped) -> None:
    """``label_values(selector, label)`` as Grafana asks it (the label's values over the
    series the selector matches): the test's namespace and job are offered, and the search's
    series alone name the job, as they do while a job is still tuning."""
    from llmtrain.dashboard import JOB_SERIES

    shipped = json.loads((ROOT / "charts" / "llmtrain" / "dashboards" / "llmtrain.json").read_text())
    variables = {v["name"]: v["query"] for v in shipped["templating"]["list"] if v["type"] == "query"}

    def values(query: str) -> list[str]:
        selector, label = query[len("label_values(") : -1].rsplit(", ", 1)
        selector = selector.replace("$namespace", scraped.variables["namespace"])
        params = urllib.parse.urlencode({"match[]": selector, "start": scraped.start, "end": scraped.end})
        out: list[str] = _get(f"{scraped.prom.url}/api/v1/label/{label}/values?{params}")["data"]
        return out

    assert scraped.variables["namespace"] in values(variables["namespace"])
    assert values(variables["job"]) == ["prom-a"]
    tuning_only = variables["job"].replace(JOB_SERIES, "llmtrain_tune_trials")
    assert tuning_only != variables["job"] and values(tuning_only) == ["prom-a"]
    # Negative control: a metric nobody exports offers no job.
    assert values(variables["job"].replace(JOB_SERIES, "llmtrain_tune_trial")) == []


def test_a_misspelt_metric_or_broken_query_fails(scraped: Scraped) -> None:
    """Negative control: the check above reports a panel with a misspelt metric (no series)
    and one Prometheus cannot parse."""
    planted = [
        ("Loss", 'max by (namespace, job) (llmtrain_train_los{namespace=~"$namespace", job=~"$job"})'),
        (
            "Step time",
            "histogram_quantile(0.5, sum by (le) (rate(llmtrain_train_step_seconds_bucket[$__rate_interval]))",
        ),
        ("MFU", "avg by (namespace job) (llmtrain_train_mfu_ratio)"),
    ]
    answers = ask(scraped.prom, planted, scraped.variables, scraped.start, scraped.end)
    problems = answer_problems(answers, frozenset({"MFU"}))
    assert len(problems) == 3, problems
    assert "0 series" in problems[0]
    assert "bad_data" in problems[1] and "bad_data" in problems[2]


def test_the_helm_test_hook_passes_against_a_live_operator(scraped: Scraped) -> None:
    """The chart's `helm test` Pod runs its script in the operator image; here the same
    script runs against the live operator above (its URLs pointed at 127.0.0.1), and fails
    against a port where nothing answers (negative control)."""
    from tests.unit.test_helm_chart import of_kind, render

    (pod,) = of_kind(render(), "Pod")
    command = pod["spec"]["containers"][0]["command"]
    assert command[:2] == ["python", "-c"]
    op = scraped.operator
    env = {
        **os.environ,
        "HEALTHZ_URL": f"http://127.0.0.1:{op.live_port}/healthz",
        "METRICS_URL": f"http://127.0.0.1:{op.metrics_port}/metrics",
    }
    r = subprocess.run(
        [sys.executable, "-c", command[2]], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "operator /healthz and /metrics OK" in r.stdout
    # /metrics of something that is not the operator (Prometheus' own) fails the check.
    env["METRICS_URL"] = f"{scraped.prom.url}/metrics"
    r = subprocess.run(
        [sys.executable, "-c", command[2]], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0 and "without llmtrain_operator_jobs" in r.stderr, r.stdout + r.stderr
