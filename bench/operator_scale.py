"""How fast the operator turns N LLMTrainingJobs into Running Ray clusters, against a baseline
that creates the very same objects directly.

For each N (default 100 and 1000 jobs, head + 3 workers each) and each mode, a FRESH local
control plane (tests/cluster: etcd, kube-apiserver, controller-manager, scheduler, kwok) is
started, so neither mode inherits the other's objects:

* ``direct``   — the bench itself creates each job's Secret, ConfigMap, Service,
  NetworkPolicy and 4 pods (the operator's own manifests) from 16 threads;
* ``operator`` — the bench creates N LLMTrainingJob objects from 16 threads and the operator
  (a subprocess, ``python -m llmtrain.operator``, 16 executor threads) does the rest.

A pod watch records when each pod is first seen and first Running. Per job: time from its
submission until all its pods are Running (p50/p99) and until all exist ("pods created":
the operator's own latency; in the direct mode, the submitting thread's); overall: time
until every pod is Running. The
operator's peak RSS is its VmHWM (the figure ``ru_maxrss`` reports). Extra KWOK nodes
with room for 1000 pods each are registered so that scheduling, not capacity, is measured.

    .venv/bin/python bench/operator_scale.py                # 100 and 1000 jobs
    .venv/bin/python bench/operator_scale.py --jobs 20 --no-results   # a quick look

Nothing connects anywhere but the 127.0.0.1 ports the control plane listens on.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "cluster"))

import controlplane  # noqa: E402
from llmtrain.operator import manifests as m  # noqa: E402

from llmtrain.api.job import LLMTrainingJob  # noqa: E402

GROUP, VERSION, PLURAL = "llmtrain.dev", "v1alpha1", "llmtrainingjobs"
THREADS = 16
BENCH_NODES = 8
PODS_PER_BENCH_NODE = 1000


def job_body(name: str, workers: int, pool: str | None = "bench") -> dict[str, Any]:
    """A CPU-only job small enough that 1000 of them fit the fake nodes (of ``pool``)."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMTrainingJob",
        "metadata": {"name": name},
        "spec": {
            "data": {
                "sources": [{"name": "s", "pythonStdlib": {}}],
                "tokenizer": {"train": {"vocabSize": 512}},
                "outputUri": "s3://bench/data",
            },
            "model": {
                "architecture": {"layers": 2, "dModel": 64, "heads": 4, "contextLength": 64},
                "init": {"random": {"seed": 0}},
            },
            "training": {
                "optimizer": {"type": "adamw", "lr": 0.001},
                "schedule": {"warmupSteps": 1},
                "batch": {"globalBatchSize": 4 * workers, "microBatchSize": 4},
                "duration": {"maxSteps": 10},
            },
            "resources": {
                "workers": workers,
                "worker": {"cpu": "100m", "memory": "128Mi"},
                "head": {"cpu": "100m", "memory": "128Mi"},
                "nodeSelector": {"llmtrain.dev/pool": pool} if pool else {},
            },
        },
    }


def bench_nodes(count: int = BENCH_NODES) -> list[dict[str, Any]]:
    cap = {"cpu": "1000", "memory": "4Ti", "pods": str(PODS_PER_BENCH_NODE), "ephemeral-storage": "10Ti"}
    return [
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": f"bench-node-{i}",
                "annotations": {
                    controlplane.KWOK_NODE_ANNOTATION: "fake",
                    "node.alpha.kubernetes.io/ttl": "0",
                },
                "labels": {
                    "kubernetes.io/hostname": f"bench-node-{i}",
                    "type": "kwok",
                    controlplane.POOL_LABEL: "bench",
                },
            },
            "status": {"capacity": cap, "allocatable": cap},
        }
        for i in range(count)
    ]


class PodWatch:
    """Records the first time each pod of a namespace is seen Running."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        from kubernetes import client, watch

        self.core = client.CoreV1Api(api_client)
        self.ns = namespace
        self.running: dict[str, float] = {}
        self.seen: dict[str, float] = {}  # first event of a pod: when it was created
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._watch = watch.Watch()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        rv = self.core.list_namespaced_pod(self.ns).metadata.resource_version
        while not self._stop.is_set():
            try:
                for ev in self._watch.stream(
                    self.core.list_namespaced_pod,
                    self.ns,
                    resource_version=rv,
                    timeout_seconds=30,
                    _request_timeout=60,
                ):
                    pod = ev["object"]
                    rv = pod.metadata.resource_version
                    if pod.metadata.name.startswith("job-"):
                        with self.lock:
                            self.seen.setdefault(pod.metadata.name, time.monotonic())
                    if pod.status and pod.status.phase == "Running" and pod.metadata.name.startswith("job-"):
                        with self.lock:
                            self.running.setdefault(pod.metadata.name, time.monotonic())
                    if self._stop.is_set():
                        return
            except Exception as e:  # a dropped watch: resume from the last version
                if self._stop.is_set():
                    return
                print(f"  (pod watch restarted: {type(e).__name__})", file=sys.stderr)
                rv = self.core.list_namespaced_pod(self.ns).metadata.resource_version

    def count(self) -> int:
        with self.lock:
            return len(self.running)

    def created(self) -> int:
        with self.lock:
            return len(self.seen)

    def stop(self) -> None:
        self._stop.set()
        self._watch.stop()


def _vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of a live process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _free_port() -> int:
    return controlplane.free_port()


def measure(
    cp: controlplane.ControlPlane,
    mode: str,
    n: int,
    workers: int,
    namespace: str,
    timeout: float,
    pool: str | None = "bench",
    operator_source: Path | None = None,
    rate: float = 0.0,
    until_created: float | None = None,
) -> dict[str, Any]:
    """Create n jobs in ``namespace`` (mode direct|operator) and time them until all pods Run.
    ``operator_source``: run the operator from that source tree (see :func:`baseline_source`).
    ``rate``: submit job i at i/rate seconds (0: as fast as the submitting threads go).
    ``until_created``: stop that many seconds after the last pod exists, not when all Run
    (a memory probe at a job count whose fake pods would take too long to start)."""
    from kubernetes import client, config

    api_client = config.new_client_from_config(config_file=str(cp.kubeconfig))
    # Sixteen submitting threads need sixteen connections.
    api_client.rest_client.pool_manager.connection_pool_kw["maxsize"] = THREADS
    core = client.CoreV1Api(api_client)
    net = client.NetworkingV1Api(api_client)
    # Every kind the operator's static children may hold (the direct mode makes the same).
    creators = {
        "Secret": core.create_namespaced_secret,
        "ConfigMap": core.create_namespaced_config_map,
        "Service": core.create_namespaced_service,
        "NetworkPolicy": net.create_namespaced_network_policy,
        "PodDisruptionBudget": client.PolicyV1Api(api_client).create_namespaced_pod_disruption_budget,
    }
    custom = client.CustomObjectsApi(api_client)
    try:
        core.create_namespace({"metadata": {"name": namespace}})
    except client.ApiException as e:
        if e.status != 409:
            raise
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            core.read_namespaced_service_account("default", namespace)
            break
        except client.ApiException:
            time.sleep(0.2)

    op: subprocess.Popen[bytes] | None = None
    op_log = Path(tempfile.mkdtemp(prefix="llmtrain-bench-op-")) / "operator.log"
    if mode == "operator":
        live = _free_port()
        env = cp.env()
        if operator_source is not None:
            env["PYTHONPATH"] = str(operator_source)
        op = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llmtrain.operator",
                "--namespace",
                namespace,
                "--standalone",
                "--liveness-port",
                str(live),
                "--metrics-port",
                str(_free_port()),
                "--bind-address",
                "127.0.0.1",
                "--kubeconfig",
                str(cp.kubeconfig),
            ],
            stdout=open(op_log, "wb"),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=op_log.parent,  # not the repo root: its operator/ would shadow the stdlib module
        )
        t_ready = time.monotonic() + 60
        while True:
            if op.poll() is not None:
                raise RuntimeError(f"operator exited:\n{op_log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{live}/healthz", timeout=1):
                    break
            except OSError:
                if time.monotonic() > t_ready:
                    raise RuntimeError("operator did not become live") from None
                time.sleep(0.2)

    if op is not None:
        # The liveness endpoint answers before Kopf's watches are up; a warm-up job whose
        # pods appear proves the operator is reconciling (it is not counted).
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job_body("warmup", 1, pool))
        t_warm = time.monotonic() + 60
        while not core.list_namespaced_pod(namespace, label_selector=f"{m.LABEL_JOB}=warmup").items:
            if time.monotonic() > t_warm:
                raise RuntimeError(f"operator created no pods:\n{op_log.read_text()[-3000:]}")
            time.sleep(0.1)

    watch = PodWatch(api_client, namespace)
    names = [f"job-{i:04d}" for i in range(n)]
    submitted: dict[str, float] = {}
    settings = m.OperatorSettings()

    slot = {name: i for i, name in enumerate(names)}

    def submit(name: str) -> None:
        if rate > 0:  # job i's slot: i/rate seconds after the start
            wait = t0 + slot[name] / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        body = job_body(name, workers, pool)
        submitted[name] = time.monotonic()
        if mode == "operator":
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
            return
        body["metadata"]["namespace"] = namespace
        job = LLMTrainingJob.model_validate(body)
        for obj in m.static_children(job, settings, os.urandom(32).hex()):
            try:
                create = creators[obj["kind"]]
            except KeyError:
                raise RuntimeError(
                    f"the direct mode cannot create a {obj['kind']}: add it to creators"
                ) from None
            create(namespace, obj)
        for pod in m.pods(job, settings):
            core.create_namespaced_pod(namespace, pod)

    t0 = time.monotonic()
    with ThreadPoolExecutor(THREADS) as submitters:
        list(submitters.map(submit, names))
    t_submitted = time.monotonic() - t0
    total_pods = n * (workers + 1)
    waited = watch.count if until_created is None else watch.created
    while waited() < total_pods:
        if time.monotonic() - t0 > timeout:
            if op is not None:  # never leave the operator running behind
                op.kill()
                op.wait()
            watch.stop()
            raise RuntimeError(
                f"{mode} n={n}: only {waited()}/{total_pods} pods Running (or created) after {timeout}s"
            )
        if op is not None and op.poll() is not None:
            raise RuntimeError(f"operator exited:\n{op_log.read_text()[-3000:]}")
        time.sleep(0.1)
    t_all = time.monotonic() - t0
    if until_created is not None:
        time.sleep(until_created)  # resyncs: status writes, the jobs' bodies grow in the cache
    watch.stop()
    rss = cpu = None
    if op is not None:
        rss = _vm_hwm_mb(op.pid)
        cpu = _cpu_seconds(op.pid)
        op.terminate()
        try:
            op.wait(timeout=20)
        except subprocess.TimeoutExpired:
            op.kill()
            op.wait()
    per_job = []
    to_created = []  # submission → its last pod created: the operator's own latency
    for name in names:
        pods = _pods(name, workers)
        if until_created is None:
            per_job.append(max(watch.running[p] for p in pods) - submitted[name])
        to_created.append(max(watch.seen.get(p, watch.running.get(p, 0.0)) for p in pods) - submitted[name])
    per_job.sort()
    # Jobs whose pods all exist per second, from the first submission to the last pod
    # created: the creation throughput (the API server's, if the operator keeps up with it).
    last_created = max(
        max(watch.seen.get(p, watch.running.get(p, 0.0)) for p in _pods(name, workers)) for name in names
    )
    created_rate = n / max(last_created - t0, 1e-9)
    to_created.sort()
    api_client.close()
    shutil.rmtree(op_log.parent, ignore_errors=True)
    return {
        "mode": mode if operator_source is None else f"{mode}@{operator_source.name}",
        "jobs": n,
        "pods": total_pods,
        "submit_s": round(t_submitted, 2),
        "all_running_s": round(t_all, 2) if until_created is None else None,
        "p50_s": round(statistics.median(per_job), 2) if per_job else None,
        "p99_s": round(per_job[min(len(per_job) - 1, int(0.99 * len(per_job)))], 2) if per_job else None,
        "created_p50_s": round(statistics.median(to_created), 2),
        "created_p99_s": round(to_created[min(len(to_created) - 1, int(0.99 * len(to_created)))], 2),
        "created_jobs_per_s": round(created_rate, 1),
        "operator_peak_rss_mb": round(rss, 1) if rss is not None else None,
        "operator_cpu_s": round(cpu, 1) if cpu is not None else None,
    }


def _pods(job: str, workers: int) -> list[str]:
    return [m.head_name(job)] + [m.worker_name(job, i) for i in range(workers)]


def _bench_nodes_ready(cp: controlplane.ControlPlane) -> int:
    nodes = cp.api("GET", "/api/v1/nodes?labelSelector=llmtrain.dev%2Fpool%3Dbench")["items"]
    return sum(
        any(c["type"] == "Ready" and c["status"] == "True" for c in nd["status"].get("conditions", []))
        for nd in nodes
    )


def fresh_control_plane(workdir: Path, nodes: int = BENCH_NODES) -> controlplane.ControlPlane:
    cp = controlplane.ControlPlane(workdir=workdir).start()
    try:
        for node in bench_nodes(nodes):
            cp.api("POST", "/api/v1/nodes", node)
        fresh_crd(cp)
        deadline = time.monotonic() + 60
        while _bench_nodes_ready(cp) < nodes:
            if time.monotonic() > deadline:
                raise RuntimeError("the bench nodes did not become Ready")
            time.sleep(0.2)
    except BaseException:
        cp.stop(keep_logs=False)  # never leave a control plane running behind
        raise
    return cp


def fresh_crd(cp: controlplane.ControlPlane) -> None:
    """Apply the LLMTrainingJob CRD (``llmtrain crd``) and wait until it is served."""
    from llmtrain.api.crd import crd_yaml

    cp.kubectl("apply", "-f", "-", input=crd_yaml())
    deadline = time.monotonic() + 60

    def established() -> bool:
        crd = cp.api(
            "GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/llmtrainingjobs.llmtrain.dev"
        )
        conds = (crd.get("status") or {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conds)

    while not established():
        if time.monotonic() > deadline:
            raise RuntimeError("the LLMTrainingJob CRD did not become Established")
        time.sleep(0.1)


def baseline_source(rev: str, into: Path) -> Path:
    """The operator (and the llmtrain package it imports) of commit ``rev``, laid out as
    the installed package is (``operator/`` is ``llmtrain.operator``), for PYTHONPATH: the
    editable install's finder comes after PYTHONPATH, so that process imports ``rev``'s code.
    Before and after then run in one bench run, under the same load."""
    sha = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    root = into / sha
    src = into / "src"
    src.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", sha, "llmtrain", "operator"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    root.mkdir()
    (src / "llmtrain").rename(root / "llmtrain")
    (src / "operator").rename(root / "llmtrain" / "operator")
    return root


def run(
    jobs: list[int],
    workers: int,
    timeout: float,
    modes: tuple[str, ...] = ("direct", "operator"),
    baseline: str | None = None,
    rate: float = 0.0,
    until_created: float | None = None,
) -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory(prefix="llmtrain-bench-src-") as srcdir:
        before = baseline_source(baseline, Path(srcdir)) if baseline else None
        # (mode, operator source): the baseline's operator runs right before this tree's.
        plan: list[tuple[str, Path | None]] = []
        for mode in modes:
            if mode == "operator" and before is not None:
                plan.append((mode, before))
            plan.append((mode, None))
        for n in jobs:
            for mode, source in plan:
                with tempfile.TemporaryDirectory(prefix="llmtrain-bench-cp-") as d:
                    # Room for every pod (1000 per fake node), 8 nodes at least.
                    nodes = max(BENCH_NODES, -(-n * (workers + 1) // PODS_PER_BENCH_NODE))
                    cp = fresh_control_plane(Path(d), nodes)
                    try:
                        r = measure(
                            cp,
                            mode,
                            n,
                            workers,
                            f"bench-{mode}",
                            timeout,
                            operator_source=source,
                            rate=rate,
                            until_created=until_created,
                        )
                    finally:
                        cp.stop(keep_logs=False)
                r["rate"] = rate
                r["load1"] = round(os.getloadavg()[0], 1)
                print(json.dumps(r), flush=True)
                results.append(r)
    return results


def markdown(results: list[dict[str, Any]], workers: int) -> str:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    lines = [
        f"## Operator scale (bench/operator_scale.py) — {dt.date.today().isoformat()}, commit {commit}",
        "",
        "Machine: 2 cores / 24 GiB, no GPU (shared), Python "
        f"{platform.python_version()}; local control plane (etcd, kube-apiserver/KCM/scheduler v1.35.4, "
        f"kwok) on 127.0.0.1, a fresh one per row; jobs of 1 head + {workers} workers (CPU-only; fake "
        "nodes of 1000 pods each, 8 at least); 16 submitting threads in both modes"
        + (f", paced at {results[0]['rate']} jobs/s" if results and results[0].get("rate") else "")
        + "; operator reconcile interval 5 s, 16 reconcile threads (4 of them for new jobs since 4b44fc9).",
        "",
        "| jobs | pods | mode | submit (s) | all pods Running (s) | per job p50 (s) | per job p99 (s) | "
        "pods created p50 / p99 (s) | created jobs/s | operator peak RSS (MB) | operator CPU (s) | load (1 min) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['jobs']} | {r['pods']} | {r['mode']} | {r['submit_s']} | {r['all_running_s']} | "
            f"{r['p50_s']} | {r['p99_s']} | {r['created_p50_s']} / {r['created_p99_s']} | {r['created_jobs_per_s']} | "
            f"{r['operator_peak_rss_mb'] or '–'} | {r['operator_cpu_s'] or '–'} | {r.get('load1', '–')} |"
        )
    lines.append("")
    by_n: dict[int, dict[str, dict[str, Any]]] = {}
    for r in results:
        by_n.setdefault(r["jobs"], {})[r["mode"]] = r
    for n, modes in by_n.items():
        direct = modes.get("direct")
        for name, r in modes.items():
            if (
                not name.startswith("operator")
                or direct is None
                or None in (r["all_running_s"], direct["all_running_s"])
            ):
                continue
            ratio = r["all_running_s"] / max(direct["all_running_s"], 1e-9)
            lines.append(
                f"- {n} jobs, {name}: time to all Running **{ratio:.2f}×** direct's (goal ≤ 1.1×); "
                f"apply → pods created p50 / p99 {r['created_p50_s']} / {r['created_p99_s']} s "
                f"(goal ≤ 2 / 5 s at 1000); peak RSS {r['operator_peak_rss_mb']} MB."
            )
    lines.append(
        "- Anchor: KubeRay readies 100 RayClusters in 83 s and 1000 in 258 s on GKE (real kubelets and "
        "images); here pods are fake (kwok), so the figures measure the control path only."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--no-results", action="store_true", help="do not append to bench/RESULTS.md")
    ap.add_argument(
        "--modes",
        nargs="+",
        choices=["direct", "operator"],
        default=["direct", "operator"],
        help="one mode alone is for diagnosis (no ratio; with --no-results)",
    )
    ap.add_argument(
        "--baseline",
        metavar="REV",
        help="also run the operator of commit REV (before) right before this tree's (after), "
        "each on a fresh control plane",
    )
    ap.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="submit this many jobs per second (both modes), not as fast as 16 threads go: "
        "below the API server's creation rate, the wait left is the operator's own",
    )
    ap.add_argument(
        "--until-created",
        type=float,
        metavar="SECONDS",
        help="stop SECONDS after the last pod exists instead of when all Run (an RSS probe at "
        "3000 jobs: the fake pods' start is kwok's work, not the operator's)",
    )
    a = ap.parse_args(argv)
    missing = controlplane.missing_binaries()
    if missing:
        sys.exit("control-plane binaries missing (run tests/cluster/build.sh): " + ", ".join(missing))
    results = run(a.jobs, a.workers, a.timeout, tuple(a.modes), a.baseline, a.rate, a.until_created)
    text = markdown(results, a.workers)
    print(text)
    if not a.no_results:
        with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
