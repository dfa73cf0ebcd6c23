"""llmtrain.operator: the Kopf operator (imported as llmtrain.operator; needs no torch)."""

from __future__ import annotations

import sys


def forgo_kubernetes_client() -> None:
    """Make ``import kubernetes`` fail in this process, unless something already imported it.

    The operator talks to the API server through :mod:`llmtrain.operator.kube` and never
    uses the official client, but Kopf imports the client's model classes whenever the
    package is installed (only for isinstance checks on objects the operator never hands
    it): ~40 MB of RSS, against ~55 MB for the operator's whole import without it. The
    operator image does not install the client; a development venv does (the tests use
    it), so the operator's entry points call this before importing Kopf.
    """
    sys.modules.setdefault("kubernetes", None)  # type: ignore[arg-type]
