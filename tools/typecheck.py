"""Type-check all three package roots as the one package ``llmtrain``.

mypy does not understand setuptools' ``package-dir`` mapping: ``mypy -p llmtrain``
silently checks only ``llmtrain/`` and skips ``operator/`` (llmtrain.operator) and
``runtime/`` (llmtrain.runtime). This builds the installed layout out of symlinks in a
temporary directory, runs ``mypy -p llmtrain`` on it, and fails unless the number of
files mypy checked equals the number of ``.py`` files under the three roots.

    python tools/typecheck.py [--root DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOTS = {"llmtrain": "llmtrain", "operator": "llmtrain/operator", "runtime": "llmtrain/runtime"}


def build_tree(root: Path, dest: Path) -> int:
    """Symlink every .py file into dest/<package path>; return how many there are."""
    count = 0
    for src_dir, pkg_dir in ROOTS.items():
        for py in sorted((root / src_dir).rglob("*.py")):
            if "__pycache__" in py.parts:
                continue
            target = dest / pkg_dir / py.relative_to(root / src_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(py.resolve(), target)
            count += 1
    return count


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    root: Path = args.root.resolve()
    cache = args.cache_dir or root / ".mypy_cache"
    with tempfile.TemporaryDirectory(prefix="llmtrain-mypy-") as tmp:
        expected = build_tree(root, Path(tmp))
        cmd = [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(root / "pyproject.toml"),
            "--cache-dir",
            str(cache),
            "-v",
            "-p",
            "llmtrain",
        ]
        proc = subprocess.run(
            cmd, cwd=tmp, env={**os.environ, "MYPYPATH": tmp}, capture_output=True, text=True
        )
        # -v logs one "Parsing <path> (<module>)" line per file it parses from source; cached
        # modules log "Metadata fresh"/"Found source" instead, so count the sources list.
        checked = {
            m.group(1)
            for m in re.finditer(r"BuildSource\(path='([^']+)'", proc.stderr)
            if m.group(1).startswith(tmp)
        }
        print(proc.stdout, end="")
        print(f"mypy checked {len(checked)} files; the package roots hold {expected} .py files")
        if proc.returncode != 0:
            return proc.returncode
        if len(checked) != expected:
            print(
                "mypy did not check every file of llmtrain, llmtrain.operator and llmtrain.runtime",
                file=sys.stderr,
            )
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
