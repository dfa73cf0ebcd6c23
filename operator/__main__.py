"""``python -m llmtrain.operator``: the operator process, as ``llmtrain operator`` runs it."""

from llmtrain.operator import forgo_kubernetes_client

forgo_kubernetes_client()

from llmtrain.operator.main import main  # noqa: E402  (after the guard: it imports Kopf)

main()
