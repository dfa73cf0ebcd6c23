"""``make k8s-demo``: an LLMTrainingJob trained through the operator, on one machine.

By default on a **real node** (``tests/realcluster.py``): the control plane in node mode, a
kubelet + containerd node in the network namespace ``llmtrain-node``, the operator installed
by Helm and running as a pod from the image ``make images`` built, moto S3 on the node link;
the job's head and worker pods run the runtime image and train. It applies
``examples/k8s-demo.yaml``, prints ``kubectl get ltj -w`` until the job ends, then
``kubectl get pods -o wide`` as it was during training and ``kubectl describe ltj``.

``--standin`` (machines without a container runtime) stands up instead (the same pieces the
KWOK integration tests use, nothing mocked):

1. the local control plane (``tests/cluster/run.sh up``: kube-apiserver, etcd, scheduler,
   controller-manager, KWOK GPU and CPU nodes);
2. the Helm chart: CRDs, the operator's ServiceAccount and least-privilege RBAC;
3. moto's S3 server on 127.0.0.1 (data, checkpoints, logs and the export go there);
4. a real local Ray cluster with token auth standing in for the job's KWOK pods, which
   run no processes (``tests/raystandin.py``);
5. the operator, as the chart's ServiceAccount (a token from the TokenRequest API), told
   to reach every job's head on the stand-in;

then applies ``examples/k8s-demo.yaml``, prints ``kubectl get ltj -w`` until the job ends,
and ``kubectl describe ltj``. ``--keep`` leaves everything running (Ctrl-C stops it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "cluster"))
sys.path.append(str(ROOT))  # tests.raystandin; appended: operator/ must not shadow the stdlib's

from controlplane import ControlPlane, cache_dir  # noqa: E402

from tests import realcluster  # noqa: E402
from tests.raystandin import RayStandIn, free_port  # noqa: E402

NAMESPACE = "llmtrain-system"
JOB = ROOT / "examples" / "k8s-demo.yaml"


def say(msg: str) -> None:
    print(f"\033[1m==> {msg}\033[0m", flush=True)


def start_moto(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    exe = Path(sys.executable).parent / "moto_server"
    port = free_port()
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    raise SystemExit("moto_server did not start")


def service_account_kubeconfig(cp: ControlPlane, out: Path) -> Path:
    """A kubeconfig that authenticates as the chart's ServiceAccount (TokenRequest API)."""
    token = cp.kubectl("create", "token", "llmtrain", "-n", NAMESPACE, "--duration=24h").stdout.strip()
    admin = json.loads(cp.kubectl("config", "view", "--raw", "-o", "json").stdout)
    cluster = admin["clusters"][0]
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": "llmtrain-operator", "user": {"token": token}}],
        "contexts": [
            {"name": "operator", "context": {"cluster": cluster["name"], "user": "llmtrain-operator"}}
        ],
        "current-context": "operator",
    }
    out.write_text(json.dumps(cfg))
    return out


def watch_job(
    kenv: dict[str, str], name: str, namespace: str, timeout: float, during_training: Callable[[], None]
) -> tuple[str, float | None]:
    """Print `kubectl get ltj -w` until the job ends; the seconds to the first step in status."""
    applied_at = time.monotonic()
    watch = subprocess.Popen(
        ["kubectl", "get", "ltj", "-n", namespace, "-w"], env=kenv, stdout=subprocess.PIPE, text=True
    )
    first_step: float | None = None
    phase = ""
    assert watch.stdout is not None
    deadline = time.monotonic() + timeout
    for line in watch.stdout:
        print(line, end="", flush=True)
        cols = line.split()
        if len(cols) > 1 and cols[0] == name:
            phase = cols[1]
            if (
                first_step is None
                and phase == "Training"
                and len(cols) > 3
                and cols[3].isdigit()
                and int(cols[3]) > 0
            ):
                first_step = time.monotonic() - applied_at
                during_training()
        if phase in ("Succeeded", "Failed") or time.monotonic() > deadline:
            break
    watch.terminate()
    return phase, first_step


def real_node(args: argparse.Namespace, work: Path) -> int:
    t0 = time.monotonic()
    reason = realcluster.skip_reason()
    if reason:
        raise SystemExit(f"the real node cannot run here: {reason} (or run with --standin)")
    rc = realcluster.RealCluster(work)
    try:
        say(
            "control plane (node mode) + a real node in netns llmtrain-node: containerd, kubelet, kube-proxy, CoreDNS, NetworkPolicy engine"
        )
        say(
            "helm install llmtrain charts/llmtrain (the operator runs as a pod from ghcr.io/llmtrain/llmtrain-operator:0.1.0); moto S3 on the node link"
        )
        rc.start()
        kenv = {**os.environ, **rc.env}
        print(rc.kubectl("get", "nodes,pods", "-n", NAMESPACE, "-o", "wide").stdout, flush=True)
        rc.namespace_with_s3("default")
        text = rc.job_text(args.job)
        name = text.split("name:", 1)[1].split()[0]
        say(f"kubectl apply -f {args.job.relative_to(ROOT) if args.job.is_relative_to(ROOT) else args.job}")
        subprocess.run(["kubectl", "apply", "-f", "-"], input=text.encode(), env=kenv, check=True)
        say("kubectl get ltj -w")
        pods_seen: list[str] = []

        def show_pods() -> None:
            pods_seen.append(rc.kubectl("get", "pods", "-o", "wide").stdout)

        phase, first_step = watch_job(kenv, name, "default", args.timeout, show_pods)
        if pods_seen:
            say("kubectl get pods -o wide (at the first training step)")
            print(pods_seen[0], flush=True)
        say(f"kubectl describe ltj {name}")
        subprocess.run(["kubectl", "describe", "ltj", name], env=kenv)
        total = time.monotonic() - t0
        ready = rc.timings.get("operator ready", 0.0)
        say(
            f"{name}: {phase} — demo wall time {total:.0f} s (node + operator ready in {ready:.0f} s)"
            + (
                f", apply → first training step in status {first_step:.0f} s"
                if first_step is not None
                else ""
            )
        )
        if args.keep:
            say(f"still running: KUBECONFIG={rc.cp.kubeconfig if rc.cp else ''} (Ctrl-C stops everything)")
            signal.pause()
        return 0 if phase == "Succeeded" else 1
    except KeyboardInterrupt:
        return 130
    finally:
        rc.stop(keep_logs=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", type=Path, default=JOB, help="the LLMTrainingJob to apply")
    p.add_argument("--keep", action="store_true", help="leave everything running at the end")
    p.add_argument("--timeout", type=float, default=1200, help="seconds to wait for the job")
    p.add_argument(
        "--standin",
        action="store_true",
        help="KWOK pods + a local Ray cluster standing in for them (no container runtime needed)",
    )
    args = p.parse_args()
    # SIGTERM (and SIGINT, which a shell's `&` leaves ignored) tear everything down as Ctrl-C does.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.default_int_handler)
    work = cache_dir() / "run" / "k8s-demo"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return run_standin(args, work) if args.standin else real_node(args, work)


def run_standin(args: argparse.Namespace, work: Path) -> int:
    t0 = time.monotonic()
    env = {
        **os.environ,
        # moto's dummy credentials, as a pod would get them from spec.storage.secretRef.
        "AWS_ACCESS_KEY_ID": "demo",
        "AWS_SECRET_ACCESS_KEY": "demo",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update(
        {k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    )
    procs: list[subprocess.Popen[bytes]] = []
    standin: RayStandIn | None = None
    cp = ControlPlane(work / "cluster")
    try:
        say("control plane (tests/cluster): apiserver, etcd, scheduler, controller-manager, KWOK nodes")
        cp.start()
        kenv = {**env, **cp.env()}
        say("helm install llmtrain charts/llmtrain (CRDs, ServiceAccount, RBAC)")
        subprocess.run(
            [
                "helm",
                "install",
                "llmtrain",
                str(ROOT / "charts" / "llmtrain"),
                "-n",
                NAMESPACE,
                "--create-namespace",
            ],
            env=kenv,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        say("moto S3 on 127.0.0.1")
        moto, endpoint = start_moto(env)
        procs.append(moto)
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="llmtrain")
        say("a local Ray cluster (token auth) standing in for the job's KWOK pods")
        standin = RayStandIn(num_cpus=os.cpu_count() or 2, workdir=work).start()
        standin.mirror_specs(cp.kubeconfig)  # the kubelet's part: spec ConfigMap → the driver's file
        say("the operator, as ServiceAccount llmtrain-system/llmtrain")
        kubeconfig = service_account_kubeconfig(cp, work / "operator.kubeconfig")
        op_log = open(work / "operator.log", "wb")
        operator = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "llmtrain"),
                "operator",
                "--standalone",
                "--kubeconfig",
                str(kubeconfig),
                # Polls each head every second: the demo's export stage lasts ~2 s.
                "--interval",
                "1",
                "--liveness-port",
                str(free_port()),
                "--metrics-port",
                str(free_port()),
                "--bind-address",
                "127.0.0.1",
                *standin.operator_args(),
            ],
            stdout=op_log,
            stderr=subprocess.STDOUT,
            env=kenv,
            cwd=work,
        )
        procs.append(operator)
        # The Secret the job's spec.storage.secretRef names (the stand-in Ray reads the same
        # dummy credentials from its environment).
        subprocess.run(
            [
                "kubectl",
                "create",
                "secret",
                "generic",
                realcluster.S3_SECRET,
                "-n",
                "default",
                "--from-literal=AWS_ACCESS_KEY_ID=demo",
                "--from-literal=AWS_SECRET_ACCESS_KEY=demo",
            ],
            env=kenv,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        text = args.job.read_text().replace("http://S3_ENDPOINT", endpoint)
        say(f"kubectl apply -f {args.job.relative_to(ROOT) if args.job.is_relative_to(ROOT) else args.job}")
        subprocess.run(["kubectl", "apply", "-f", "-"], input=text.encode(), env=kenv, check=True)
        name = text.split("name:", 1)[1].split()[0]
        say("kubectl get ltj -w")
        phase, first_step = watch_job(kenv, name, "default", args.timeout, lambda: None)
        say(f"kubectl describe ltj {name}")
        subprocess.run(["kubectl", "describe", "ltj", name], env=kenv)
        total = time.monotonic() - t0
        say(
            f"{name}: {phase} — demo wall time {total:.0f} s, apply → first training step in status "
            f"{first_step:.0f} s"
            if first_step is not None
            else f"{name}: {phase} — demo wall time {total:.0f} s"
        )
        if args.keep:
            say(f"still running: KUBECONFIG={cp.kubeconfig} (Ctrl-C stops everything)")
            signal.pause()
        return 0 if phase == "Succeeded" else 1
    except KeyboardInterrupt:
        return 130
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if standin is not None:
            standin.stop()
        cp.stop()


if __name__ == "__main__":
    sys.exit(main())
