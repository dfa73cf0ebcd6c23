"""The LLMTrainingJob CRD (crds/*.yaml) against a real kube-apiserver v1.35.

Applies the CRD and every example, then checks the printer columns, the field docs
served for `kubectl explain`, and that the CEL rules reject invalid objects with
their messages.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # the fixture's type; never imported at run time
    from conftest import Cluster

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
# LLMTRAIN_CRDS_DIR: try another copy of the CRD (e.g. a fix) without touching crds/
CRDS_DIR = Path(os.environ.get("LLMTRAIN_CRDS_DIR", str(ROOT / "crds")))
CRD_FILES = sorted(CRDS_DIR.glob("*.yaml"))
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def _yaml() -> Any:
    return pytest.importorskip("yaml")


def _crd() -> dict[str, Any]:
    for f in CRD_FILES:
        for doc in _yaml().safe_load_all(f.read_text()):
            if (
                doc
                and doc.get("kind") == "CustomResourceDefinition"
                and doc["spec"]["group"] == "llmtrain.dev"
            ):
                return dict(doc)
    pytest.skip("crds/ has no llmtrain.dev CustomResourceDefinition yet")


def _examples() -> list[dict[str, Any]]:
    docs = []
    for f in EXAMPLES:
        for doc in _yaml().safe_load_all(f.read_text()):
            if doc and doc.get("kind") == "LLMTrainingJob":
                doc["metadata"].pop("namespace", None)  # each test applies into its own namespace
                docs.append(doc)
    return docs


@pytest.fixture(scope="module")
def crd(cluster: Cluster) -> dict[str, Any]:
    doc = _crd()
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS_DIR))
    name = doc["metadata"]["name"]

    def established() -> bool:
        c = cluster.apiext.read_custom_resource_definition(name)
        return any(x.type == "Established" and x.status == "True" for x in c.status.conditions or [])

    cluster.wait_for(established, what=f"CRD {name} Established")
    # discovery must list the short name before kubectl can use `ltj`
    cluster.wait_for(
        lambda: cluster.kubectl("get", "ltj", "-A", check=False).returncode == 0,
        what="`kubectl get ltj` to work",
    )
    return doc


def _apply(cluster: Cluster, ns: str, obj: dict[str, Any]) -> Any:
    return cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(obj), check=False)


def test_examples_accepted_and_printer_columns(cluster: Cluster, crd: dict[str, Any], namespace: str) -> None:
    examples = _examples()
    assert examples, "examples/*.yaml has no LLMTrainingJob"
    for obj in examples:
        r = _apply(cluster, namespace, obj)
        assert r.returncode == 0, f"{obj['metadata']['name']} rejected: {r.stderr}"
    out = cluster.kubectl("get", "ltj", "-n", namespace).stdout
    header = out.splitlines()[0]
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    for col in version.get("additionalPrinterColumns", []):
        if col.get("priority", 0) == 0:
            assert col["name"].upper() in header, f"column {col['name']!r} missing from: {header}"
    for obj in examples:
        assert obj["metadata"]["name"] in out
    # the same objects through the full resource name and the category
    wide = cluster.kubectl("get", "llmtrainingjobs.llmtrain.dev", "-n", namespace, "-o", "name").stdout
    assert len(wide.split()) == len(examples)


def test_explain_model(cluster: Cluster, crd: dict[str, Any]) -> None:
    r = cluster.kubectl("explain", "ltj.spec.model", check=False)
    assert r.returncode == 0, r.stderr
    assert "KIND:" in r.stdout and "LLMTrainingJob" in r.stdout
    assert "FIELDS:" in r.stdout
    model = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "model"
    ]
    for field in model.get("properties", {}):
        assert field in r.stdout, f"field {field!r} not explained"


def _quickstart() -> dict[str, Any]:
    for obj in _examples():
        if obj["metadata"]["name"] == "quickstart":
            return obj
    pytest.skip("examples/quickstart.yaml not found")


def _borrow(path: Callable[[dict[str, Any]], Any]) -> Any:
    """The first value `path` finds in the examples (so mutations stay valid as the schema evolves)."""
    for obj in _examples():
        try:
            value = path(obj)
        except (KeyError, IndexError, TypeError, StopIteration):
            continue
        if value is not None:
            return copy.deepcopy(value)
    pytest.skip("no example carries the field this case borrows")


def _set_heads(o: dict[str, Any]) -> None:
    arch = o["spec"]["model"]["architecture"]
    arch["heads"] = 7
    arch.pop("kvHeads", None)


def _two_source_kinds(o: dict[str, Any]) -> None:
    o["spec"]["data"]["sources"][0]["s3"] = _borrow(
        lambda e: next(s["s3"] for s in e["spec"]["data"]["sources"] if "s3" in s)
    )


def _two_tokenizers(o: dict[str, Any]) -> None:
    o["spec"]["data"]["tokenizer"]["load"] = _borrow(lambda e: e["spec"]["data"]["tokenizer"]["load"])


def _duplicate_source_names(o: dict[str, Any]) -> None:
    src = o["spec"]["data"]["sources"]
    src.append(copy.deepcopy(src[0]))


INVALID: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("heads", _set_heads, "dModel must be divisible by heads"),
    ("source-kinds", _two_source_kinds, "set exactly one of s3, local, huggingface, pythonStdlib"),
    ("tokenizer", _two_tokenizers, "set exactly one of tokenizer.train or tokenizer.load"),
    ("dup-sources", _duplicate_source_names, "source names must be unique"),
]


@pytest.mark.parametrize(("case", "mutate", "message"), INVALID, ids=[c[0] for c in INVALID])
def test_cel_rejections(
    cluster: Cluster,
    crd: dict[str, Any],
    namespace: str,
    case: str,
    mutate: Callable[[dict[str, Any]], None],
    message: str,
) -> None:
    crd_text = "\n".join(f.read_text() for f in CRD_FILES)
    if message not in crd_text:
        pytest.skip(f"the CRD no longer carries the CEL message {message!r}")
    obj = copy.deepcopy(_quickstart())
    obj["metadata"]["name"] = f"invalid-{case}"
    mutate(obj)
    r = _apply(cluster, namespace, obj)
    assert r.returncode != 0, f"apiserver accepted an invalid object ({case})"
    assert message in r.stderr, r.stderr
    assert "Invalid value" in r.stderr or "invalid" in r.stderr.lower()
