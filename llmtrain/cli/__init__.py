"""The ``llmtrain`` command line, one module per command group:

    manifests   validate, crd               the API, without a cluster
    cluster     operator, driver            what the pods run
    local       run, report                 the whole workflow on this machine (display: its screen)
    data        data prepare, data inspect  the data stage alone
    model       export, generate, serve     the model leaves the system and talks

Every command imports what it needs inside its function, so ``llmtrain --help``,
``validate`` and ``crd`` never load torch or ray. The ``llmtrain`` console script is
:func:`main` (pyproject.toml); ``python -m llmtrain.cli`` runs the same.
"""

from __future__ import annotations

import typer

from llmtrain.cli import cluster, data, local, manifests, model

app = typer.Typer(
    name="llmtrain",
    help="Train a language model from raw text to an exported model, locally or on Kubernetes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Registration order is the order of `llmtrain --help`.
for command in (manifests.validate, manifests.crd, cluster.operator, local.run, local.report, cluster.driver):
    app.command()(command)
app.add_typer(data.app, name="data")
app.command("export")(model.export_cmd)
app.command("generate")(model.generate_cmd)
app.command("serve")(model.serve_cmd)


def main() -> None:
    app()
