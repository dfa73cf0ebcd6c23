"""``llmtrain validate`` and ``llmtrain crd``: the API, checked and printed, without a cluster."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from llmtrain.cli.consoles import console, err_console


def validate(
    files: Annotated[list[Path], typer.Argument(help="Manifests to check.", exists=True, dir_okay=False)],
    old: Annotated[
        Path | None,
        typer.Option(help="The stored version of the same jobs: also check the update (immutable fields)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print problems as JSON lines.")] = False,
) -> None:
    """Check LLMTrainingJob manifests with the schema and the CRD's own CEL rules; exit 1 on problems."""
    from llmtrain.api.validate import validate_file

    bad = 0
    for f in files:
        for result in validate_file(f, old):
            if as_json:
                for p in result.problems:
                    print(
                        json.dumps(
                            {
                                "file": result.file,
                                "name": result.name,
                                "path": p.path,
                                "message": p.message,
                                "layer": p.layer,
                            }
                        )
                    )
                bad += len(result.problems)
                continue
            if not result.problems:
                # One line per result whatever the width (rich wraps at 80 columns
                # when piped): scripts and CI grep these lines.
                console.print(
                    f"[green]✓[/] {escape(str(result.file))}: {escape(result.name)} is valid", soft_wrap=True
                )
                continue
            bad += len(result.problems)
            n = len(result.problems)
            console.print(
                f"[red]✗[/] {escape(str(result.file))}: {escape(result.name)}: {n} problem{'s' * (n != 1)}",
                soft_wrap=True,
            )
            for p in result.problems:
                console.print(f"    [bold]{escape(p.path)}[/]: {escape(p.message)}", soft_wrap=True)
    raise typer.Exit(1 if bad else 0)


def crd(
    check: Annotated[
        Path | None, typer.Option(help="Compare with this file instead of printing; exit 1 if it differs.")
    ] = None,
) -> None:
    """Print the LLMTrainingJob CustomResourceDefinition generated from llmtrain.api."""
    from llmtrain.api.crd import crd_yaml

    text = crd_yaml()
    if check is None:
        print(text, end="")
        return
    if not check.exists() or check.read_text() != text:
        err_console.print(f"{check} is stale: regenerate it with `llmtrain crd > {check}`")
        raise typer.Exit(1)
    console.print(f"{check} is up to date")
