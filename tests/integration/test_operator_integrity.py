# ruff: noqa: F811  (pytest fixtures imported from other modules are redefined as arguments)
"""Status integrity (issue 24) on the test control plane: a job's status holds only its own
run's progress, and a Secret the spec references is named before any pod is made.

The jobs of the first test share one stand-in Ray head, as they did in the hand run that
found the bug (``make k8s-demo`` with three jobs): every job's head address is the same
127.0.0.1 ports, so the second driver cannot bind the progress port and the operator's
progress poll for it reaches the first job's driver — what a head Service selecting another
job's head pod would do in a real cluster.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from test_operator_lifecycle import Api, Operator, crds, operator, serve  # noqa: F401 (fixtures)
from test_operator_run import api, corpus, run_operator, standin, tiny_job  # noqa: F401 (fixtures)

from tests.data.datahelpers import S3Server, s3_server  # noqa: F401 (fixture)
from tests.manifests import gpu_job
from tests.raystandin import RayStandIn

Cluster = Any
pytestmark = pytest.mark.cluster


def _conditions(st: dict[str, Any]) -> str:
    return "\n".join(
        f"{c['type']}={c['status']} {c['reason']}: {c['message']}" for c in st.get("conditions", [])
    )


@pytest.mark.ray
def test_two_jobs_sharing_one_head_each_status_holds_only_its_own_run(
    api: Api, run_operator: Operator, standin: RayStandIn, corpus: str, s3_server: S3Server
) -> None:
    # Negative control, run by hand on this test: with the operator's id check taken out
    # (RayJobs.progress returning any snapshot, its request naming no id) it fails with
    # "beta shows another run's data: s3://llmtrain/alpha/data/manifest.json" — the second
    # job's status held the first job's data manifest, as in issue 24's hand run.
    names = ("alpha", "beta")
    for n in names:
        api.create(tiny_job(n, corpus, s3_server.endpoint))
    samples: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    final: dict[str, dict[str, Any]] = {}
    foreign_seen: set[str] = set()
    deadline = time.monotonic() + 420
    while len(final) < len(names) and time.monotonic() < deadline:
        for n in names:
            if n in final:
                continue
            st = api.status(n)
            if st.get("phase") in ("Succeeded", "Failed"):
                final[n] = st
            elif st.get("progress") or st.get("data"):
                samples[n].append(st)
            if any(c.get("reason") == "ForeignProgress" for c in st.get("conditions", [])):
                foreign_seen.add(n)
        time.sleep(0.3)
    assert set(final) == set(names), {n: api.status(n).get("phase") for n in names}
    for n in names:
        st = final[n]
        assert st["phase"] == "Succeeded", f"{n}:\n{_conditions(st)}\n{run_operator.log()}"
        own = f"s3://llmtrain/{n}/"
        # Every sample and the final status: this job's data, checkpoints and export only.
        for s in [*samples[n], st]:
            data = (s.get("data") or {}).get("manifestUri")
            assert data is None or data.startswith(own), f"{n} shows another run's data: {data}"
            for c in (s.get("checkpoint") or {}).get("lineage") or []:
                assert c["uri"].startswith(own), f"{n} shows another run's checkpoint: {c['uri']}"
        assert st["data"]["manifestUri"] == f"{own}data/manifest.json"
        assert st["exportUri"] == f"{own}model" and st["progress"]["step"] == 120
        assert st["rayJob"]["submissionId"] == f"{n}-1"
    # The second driver could not serve its progress (the port is the first one's): the
    # operator was answered by the other driver, refused it, and counted it.
    metrics = run_operator.metrics()
    counted = sum(
        float(v)
        for v in re.findall(r'llmtrain_operator_foreign_snapshots_total\{source="progress"\} (\S+)', metrics)
    )
    assert counted > 0, metrics
    assert "ignored a progress snapshot of Ray job" in run_operator.full_log()
    print(
        f"foreign progress snapshots refused: {counted:.0f}; ForeignProgress shown on: {sorted(foreign_seen)}"
    )


def test_a_missing_secret_is_named_before_any_pod_and_the_job_proceeds_once_it_exists(
    api: Api, operator: Operator, cluster: Cluster
) -> None:
    # Negative control, run by hand: with the reference check taken out of reconcile step 6
    # (``absent = None``), this fails at the reason: "Running=False Provisioning: Ray cluster
    # ready: 1 head + 1 workers Running" — the pods were made at once (on a real node they
    # would then sit in CreateContainerConfigError).
    from kubernetes import client

    job = gpu_job(
        "needs-secret",
        resources={"workers": 1},
        storage={"endpoint": "http://127.0.0.1:9", "secretRef": {"name": "late-creds"}},
    )
    api.create(job)
    t0 = time.monotonic()
    st = api.wait(
        lambda: (s := api.status("needs-secret")).get("phase") and s,
        "needs-secret: its first status",
        timeout=20,
    )
    took = time.monotonic() - t0
    running = api.cond("needs-secret", "Running")
    assert st["phase"] == "Provisioning", _conditions(st)
    assert running["reason"] == "SecretNotFound", _conditions(st)
    assert running["message"].startswith(
        f'Secret "late-creds" (spec.storage.secretRef) not found in namespace "{api.ns}"'
    )
    assert api.children("needs-secret") == {
        "pods": [],
        "services": [],
        "secrets": [],
        "configmaps": [],
        "networkpolicies": [],
    }
    events = api.wait(
        lambda: [e for e in api.events("needs-secret") if e.reason == "SecretNotFound"],
        "the SecretNotFound Event",
    )
    assert events[0].type == "Warning" and "late-creds" in events[0].message
    print(f"condition written {took:.1f}s after the apply:")
    print(cluster.kubectl("describe", "ltj", "needs-secret", "-n", api.ns).stdout)
    time.sleep(3)  # several resyncs (0.5 s): still nothing made, one Event
    assert api.pods("needs-secret") == []
    assert len([e for e in api.events("needs-secret") if e.reason == "SecretNotFound"]) == 1

    # Created later, without a new apply: the resync finds it and makes the Ray cluster.
    cluster.core.create_namespaced_secret(
        api.ns,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name="late-creds"),
            string_data={"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"},
        ),
    )
    api.wait(lambda: api.running("needs-secret", 2), "needs-secret: pods Running once the Secret exists")
    api.wait(
        lambda: api.cond("needs-secret", "Running").get("reason") not in (None, "SecretNotFound"),
        "the condition moving on",
    )
    assert api.status("needs-secret")["observedGeneration"] == 1  # no new apply was needed


def _play_kubelet_waiting(cluster: Cluster, ns: str, pod: str, reason: str, message: str) -> None:
    """Write the status a kubelet writes for a container that cannot start (KWOK plays no
    waiting state). ``Ready: True`` keeps KWOK's pod-running stage (Pending and not Ready)
    from overwriting it; the operator reads the phase and the container's waiting state."""
    body = cluster.core.read_namespaced_pod(pod, ns)
    image = body.spec.containers[0].image
    cluster.core.patch_namespaced_pod_status(
        pod,
        ns,
        {
            "status": {
                "phase": "Pending",
                "conditions": [
                    {"type": "PodScheduled", "status": "True"},
                    {"type": "Ready", "status": "True"},
                ],
                "containerStatuses": [
                    {
                        "name": "ray",
                        "image": image,
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "started": False,
                        "state": {"waiting": {"reason": reason, "message": message}},
                    }
                ],
            }
        },
    )


def test_a_wrong_image_is_named_and_fixing_it_makes_the_pods_again(
    api: Api, operator: Operator, cluster: Cluster
) -> None:
    image = "does-not/exist:1"
    pull_error = (  # containerd's answer through kubelet v1.35 (ErrImagePull's message)
        f'rpc error: code = NotFound desc = failed to pull and unpack image "docker.io/{image}": '
        f'failed to resolve reference "docker.io/{image}": docker.io/{image}: not found'
    )
    api.create(gpu_job("wrong-image", resources={"workers": 1, "image": image}))
    api.wait(lambda: api.running("wrong-image", 2), "wrong-image: pods Running (KWOK)")
    old_uids = {p.metadata.uid for p in api.pods("wrong-image")}
    for pod in ("wrong-image-head", "wrong-image-worker-0"):
        _play_kubelet_waiting(cluster, api.ns, pod, "ErrImagePull", pull_error)
    running = api.wait(
        lambda: (c := api.cond("wrong-image", "Running")).get("reason") == "ImagePullFailed" and c,
        "the ImagePullFailed condition",
    )
    assert api.status("wrong-image")["phase"] == "Provisioning"
    assert f'container ray ErrImagePull (image "{image}"): {pull_error}' in running["message"]
    events = api.wait(
        lambda: [e for e in api.events("wrong-image") if e.reason == "ImagePullFailed"], "the Event"
    )
    assert events[0].type == "Warning" and image in events[0].message and "not found" in events[0].message
    print(cluster.kubectl("describe", "ltj", "wrong-image", "-n", api.ns).stdout.split("Status:", 1)[-1])

    # The fix: the pods made with the old image go, new ones come with the new image.
    fixed = "ghcr.io/llmtrain/llmtrain:0.1.0"
    api.patch_spec("wrong-image", {"resources": {"image": fixed}})
    api.wait(
        lambda: (
            (ps := api.pods("wrong-image"))
            and not ({p.metadata.uid for p in ps} & old_uids)
            and all(p.spec.containers[0].image == fixed for p in ps)
            and api.running("wrong-image", 2)
        ),
        "wrong-image: pods made again with the fixed image, Running",
    )
    assert "PodsRecreated" in [e.reason for e in api.events("wrong-image")]
    st = api.status("wrong-image")
    assert st["restarts"] == 0 and st["attempt"] == 1
