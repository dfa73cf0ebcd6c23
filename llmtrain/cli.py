"""The ``llmtrain`` command line.

Every command imports what it needs inside its function, so ``llmtrain --help``,
``validate`` and ``crd`` never load torch or ray.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    name="llmtrain",
    help="Train a language model from raw text to an exported model, locally or on Kubernetes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


@app.command()
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
                console.print(f"[green]✓[/] {result.file}: {result.name} is valid")
                continue
            bad += len(result.problems)
            n = len(result.problems)
            console.print(f"[red]✗[/] {result.file}: {result.name}: {n} problem{'s' * (n != 1)}")
            for p in result.problems:
                console.print(f"    [bold]{p.path}[/]: {p.message}")
    raise typer.Exit(1 if bad else 0)


@app.command()
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
