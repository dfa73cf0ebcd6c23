# ruff: noqa: F811  (pytest fixtures imported from other modules are redefined as arguments)
"""Objects the current code rejects, stored on the real API server: an upgrade after a
looser CRD. The permissive CRD is installed, bad jobs are written through it (a spec of
the wrong type, a spec that is not an object, a status no operator would write), the real
CRD goes back, and the operator starts: each bad job ends in a clear condition or Event,
the good job beside them gets its Ray cluster, a NameConflict is retried with backoff (the
error metric counts each try once), and nothing loops."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_operator_lifecycle import GROUP, PLURAL, VERSION, Api, Operator, crds, serve  # noqa: F401

from tests.manifests import gpu_job

Cluster = Any
pytestmark = pytest.mark.cluster


def _permissive_crd() -> str:
    """The real CRD with every schema replaced by "any object": what validated nothing."""
    from llmtrain.api.crd import crd_yaml

    crd = yaml.safe_load(crd_yaml())
    for v in crd["spec"]["versions"]:
        v["schema"] = {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}
    return json.dumps(crd)


@pytest.fixture
def api(cluster: Cluster, namespace: str) -> Api:
    return Api(cluster, namespace)


@pytest.fixture
def stored_bad_jobs(cluster: Cluster, namespace: str, crds: None, api: Api) -> Iterator[None]:
    from llmtrain.api.crd import crd_yaml

    cluster.kubectl("apply", "-f", "-", input=_permissive_crd())
    try:
        api.wait(
            lambda: _accepts(api, gpu_job("probe", resources={"workers": "many"})),
            "the permissive CRD served",
        )
        api.create(gpu_job("bad-spec", resources={"workers": "many"}))
        nothing = gpu_job("bad-shape")
        nothing["spec"] = "oops"
        api.create(nothing)
        api.create(gpu_job("bad-status", resources={"workers": 1}))
        api.c.custom.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            api.ns,
            PLURAL,
            "bad-status",
            {"status": {"phase": "Training", "restarts": "lots", "conditions": ["Running"], "rayJob": "x"}},
        )
    finally:
        cluster.kubectl("apply", "-f", "-", input=crd_yaml())
    api.wait(lambda: not _accepts(api, gpu_job("probe2", resources={"workers": "many"})), "the real CRD back")
    yield


def _accepts(api: Api, body: dict[str, Any]) -> bool:
    from kubernetes.client import ApiException

    try:
        api.c.custom.create_namespaced_custom_object(GROUP, VERSION, api.ns, PLURAL, body, dry_run="All")
        return True
    except ApiException:
        return False


def _said_all(api: Api, name: str, reason: str) -> list[Any]:
    return [e for e in api.events(name) if e.reason == reason]


def _said(api: Api, name: str, reason: str) -> Any:
    return next(iter(_said_all(api, name, reason)), None)


def _errors(op: Operator, kind: str) -> float:
    m = re.search(rf'llmtrain_operator_reconcile_errors_total{{kind="{kind}"}} (\S+)', op.metrics())
    return float(m.group(1)) if m else 0.0


def test_stored_bad_jobs_end_clearly_and_the_good_one_runs_without_a_loop(
    cluster: Cluster, namespace: str, api: Api, stored_bad_jobs: None, tmp_path: Path
) -> None:
    from kubernetes import client

    # A Secret of someone else's under the Ray auth Secret's name of a job to come.
    api.c.core.create_namespaced_secret(
        namespace,
        client.V1Secret(metadata=client.V1ObjectMeta(name="taken-ray-auth"), string_data={"token": "x"}),
    )
    for op in serve(Operator(cluster, namespace, tmp_path)):
        api.create(gpu_job("good", resources={"workers": 1}))
        api.create(gpu_job("taken", resources={"workers": 1}))
        t0 = time.monotonic()

        # ---- a spec the current CRD rejects: the API server refuses every write to the job
        # (its rules fail on the stored spec, 422), status included; the InvalidSpec Event
        # names the field, and the job is tried with backoff, not at every resync.
        for name, field in (("bad-spec", "spec.resources.workers:"), ("bad-shape", "spec:")):
            ev = api.wait(lambda name=name: _said(api, name, "InvalidSpec"), f"{name}: InvalidSpec Event")
            assert field in ev.message and ev.type == "Warning", ev.message
            assert api.pods(name) == []
        # a status it cannot read: said once, rewritten, and the job goes on
        api.wait(lambda: api.running("bad-status", 2), "bad-status: its pods Running", timeout=60)
        assert "UnreadableStatus" in [e.reason for e in api.events("bad-status")]
        st = api.status("bad-status")
        assert (
            st["restarts"] == 0 and "rayJob" not in st and all(isinstance(c, dict) for c in st["conditions"])
        )
        # ---- the good job beside them gets its Ray cluster
        api.wait(lambda: api.running("good", 2), "good: its pods Running", timeout=60)
        # ---- someone else's Secret: no pods, a NameConflict, never adopted
        api.wait(lambda: "NameConflict" in [e.reason for e in api.events("taken")], "taken: NameConflict")
        assert api.pods("taken") == []
        theirs = api.c.core.read_namespaced_secret("taken-ray-auth", namespace)
        assert not theirs.metadata.owner_references

        # ---- no loop: every 0.5 s resync for ~8 s would be ~16 tries of each failing job;
        # with backoff (0.5, 1, 2, 4 s) at most 5, each counted once and said once.
        time.sleep(max(0.0, 8 - (time.monotonic() - t0)))
        invalid = [len(_said_all(api, n, "InvalidSpec")) for n in ("bad-spec", "bad-shape")]
        conflicts = len(_said_all(api, "taken", "NameConflict"))
        assert all(2 <= n <= 5 for n in invalid) and 2 <= conflicts <= 5, (invalid, conflicts)
        assert _errors(op, "http_422") == sum(invalid), op.metrics()
        assert _errors(op, "create") == conflicts, op.metrics()
        assert _errors(op, "unexpected") == 0 and "Traceback" not in op.full_log(), op.full_log()[-5000:]
        assert op.proc is not None and op.proc.poll() is None

        # ---- fixed by its owner, the job is tried at once
        api.c.core.delete_namespaced_secret("taken-ray-auth", namespace)
        api.c.custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "taken", {"metadata": {"labels": {"fixed": "yes"}}}
        )
        api.wait(
            lambda: api.running("taken", 2), "taken: its pods Running once the Secret is gone", timeout=20
        )
