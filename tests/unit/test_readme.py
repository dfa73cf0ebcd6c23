"""README.md promises (issues 2 and 3): two set-up commands, the control plane for people."""

from __future__ import annotations

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def test_exactly_two_setup_commands() -> None:
    setup = _section("Set up and run")
    (block,) = re.findall(r"```bash\n(.*?)```", setup, re.S)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
    assert commands == ["make quickstart", "make test"]


def test_development_section_documents_the_local_control_plane() -> None:
    dev = _section("Development")
    for command in ("tests/cluster/run.sh up", "tests/cluster/run.sh logs", "tests/cluster/run.sh down"):
        assert command in dev, command
    assert "KUBECONFIG" in dev
