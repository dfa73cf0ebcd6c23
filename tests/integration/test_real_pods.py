"""The product in real containers on a real node (issue 23): nothing stands in for anything.

The module starts ``tests/realcluster.py``: the control plane in node mode, the node
(containerd, kubelet, kube-proxy, CoreDNS, kube-network-policies) in the network namespace
``llmtrain-node``, the operator installed by Helm **as a pod** from the image ``make images``
built, and moto S3 on the node link. Then, as a user would:

* ``test_train_recover_serve``: a small CPU job trains in head and worker pods of the runtime
  image (uid 65532, Ray token auth, the driver submitted through the head Service). Mid-run the
  job's NetworkPolicy is checked from a pod in another namespace (refused; with the policy
  deleted, admitted: the negative control), the operator pod is deleted (its successor takes
  over, no second submission), the worker pod is deleted (recreated, same attempt), the head
  pod is deleted (attempt 2 resumes from ``status.checkpoint.latestUri``). It ends Succeeded
  with the export in S3, and ``serve:`` answers the official ``openai`` client through its
  Service's DNS name.
* ``test_wrong_image_then_fixed``: ``spec.resources.image: does-not/exist:1`` stays
  Provisioning with the image and the pull error named; the fixed image proceeds.

Skipped with the reason when not root, or the node binaries or the images are missing
(``tests/cluster/build.sh all``, ``make images``).
"""

from __future__ import annotations

import ipaddress
import json
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from tests import realcluster  # noqa: E402

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

T = TypeVar("T")
POD_NET = ipaddress.ip_network("10.245.0.0/24")
CLIENT_IMAGE = realcluster.RUNTIME_IMAGE


@pytest.fixture(scope="module")
def rc(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[realcluster.RealCluster]:
    reason = realcluster.skip_reason()
    if reason:
        pytest.skip(reason)
    c = realcluster.RealCluster(tmp_path_factory.mktemp("realnode"), die_with_parent=True)
    try:
        c.start()
    except Exception as e:
        pytest.fail(f"real node cluster failed to start: {e}")
    print(f"\nreal node + operator ready: {c.timings}")
    yield c
    failed = request.session.testsfailed > 0
    if failed:
        print(c.logs_summary(40))
    c.stop(keep_logs=failed)


def wait(fn: Callable[[], T], timeout: float, what: str, interval: float = 1.0) -> T:
    try:
        return realcluster.wait_for(fn, timeout, what, interval)
    except TimeoutError as e:
        pytest.fail(str(e))


_NAMESPACES: list[str] = []


@pytest.fixture(autouse=True)
def _namespaces_go(rc: realcluster.RealCluster) -> Iterator[None]:
    """Each test's namespaces (its jobs, their pods and model servers) are gone before the next
    test starts: the node has 2 CPUs, and a model server left running made the next job's
    worker unschedulable."""
    yield
    if _NAMESPACES:
        rc.kubectl(
            "delete", "namespace", *_NAMESPACES, "--wait=true", "--timeout=300s", check=False, timeout=330
        )
        _NAMESPACES.clear()


def fresh_namespace(rc: realcluster.RealCluster, prefix: str) -> str:
    ns = f"{prefix}-{uuid.uuid4().hex[:5]}"
    rc.namespace_with_s3(ns)
    _NAMESPACES.append(ns)
    return ns


def upload_corpus(rc: realcluster.RealCluster, prefix: str) -> str:
    """~1 MB of text in S3: modules of this interpreter's standard library."""
    s3 = rc.s3()
    stdlib = Path(json.__file__).resolve().parents[1]
    files = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size > 20_000)[:40]
    for p in files:
        s3.put_object(Bucket=realcluster.BUCKET, Key=f"{prefix}/corpus/{p.stem}.txt", Body=p.read_bytes())
    return f"s3://{realcluster.BUCKET}/{prefix}/corpus/"


def job_manifest(name: str, ns: str, corpus: str, endpoint: str, **resources: Any) -> dict[str, Any]:
    base = f"s3://{realcluster.BUCKET}/{ns}/{name}"
    return {
        "apiVersion": "llmtrain.dev/v1alpha1",
        "kind": "LLMTrainingJob",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "data": {
                "sources": [{"name": "stdlib", "s3": {"uri": corpus}}],
                "tokenizer": {"train": {"vocabSize": 512}},
                "outputUri": f"{base}/data",
                "validationFraction": 0.05,
            },
            # ~0.25 s a step on the worker's one CPU: ~150 s of training, long enough for the
            # losses the test inflicts mid-run (each costs ~30–90 s of recovery).
            "model": {
                "architecture": {"layers": 4, "dModel": 192, "heads": 6, "kvHeads": 3, "contextLength": 128}
            },
            "training": {
                "batch": {"globalBatchSize": 8, "microBatchSize": 8},
                "duration": {"maxSteps": 600},
                "logEverySteps": 5,
            },
            "validation": {"everySteps": 100, "batches": 2},
            "checkpoint": {"uri": f"{base}/checkpoints", "everySteps": 25, "keepLast": 3},
            "export": {"uri": f"{base}/model"},
            "storage": {
                "endpoint": endpoint,
                "region": "us-east-1",
                "secretRef": {"name": realcluster.S3_SECRET},
            },
            "resources": {
                "workers": 1,
                # The node has 2 CPUs: head + worker + the operator's 100m. A head throttled
                # harder than this starved its GCS under the driver's load, and the GCS then
                # declared the worker dead (its raylet exits): an extra restart.
                "head": {"cpu": "800m", "memory": "3Gi"},
                "worker": {"cpu": "1", "memory": "4Gi"},
                **resources,
            },
            "serve": {"port": 8000, "resources": {"cpu": "500m", "memory": "2Gi"}},
        },
    }


def apply(rc: realcluster.RealCluster, manifest: dict[str, Any]) -> None:
    rc.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))


def status(rc: realcluster.RealCluster, name: str, ns: str) -> dict[str, Any]:
    return dict(rc.ltj(name, ns).get("status") or {})


def step(rc: realcluster.RealCluster, name: str, ns: str) -> int:
    return int(status(rc, name, ns).get("progress", {}).get("step") or 0)


def pod(rc: realcluster.RealCluster, name: str, ns: str) -> dict[str, Any]:
    return rc.get("pod", name, ns) or {}


def running_ip(rc: realcluster.RealCluster, name: str, ns: str) -> str:
    p = pod(rc, name, ns)
    return (
        str(p.get("status", {}).get("podIP") or "") if p.get("status", {}).get("phase") == "Running" else ""
    )


def connect_from_pod(rc: realcluster.RealCluster, ns: str, ip: str, port: int, labels: str = "") -> str:
    """A pod of the runtime image in ``ns`` tries a TCP connect (3 s timeout): its log line."""
    name = f"probe-{uuid.uuid4().hex[:5]}"
    script = textwrap.dedent(f"""
        import socket
        try:
            socket.create_connection(("{ip}", {port}), timeout=3).close()
            print("CONNECTED")
        except OSError as e:
            print("REFUSED", type(e).__name__, e)
    """)
    args = ["run", name, "-n", ns, f"--image={CLIENT_IMAGE}", "--image-pull-policy=IfNotPresent"]
    args += ["--restart=Never", "--command", "--", "python", "-c", script]
    if labels:
        args.insert(2, f"--labels={labels}")  # before `-n ns`, after the pod's name
    rc.kubectl(*args)
    wait(
        lambda: pod(rc, name, ns).get("status", {}).get("phase") in ("Succeeded", "Failed"),
        120,
        f"pod {name}",
    )
    out = rc.kubectl("logs", "-n", ns, name).stdout.strip()
    rc.kubectl("delete", "pod", name, "-n", ns, "--wait=false")
    return out


def ray_jobs_on_head(rc: realcluster.RealCluster, name: str, ns: str) -> list[str]:
    """The submission ids the head's Jobs API lists (asked from inside the node's namespace,
    with the job's token, as the operator asks)."""
    import base64

    secret = rc.get("secret", f"{name}-ray-auth", ns) or {}
    token = base64.b64decode(secret["data"]["token"]).decode()
    ip = running_ip(rc, f"{name}-head", ns)
    r = rc.in_node(
        "curl", "-sf", "-m", "10", "-H", f"Authorization: Bearer {token}", f"http://{ip}:8265/api/jobs/"
    )
    return sorted(j.get("submission_id") or "" for j in json.loads(r.stdout))


def test_train_recover_serve(rc: realcluster.RealCluster) -> None:
    ns = fresh_namespace(rc, "train")
    name = "tiny"
    corpus = upload_corpus(rc, ns)
    t0 = time.monotonic()
    manifest = job_manifest(name, ns, corpus, rc.s3_endpoint)
    # Two restarts are this test's own doing; room for one more that a loaded 2-core machine
    # may add (a raylet the GCS declared dead), which the job must also survive.
    manifest["spec"]["backoffLimit"] = 5
    apply(rc, manifest)

    # 1. Real pods: Running, real IPs on the node's pod network, the image's uid.
    head, worker = f"{name}-head", f"{name}-worker-0"
    wait(lambda: running_ip(rc, head, ns) and running_ip(rc, worker, ns), 300, "head and worker Running")
    for p in (head, worker):
        assert ipaddress.ip_address(running_ip(rc, p, ns)) in POD_NET
        assert rc.kubectl("exec", "-n", ns, p, "-c", "ray", "--", "id", "-u").stdout.strip() == "65532"
    wait(lambda: step(rc, name, ns) > 0, 600, "the first training step in status")
    print(f"apply → first step in status: {time.monotonic() - t0:.0f} s")
    print(rc.kubectl("get", "pods", "-n", ns, "-o", "wide").stdout)
    wait(lambda: status(rc, name, ns).get("checkpoint", {}).get("latestUri"), 300, "a checkpoint")

    # 2. The operator pod goes: its successor takes over with no second submission.
    before = step(rc, name, ns)
    rc.kubectl(
        "delete", "pod", "-n", realcluster.NAMESPACE, "-l", "app.kubernetes.io/name=llmtrain", "--wait=false"
    )
    wait(lambda: step(rc, name, ns) > before, 300, "progress from the new operator pod")
    jobs = ray_jobs_on_head(rc, name, ns)
    print(f"Ray jobs on the head after the operator's restart: {jobs}")
    assert jobs == [f"{name}-1"], jobs

    # 3. The worker pod goes: recreated, the run goes on in the same attempt.
    before = step(rc, name, ns)
    worker_uid = pod(rc, worker, ns)["metadata"]["uid"]
    rc.kubectl("delete", "pod", worker, "-n", ns, "--wait=false")
    wait(
        lambda: pod(rc, worker, ns).get("metadata", {}).get("uid") not in (None, worker_uid),
        120,
        "a new worker pod",
    )
    wait(lambda: step(rc, name, ns) > before + 5, 600, "training to go on after the worker's loss")
    st = status(rc, name, ns)
    print(
        f"after the worker's loss: attempt {st.get('attempt')}, {st.get('rayJob')}, restarts {st.get('restarts')}"
    )
    assert st["rayJob"]["submissionId"] == f"{name}-1" and st["restarts"] == 1

    # 4. The head pod goes: attempt 2 resumes from the newest checkpoint.
    latest = status(rc, name, ns)["checkpoint"]["latestStep"]
    rc.kubectl("delete", "pod", head, "-n", ns, "--wait=false")
    wait(
        lambda: (status(rc, name, ns).get("rayJob") or {}).get("submissionId") == f"{name}-2",
        300,
        "attempt 2",
    )
    wait(lambda: (status(rc, name, ns).get("checkpoint") or {}).get("resumedFrom"), 600, "attempt 2 resuming")
    resumed = status(rc, name, ns)["checkpoint"]["resumedFrom"]
    print(f"attempt 2 resumed from {resumed}")
    assert resumed["step"] >= latest
    st = status(rc, name, ns)
    assert st["attempt"] == 2 and st["restarts"] == 2, st
    jobs = ray_jobs_on_head(rc, name, ns)
    print(f"Ray jobs on the new head: {jobs}")
    assert jobs == [f"{name}-2"], jobs  # one Ray job per attempt, none resubmitted under an old id

    # 5. Succeeded, the export in S3, and the model server answers the openai client.
    wait(lambda: status(rc, name, ns).get("phase") in ("Succeeded", "Failed"), 900, "the job to end")
    st = status(rc, name, ns)
    assert st["phase"] == "Succeeded", st.get("conditions")
    keys = [
        o["Key"]
        for o in rc.s3()
        .list_objects_v2(Bucket=realcluster.BUCKET, Prefix=f"{ns}/{name}/model/")
        .get("Contents", [])
    ]
    assert any(k.endswith("config.json") for k in keys), keys
    print(rc.kubectl("get", "ltj", "-n", ns, "-o", "wide").stdout)
    wait(
        lambda: (status(rc, name, ns).get("serving") or {}).get("readyReplicas"),
        600,
        "the model server ready",
    )
    url = status(rc, name, ns)["serving"]["url"]
    answer = openai_completion(rc, url, name)
    print(f"openai client via {url}: {answer}")
    assert answer["model"] == name and answer["finish_reason"] in ("stop", "length"), answer
    assert answer["completion_tokens"] >= 1 or answer["finish_reason"] == "stop", answer


def openai_completion(rc: realcluster.RealCluster, base_url: str, model: str) -> dict[str, Any]:
    """The official openai client inside the node's namespace, resolving the Service's name
    through the cluster DNS, as a client pod would: the answer's model, text, finish reason and
    token count (a small model may well stop at once: the text alone proves nothing)."""
    script = textwrap.dedent(f"""
        import json
        from openai import OpenAI
        c = OpenAI(base_url="{base_url}", api_key="unused", timeout=60, max_retries=2)
        r = c.completions.create(model="{model}", prompt="import ", max_tokens=16, temperature=0)
        print(json.dumps({{"model": r.model, "text": r.choices[0].text,
                          "finish_reason": r.choices[0].finish_reason,
                          "completion_tokens": r.usage.completion_tokens if r.usage else None}}))
    """)
    path = rc.workdir / "openai_client.py"
    path.write_text(script)
    r = rc.in_node_with_cluster_dns(f"{sys.executable} {path}", timeout=180)
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


def test_wrong_image_then_fixed(rc: realcluster.RealCluster) -> None:
    ns = fresh_namespace(rc, "image")
    name = "badimage"
    corpus = upload_corpus(rc, ns)
    manifest = job_manifest(name, ns, corpus, rc.s3_endpoint, image="does-not/exist:1")
    apply(rc, manifest)

    def pull_error() -> dict[str, Any] | None:
        for c in status(rc, name, ns).get("conditions", []):
            if "does-not/exist:1" in c.get("message", "") and (
                "ErrImagePull" in c["message"]
                or "ImagePullBackOff" in c["message"]
                or "pull" in c["message"].lower()
            ):
                return dict(c)
        return None

    cond = wait(pull_error, 180, "a condition naming the image and the pull error")
    print(f"condition: {cond}")
    assert status(rc, name, ns)["phase"] == "Provisioning"
    events = rc.kubectl("get", "events", "-n", ns, "--field-selector", f"involvedObject.name={name}").stdout
    print(events)
    assert "does-not/exist:1" in events
    manifest["spec"]["resources"]["image"] = realcluster.RUNTIME_IMAGE
    apply(rc, manifest)
    wait(
        lambda: status(rc, name, ns).get("phase") in ("Preprocessing", "Training", "Exporting", "Succeeded"),
        600,
        "the fixed job to proceed",
    )


def test_network_policy(rc: realcluster.RealCluster) -> None:
    """The job's NetworkPolicy, enforced by a real engine: a pod of another namespace is refused
    the head's Jobs API (8265); the job's own pods and the operator connect. Negative control:
    with the policy deleted (the operator scaled to 0 meanwhile, or it would recreate it at
    once) the same pod connects. The job's worker asks 8 CPUs of a 2-CPU node, so the head runs
    and the job waits, Unschedulable, for as long as the test needs."""
    ns = fresh_namespace(rc, "policy")
    other = fresh_namespace(rc, "other")
    name = "fenced"
    corpus = upload_corpus(rc, ns)
    apply(rc, job_manifest(name, ns, corpus, rc.s3_endpoint, worker={"cpu": "8", "memory": "4Gi"}))
    head = f"{name}-head"
    head_ip = wait(lambda: running_ip(rc, head, ns), 300, "the head Running")
    wait(lambda: rc.get("networkpolicy", f"{name}-ray", ns), 60, "the job's NetworkPolicy")
    reason = wait(lambda: running_reason(rc, name, ns) == "Unschedulable", 120, "Unschedulable")
    assert reason

    # Running is not listening: Ray's dashboard (8265) comes up some seconds after the pod
    # runs; the operator, which the policy admits, tells when it does.
    operator = wait(
        lambda: (r := operator_connect(rc, head_ip, 8265)) == "CONNECTED" and r, 180, "8265 to listen"
    )
    refused = connect_from_pod(rc, other, head_ip, 8265)
    own = connect_from_pod(rc, ns, head_ip, 8265, labels=f"llmtrain.dev/job={name}")
    print(f"to {head}:8265 with the policy: other namespace {refused}; own pod {own}; operator {operator}")
    assert refused.startswith("REFUSED") and own == "CONNECTED" and operator == "CONNECTED"

    rc.kubectl("scale", "deploy/llmtrain", "-n", realcluster.NAMESPACE, "--replicas=0")
    try:
        rc.kubectl("delete", "networkpolicy", f"{name}-ray", "-n", ns)
        admitted = connect_from_pod(rc, other, head_ip, 8265)
        print(f"other namespace → {head}:8265 without the policy: {admitted}")
        assert admitted == "CONNECTED", admitted
    finally:
        rc.kubectl("scale", "deploy/llmtrain", "-n", realcluster.NAMESPACE, "--replicas=1")
    wait(
        lambda: rc.get("networkpolicy", f"{name}-ray", ns), 180, "the operator to recreate the NetworkPolicy"
    )
    again = wait(
        lambda: (r := connect_from_pod(rc, other, head_ip, 8265)).startswith("REFUSED") and r,
        60,
        "refused again",
    )
    print(f"other namespace → {head}:8265 with the policy recreated: {again}")


def running_reason(rc: realcluster.RealCluster, name: str, ns: str) -> str:
    for c in status(rc, name, ns).get("conditions", []):
        if c.get("type") == "Running":
            return str(c.get("reason", ""))
    return ""


def operator_connect(rc: realcluster.RealCluster, ip: str, port: int) -> str:
    """The operator's own pod (its image has Python) tries the same connect."""
    script = (
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(('{ip}', {port}), timeout=3).close(); print('CONNECTED')\n"
        "except OSError as e:\n"
        "    print('REFUSED', type(e).__name__, e)\n"
    )
    r = rc.kubectl("exec", "-n", realcluster.NAMESPACE, "deploy/llmtrain", "--", "python", "-c", script)
    return r.stdout.strip()


def test_a_crashing_container_shows_its_last_log_lines(rc: realcluster.RealCluster) -> None:
    """An image that exists but is no runtime image (the operator's: no `ray` in it): the head
    container exits at once; with backoffLimit 0 the job fails, and the Failed condition
    carries the container's own last log lines, read through the kubelet."""
    ns = fresh_namespace(rc, "crash")
    name = "noray"
    manifest = job_manifest(
        name, ns, "s3://llmtrain/unused/", rc.s3_endpoint, image=realcluster.OPERATOR_IMAGE
    )
    manifest["spec"]["backoffLimit"] = 0
    apply(rc, manifest)
    wait(lambda: status(rc, name, ns).get("phase") == "Failed", 240, "the job to fail")
    failed = next(c for c in status(rc, name, ns)["conditions"] if c["type"] == "Failed")
    print(f"Failed condition: {failed['reason']}: {failed['message']}")
    assert "last log lines" in failed["message"] and "ray" in failed["message"].split("last log lines")[1]
