"""Collect: sources → work units → keyed documents."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from llmtrain.runtime.data import collect
from llmtrain.runtime.data.collect import (
    SourceConfig,
    SourceError,
    WorkUnit,
    plan_source,
    read_unit,
    split_text,
)


def _fake_stdlib(root: Path) -> None:
    files = {
        "os.py": "import sys\n",
        "json/__init__.py": "x = 1\n",
        "test/test_os.py": "def test(): pass\n",
        "unittest/test/test_case.py": "t = 1\n",
        "idlelib/idle_test/test_x.py": "i = 1\n",
        "site-packages/numpy/__init__.py": "not stdlib\n",
        "dist-packages/foo.py": "not stdlib\n",
        "__pycache__/os.cpython-311.py": "cache\n",
        "data.txt": "not python\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "latin1.py").write_bytes(b"s = '\xe9t\xe9'\n")  # not UTF-8


def test_stdlib_excludes_site_packages_and_tests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_stdlib(tmp_path)
    monkeypatch.setattr(collect, "stdlib_root", lambda: tmp_path)
    rels = [r for r, _ in collect.stdlib_files(include_tests=False)]
    assert rels == ["json/__init__.py", "latin1.py", "os.py"]


def test_stdlib_include_tests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """spec.data.sources[].pythonStdlib.includeTests"""
    _fake_stdlib(tmp_path)
    monkeypatch.setattr(collect, "stdlib_root", lambda: tmp_path)
    rels = [r for r, _ in collect.stdlib_files(include_tests=True)]
    assert rels == [
        "idlelib/idle_test/test_x.py",
        "json/__init__.py",
        "latin1.py",
        "os.py",
        "test/test_os.py",
        "unittest/test/test_case.py",
    ]


def test_stdlib_undecodable_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_stdlib(tmp_path)
    monkeypatch.setattr(collect, "stdlib_root", lambda: tmp_path)
    src = SourceConfig("std", 0, "pythonStdlib", text_unit="file")
    results = [read_unit(u) for u in plan_source(src)]
    assert sum(r.undecodable for r in results) == 1
    assert sorted(t for r in results for _, t in r.docs) == ["import sys\n", "x = 1\n"]


def test_real_stdlib_has_no_site_packages() -> None:
    files = collect.stdlib_files(include_tests=False)
    assert len(files) > 300
    assert not any("site-packages" in r or r.startswith("test/") for r, _ in files)
    with_tests = collect.stdlib_files(include_tests=True)
    assert any(r.startswith("test/") for r, _ in with_tests) and len(with_tests) > len(files)


def test_text_units() -> None:
    """spec.data.sources[].local.textUnit / s3.textUnit"""
    text = "para one\nline two\n\n\n  para two\r\n\r\npara three\n"
    assert split_text(text, "file") == [text]
    assert split_text(text, "paragraph") == ["para one\nline two", "  para two", "para three\n"]
    assert split_text(text, "line") == ["para one", "line two", "  para two", "para three"]


def test_local_glob_and_keys_are_stable(tmp_path: Path) -> None:
    """spec.data.sources[].local.glob"""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("one\n\ntwo")
    (tmp_path / "b.txt").write_text("three")
    (tmp_path / "skip.md").write_text("not matched")
    src = SourceConfig("loc", 0, "local", glob=str(tmp_path / "**" / "*.txt"), text_unit="paragraph")
    units = plan_source(src)
    assert [Path(u.location).relative_to(tmp_path).as_posix() for u in units] == ["a/x.txt", "b.txt"]
    docs = [d for u in units for d in read_unit(u).docs]
    assert sorted(t for _, t in docs) == ["one", "three", "two"]
    again = [d for u in plan_source(src) for d in read_unit(u).docs]
    assert sorted(docs) == sorted(again)
    assert len({k for k, _ in docs}) == 3
    # The same corpus in another folder: the same keys (so the same validation split).
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(tmp_path / "a", moved / "a")
    shutil.copy(tmp_path / "b.txt", moved / "b.txt")
    src2 = SourceConfig("loc", 0, "local", glob=str(moved / "**" / "*.txt"), text_unit="paragraph")
    assert [u.ident for u in plan_source(src2)] == ["a/x.txt", "b.txt"]
    assert sorted(d for u in plan_source(src2) for d in read_unit(u).docs) == sorted(docs)
    # A glob naming one file: keyed by its name within its folder.
    one = SourceConfig("loc", 0, "local", glob=str(tmp_path / "b.txt"), text_unit="paragraph")
    assert [u.ident for u in plan_source(one)] == ["b.txt"]


def test_nonexistent_glob_names_the_field(tmp_path: Path) -> None:
    src = SourceConfig("loc", 3, "local", glob=str(tmp_path / "nope" / "*.txt"))
    with pytest.raises(SourceError, match=r"spec\.data\.sources\[3\]\.local\.glob"):
        plan_source(src)


def test_jsonl_field_and_gzip(tmp_path: Path) -> None:
    """spec.data.sources[].local.format=jsonl + field, .gz decompressed"""
    lines = [json.dumps({"body": f"record {i}", "text": "wrong"}) for i in range(3)]
    (tmp_path / "r.jsonl.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    src = SourceConfig("j", 0, "local", glob=str(tmp_path / "*.jsonl.gz"), format="jsonl", field="body")
    (unit,) = plan_source(src)
    assert [t for _, t in read_unit(unit).docs] == ["record 0", "record 1", "record 2"]
    bad = SourceConfig("j", 0, "local", glob=str(tmp_path / "*.jsonl.gz"), format="jsonl", field="missing")
    with pytest.raises(SourceError, match=r"sources\[0\]\.local\.field"):
        read_unit(WorkUnit(bad, unit.location, unit.ident))


def test_parquet_column(tmp_path: Path) -> None:
    """spec.data.sources[].local.format=parquet + field"""
    pq.write_table(pa.table({"content": ["alpha", "beta"], "n": [1, 2]}), tmp_path / "t.parquet")
    src = SourceConfig("p", 0, "local", glob=str(tmp_path / "*.parquet"), format="parquet", field="content")
    (unit,) = plan_source(src)
    assert [t for _, t in read_unit(unit).docs] == ["alpha", "beta"]
    bad = SourceConfig("p", 1, "local", glob=str(tmp_path / "*.parquet"), format="parquet", field="text")
    with pytest.raises(SourceError, match=r"sources\[1\]\.local\.field"):
        read_unit(WorkUnit(bad, unit.location, unit.ident))


def test_huggingface_local_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """spec.data.sources[].huggingface (builder json, dataFiles, split, field), offline"""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"t": f"row {i}"}) for i in range(5)))
    src = SourceConfig(
        "hf", 0, "huggingface", builder="json", data_files=(str(tmp_path / "*.jsonl"),), field="t"
    )
    units = plan_source(src)
    assert [t for u in units for _, t in read_unit(u).docs] == [f"row {i}" for i in range(5)]
    bad = SourceConfig(
        "hf", 0, "huggingface", builder="json", data_files=(str(tmp_path / "*.jsonl"),), field="x"
    )
    with pytest.raises(SourceError, match=r"huggingface\.field"):
        plan_source(bad)
    no_split = SourceConfig(
        "hf",
        0,
        "huggingface",
        builder="json",
        data_files=(str(tmp_path / "*.jsonl"),),
        field="t",
        split="test",
    )
    with pytest.raises(SourceError, match=r"sources\[0\]\.huggingface.*test"):
        plan_source(no_split)
