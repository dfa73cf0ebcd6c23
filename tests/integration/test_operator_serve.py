# ruff: noqa: F811  (pytest fixtures imported from other modules are redefined as arguments)
"""spec.serve's Secrets on the test control plane (issue 26, items 1 and 5): the real operator
holds the model server back while its API key's Secret is missing, then makes a Deployment the
apiserver accepts with the key mounted as a file, and a later edit that drops the key takes
its volume away through the apiserver's own merge patch.

The job is made finished without a run: its status (the status subresource) is written before
the operator starts, as the operator would have left it after a run that exported the model.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_operator_lifecycle import GROUP, PLURAL, VERSION, Api, Operator, crds, serve  # noqa: F401 (fixture)

from tests.manifests import gpu_job

Cluster = Any
pytestmark = pytest.mark.cluster

MODEL = "s3://llmtrain/srv/model"
KEY_PATH = "/var/run/llmtrain/serve-key/api-key"


def _secret(api: Api, name: str, data: dict[str, str]) -> None:
    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }
    api.c.core.create_namespaced_secret(api.ns, body)


def _deployment(api: Api) -> Any:
    from kubernetes import client

    found = client.AppsV1Api(api.c.api_client).list_namespaced_deployment(
        api.ns, label_selector="llmtrain.dev/serve=srv"
    )
    return found.items[0] if found.items else None


@pytest.fixture
def finished_job(cluster: Cluster, namespace: str, crds: None, tmp_path: Path) -> Iterator[Api]:
    """A Succeeded job with an export and spec.serve naming a key Secret not made yet; then the
    operator."""
    api = Api(cluster, namespace)
    _secret(api, "s3-read-only", {"AWS_ACCESS_KEY_ID": "ro", "AWS_SECRET_ACCESS_KEY": "ro-secret"})
    serve_spec = {
        "apiKeySecretRef": {"name": "chat-key", "key": "token"},
        "maxWaiting": 8,
        "storageSecretRef": {"name": "s3-read-only"},
    }
    api.create(gpu_job("srv", export={"uri": MODEL}, serve=serve_spec))
    status = {"phase": "Succeeded", "exportUri": MODEL}
    cluster.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "srv", {"status": status}
    )
    for _ in serve(Operator(cluster, namespace, tmp_path)):  # started; the job deleted after
        yield api


def test_the_server_waits_for_its_key_then_mounts_it_and_unsetting_it_drops_the_volume(
    finished_job: Api,
) -> None:
    api = finished_job
    msg = api.wait(
        lambda: (c := api.cond("srv", "Serving")).get("reason") == "SecretNotFound" and c["message"],
        "the Serving condition naming the missing key Secret",
    )
    assert 'Secret "chat-key" (spec.serve.apiKeySecretRef) not found' in msg, msg
    assert "SecretNotFound" in [e.reason for e in api.events("srv")]
    assert _deployment(api) is None  # nothing made while the Secret is missing

    _secret(api, "chat-key", {"token": "sk-test"})  # the job goes on by itself
    st = api.wait(
        lambda: ((s := api.status("srv")).get("serving") or {}).get("readyReplicas") == 1 and s,
        "the model server ready (KWOK pod)",
        timeout=60,
    )
    assert next(c for c in st["conditions"] if c["type"] == "Serving")["reason"] == "ServerReady"
    dep = _deployment(api)
    pod = dep.spec.template.spec
    (vol,) = pod.volumes
    assert vol.name == "serve-api-key" and vol.secret.secret_name == "chat-key"
    assert [(i.key, i.path) for i in vol.secret.items] == [("token", "api-key")]
    assert vol.secret.default_mode == 0o444
    (c,) = pod.containers
    assert [(m.mount_path, m.read_only) for m in c.volume_mounts] == [("/var/run/llmtrain/serve-key", True)]
    assert c.command[c.command.index("--api-key-file") + 1] == KEY_PATH
    assert c.command[c.command.index("--max-waiting") + 1] == "8"
    env = {e.name: e for e in c.env}
    assert env["AWS_ACCESS_KEY_ID"].value_from.secret_key_ref.name == "s3-read-only"
    assert "chat-key" not in str(c.env)  # the key is a file, never an environment variable

    # Unset the key: the operator's merge patch on the real apiserver removes the volume too.
    api.patch_spec("srv", {"serve": {"apiKeySecretRef": None}})
    api.wait(
        lambda: not (_deployment(api).spec.template.spec.volumes or []),
        "the key's volume removed from the Deployment",
    )
    c = _deployment(api).spec.template.spec.containers[0]
    assert "--api-key-file" not in c.command and not c.volume_mounts
    assert "--max-waiting" in c.command  # the rest of spec.serve kept
