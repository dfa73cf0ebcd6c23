"""The offline task dataset (runtime/data/stdlib_task.py, ``llmtrain data stdlib-task``):
deterministic, split by source file, answers are the functions' names."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from llmtrain.runtime.data import stdlib_task as st
from llmtrain.runtime.data.collect import stdlib_root
from typer.testing import CliRunner

from llmtrain.cli import app


def test_the_command_writes_the_same_bytes_twice(tmp_path: Path) -> None:
    for out in ("a", "b"):
        r = CliRunner().invoke(
            app,
            [
                "data",
                "stdlib-task",
                "--out",
                str(tmp_path / out),
                "--train-records",
                "400",
                "--heldout-records",
                "60",
            ],
        )
        assert r.exit_code == 0, r.output
    for name in (st.TRAIN_NAME, st.HELDOUT_NAME):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    train = [json.loads(x) for x in (tmp_path / "a" / st.TRAIN_NAME).read_text().splitlines()]
    assert len(train) == 400


def test_split_by_file_and_answers_are_the_function_names() -> None:
    split = st.build(train_records=1000, heldout_records=200)
    assert len(split.train) == 1000 and len(split.heldout) == 200
    train_files = {r.file for r in split.train}
    heldout_files = {r.file for r in split.heldout}
    assert train_files.isdisjoint(heldout_files)  # no held-out record comes from a trained file
    assert not {r.prompt for r in split.heldout} & {r.prompt for r in split.train}
    assert split.files_heldout > 10 and split.files_train > 100
    # Every answer is the name of a function with that docstring in that file, not in the prompt.
    for r in split.heldout[:50]:
        tree = ast.parse((stdlib_root() / r.file).read_text(encoding="utf-8"))
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
        assert r.answer in names and r.answer.isidentifier()
        assert r.answer not in r.prompt and r.prompt.startswith(st.QUESTION)
        assert r.id == f"{r.file}:{r.id.split(':', 1)[1]}" and r.id.endswith(r.answer)


def test_records_are_chat_conversations() -> None:
    (record,) = st.build(train_records=1, heldout_records=1).train
    raw = json.loads(record.to_json())
    assert [m["role"] for m in raw["messages"]] == ["user", "assistant"]
    assert raw["messages"][1]["content"] == record.answer


def test_the_definition_kind_asks_about_the_same_functions_with_the_name_shown() -> None:
    hidden = st.build(train_records=300, heldout_records=60)
    shown = st.build(train_records=300, heldout_records=60, kind="definition")
    # The same functions and split, so the two kinds' figures compare ...
    assert [r.id for r in shown.train] == [r.id for r in hidden.train]
    assert [r.id for r in shown.heldout] == [r.id for r in hidden.heldout]
    # ... and only the definition kind's prompt holds the answer, on its def line.
    for h, s in zip(hidden.heldout, shown.heldout, strict=True):
        assert h.answer == s.answer and h.answer not in h.prompt
        assert s.prompt.splitlines()[1].startswith(f"def {s.answer}(")


def test_an_unknown_kind_is_refused_naming_the_flag() -> None:
    r = CliRunner().invoke(app, ["data", "stdlib-task", "--out", "/nonexistent/x", "--kind", "names"])
    assert r.exit_code != 0 and "--kind" in r.output
