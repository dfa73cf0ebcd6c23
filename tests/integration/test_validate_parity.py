"""``llmtrain validate`` and the apiserver judge every invalid manifest alike.

Each case of :mod:`tests.manifests` goes to both: ``llmtrain validate`` and
``kubectl apply --dry-run=server`` against the real kube-apiserver with the generated CRD.
Both must reject it and both must name the same field path. Transition (update) rules
are checked by first creating the old object for real, then dry-running the new one.
"""

from __future__ import annotations

import json
import subprocess
from typing import TYPE_CHECKING, Any

import pytest

from llmtrain.api.validate import validate_object
from tests.manifests import BASE, Case, invalid_cases, valid_cases

if TYPE_CHECKING:
    from conftest import Cluster

pytestmark = pytest.mark.cluster

CASES = invalid_cases()


@pytest.fixture(scope="module")
def crd_ns(cluster: Cluster) -> str:
    return cluster.crds_and_namespace("validate-parity")


def _apply(cluster: Cluster, ns: str, obj: dict[str, Any], dry_run: bool) -> subprocess.CompletedProcess[str]:
    args = ["apply", "-n", ns, "-f", "-"] + (["--dry-run=server"] if dry_run else [])
    return cluster.kubectl(*args, input=json.dumps(obj), check=False)


def _validate(case: Case) -> list[str]:
    # In-process (the CLI's --json output is tested in tests/unit/test_validate.py): a
    # subprocess per case would double this test's time on 2 cores.
    problems = validate_object(case.manifest, case.old)
    assert problems, f"llmtrain validate accepted {case.id}"
    return [p.path for p in problems]


def test_base_accepted_by_both(cluster: Cluster, crd_ns: str) -> None:
    r = _apply(cluster, crd_ns, BASE, dry_run=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("case", valid_cases(), ids=[c.id for c in valid_cases()])
def test_both_accept(cluster: Cluster, crd_ns: str, case: Case) -> None:
    assert validate_object(case.manifest) == []
    r = _apply(cluster, crd_ns, case.manifest, dry_run=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_same_verdict_and_field_path(cluster: Cluster, crd_ns: str, case: Case) -> None:
    paths = _validate(case)
    assert case.path in paths
    if case.old is not None:
        created = _apply(cluster, crd_ns, case.old, dry_run=False)
        assert created.returncode == 0, created.stderr
    r = _apply(cluster, crd_ns, case.manifest, dry_run=True)
    if case.old is not None:
        cluster.kubectl("delete", "ltj", "-n", crd_ns, case.name, "--wait=false", check=False)
    assert r.returncode != 0, f"apiserver accepted {case.id}"
    # kubectl prints "<path>: Invalid value…" / "unknown field \"<path>\"" — the same path.
    assert case.path in r.stderr, r.stderr
