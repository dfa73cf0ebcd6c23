"""spec.serve: the model server the operator makes for a Succeeded job (reconcile step 2b)
and its manifests (pure functions). On the real apiserver: tests/integration/test_operator_serve.py."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from llmtrain.operator import manifests as m
from pydantic import ValidationError

from llmtrain.api.job import LLMTrainingJob
from llmtrain.api.progress import RESULT_PREFIX
from llmtrain.api.status import ConditionType, Phase
from llmtrain.api.validate import validate_object
from tests.unit.test_operator_fakes import job_body
from tests.unit.test_operator_reconcile import Harness
from tests.unit.test_operator_run import running, snapshot

MODEL = "s3://b/model"
SERVE_KINDS = ("Deployment", "Service", "NetworkPolicy")


def succeeded(**serve: Any) -> Harness:
    """A job that trained, exported to MODEL and Succeeded, with spec.serve."""
    h = running(
        export={"uri": MODEL},
        serve=serve,
        storage={"endpoint": "http://s3.example:9000", "secretRef": {"name": "s3-creds"}},
    )
    h.tick(1)
    final = snapshot(10, stage="done", export_uri=MODEL)
    h.ray.end("demo-1", "SUCCEEDED", RESULT_PREFIX + final.to_json() + "\n")
    h.tick(5)
    assert h.status["phase"] == Phase.Succeeded
    return h


def server(h: Harness, kind: str) -> dict[str, Any]:
    return h.api.objects[(kind, "ns1", "demo-serve")]


def test_a_succeeded_job_gets_its_server_owned_by_it_and_serving_status() -> None:
    h = succeeded(replicas=2)
    h.tick(1)
    for kind in SERVE_KINDS:
        (ref,) = server(h, kind)["metadata"]["ownerReferences"]
        assert ref["kind"] == "LLMTrainingJob" and ref["controller"] is True
    (c,) = server(h, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert c["command"][:4] == ["llmtrain", "serve", "--model", MODEL]
    assert c["command"][-2:] == ["--served-model-name", "demo"]
    env = {e["name"]: e for e in c["env"]}
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://s3.example:9000"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    assert "RAY_AUTH_TOKEN" not in env  # a server is no Ray node
    url = "http://demo-serve.ns1.svc.cluster.local:8000/v1"
    assert h.status["serving"] == {
        "url": url,
        "modelName": "demo",
        "modelUri": MODEL,
        "replicas": 2,
        "readyReplicas": 0,
    }
    assert h.cond(ConditionType.Serving)["reason"] == "ServerStarting"
    assert "ServerCreated" in h.event_reasons()

    server(h, "Deployment")["status"] = {"readyReplicas": 1}  # what the Deployment controller writes
    out = h.tick(5)
    assert h.status["serving"]["readyReplicas"] == 1
    serving = h.cond(ConditionType.Serving)
    assert serving["status"] == "True" and serving["message"] == f"1 of 2 replicas ready at {url}"
    assert [e.reason for e in out.events] == ["ServerReady"]
    h.api.calls.clear()
    h.tick(5)  # steady: one GET (readiness), nothing made or patched
    assert h.api.calls == [("get", "Deployment", "demo-serve")]


def test_editing_spec_serve_patches_the_server_and_unsetting_it_removes_it() -> None:
    h = succeeded()
    h.tick(1)
    h.body["spec"]["serve"] = {"replicas": 3, "port": 9000}
    h.tick(1)
    assert server(h, "Deployment")["spec"]["replicas"] == 3
    assert server(h, "Service")["spec"]["ports"][0]["port"] == 9000
    assert server(h, "NetworkPolicy")["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 9000}]
    assert h.event_reasons().count("ServerUpdated") == 3
    assert h.status["serving"]["url"].endswith(":9000/v1") and h.status["serving"]["replicas"] == 3

    h.body["spec"].pop("serve")
    h.tick(1)
    assert not any((k, "ns1", "demo-serve") in h.api.objects for k in SERVE_KINDS)
    assert "serving" not in h.status
    assert "Serving" not in [c["type"] for c in h.status["conditions"]]
    assert "ServerDeleted" in h.event_reasons()
    h.api.calls.clear()
    h.tick(5)
    assert h.api.calls == []  # nothing served: no API calls


def test_a_server_deleted_by_hand_is_made_again_and_a_foreign_one_is_never_touched() -> None:
    h = succeeded()
    h.tick(1)
    del h.api.objects[("Deployment", "ns1", "demo-serve")]
    h.tick(1)
    h.tick(1)
    assert ("Deployment", "ns1", "demo-serve") in h.api.objects

    h = running(export={"uri": MODEL}, serve={})
    h.api.create(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "demo-serve", "namespace": "ns1"},
            "spec": {"replicas": 7},
        }
    )
    h.tick(1)
    h.ray.end("demo-1", "SUCCEEDED", RESULT_PREFIX + snapshot(10, stage="done", export_uri=MODEL).to_json())
    h.tick(5)
    out = h.tick(1)
    assert server(h, "Deployment")["spec"] == {"replicas": 7}  # not ours: never patched
    assert "NameConflict" in h.event_reasons() and "not owned by this job" in (out.requeue or "")
    assert "serving" not in h.status


def test_no_server_before_success_nor_after_failure() -> None:
    h = running(export={"uri": MODEL}, serve={})
    h.tick(1)
    assert not any(k[0] == "Deployment" for k in h.api.objects)
    h.ray.end("demo-1", "FAILED", "boom\n")
    for _ in range(3):
        h.tick(5)
    assert not any(k[0] == "Deployment" for k in h.api.objects) and "serving" not in h.status


# ------------------------------------------------------------------------- manifests


def model(**serve: Any) -> LLMTrainingJob:
    body = job_body(
        export={"uri": MODEL},
        serve=serve,
        resources={"nodeSelector": {"pool": "gpu"}, "tolerations": [{"key": "gpu", "operator": "Exists"}]},
    )
    return LLMTrainingJob.model_validate(body)


def test_server_pods_default_to_the_training_pool_and_are_not_ray_pods() -> None:
    d = m.serve_deployment(model(), MODEL)
    pod = d["spec"]["template"]
    assert pod["spec"]["nodeSelector"] == {"pool": "gpu"}
    assert pod["spec"]["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    # The pod index and the diagnosis select LABEL_JOB: a server pod must never count as a Ray node.
    assert m.LABEL_JOB not in pod["metadata"]["labels"] and pod["metadata"]["labels"][m.LABEL_SERVE] == "demo"
    (c,) = pod["spec"]["containers"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8000}
    assert c["resources"]["limits"] == {"cpu": "2", "memory": "4Gi"}
    d = m.serve_deployment(model(nodeSelector={"pool": "cpu"}, tolerations=[], gpus=1), MODEL)
    assert d["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "cpu"}
    assert "tolerations" not in d["spec"]["template"]["spec"]
    assert d["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    own = {
        "key": "serve",
        "operator": "Equal",
        "value": "yes",
        "effect": "NoExecute",
        "tolerationSeconds": 30,
    }
    d = m.serve_deployment(model(tolerations=[own], resources={"cpu": "500m", "memory": "1Gi"}), MODEL)
    assert d["spec"]["template"]["spec"]["tolerations"] == [own]
    assert d["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"] == {
        "cpu": "500m",
        "memory": "1Gi",
    }


@pytest.mark.parametrize(
    ("serve", "client"),
    [
        ({}, {"podSelector": {"matchLabels": {}}}),  # the job's namespace, every pod
        ({"allowedPods": {"app": "chat"}}, {"podSelector": {"matchLabels": {"app": "chat"}}}),
        (
            {"allowedNamespaces": {"team": "a"}},
            {"namespaceSelector": {"matchLabels": {"team": "a"}}, "podSelector": {"matchLabels": {}}},
        ),
        (
            {"allowedNamespaces": {}, "allowedPods": {"app": "chat"}},
            {"namespaceSelector": {"matchLabels": {}}, "podSelector": {"matchLabels": {"app": "chat"}}},
        ),
    ],
)
def test_the_servers_network_policy_admits_exactly_the_named_clients(
    serve: dict[str, Any], client: dict[str, Any]
) -> None:
    np = m.serve_network_policy(model(**serve), m.OperatorSettings())
    (rule,) = np["spec"]["ingress"]
    assert rule["from"][0] == client
    assert rule["from"][1]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
    assert rule["ports"] == [{"protocol": "TCP", "port": 8000}]
    assert np["spec"]["podSelector"] == {"matchLabels": {m.LABEL_SERVE: "demo"}}


def test_serve_without_export_is_rejected_naming_the_field() -> None:
    body = job_body(serve={"replicas": 1})
    errors = validate_object(body)
    assert any(e.path == "spec.serve" and "spec.export" in e.message for e in errors), errors
    with pytest.raises(ValidationError, match="port"):
        LLMTrainingJob.model_validate(job_body(export={"uri": MODEL}, serve={"port": 80}))


# ------------------------------------------------------- API key, admission, read-only storage

KEY = {"name": "serve-key", "key": "token"}
KEY_PATH = "/var/run/llmtrain/serve-key/api-key"


def _pod_spec(d: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = d["spec"]["template"]["spec"]
    return spec


def test_the_api_key_is_a_read_only_file_the_server_is_pointed_at() -> None:
    d = m.serve_deployment(model(apiKeySecretRef=KEY, maxWaiting=32), MODEL)
    pod = _pod_spec(d)
    assert pod["volumes"] == [
        {
            "name": "serve-api-key",
            "secret": {
                "secretName": "serve-key",
                "items": [{"key": "token", "path": "api-key"}],
                "defaultMode": 0o444,
            },
        }
    ]
    (c,) = pod["containers"]
    assert c["volumeMounts"] == [
        {"name": "serve-api-key", "mountPath": "/var/run/llmtrain/serve-key", "readOnly": True}
    ]
    cmd = c["command"]
    assert cmd[cmd.index("--api-key-file") + 1] == KEY_PATH
    assert cmd[cmd.index("--max-waiting") + 1] == "32"
    # The key never travels in the environment (visible to every process and `kubectl describe`).
    assert not any("serve-key" in str(e) for e in c["env"])

    # Unset: no flag, no mount, and an empty volume list, so a merge patch drops an old volume.
    plain = m.serve_deployment(model(), MODEL)
    (c,) = _pod_spec(plain)["containers"]
    assert "--api-key-file" not in c["command"] and "--max-waiting" not in c["command"]
    assert "volumeMounts" not in c and _pod_spec(plain)["volumes"] == []


def test_the_server_gets_spec_serve_storage_secret_ref_instead_of_the_jobs_credentials() -> None:
    def creds(d: dict[str, Any]) -> dict[str, Any]:
        env = {e["name"]: e for e in _pod_spec(d)["containers"][0]["env"]}
        return {
            k: env[k]["valueFrom"]["secretKeyRef"] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        }

    body = job_body(export={"uri": MODEL}, storage={"secretRef": {"name": "rw"}}, serve={})
    rw = creds(m.serve_deployment(LLMTrainingJob.model_validate(body), MODEL))
    assert rw["AWS_ACCESS_KEY_ID"] == {"name": "rw", "key": "AWS_ACCESS_KEY_ID"}
    body["spec"]["serve"] = {
        "storageSecretRef": {"name": "ro", "accessKeyIdKey": "id", "secretAccessKeyKey": "sk"}
    }
    job = LLMTrainingJob.model_validate(body)
    assert creds(m.serve_deployment(job, MODEL)) == {
        "AWS_ACCESS_KEY_ID": {"name": "ro", "key": "id"},
        "AWS_SECRET_ACCESS_KEY": {"name": "ro", "key": "sk"},
    }
    # The Ray pods keep the job's own (read-write) credentials.
    env = {e["name"]: e for e in m.head_pod(job, m.OperatorSettings())["spec"]["containers"][0]["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "rw"


def test_a_missing_api_key_secret_holds_the_server_back_naming_the_field() -> None:
    h = succeeded(apiKeySecretRef=KEY)
    out = h.tick(1)
    assert not any((k, "ns1", "demo-serve") in h.api.objects for k in SERVE_KINDS)
    serving = h.cond(ConditionType.Serving)
    assert serving["status"] == "False" and serving["reason"] == "SecretNotFound"
    assert 'Secret "serve-key" (spec.serve.apiKeySecretRef) not found' in serving["message"]
    assert "SecretNotFound" in h.event_reasons() and "serve-key" in (out.requeue or "")

    h.api.put("Secret", "ns1", "serve-key", {"other": "x"})  # the Secret, but not the key
    h.tick(1)
    assert ("Deployment", "ns1", "demo-serve") not in h.api.objects
    assert 'has no key "token"' in h.cond(ConditionType.Serving)["message"]

    h.api.put("Secret", "ns1", "serve-key", {"token": "sk-1"})  # the job goes on by itself
    h.tick(1)
    cmd = _pod_spec(server(h, "Deployment"))["containers"][0]["command"]
    assert cmd[cmd.index("--api-key-file") + 1] == KEY_PATH
    assert h.cond(ConditionType.Serving)["reason"] == "ServerStarting"


def test_a_missing_read_only_storage_secret_is_named_too() -> None:
    h = succeeded(storageSecretRef={"name": "s3-ro"})
    h.tick(1)
    assert ("Deployment", "ns1", "demo-serve") not in h.api.objects
    assert 'Secret "s3-ro" (spec.serve.storageSecretRef)' in h.cond(ConditionType.Serving)["message"]


def test_placement_and_identity_that_spec_serve_drops_leave_the_deployment() -> None:
    """A merge patch keeps what it does not name and merges maps: a nodeSelector key,
    tolerations, a service account or pull secrets no longer asked for stayed on the
    Deployment. Each change of spec.serve now leaves exactly what the spec says."""
    h = succeeded(nodeSelector={"pool": "a", "zone": "x"}, tolerations=[{"key": "gpu", "operator": "Exists"}])
    h.body["spec"]["resources"].update(serviceAccountName="runner", imagePullSecrets=[{"name": "reg"}])
    h.api.put("Secret", "ns1", "reg", {".dockerconfigjson": "{}"})
    h.tick(1)
    pod = _pod_spec(server(h, "Deployment"))
    assert pod["nodeSelector"] == {"pool": "a", "zone": "x"} and pod["tolerations"]
    assert pod["serviceAccountName"] == "runner" and pod["imagePullSecrets"] == [{"name": "reg"}]

    h.body["spec"]["serve"] = {"nodeSelector": {"pool": "b"}, "tolerations": []}
    h.tick(1)
    pod = _pod_spec(server(h, "Deployment"))
    assert pod["nodeSelector"] == {"pool": "b"} and "tolerations" not in pod

    h.body["spec"]["serve"] = {"nodeSelector": {}}
    h.body["spec"]["resources"].pop("serviceAccountName")
    h.body["spec"]["resources"].pop("imagePullSecrets")
    h.tick(1)
    pod = _pod_spec(server(h, "Deployment"))
    assert "nodeSelector" not in pod
    assert "serviceAccountName" not in pod and "imagePullSecrets" not in pod
    assert pod["automountServiceAccountToken"] is False  # no account of the user's: no token
    assert pod == m.serve_deployment(LLMTrainingJob.model_validate(h.body), MODEL)["spec"]["template"]["spec"]


def test_adding_changing_and_removing_the_key_re_rolls_the_deployment() -> None:
    h = succeeded()
    h.api.put("Secret", "ns1", "serve-key", {"token": "sk-1", "other": "sk-2"})
    h.api.put("Secret", "ns1", "s3-ro", {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"})
    h.tick(1)
    hashes = [server(h, "Deployment")["metadata"]["annotations"][m.ANN_SERVE_HASH]]
    for serve in (
        {"apiKeySecretRef": KEY},
        {"apiKeySecretRef": {**KEY, "key": "other"}},
        {"apiKeySecretRef": {**KEY, "key": "other"}, "maxWaiting": 4},
        {
            "apiKeySecretRef": {**KEY, "key": "other"},
            "maxWaiting": 4,
            "storageSecretRef": {"name": "s3-ro"},
        },
        {},
    ):
        h.body["spec"]["serve"] = serve
        h.tick(1)
        hashes.append(server(h, "Deployment")["metadata"]["annotations"][m.ANN_SERVE_HASH])
    # Every edit patched the Deployment with a new template; back to {} is the first one again.
    assert all(a != b for a, b in itertools.pairwise(hashes)) and hashes[-1] == hashes[0]
    assert h.event_reasons().count("ServerUpdated") == 5
    pod = _pod_spec(server(h, "Deployment"))
    # Removed: the merge patch took the volume away too, not only the flag and the mount.
    assert pod["volumes"] == [] and "volumeMounts" not in pod["containers"][0]
    assert "--api-key-file" not in pod["containers"][0]["command"]


@pytest.mark.parametrize(
    ("serve", "field"),
    [
        ({"maxWaiting": 0}, "maxWaiting"),
        ({"maxWaiting": 10_001}, "maxWaiting"),
        ({"apiKeySecretRef": {"name": "k", "key": "a/b"}}, "key"),
        ({"apiKeySecretRef": {"name": "k"}}, "key"),
    ],
)
def test_serve_admission_and_key_fields_are_bounded(serve: dict[str, Any], field: str) -> None:
    errors = validate_object(job_body(export={"uri": MODEL}, serve=serve))
    assert any(e.path.startswith("spec.serve") and field in e.path for e in errors), errors


def test_the_deployments_command_is_one_llmtrain_serve_takes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The server's own CLI parses the command the operator writes: the mounted file's content
    (a Secret's value, trailing newline and all) is the key, --max-waiting reaches the engine."""
    import llmtrain.runtime.serve as serving
    from typer.testing import CliRunner

    from llmtrain.cli import app

    got: dict[str, Any] = {}
    monkeypatch.setattr(serving, "load_server", lambda model, **kw: got.update(model=model, **kw) or "server")
    monkeypatch.setattr(
        serving, "serve", lambda server, host, port, announce: got.update(host=host, port=port)
    )
    key_file = tmp_path / "api-key"  # where the kubelet puts the Secret's item
    key_file.write_text("sk-test\n")
    (c,) = _pod_spec(m.serve_deployment(model(apiKeySecretRef=KEY, maxWaiting=5), MODEL))["containers"]
    assert c["command"][:2] == ["llmtrain", "serve"]
    args = [str(key_file) if a == KEY_PATH else a for a in c["command"][2:]]
    r = CliRunner().invoke(app, ["serve", *args])
    assert r.exit_code == 0, r.output
    assert got["model"] == MODEL and got["model_id"] == "demo" and got["max_waiting"] == 5
    assert got["limits"].api_key == "sk-test" and (got["host"], got["port"]) == ("0.0.0.0", 8000)
