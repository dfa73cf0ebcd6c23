"""``metadata.name``'s limit is what the operator's children need (issue 13, item 6).

The apiserver allows a custom resource a 253-character name; the job's name, though, prefixes
its children's names, and a Service's name is a DNS-1035 label (at most 63 characters). The
limit, declared once in :mod:`llmtrain.api.job`, is checked here against the operator's own
child names so that a new child (or a longer suffix) cannot outgrow it unnoticed.
"""

from __future__ import annotations

import pytest
from llmtrain.operator import manifests as m

from llmtrain.api.crd import crd
from llmtrain.api.job import MAX_NAME_LENGTH, NAME_TOO_LONG
from llmtrain.api.validate import validate_object
from tests.manifests import base

# Every child whose name must be a DNS label (Services; labels carry the bare job name).
DNS_LABEL_CHILDREN = (m.service_name, m.serve_name)
# The rest are DNS subdomains (at most 253).
SUBDOMAIN_CHILDREN = (m.head_name, m.auth_secret_name, m.spec_configmap_name, m.network_policy_name)


def test_longest_name_fits_every_child() -> None:
    name = "n" * MAX_NAME_LENGTH
    for child in DNS_LABEL_CHILDREN:
        assert len(child(name)) <= 63, child.__name__
    for child in SUBDOMAIN_CHILDREN:
        assert len(child(name)) <= 253, child.__name__
    assert len(m.worker_name(name, 1023)) <= 253  # resources.workers ≤ 1024
    assert len(m.selector_labels(name)[m.LABEL_JOB]) <= 63


def test_limit_is_as_long_as_the_children_allow() -> None:
    """Not needlessly short either: one more character breaks a Service name."""
    assert max(len(child("n" * (MAX_NAME_LENGTH + 1))) for child in DNS_LABEL_CHILDREN) == 64


@pytest.mark.parametrize("length", [MAX_NAME_LENGTH, MAX_NAME_LENGTH + 1, 63, 64])
def test_validate_and_crd_rule_agree_on_the_limit(length: int) -> None:
    doc = base()
    doc["metadata"]["name"] = "n" * length
    problems = [str(p) for p in validate_object(doc)]
    if length <= MAX_NAME_LENGTH:
        assert problems == []
    else:
        # One problem: pydantic's check and the CEL rule share their message.
        assert problems == [f"metadata.name: {NAME_TOO_LONG}"]
    root = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    (rule,) = root["x-kubernetes-validations"]
    assert rule == {
        "rule": f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
        "message": NAME_TOO_LONG,
        "fieldPath": ".metadata.name",
    }
