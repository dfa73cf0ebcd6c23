"""The generated CRD: up to date, structural, documented, and cheap enough for CEL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from llmtrain.api.crd import CRD_FILE, crd, crd_yaml
from llmtrain.api.schema import PRESERVE_UNKNOWN_ALLOWLIST, model_schema, spec_schema
from llmtrain.api.spec import LLMTrainingJobSpec
from llmtrain.cli import app

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN_KEYS = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "title", "const", "nullable"}


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, schema) for every property, array item and map value schema."""
    yield path, node
    for key, sub in node.get("properties", {}).items():
        yield from walk(sub, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def structural_problems(schema: dict[str, Any]) -> list[str]:
    problems = []
    for path, node in walk(schema):
        for key in FORBIDDEN_KEYS & node.keys():
            problems.append(f"{path}: {key} is not allowed in a structural schema")
        if node.get("x-kubernetes-int-or-string"):
            continue
        if "type" not in node:
            problems.append(f"{path}: no type")
        if node.get("x-kubernetes-preserve-unknown-fields") and not any(
            path.endswith(f".{n}") or path.endswith(f".{n}[]") for n in ("affinity", "volumes")
        ):
            problems.append(f"{path}: preserve-unknown-fields outside the allowlist")
        if (
            node.get("type") == "number"
            and isinstance(node.get("exclusiveMinimum"), float | int)
            and not isinstance(node.get("exclusiveMinimum"), bool)
        ):
            problems.append(f"{path}: exclusiveMinimum must be a boolean in OpenAPI v3.0")
    return problems


def test_crd_file_is_up_to_date() -> None:
    assert (REPO / CRD_FILE).read_text() == crd_yaml(), (
        "crds/ is stale: run `llmtrain crd > " + CRD_FILE + "`"
    )


def test_cli_crd_check(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["crd", "--check", str(REPO / CRD_FILE)]).exit_code == 0
    stale = tmp_path / "stale.yaml"
    stale.write_text(crd_yaml().replace("Number of transformer blocks.", "Old text."))
    result = runner.invoke(app, ["crd", "--check", str(stale)])
    assert result.exit_code == 1


def test_schema_is_structural() -> None:
    root = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert structural_problems(root) == []


def test_structural_check_catches_pydantic_dump() -> None:
    # Negative control: pydantic's own JSON schema is not structural; the check must say so.
    dumped = LLMTrainingJobSpec.model_json_schema(by_alias=True)
    problems = structural_problems(dumped)
    assert any("$defs" in p or "$ref" in p for p in problems)
    assert any("anyOf" in p for p in problems)
    assert any("title" in p for p in problems)


def test_every_property_is_described() -> None:
    for path, node in walk(spec_schema(), "spec"):
        if path.endswith("[]") or path.endswith("{}") or path == "spec":
            continue
        desc = node.get("description", "")
        name = path.rsplit(".", 1)[-1]
        assert len(desc) >= 8 and desc.lower() != name.lower(), f"{path}: description {desc!r}"


def test_kubectl_explain_text_for_architecture() -> None:
    arch = spec_schema()["properties"]["model"]["properties"]["architecture"]
    assert (
        "multipleOf * ceil(int(ffnDimMultiplier * int(8 * dModel / 3)) / multipleOf)"
        in (arch["properties"]["ffnHiddenSize"]["description"])
    )
    assert arch["properties"]["kvHeads"]["minimum"] == 1
    assert arch["required"] == ["layers", "dModel", "heads", "contextLength"]


def test_preserve_unknown_only_on_allowlist() -> None:
    seen = [p for p, n in walk(spec_schema(), "spec") if n.get("x-kubernetes-preserve-unknown-fields")]
    assert sorted(seen) == ["spec.resources.affinity", "spec.resources.volumes[]"]
    assert set(PRESERVE_UNKNOWN_ALLOWLIST) == {"Affinity", "Volume"}

    from typing import ClassVar

    from llmtrain.api.base import ApiModel

    class Sneaky(ApiModel):
        preserve_unknown: ClassVar[bool] = True

    with pytest.raises(TypeError, match="allowlist"):
        model_schema(Sneaky)


def test_defaults_let_cel_read_omitted_objects() -> None:
    props = spec_schema()["properties"]
    # Object defaults are complete: the apiserver evaluates CEL rules on a default as written.
    assert props["resources"]["default"]["workers"] == 1
    assert props["resources"]["default"]["worker"] == {"cpu": "4", "memory": "16Gi"}
    assert props["resources"]["properties"]["workers"]["default"] == 1
    assert props["resources"]["properties"]["head"]["default"] == {"cpu": "2", "memory": "8Gi"}
    assert props["training"]["properties"]["schedule"]["default"] == {
        "warmupSteps": 0,
        "decay": "cosine",
        "minLr": 0.0,
    }
    assert props["training"]["properties"]["schedule"]["properties"]["warmupSteps"]["default"] == 0


def test_bounds_are_openapi_v3_0() -> None:
    frac = spec_schema()["properties"]["data"]["properties"]["validationFraction"]
    assert frac["minimum"] == 0 and frac["exclusiveMinimum"] is True
    assert frac["maximum"] == 0.5 and frac["exclusiveMaximum"] is True


def test_cel_rules_over_lists_and_strings_are_bounded() -> None:
    """The apiserver rejects CRDs whose CEL cost is unbounded: lists/strings used by rules need limits."""
    for path, node in walk(spec_schema(), "spec"):
        for rule in node.get("x-kubernetes-validations", []):
            text = rule["rule"]
            for key, sub in node.get("properties", {}).items():
                if f"self.{key}" not in text:
                    continue
                if sub.get("type") == "array":
                    assert "maxItems" in sub, f"{path}.{key} is used by {text!r} without maxItems"
                if sub.get("type") == "string" and "==" in text and "oldSelf" not in text:
                    assert "maxLength" in sub or "enum" in sub, f"{path}.{key} without maxLength"


def test_crd_metadata_and_printer_columns() -> None:
    doc = yaml.safe_load(crd_yaml())
    spec = doc["spec"]
    assert doc["metadata"]["name"] == "llmtrainingjobs.llmtrain.dev"
    assert spec["names"]["shortNames"] == ["ltj"]
    assert "llmtrain" in spec["names"]["categories"]
    version = spec["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert list(columns) == [
        "Phase",
        "Progress",
        "Step",
        "Loss",
        "Val PPL",
        "Tokens/s",
        "ETA",
        "Age",
        "Reason",
        "Serving",
        "Checkpoint",
        "Best Trial",
    ]
    assert columns["Serving"] == ".status.serving.url"
    assert columns["Best Trial"] == ".status.tuning.best.metric"
    # Selected by condition type, never "the last condition".
    assert columns["Reason"] == '.status.conditions[?(@.type=="Running")].reason'
    assert "-1" not in columns["Reason"]
    phase = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["phase"]
    assert phase["enum"] == [
        "Pending",
        "Provisioning",
        "Preprocessing",
        "Tuning",
        "Training",
        "Exporting",
        "Succeeded",
        "Failed",
        "Suspended",
    ]
