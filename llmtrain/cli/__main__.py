"""``python -m llmtrain.cli``: the ``llmtrain`` command."""

from llmtrain.cli import main

main()
