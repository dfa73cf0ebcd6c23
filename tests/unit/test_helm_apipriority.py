"""The chart's API Priority and Fairness FlowSchema (charts/llmtrain/templates/apipriority.yaml),
rendered by the real ``helm`` without a cluster: it must match exactly the ServiceAccount the
operator's Deployment runs as (a FlowSchema for another name would silently leave the operator
in the shared ``workload-low`` level), and come before the built-in ``service-accounts`` schema.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.test_helm_chart import needs_helm, of_kind, render

# The built-in FlowSchema every ServiceAccount falls under otherwise (matchingPrecedence).
SERVICE_ACCOUNTS_PRECEDENCE = 9000


def apf_problems(docs: list[dict[str, Any]], level: str = "workload-high") -> list[str]:
    """What is wrong with the rendered FlowSchema(s) for the operator's ServiceAccount."""
    deployments = of_kind(docs, "Deployment")
    if len(deployments) != 1:
        return [f"expected one Deployment, found {len(deployments)}"]
    dep = deployments[0]
    sa = (dep["metadata"]["namespace"], dep["spec"]["template"]["spec"]["serviceAccountName"])
    schemas = of_kind(docs, "FlowSchema")
    if len(schemas) != 1:
        return [f"expected one FlowSchema, found {len(schemas)}"]
    fs = schemas[0]
    problems = []
    if fs["apiVersion"] != "flowcontrol.apiserver.k8s.io/v1":
        problems.append(f"apiVersion {fs['apiVersion']}")
    spec = fs["spec"]
    if spec["priorityLevelConfiguration"]["name"] != level:
        problems.append(f"priority level {spec['priorityLevelConfiguration']['name']}, not {level}")
    if not 0 < spec["matchingPrecedence"] < SERVICE_ACCOUNTS_PRECEDENCE:
        problems.append(f"matchingPrecedence {spec['matchingPrecedence']} does not beat service-accounts")
    subjects = {
        (s["serviceAccount"]["namespace"], s["serviceAccount"]["name"])
        for rule in spec["rules"]
        for s in rule["subjects"]
        if s["kind"] == "ServiceAccount"
    }
    if subjects != {sa}:
        problems.append(f"subjects {sorted(subjects)}, the operator runs as {sa}")
    every = [
        r
        for rule in spec["rules"]
        for r in rule.get("resourceRules") or []
        if r["verbs"] == ["*"]
        and r["resources"] == ["*"]
        and r.get("clusterScope")
        and r["namespaces"] == ["*"]
    ]
    if not every:
        problems.append("not every request of the ServiceAccount is matched")
    return problems


@needs_helm
@pytest.mark.parametrize(
    "args",
    [(), ("--set", "serviceAccount.name=trainer-bot"), ("--set", "watchNamespaces={team-a,team-b}")],
)
def test_flowschema_matches_the_operators_service_account(args: tuple[str, ...]) -> None:
    assert apf_problems(render(*args)) == []


@needs_helm
def test_flowschema_check_catches_another_service_account_and_can_be_turned_off() -> None:
    docs = render()
    fs = of_kind(docs, "FlowSchema")[0]
    # Negative controls: a subject that is not the operator's, a precedence after the default.
    fs["spec"]["rules"][0]["subjects"][0]["serviceAccount"]["name"] = "someone-else"
    fs["spec"]["matchingPrecedence"] = 9500
    problems = apf_problems(docs)
    assert any("subjects" in p for p in problems) and any("matchingPrecedence" in p for p in problems)
    assert of_kind(render("--set", "apiPriority.enabled=false"), "FlowSchema") == []
    custom = render(
        "--set", "apiPriority.priorityLevel=llmtrain", "--set", "apiPriority.matchingPrecedence=500"
    )
    assert apf_problems(custom, level="llmtrain") == []
