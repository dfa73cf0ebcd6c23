"""The CRD's root rule on ``metadata.name`` (issue 13, item 6) against the real apiserver.

Declaring ``metadata.name`` in the schema (so the rule's fieldPath resolves) must not change
what the apiserver keeps of an object's metadata: labels and annotations survive, a name at the
limit is stored, one character more is refused at ``metadata.name`` with the rule's message.
"""

from __future__ import annotations

import copy
import json
from typing import TYPE_CHECKING

import pytest

from llmtrain.api.job import MAX_NAME_LENGTH, NAME_TOO_LONG
from tests.manifests import base

if TYPE_CHECKING:
    from conftest import Cluster

pytestmark = pytest.mark.cluster


def test_name_limit_and_metadata_kept(cluster: Cluster) -> None:
    ns = cluster.crds_and_namespace("job-name")
    doc = copy.deepcopy(base())
    doc["metadata"] = {
        "name": "n" * MAX_NAME_LENGTH,
        "labels": {"team": "research"},
        "annotations": {"note": "kept"},
    }
    created = cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(doc), check=False)
    assert created.returncode == 0, created.stderr
    stored = json.loads(cluster.kubectl("get", "ltj", "-n", ns, doc["metadata"]["name"], "-o", "json").stdout)
    assert stored["metadata"]["labels"] == {"team": "research"}
    assert stored["metadata"]["annotations"]["note"] == "kept"

    doc["metadata"]["name"] += "n"
    refused = cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(doc), check=False)
    assert refused.returncode != 0
    assert "metadata.name" in refused.stderr and NAME_TOO_LONG in refused.stderr, refused.stderr
