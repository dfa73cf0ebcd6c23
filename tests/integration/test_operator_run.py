# ruff: noqa: F811  (pytest fixtures imported from other modules are redefined as arguments)
"""``kubectl apply`` → a trained, exported model: the operator submits the run to the job's
Ray head, mirrors its progress into status, and ends the job from the run's outcome.

Real everything: the control plane with KWOK nodes for the pods (tests/cluster), a real
local Ray cluster standing in for their processes (tests/raystandin.py: `ray start --head`
with the dashboard and ``RAY_AUTH_MODE=token``), moto's S3 server for data, checkpoints,
logs and the export, the operator as a subprocess, `transformers` on the export.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_operator_lifecycle import Api, Operator, crds, serve  # noqa: F401 (fixture)

from tests.data.datahelpers import S3Server, s3_server  # noqa: F401 (fixture)
from tests.raystandin import RayStandIn

Cluster = Any
pytestmark = [pytest.mark.cluster, pytest.mark.ray]

BUCKET = "llmtrain"


@pytest.fixture(scope="module")
def corpus(s3_server: S3Server) -> str:
    """~150 KB of English-ish text in S3: the standard library's email package source."""
    import email

    s3 = s3_server.client()
    for b in ("corpus", BUCKET):
        s3.create_bucket(Bucket=b)
    for i, f in enumerate(sorted(Path(email.__file__).parent.glob("*.py"))):
        s3.put_object(Bucket="corpus", Key=f"text/{i:03d}.txt", Body=f.read_bytes())
    return "s3://corpus/text/"


# Distinctive fake S3 credentials (moto takes any): the Ray processes, so every driver of
# this module, sign their S3 requests with them, and _assert_no_secret_leaked looks for
# them (and the job's Ray token) wherever a user or an attacker could read.
CANARY_KEY_ID = "AKIACANARYK3Y1D7Q2ZX"
CANARY_SECRET = "canary/S3cr3t+9f3c1e7a5b2d4c6e8f0a1b3c5d7e9f"
S3_SECRET = "s3-credentials"


@pytest.fixture(scope="module")
def standin(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayStandIn]:
    # After s3_server. The Ray processes inherit these as a pod gets them from
    # spec.storage.secretRef; the driver logs at DEBUG (botocore then logs every request's
    # headers), the level a user turns on to look closer.
    env = {
        "AWS_ACCESS_KEY_ID": CANARY_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": CANARY_SECRET,
        "LLMTRAIN_LOG_LEVEL": "DEBUG",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        s = RayStandIn(num_cpus=2, workdir=tmp_path_factory.mktemp("standin")).start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield s
    s.stop()


@pytest.fixture
def run_operator(
    cluster: Cluster,
    namespace: str,
    crds: None,
    tmp_path: Path,
    standin: RayStandIn,
) -> Iterator[Operator]:
    standin.mirror_specs(cluster.kubeconfig)  # the kubelet's part: ConfigMap → the driver's file
    from kubernetes import client

    cluster.core.create_namespaced_secret(
        namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name=S3_SECRET),
            string_data={"AWS_ACCESS_KEY_ID": CANARY_KEY_ID, "AWS_SECRET_ACCESS_KEY": CANARY_SECRET},
        ),
    )
    yield from serve(
        Operator(
            cluster, namespace, tmp_path, extra=standin.operator_args(), env={"LLMTRAIN_LOG_LEVEL": "DEBUG"}
        )
    )


@pytest.fixture
def api(cluster: Cluster, namespace: str) -> Api:
    return Api(cluster, namespace)


def tiny_job(name: str, source: str, endpoint: str, **over: Any) -> dict[str, Any]:
    """A job that trains in ~20 s on the stand-in: 2 layers × 64, 120 steps, S3 everything."""
    prefix = f"s3://{BUCKET}/{name}"
    spec: dict[str, Any] = {
        "data": {
            "sources": [{"name": "text", "s3": {"uri": source, "format": "text"}}],
            "tokenizer": {"train": {"vocabSize": 512}},
            "outputUri": f"{prefix}/data",
            "validationFraction": 0.05,
        },
        "model": {
            "architecture": {"layers": 2, "dModel": 64, "heads": 4, "contextLength": 64},
            "init": {"random": {"seed": 0}},
        },
        "training": {
            "optimizer": {"type": "adamw", "lr": 0.003},
            "batch": {"globalBatchSize": 8, "microBatchSize": 8},
            "duration": {"maxSteps": 120},
            "logEverySteps": 5,
        },
        "validation": {"everySteps": 40, "batches": 2},
        "checkpoint": {"uri": f"{prefix}/checkpoints", "everySteps": 40, "keepLast": 2},
        "export": {"uri": f"{prefix}/model"},
        "storage": {"endpoint": endpoint, "region": "us-east-1", "secretRef": {"name": S3_SECRET}},
        "resources": {"workers": 1, "worker": {"cpu": "1", "memory": "2Gi"}},
        "backoffLimit": 1,
    }
    for k, v in over.items():
        spec[k] = v
    return {
        "apiVersion": "llmtrain.dev/v1alpha1",
        "kind": "LLMTrainingJob",
        "metadata": {"name": name},
        "spec": spec,
    }


def _why(st: dict[str, Any], op: Operator, api: Api | None = None, name: str = "") -> str:
    """A failed assertion's story: conditions, the job's Events, the operator's log."""
    conds = "\n".join(
        f"{c['type']}={c['status']} {c['reason']}: {c['message']}" for c in st.get("conditions", [])
    )
    events = "\n".join(f"{e.reason}: {e.message}" for e in api.events(name)) if api is not None else ""
    return f"{conds}\n--- events ---\n{events}\n--- operator log ---\n{op.log()[-3000:]}"


def _sample_progress(api: Api, name: str, timeout: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Status samples while the job runs (distinct steps), then the final status."""
    samples: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = api.status(name)
        if st.get("phase") in ("Succeeded", "Failed"):
            return samples, st
        step = (st.get("progress") or {}).get("step")
        # Not the first step's start-up mark (runtime/train.py emits it before the first log
        # step, without a loss): on a loaded machine a poll lands there now and then.
        logged = "trainLoss" in (st.get("metrics") or {})
        if (
            st.get("phase") == "Training"
            and step
            and logged
            and all(s["progress"]["step"] != step for s in samples)
        ):
            samples.append(st)
        time.sleep(0.2)
    raise AssertionError(f"{name} did not finish in {timeout}s: {api.status(name)}")


def test_apply_trains_exports_and_mirrors_progress(
    api: Api, run_operator: Operator, standin: RayStandIn, corpus: str, s3_server: S3Server, tmp_path: Path
) -> None:
    api.create(tiny_job("tiny", corpus, s3_server.endpoint, serve={"allowedPods": {"app": "chat"}}))
    samples, st = _sample_progress(api, "tiny", timeout=300)
    assert st["phase"] == "Succeeded", _why(st, run_operator)

    # ---- live progress: at least two samples with different steps, each with figures
    assert len(samples) >= 2, f"progress was seen at {len(samples)} distinct steps only"
    for s in samples:
        assert 0 < s["progress"]["step"] <= 120 and s["progress"]["totalSteps"] == 120
        assert s["metrics"]["trainLoss"] > 0 and s["metrics"]["tokensPerSecond"] > 0
        assert s["progress"].get("eta")
    assert any("valPerplexity" in s["metrics"] for s in samples) or "valPerplexity" in st["metrics"]

    # ---- final status: metrics, data, lineage, export
    assert st["progress"]["step"] == 120 and st["progress"]["percent"] == 100
    assert st["metrics"]["valPerplexity"] > 1 and 0 <= st["metrics"]["valAccuracy"] <= 1
    assert st["data"]["manifestUri"] == f"s3://{BUCKET}/tiny/data/manifest.json"
    assert st["data"]["trainTokens"] > 0 and st["data"]["validationTokens"] > 0
    lineage = st["checkpoint"]["lineage"]
    assert [c["step"] for c in lineage] == [80, 120]  # keepLast: 2
    assert st["checkpoint"]["latestStep"] == 120 and st["checkpoint"]["latestUri"] == lineage[-1]["uri"]
    assert all("valLoss" in c and c["time"].endswith("Z") for c in lineage)
    assert st["exportUri"] == f"s3://{BUCKET}/tiny/model"
    assert st["attempt"] == 1 and st["restarts"] == 0
    assert st["rayJob"] == {"submissionId": "tiny-1", "status": "SUCCEEDED"}
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Succeeded"]["status"] == "True" and conds["DataReady"]["status"] == "True"

    # ---- one Ray job for the one attempt; the pods are gone at once (GPUs freed)
    assert [j["submission_id"] for j in standin.jobs() if j["submission_id"].startswith("tiny-")] == [
        "tiny-1"
    ]
    api.wait(lambda: not api.pods("tiny"), "Ray pods deleted after success", timeout=30)

    # ---- kubectl get ltj: the printer columns filled
    out = api.c.kubectl("get", "ltj", "tiny", "-n", api.ns).stdout
    header, row = out.splitlines()[:2]
    cols = dict(zip(header.split(), row.split(), strict=False))
    assert cols["PHASE"] == "Succeeded" and cols["STEP"] == "120" and cols["PROGRESS"] == "100"
    assert float(cols["LOSS"]) > 0 and float(cols["VAL"]) > 1  # "VAL PPL" splits in two

    # ---- the driver read the job from the spec ConfigMap (the stand-in's kubelet copy)
    (ray_job,) = [j for j in standin.jobs() if j["submission_id"] == "tiny-1"]
    spec_file = standin.specs / api.ns / "tiny" / "job.yaml"
    assert ray_job["entrypoint"].startswith(f"llmtrain driver --spec {spec_file} --spec-sha256 ")
    assert "LLMTRAIN_SPEC" not in ((ray_job.get("runtime_env") or {}).get("env_vars") or {})

    # ---- the driver's log outlived the cluster
    log = s3_server.client().get_object(Bucket=BUCKET, Key="tiny/logs/tiny-1.log")["Body"].read().decode()
    assert "LLMTRAIN_RESULT" in log

    # ---- the export loads with transformers; its greedy output equals llmtrain generate's
    _assert_export_matches_generate(s3_server, f"s3://{BUCKET}/tiny/model", tmp_path)

    _assert_serving_follows_spec_serve(api)
    _assert_no_secret_leaked(api, run_operator, standin, s3_server, "tiny")


def _assert_serving_follows_spec_serve(api: Api) -> None:
    """spec.serve on the Succeeded job: the model server's objects, accepted by the apiserver
    and owned by the job, its (KWOK) pod Running and Ready; serve: null removes them."""
    from kubernetes import client

    apps, net = client.AppsV1Api(api.c.api_client), client.NetworkingV1Api(api.c.api_client)
    try:
        st = api.wait(
            lambda: ((s := api.status("tiny")).get("serving") or {}).get("readyReplicas") == 1 and s,
            "the model server ready",
            timeout=90,
        )
    except BaseException:
        deps = apps.list_namespaced_deployment(api.ns).items
        pods = api.c.core.list_namespaced_pod(api.ns).items
        raise AssertionError(
            f"status: {api.status('tiny')}\nevents: {[(e.reason, e.message) for e in api.events('tiny')]}\n"
            f"deployments: {[(d.metadata.name, d.status) for d in deps]}\n"
            f"pods: {[(p.metadata.name, p.status.phase, p.spec.node_name) for p in pods]}"
        ) from None
    url = f"http://tiny-serve.{api.ns}.svc.cluster.local:8000/v1"
    assert st["serving"] == {
        "url": url,
        "modelName": "tiny",
        "modelUri": f"s3://{BUCKET}/tiny/model",
        "replicas": 1,
        "readyReplicas": 1,
    }
    serving = next(c for c in st["conditions"] if c["type"] == "Serving")
    assert serving["status"] == "True" and serving["reason"] == "ServerReady"
    uid = api.job("tiny")["metadata"]["uid"]
    dep = apps.read_namespaced_deployment("tiny-serve", api.ns)
    svc = api.c.core.read_namespaced_service("tiny-serve", api.ns)
    np = net.read_namespaced_network_policy("tiny-serve", api.ns)
    for obj in (dep, svc, np):
        assert [(o.kind, o.uid) for o in obj.metadata.owner_references] == [("LLMTrainingJob", uid)]
    assert dep.spec.template.spec.containers[0].command[:4] == [
        "llmtrain",
        "serve",
        "--model",
        f"s3://{BUCKET}/tiny/model",
    ]
    assert np.spec.ingress[0]._from[0].pod_selector.match_labels == {"app": "chat"}
    (pod,) = api.c.core.list_namespaced_pod(api.ns, label_selector="llmtrain.dev/serve=tiny").items
    assert pod.status.phase == "Running"
    out = api.c.kubectl("get", "ltj", "tiny", "-n", api.ns, "-o", "wide").stdout
    row = out.splitlines()[1].split()
    assert url in row, out  # the Serving column
    assert row[row.index(url) + 1] == "120", out  # then Checkpoint: the newest checkpoint's step

    api.patch_spec("tiny", {"serve": None})
    api.wait(lambda: "serving" not in api.status("tiny"), "status.serving removed", timeout=30)
    api.wait(
        lambda: (
            not apps.list_namespaced_deployment(api.ns, label_selector="llmtrain.dev/serve=tiny").items
            and not api.c.core.list_namespaced_service(api.ns, label_selector="llmtrain.dev/serve=tiny").items
            and not net.list_namespaced_network_policy(api.ns, label_selector="llmtrain.dev/serve=tiny").items
        ),
        "the model server's objects deleted",
        timeout=30,
    )
    assert "ServerDeleted" in [e.reason for e in api.events("tiny")]


def _assert_export_matches_generate(s3: S3Server, model_uri: str, tmp: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    env = {"AWS_ENDPOINT_URL": s3.endpoint}
    import os

    r = subprocess.run(
        [
            str(Path(sys.executable).parent / "llmtrain"),
            "generate",
            "--model",
            model_uri,
            "--prompt",
            "def ",
            "--max-tokens",
            "12",
            "--temperature",
            "0",
            "--ids",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    ours = json.loads(r.stdout)
    from llmtrain.runtime.publish import resolve_export

    from llmtrain.api.s3 import S3Options

    # The published version the pointer names (runtime/publish.py), as a user copies it.
    published = resolve_export(model_uri, S3Options(endpoint=s3.endpoint)).uri
    local = tmp / "model"
    client = s3.client()
    bucket, _, prefix = published[len("s3://") :].partition("/")
    for obj in client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/")["Contents"]:
        dest = local / obj["Key"][len(prefix) + 1 :]
        dest.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, obj["Key"], str(dest))
    model = AutoModelForCausalLM.from_pretrained(local)
    prompt = torch.tensor([ours["prompt"]])
    hf = model.generate(prompt, max_new_tokens=len(ours["new"]), do_sample=False, pad_token_id=0)
    assert hf[0, prompt.shape[1] :].tolist() == ours["new"]


def test_submission_without_the_token_is_refused(standin: RayStandIn) -> None:
    body = json.dumps({"entrypoint": "echo pwned", "submission_id": "intruder-1"}).encode()
    for headers in ({}, {"Authorization": "Bearer " + "0" * 64}):
        req = urllib.request.Request(
            standin.dashboard + "/api/jobs/",
            data=body,
            headers={"Content-Type": "application/json", **headers},
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code in (401, 403)
    assert "intruder-1" not in [j["submission_id"] for j in standin.jobs()]


def test_missing_source_fails_at_once_with_the_reason_and_the_log(
    api: Api, run_operator: Operator, standin: RayStandIn, corpus: str, s3_server: S3Server
) -> None:
    job = tiny_job("nodata", "s3://corpus/no-such-prefix/", s3_server.endpoint)
    api.create(job)
    st = api.wait_phase("nodata", "Failed", timeout=180)
    failed = api.cond("nodata", "Failed")
    assert failed["reason"] == "DataError", failed
    assert "no-such-prefix" in failed["message"]
    assert "driver log, last lines" in failed["message"]  # the log tail rides along
    assert st["restarts"] == 0 and st["attempt"] == 1  # permanent: no retry
    assert [j["submission_id"] for j in standin.jobs() if j["submission_id"].startswith("nodata-")] == [
        "nodata-1"
    ]
    reasons = [e.reason for e in api.events("nodata")]
    assert "DataError" in reasons
    log = s3_server.client().get_object(Bucket=BUCKET, Key="nodata/logs/nodata-1.log")["Body"].read().decode()
    assert "no-such-prefix" in log
    # The error path: the Failed condition carries the log's tail, the Event its message.
    _assert_no_secret_leaked(api, run_operator, standin, s3_server, "nodata")


def _assert_no_secret_leaked(api: Api, op: Operator, standin: RayStandIn, s3: S3Server, job: str) -> None:
    """Neither fake S3 credential nor the Ray token, as text or base64, in anything but their
    two Secrets: the jobs (spec, status, annotations), the namespace's Events, ConfigMaps,
    other Secrets, pods and Deployments, the Ray jobs as submitted, the driver's log (Ray's
    copy and the one in S3) and the operator's log, both at DEBUG."""
    from kubernetes import client

    secrets = {"S3 access key id": CANARY_KEY_ID, "S3 secret key": CANARY_SECRET, "Ray token": standin.token}
    ns, core, ser = api.ns, api.c.core, api.c.api_client.sanitize_for_serialization
    places: dict[str, str] = {
        "jobs": json.dumps(
            api.c.custom.list_namespaced_custom_object("llmtrain.dev", "v1alpha1", ns, "llmtrainingjobs")
        ),
        "events": json.dumps(ser(core.list_namespaced_event(ns).items)),
        "configmaps": json.dumps(ser(core.list_namespaced_config_map(ns).items)),
        "pods": json.dumps(ser(core.list_namespaced_pod(ns).items)),
        "deployments": json.dumps(
            ser(client.AppsV1Api(api.c.api_client).list_namespaced_deployment(ns).items)
        ),
        "other secrets": json.dumps(
            ser(
                [
                    x
                    for x in core.list_namespaced_secret(ns).items
                    # the jobs' Ray auth Secrets hold the stand-in's one token (its file)
                    if x.metadata.name != S3_SECRET and not x.metadata.name.endswith("-ray-auth")
                ]
            )
        ),
        "operator log": op.full_log(),
    }
    sids = [j["submission_id"] for j in standin.jobs() if j["submission_id"].startswith(f"{job}-")]
    assert sids
    for j in standin.jobs():
        if j["submission_id"] in sids:
            places[f"Ray job {j['submission_id']} as submitted"] = json.dumps(j)
    driver_logs = ""
    for sid in sids:
        driver_logs += standin.get(f"/api/jobs/{sid}/logs")["logs"]
        obj = s3.client().get_object(Bucket=BUCKET, Key=f"{job}/logs/{sid}.log")
        driver_logs += obj["Body"].read().decode()
    places["driver log"] = driver_logs
    leaks = []
    for what, value in secrets.items():
        forms = {value, base64.b64encode(value.encode()).decode()}
        for where, text in places.items():
            for form in forms:
                if form in text:
                    at = text.index(form)
                    leaks.append(f"{what} in {where}: ...{text[max(0, at - 200) : at + 80]}...")
    assert not leaks, "\n".join(leaks)
    # The net holds: the driver logged at DEBUG and signed its S3 requests with the canary.
    assert "DEBUG botocore" in driver_logs and "Credential=<redacted>/" in driver_logs, driver_logs[-3000:]
    assert " DEBUG " in places["operator log"]


# ------------------------------------------------------------------------- recovery

LONG = {
    "training": {
        "optimizer": {"type": "adamw", "lr": 0.003},
        "batch": {"globalBatchSize": 8, "microBatchSize": 8},
        "duration": {"maxSteps": 240},
        "logEverySteps": 5,
        "seed": 0,
    },
    "checkpoint": {"uri": "", "everySteps": 40, "keepLast": 3},
    "backoffLimit": 2,
}


def long_job(name: str, corpus: str, endpoint: str) -> dict[str, Any]:
    job = tiny_job(name, corpus, endpoint, **LONG)
    job["spec"]["checkpoint"]["uri"] = f"s3://{BUCKET}/{name}/checkpoints"
    return job


def _succeeded(api: Api, name: str, op: Operator, timeout: float = 300) -> dict[str, Any]:
    """The job's final status, which must be Succeeded (else: conditions, events, operator log)."""
    deadline = time.monotonic() + timeout
    st = api.status(name)
    while st.get("phase") not in ("Succeeded", "Failed") and time.monotonic() < deadline:
        time.sleep(0.5)
        st = api.status(name)
    assert st.get("phase") == "Succeeded", f"{name}: {st.get('phase')}, {st.get('rayJob')}\n" + _why(
        st, op, api, name
    )
    return st


def _after_first_checkpoint(api: Api, name: str, timeout: float = 240) -> dict[str, Any]:
    """Status once a checkpoint is recorded and training has steps left to run."""
    st: dict[str, Any] = api.wait(
        lambda: (
            (s := api.status(name)).get("checkpoint", {}).get("latestStep", 0) >= 40
            and s.get("progress", {}).get("step", 240) < 200
            and s
        ),
        f"{name}: a checkpoint, mid-training",
        timeout,
    )
    return st


def _final_losses(st: dict[str, Any]) -> tuple[float, float]:
    return st["metrics"]["trainLoss"], st["metrics"]["valLoss"]


def _exit(api: Api, pod: str, code: int) -> None:
    """What the kubelet reports when a pod's container dies (KWOK plays it)."""
    api.c.kubectl("annotate", "pod", pod, "-n", api.ns, f"llmtrain.dev/test-exit={code}", "--overwrite")


@pytest.mark.slow
def test_lost_head_then_lost_worker_resume_from_the_latest_checkpoint(
    api: Api, run_operator: Operator, standin: RayStandIn, corpus: str, s3_server: S3Server
) -> None:
    # The uninterrupted run, for its losses.
    api.create(long_job("ref", corpus, s3_server.endpoint))
    ref = _succeeded(api, "ref", run_operator)

    # ---- the head dies mid-training (every Ray process of it, the driver too)
    api.create(long_job("crash", corpus, s3_server.endpoint))
    before = _after_first_checkpoint(api, "crash")
    standin.kill_head()
    _exit(api, "crash-head", 137)
    # The new head pod's Ray starts once the operator has made the new pods (as in a cluster).
    api.wait(lambda: api.status("crash").get("attempt") == 2, "attempt 2", timeout=60)
    standin.start()
    st = _succeeded(api, "crash", run_operator)
    assert st["attempt"] == 2 and st["restarts"] == 1, _why(st, run_operator, api, "crash")
    assert st["rayJob"]["submissionId"] == "crash-2"
    resumed = st["checkpoint"]["resumedFrom"]["step"]
    assert resumed >= before["checkpoint"]["latestStep"]
    assert st["progress"]["step"] == 240
    # The steps after the resume reproduce the uninterrupted run (fixed seed, exact resume).
    assert _final_losses(st) == pytest.approx(_final_losses(ref), rel=1e-5)
    assert [j["submission_id"] for j in standin.jobs() if j["submission_id"].startswith("crash-")] == [
        "crash-2"
    ]
    reasons = [e.reason for e in api.events("crash")]
    assert "Restarting" in reasons
    print(api.c.kubectl("describe", "ltj", "crash", "-n", api.ns).stdout)

    # ---- a worker dies mid-training: its pod is recreated, the same attempt resumes
    api.create(long_job("worker", corpus, s3_server.endpoint))
    _after_first_checkpoint(api, "worker")
    standin.kill_training_worker()
    _exit(api, "worker-worker-0", 137)
    st = _succeeded(api, "worker", run_operator)
    assert st["attempt"] == 1 and st["restarts"] == 1, _why(st, run_operator, api, "worker")
    assert [j["submission_id"] for j in standin.jobs() if j["submission_id"].startswith("worker-")] == [
        "worker-1"
    ]
    assert _final_losses(st) == pytest.approx(_final_losses(ref), rel=1e-5)


@pytest.mark.slow
def test_suspend_mid_training_then_resume_continues_from_the_checkpoint(
    api: Api, run_operator: Operator, standin: RayStandIn, corpus: str, s3_server: S3Server
) -> None:
    api.create(long_job("pause", corpus, s3_server.endpoint))
    _after_first_checkpoint(api, "pause")
    seen = api.status("pause")["progress"]["step"]
    api.patch_spec("pause", {"suspend": True})
    st = api.wait_phase("pause", "Suspended", timeout=90)
    # A last checkpoint was asked for and taken before the pods went: past every step seen
    # before the suspend, outside the every-40-steps schedule (asked at a log step).
    last = st["checkpoint"]["latestStep"]
    assert last > seen and st["rayJob"]["checkpointAskedStep"] >= seen, _why(st, run_operator)
    assert last in [c["step"] for c in st["checkpoint"]["lineage"]]
    suspended = next(c for c in st["conditions"] if c["type"] == "Suspended")
    assert f"resumes from its newest checkpoint, step {last} when suspended" in suspended["message"]
    api.wait(lambda: not api.pods("pause"), "pods deleted on suspend", timeout=30)
    job = next(j for j in standin.jobs() if j["submission_id"] == "pause-1")
    api.wait(
        lambda: (
            next(j for j in standin.jobs() if j["submission_id"] == "pause-1")["status"]
            in ("STOPPED", "SUCCEEDED")
        ),
        "the Ray job stopped",
        timeout=60,
    )
    # Edited while suspended (a mutable field): the resumed driver reads it from the spec
    # ConfigMap, which the operator brings up to date before submitting.
    api.patch_spec("pause", {"suspend": False, "export": {"uri": f"s3://{BUCKET}/pause/model-v2"}})
    st = _succeeded(api, "pause", run_operator)
    assert st["attempt"] == 2 and st["rayJob"]["submissionId"] == "pause-2", _why(st, run_operator)
    assert st["exportUri"] == f"s3://{BUCKET}/pause/model-v2"
    assert "SpecUpdated" in [e.reason for e in api.events("pause")]
    spec_file = standin.specs / api.ns / "pause" / "job.yaml"
    assert "model-v2" in spec_file.read_text()
    # The stand-in's processes outlive the deleted KWOK pods until Ray's stop lands (a real
    # pod's grace period is the same window), so a periodic checkpoint may follow the last
    # one: attempt 2 resumes from the newest, never an older one.
    assert st["checkpoint"]["resumedFrom"]["step"] >= last
    assert st["progress"]["step"] == 240  # maxSteps optimizer steps in all: none twice, none lost
    del job


@pytest.mark.slow
def test_operator_restarted_five_times_during_a_run_submits_once(
    api: Api, run_operator: Operator, standin: RayStandIn, corpus: str, s3_server: S3Server
) -> None:
    import random

    rng = random.Random(7)
    api.create(long_job("bumpy", corpus, s3_server.endpoint))
    for _ in range(5):
        time.sleep(rng.uniform(0.5, 4.0))
        run_operator.kill()
        time.sleep(rng.uniform(0.0, 1.0))
        run_operator.start()
    st = _succeeded(api, "bumpy", run_operator)
    assert st["attempt"] == 1 and st["restarts"] == 0, _why(st, run_operator)
    assert [j["submission_id"] for j in standin.jobs() if j["submission_id"].startswith("bumpy-")] == [
        "bumpy-1"
    ]
    steps = [c["step"] for c in st["checkpoint"]["lineage"]]
    assert steps == sorted(set(steps)) and steps[-1] == 240  # nothing duplicated
    assert st["progress"]["step"] == 240


def test_deleting_a_running_job_stops_its_ray_job_first(
    api: Api, run_operator: Operator, standin: RayStandIn, corpus: str, s3_server: S3Server
) -> None:
    api.create(long_job("gone", corpus, s3_server.endpoint))
    api.wait(lambda: api.status("gone").get("progress", {}).get("step", 0) > 0, "gone: training", timeout=240)
    assert "llmtrain.dev/stop-ray-job" in api.job("gone")["metadata"]["finalizers"]
    api.c.kubectl("delete", "ltj", "gone", "-n", api.ns, "--wait=true", "--timeout=60s")
    # Ray's stop is asynchronous: the driver gets SIGTERM, then the job reads STOPPED.
    api.wait(
        lambda: next(j for j in standin.jobs() if j["submission_id"] == "gone-1")["status"] == "STOPPED",
        "gone-1 STOPPED on the head (not left running, nor to the garbage collector)",
        timeout=30,
    )


def test_corrupt_shard_fails_at_once_as_bad_data(
    api: Api, run_operator: Operator, standin: RayStandIn, corpus: str, s3_server: S3Server
) -> None:
    from llmtrain.runtime.data.prepare import PrepareConfig, prepare

    from llmtrain.api.spec import LLMTrainingJobSpec

    job = tiny_job("corrupt", corpus, s3_server.endpoint, backoffLimit=0)
    # The data prepared beforehand (the run reuses it: same fingerprint), then one training
    # shard's bytes flipped in place: same size, another sha256.
    prepared = prepare(PrepareConfig.from_spec(LLMTrainingJobSpec.model_validate(job["spec"])))
    shard = next(s for s in prepared.manifest.split_shards("train"))
    key = f"corrupt/data/{shard.path}"
    s3 = s3_server.client()
    data = bytearray(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[-1] ^= 0xFF
    s3.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))

    api.create(job)
    st = api.wait_phase("corrupt", "Failed", timeout=240)
    failed = api.cond("corrupt", "Failed")
    assert failed["reason"] == "DataError", _why(st, run_operator, api, "corrupt")
    assert "sha256" in failed["message"] and shard.path in failed["message"]
    assert st["restarts"] == 0 and st["attempt"] == 1
    assert st["data"]["reused"] is True  # it trained on the prepared data, and found the bad shard
