"""The command line's two consoles: results on stdout, errors on stderr (no syntax
highlighting: paths and numbers print as written)."""

from __future__ import annotations

from rich.console import Console

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)
