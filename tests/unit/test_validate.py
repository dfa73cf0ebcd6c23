"""``llmtrain validate``: every invalid manifest is rejected at its exact field path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from llmtrain.api import validate as validate_mod
from llmtrain.api.validate import validate_object
from llmtrain.cli import app
from tests.manifests import Case, base, invalid_cases, valid_cases

REPO = Path(__file__).resolve().parents[2]
CASES = invalid_cases()


def test_base_manifest_is_valid() -> None:
    assert validate_object(base()) == []


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_invalid_manifest_rejected_at_field_path(case: Case) -> None:
    problems = validate_object(case.manifest, case.old)
    assert case.path in [p.path for p in problems], [str(p) for p in problems]


def test_case_library_covers_every_kind_of_check() -> None:
    ids = " ".join(c.id for c in CASES)
    for kind in ("enum ", "min ", "max ", "pattern ", "immutable", "inline", "exactly one"):
        assert kind in ids
    # One case per CEL rule in the CRD: count rules and compare with rule cases.
    from llmtrain.api.schema import spec_schema

    def rules(node: object) -> int:
        if isinstance(node, dict):
            return len(node.get("x-kubernetes-validations", [])) + sum(rules(v) for v in node.values())
        if isinstance(node, list):
            return sum(rules(v) for v in node)
        return 0

    from tests.manifests import rule_cases

    assert len(rule_cases()) >= rules(spec_schema())


def test_every_cel_rule_has_its_own_invalid_case() -> None:
    """Each CEL rule, at the object that carries it, is violated by at least one case.

    A count of rules against cases is not enough: rules that share a message (the quantity
    rules on resources.worker and resources.head) must each be hit where they live.
    """
    import re

    from llmtrain.api.schema import spec_schema

    rules: list[tuple[str, str]] = []  # (object path without list indices, message)

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            for rule in node.get("x-kubernetes-validations", []):
                rules.append((path, rule.get("message") or rule["rule"]))
            for key, sub in node.get("properties", {}).items():
                walk(sub, f"{path}.{key}")
            walk(node.get("items"), path)

    walk(spec_schema(), "spec")
    hits = {
        (re.sub(r"\[\d+\]", "", p.path), p.message) for c in CASES for p in validate_object(c.manifest, c.old)
    }
    missing = [
        (where, msg)
        for where, msg in rules
        if not any(msg in m and (path == where or path.startswith(f"{where}.")) for path, m in hits)
    ]
    assert len(rules) >= 20
    assert missing == []


def test_transition_rules_only_on_update() -> None:
    doc = base()
    old = base()
    old["spec"]["resources"]["workers"] = 4
    assert validate_object(doc) == []
    assert [p.path for p in validate_object(doc, old)] == ["spec.resources.workers"]
    # suspend and lifecycle fields stay mutable
    old = base()
    old["spec"]["suspend"] = True
    old["spec"]["activeDeadlineSeconds"] = 5
    old["spec"]["ttlSecondsAfterFinished"] = 1
    assert validate_object(doc, old) == []


def test_unknown_field_suggests_spelling() -> None:
    doc = base()
    doc["spec"]["model"]["architecture"]["kvheads"] = 2
    (p,) = validate_object(doc)
    assert p.path == "spec.model.architecture.kvheads"
    assert "did you mean 'kvHeads'" in p.message


def test_cel_uses_schema_defaults_like_the_apiserver() -> None:
    # resources omitted: workers defaults to 1, so the divisibility rule must evaluate (and pass).
    doc = base()
    del doc["spec"]["resources"]
    doc["spec"]["training"]["batch"] = {"globalBatchSize": 12, "microBatchSize": 4}
    assert validate_object(doc) == []
    doc["spec"]["training"]["batch"] = {"globalBatchSize": 10, "microBatchSize": 4}
    assert [p.path for p in validate_object(doc)] == ["spec.training.batch.globalBatchSize"]


def test_unsupported_field_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(validate_mod.NOT_SUPPORTED_YET, "spec.data.sources[].huggingface", "planned")
    problems = validate_object(base())
    assert [(p.path, p.layer) for p in problems] == [("spec.data.sources[].huggingface", "unsupported")]
    assert "not supported yet: planned" in problems[0].message


runner = CliRunner()


def test_cli_examples_are_valid() -> None:
    files = sorted(str(p) for p in (REPO / "examples").glob("*.yaml"))
    assert len(files) >= 3
    result = runner.invoke(app, ["validate", *files])
    assert result.exit_code == 0, result.output
    assert result.output.count("is valid") == len(files)


def test_cli_reports_every_problem_with_path(tmp_path: Path) -> None:
    doc = base()
    doc["spec"]["model"]["architecture"]["kvHeads"] = 3
    doc["spec"]["training"]["optimizer"]["type"] = "adam"
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(doc))
    result = runner.invoke(app, ["validate", str(f)])
    assert result.exit_code == 1
    assert "spec.model.architecture.kvHeads: heads must be divisible by kvHeads" in result.output
    assert "spec.training.optimizer.type" in result.output
    result = runner.invoke(app, ["validate", "--json", str(f)])
    paths = {json.loads(line)["path"] for line in result.output.splitlines()}
    assert paths == {"spec.model.architecture.kvHeads", "spec.training.optimizer.type"}


def test_cli_prints_text_that_looks_like_markup_intact(tmp_path: Path) -> None:
    # rich once ate "[a-z0-9]" as a markup tag and printed the name pattern as '^(*)?$'.
    doc = base()
    doc["metadata"]["name"] = "Bad_[red]Name"
    f = tmp_path / "[bold]bad.yaml"
    f.write_text(yaml.safe_dump(doc))
    result = runner.invoke(app, ["validate", str(f)])
    assert result.exit_code == 1
    assert r"'^[a-z0-9]([a-z0-9\-]*[a-z0-9])?$'" in result.output, result.output
    assert f"✗ {f}: Bad_[red]Name: 1 problem" in result.output


def test_cli_prints_one_line_per_result_however_long_the_path(tmp_path: Path) -> None:
    # CI clones into deeper folders than a laptop; rich wraps piped output at
    # 80 columns, which once split "is valid" across two lines.
    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / "examples"
    deep.mkdir(parents=True)
    good, bad = deep / "good.yaml", deep / "bad.yaml"
    good.write_text(yaml.safe_dump(base()))
    doc = base()
    doc["spec"]["model"]["architecture"]["kvHeads"] = 3
    bad.write_text(yaml.safe_dump(doc))
    assert len(f"✓ {good}: x is valid") > 80
    result = runner.invoke(app, ["validate", str(good), str(bad)])
    lines = result.output.splitlines()
    assert any(line.startswith("✓ ") and str(good) in line and line.endswith("is valid") for line in lines), (
        lines
    )
    assert any(line.startswith("✗ ") and str(bad) in line and line.endswith("1 problem") for line in lines), (
        lines
    )


def test_cli_old_file_checks_update(tmp_path: Path) -> None:
    new, old = tmp_path / "new.yaml", tmp_path / "old.yaml"
    new.write_text(yaml.safe_dump(base()))
    changed = base()
    changed["spec"]["training"]["batch"]["microBatchSize"] = 8
    old.write_text(yaml.safe_dump(changed))
    result = runner.invoke(app, ["validate", "--old", str(old), str(new)])
    assert result.exit_code == 1
    assert "spec.training.batch: spec.training.batch is immutable" in result.output


def test_cli_yaml_error_and_no_job(tmp_path: Path) -> None:
    f = tmp_path / "broken.yaml"
    f.write_text("spec: [unclosed\n")
    assert runner.invoke(app, ["validate", str(f)]).exit_code == 1
    g = tmp_path / "cm.yaml"
    g.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    result = runner.invoke(app, ["validate", str(g)])
    assert result.exit_code == 1 and "no LLMTrainingJob" in result.output


def test_null_means_unset_as_on_the_apiserver(tmp_path: Path) -> None:
    from llmtrain.api.job import load_job
    from tests.manifests import valid_cases

    for case in valid_cases():
        assert validate_object(case.manifest) == [], case.id
        f = tmp_path / "job.yaml"
        f.write_text(yaml.safe_dump(case.manifest))
        load_job(f)  # what `llmtrain run` and the driver read: accepted the same way
    doc = base()
    doc["spec"]["data"]["sources"] = None  # required: pruned, then missing (no CEL crash)
    assert [p.path for p in validate_object(doc)] == ["spec.data.sources"]


@pytest.mark.parametrize("case", valid_cases(), ids=[c.id for c in valid_cases()])
def test_valid_variants_accepted(case: Case) -> None:
    """What both validators must accept (tests/integration/test_validate_parity.py sends the
    same manifests to the apiserver)."""
    assert validate_object(case.manifest) == []


def test_issue13_defects_named_with_a_fix() -> None:
    """The defects found by trying the product as a new user: each rejected at its field, with a
    message that says what to write instead."""
    by_id = {c.id: c for c in CASES}
    expected = {
        "s3 uri with one slash": "write s3://bucket/prefix",
        "s3 uri without bucket": "write s3://bucket/prefix",
        "minLr above lr": "lower minLr or raise lr",
        "minLr above an integer lr": "lower minLr or raise lr",
        "name too long": "choose a shorter name",
    }
    for case_id, fix in expected.items():
        case = by_id[case_id]
        problems = validate_object(case.manifest)
        assert [p.path for p in problems] == [case.path], [str(p) for p in problems]
        assert fix in problems[0].message
