"""A small task dataset built offline from the Python standard library's own source.

Each record asks for a function's name, as a chat (``kind``):

    docstring   user: the docstring's first paragraph and ``def ?(args):`` (the name hidden);
                the answer must be inferred — hard for a small model (bench/RESULTS.md)
    definition  user: ``def name(args):`` and the docstring's first paragraph; the answer is
                read off the definition — an extraction task a small model learns in minutes,
                so the fine-tuning machinery shows its effect (before: the base model does not
                even answer in the chat format)
    assistant:  the function's name (checked by the ``identifier`` task checker)

Both kinds use the same functions and the same split, so their figures compare.

The split is by source file: a file's records are all training or all held out (a stable hash
of its path relative to the standard library), so no held-out prompt comes from a module the
fine-tune saw. A held-out record whose prompt also occurs in training (the same docstring in
two modules, e.g. ``_pydecimal`` and a wrapper) is dropped, so exact recall cannot pass.

Deterministic: the same Python version gives the same bytes on any machine (files, functions
and the sample are ordered by path and hash, never by the file system's order). The
standard library's ``ast`` does the parsing; no dependency needed.

Note: ``examples/quickstart.yaml`` pretrains on this same source as plain text, so the base
model has seen the held-out files' text (not as prompt/answer pairs).
"""

from __future__ import annotations

import ast
import hashlib
import json
import keyword
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmtrain.runtime.data.collect import stdlib_files

TRAIN_NAME = "train.jsonl"
HELDOUT_NAME = "heldout.jsonl"
QUESTION = "Which Python function is this?"
KINDS = ("docstring", "definition")
MAX_DOC_CHARS = 300  # the quickstart's context is 256 tokens: prompt, chat markup and answer fit


@dataclass(frozen=True)
class TaskRecord:
    id: str  # "<file>:<qualified name>"
    file: str  # path relative to the standard library
    prompt: str
    answer: str

    def to_json(self) -> str:
        return json.dumps(
            {
                "id": self.id,
                "file": self.file,
                "messages": [
                    {"role": "user", "content": self.prompt},
                    {"role": "assistant", "content": self.answer},
                ],
            },
            ensure_ascii=False,
            sort_keys=True,
        )


@dataclass(frozen=True)
class TaskSplit:
    train: list[TaskRecord]
    heldout: list[TaskRecord]
    files_train: int
    files_heldout: int
    dropped_duplicates: int


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _first_paragraph(doc: str) -> str:
    para = doc.strip().split("\n\n", 1)[0]
    return " ".join(para.split())


def _args(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    # ast.unparse gives the argument list as written, defaults and annotations included.
    return ast.unparse(fn.args)


def function_records(rel: str, source: str, kind: str = "docstring") -> Iterator[TaskRecord]:
    """Public functions and methods of one file that have a usable docstring."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # a few stdlib files are templates or other versions' syntax
        return
    stack: list[tuple[str, ast.AST]] = [("", tree)]
    while stack:
        prefix, node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                stack.append((f"{prefix}{child.name}.", child))
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = child.name
                doc = ast.get_docstring(child)
                if name.startswith("_") or keyword.iskeyword(name) or not doc:
                    continue
                text, args = _first_paragraph(doc), _args(child)
                # A docstring or argument list that names its function gives the answer away.
                if len(text) < 20 or len(text) > MAX_DOC_CHARS or name in text or name in args:
                    continue
                if kind == "definition":
                    prompt = f"{QUESTION}\ndef {name}({args}):\n{text}"
                else:
                    prompt = f"{QUESTION}\n{text}\ndef ?({args}):"
                yield TaskRecord(f"{rel}:{prefix}{name}", rel, prompt, name)


def build(
    *,
    train_records: int = 3000,
    heldout_records: int = 300,
    heldout_percent: int = 10,
    kind: str = "docstring",
) -> TaskSplit:
    """The records of every stdlib file (tests excluded), split by file, then a stable sample."""
    if kind not in KINDS:
        raise ValueError(f"task kind must be one of {', '.join(KINDS)}, got {kind!r} (--kind)")
    if not 0 < heldout_percent < 100:
        raise ValueError(f"heldout percent must be in 1..99, got {heldout_percent} (--heldout-percent)")
    train: list[TaskRecord] = []
    heldout: list[TaskRecord] = []
    files = {"train": 0, "heldout": 0}
    for rel, path in stdlib_files(include_tests=False):
        records = list(function_records(rel, path.read_text(encoding="utf-8", errors="replace"), kind))
        if not records:
            continue
        side = "heldout" if _hash(rel) % 100 < heldout_percent else "train"
        files[side] += 1
        (heldout if side == "heldout" else train).extend(records)
    seen = {r.prompt for r in train}
    kept = [r for r in heldout if r.prompt not in seen]
    dropped = len(heldout) - len(kept)

    def sample(records: list[TaskRecord], n: int) -> list[TaskRecord]:
        return sorted(records, key=lambda r: (_hash(r.id), r.id))[:n]

    return TaskSplit(
        train=sample(train, train_records),
        heldout=sample(kept, heldout_records),
        files_train=files["train"],
        files_heldout=files["heldout"],
        dropped_duplicates=dropped,
    )


def write(split: TaskSplit, out: Path) -> tuple[Path, Path]:
    """``train.jsonl`` and ``heldout.jsonl`` under ``out`` (created)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / TRAIN_NAME, out / HELDOUT_NAME)
    for path, records in zip(paths, (split.train, split.heldout), strict=True):
        path.write_text("".join(r.to_json() + "\n" for r in records), encoding="utf-8")
    return paths
