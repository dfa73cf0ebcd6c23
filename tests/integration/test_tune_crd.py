"""The apiserver takes a job with spec.tuning (the CRD's rules over the search-space map stay
within the CEL cost budget) and stores status.tuning as the driver writes it."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest

from llmtrain.api.progress import RunSnapshot, TrialRecord, summarize
from llmtrain.api.spec import TUNABLE_PATHS
from tests.manifests import base, with_tuning

if TYPE_CHECKING:
    from conftest import Cluster

pytestmark = pytest.mark.cluster


def test_a_tuned_job_is_accepted_and_its_status_tuning_is_kept(cluster: Cluster) -> None:
    from kubernetes import client

    ns = cluster.crds_and_namespace("tune-crd")
    doc = base()
    doc["metadata"]["name"] = "tuned"
    # Every tunable path at once: the largest space the CRD allows.
    with_tuning(space={p: {"choice": [0.1, 0.2]} for p in TUNABLE_PATHS})(doc["spec"])
    doc["spec"]["tuning"]["space"]["training.batch.microBatchSize"] = {"choice": [2, 4]}
    doc["spec"]["tuning"]["space"]["training.batch.globalBatchSize"] = {"choice": [32]}
    r = cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(doc), check=False)
    assert r.returncode == 0, r.stderr
    trials = [
        TrialRecord(i + 1, "completed", {p: 0.5 for p in TUNABLE_PATHS}, metric=5.0 + i / 1000, steps=20)
        for i in range(1000)
    ]
    status = RunSnapshot(
        stage="tuning",
        tuning=summarize(trials, search="bayesian", metric="valLoss", mode="min", planned=1000),
    ).status_patch()["tuning"]
    api = client.CustomObjectsApi(cluster.api_client)
    api.patch_namespaced_custom_object_status(
        "llmtrain.dev",
        "v1alpha1",
        ns,
        "llmtrainingjobs",
        "tuned",
        {"status": {"phase": "Tuning", "tuning": status}},
    )
    got = api.get_namespaced_custom_object("llmtrain.dev", "v1alpha1", ns, "llmtrainingjobs", "tuned")
    assert got["status"]["phase"] == "Tuning"
    assert got["status"]["tuning"]["best"]["number"] == 1 and len(got["status"]["tuning"]["trials"]) == 10
    assert got["status"]["tuning"]["completed"] == 1000
    wide = cluster.kubectl("get", "ltj", "-n", ns, "tuned", "-o", "wide").stdout
    header, row = wide.splitlines()[:2]
    assert "BEST TRIAL" in header and row.split()[-1] == "5"  # the best metric, 5.0
