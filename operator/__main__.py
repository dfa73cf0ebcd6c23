"""``python -m llmtrain.operator``: ``llmtrain operator`` by another name. One command line
(llmtrain/cli/cluster.py) with one set of flags; this entry point stays for the scripts and
tests that start the operator as a module."""

import sys

from llmtrain.cli import app

app(["operator", *sys.argv[1:]], prog_name="llmtrain")
