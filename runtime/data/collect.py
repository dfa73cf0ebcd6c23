"""Collect: turn ``spec.data.sources`` into work units, and work units into documents.

Planning (:func:`plan_sources`, on the driver) lists files/objects into :class:`WorkUnit` s —
small, JSON-able descriptions that Ray Data ships to workers. Reading (:func:`read_unit`, on
a worker) opens one unit and splits it into documents, each with a **stable key**:
``sha256(source name, unit identity, index)``. Keys, not arrival order, decide everything
downstream (dedup winner, train/validation split, tokenizer sample, shard order), which is
what makes the output independent of the number of Ray blocks.

Sources:

* ``s3``: every object under the prefix whose name ends in the format's extension
  (text ``.txt``; jsonl ``.jsonl``/``.json``; parquet ``.parquet``), optionally ``.gz``.
  The listing paginates (1000 keys per page) until complete.
* ``local``: a recursive glob.
* ``huggingface``: ``datasets.load_dataset(builder, data_files=…, split=…)`` over local files,
  offline (``HF_DATASETS_OFFLINE=1``); one document per row.
* ``pythonStdlib``: the ``.py`` files under ``sysconfig.get_paths()["stdlib"]``, never
  ``site-packages``/``dist-packages`` (some builds put them inside the stdlib folder);
  ``test``/``tests``/``idle_test`` packages only with ``includeTests``. One document per file.

Document unit of plain text (``textUnit``): ``file``, ``paragraph`` (blank-line separated —
the default, so even a single novel gives thousands of documents and the validation split is
never empty) or ``line``. JSONL/Parquet/HF: one record is one document. Files that are not
valid UTF-8 are counted as dropped (``undecodable``), never silently mangled.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import gzip
import hashlib
import io
import json
import os
import re
import sys
import sysconfig
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmtrain.runtime.data import task as task_mod
from llmtrain.runtime.store import S3Store, StorageError, split_s3_uri

from llmtrain.api.s3 import S3Options

FORMAT_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "text": (".txt",),
    "jsonl": (".jsonl", ".json"),
    "parquet": (".parquet",),
}
STDLIB_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_PARAGRAPH_RE = re.compile(r"\n(?:[ \t]*\r?\n)+|\r\n(?:[ \t]*\r\n)+")


class SourceError(ValueError):
    """A source cannot be read; the message names the object and the spec field."""


@dataclass(frozen=True)
class SourceConfig:
    """Plain (pydantic-free) form of one ``spec.data.sources[i]`` for workers."""

    name: str
    index: int  # position in spec.data.sources, for error messages
    kind: str  # s3 | local | huggingface | pythonStdlib
    weight: float | None = None
    uri: str = ""  # s3 prefix
    glob: str = ""
    format: str = "text"
    field: str = "text"
    text_unit: str = "paragraph"
    builder: str = ""
    data_files: tuple[str, ...] = ()
    split: str = "train"
    include_tests: bool = False
    field_name: str = "sources"  # or validationSources: which spec list it is in
    # spec.data.sources[].task (runtime/data/task.py): "" = plain text.
    task_format: str = ""
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    system: str | None = None

    @property
    def task(self) -> task_mod.TaskFields | None:
        if not self.task_format:
            return None
        return task_mod.TaskFields(self.task_format, self.prompt_field, self.response_field,
                                   self.messages_field, self.system)  # fmt: skip

    @property
    def spec_path(self) -> str:
        return f"spec.data.{self.field_name}[{self.index}].{self.kind}"

    @property
    def is_validation(self) -> bool:
        return self.field_name == "validationSources"

    @classmethod
    def from_spec(cls, src: Any, index: int, field_name: str = "sources") -> SourceConfig:
        cfg = dataclasses.replace(cls._from_spec(src, index), field_name=field_name)
        task = getattr(src, "task", None)
        if task is None:
            return cfg
        return dataclasses.replace(
            cfg,
            task_format=str(getattr(task.format, "value", task.format)),
            prompt_field=task.prompt_field,
            response_field=task.response_field,
            messages_field=task.messages_field,
            system=task.system,
        )

    @classmethod
    def _from_spec(cls, src: Any, index: int) -> SourceConfig:
        def val(x: Any) -> Any:
            return getattr(x, "value", x)

        if src.s3 is not None:
            s = src.s3
            return cls(src.name, index, "s3", src.weight, uri=s.uri, format=val(s.format), field=s.field,
                       text_unit=val(s.text_unit))  # fmt: skip
        if src.local is not None:
            s = src.local
            return cls(src.name, index, "local", src.weight, glob=s.glob, format=val(s.format),
                       field=s.field, text_unit=val(s.text_unit))  # fmt: skip
        if src.huggingface is not None:
            s = src.huggingface
            return cls(src.name, index, "huggingface", src.weight, builder=s.builder,
                       data_files=tuple(s.data_files), split=s.split, field=s.field)  # fmt: skip
        if src.python_stdlib is not None:
            return cls(src.name, index, "pythonStdlib", src.weight, format="text", text_unit="file",
                       include_tests=src.python_stdlib.include_tests)  # fmt: skip
        raise SourceError(
            f"spec.data.sources[{index}]: set exactly one of s3, local, huggingface, pythonStdlib"
        )


@dataclass(frozen=True)
class WorkUnit:
    """One file/object (or a row range of a HF dataset) of one source."""

    source: SourceConfig
    location: str  # path, s3:// URI, or HF "rows:<start>:<stop>"
    ident: str  # stable identity within the source (relative path, key, row range)
    size: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["source"]["data_files"] = list(self.source.data_files)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkUnit:
        src = dict(d["source"])
        src["data_files"] = tuple(src["data_files"])
        return cls(source=SourceConfig(**src), location=d["location"], ident=d["ident"], size=d["size"])


@dataclass
class UnitDocs:
    """What reading one unit gives: documents ``(key, text)`` and bookkeeping."""

    docs: list[tuple[str, str]]
    undecodable: int = 0
    raw_sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # Task sources: each document's record name (parallel to docs), and the bad records.
    refs: list[str] = field(default_factory=list)
    bad: list[dict[str, str]] = field(default_factory=list)


def doc_key(source: str, ident: str, index: int) -> str:
    """Stable document key: independent of machine, block layout and arrival order."""
    return hashlib.sha256(f"{source}\0{ident}\0{index}".encode()).hexdigest()[:32]


# ----------------------------------------------------------------------- planning


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(include_tests: bool) -> list[tuple[str, Path]]:
    """``(relative path, path)`` of the standard library's .py files, sorted."""
    root = stdlib_root()
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        keep = []
        for d in dirnames:
            if d in STDLIB_EXCLUDED_DIRS:
                continue
            if not include_tests and d in STDLIB_TEST_DIRS:
                continue
            keep.append(d)
        dirnames[:] = sorted(keep)
        for f in filenames:
            if f.endswith(".py"):
                out.append(((rel_dir / f).as_posix(), Path(dirpath) / f))
    out.sort()
    return out


def glob_base(pattern: str) -> str:
    """The directory of a glob up to its first wildcard part (``/data/corpus`` for
    ``/data/corpus/**/*.txt``; a plain file's own folder). Local documents are keyed by their
    path relative to it, so the train/validation split does not change when the same corpus
    sits in another folder or on another machine."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if any(c in part for c in "*?["):
            break
        fixed.append(part)
    else:  # no wildcard: one file
        fixed = fixed[:-1]
    return str(Path(*fixed)) if fixed else "."


def python_version() -> str:
    return ".".join(str(x) for x in sys.version_info[:3])


def _matches_format(name: str, fmt: str) -> bool:
    base = name[:-3] if name.endswith(".gz") else name
    return base.endswith(FORMAT_EXTENSIONS[fmt])


def plan_source(src: SourceConfig, s3: S3Options | None = None) -> list[WorkUnit]:
    """List one source's work units (driver side). Raises SourceError naming the spec field."""
    if src.kind == "pythonStdlib":
        files = stdlib_files(src.include_tests)
        if not files:
            raise SourceError(f"{src.spec_path}: no .py files under {stdlib_root()}")
        return [WorkUnit(src, str(p), rel, p.stat().st_size) for rel, p in files]
    if src.kind == "local":
        paths = sorted(
            p for p in globlib.glob(os.path.expanduser(src.glob), recursive=True) if os.path.isfile(p)
        )
        if not paths:
            raise SourceError(
                f"{src.spec_path}.glob: {src.glob!r} matches no files (nonexistent path or empty "
                "directory); fix the pattern"
            )
        base = glob_base(os.path.expanduser(src.glob))
        return [
            WorkUnit(src, p, Path(os.path.relpath(p, base)).as_posix(), os.path.getsize(p)) for p in paths
        ]
    if src.kind == "s3":
        store = S3Store(src.uri, s3)
        try:
            objects = list(store.iter_objects())
        except StorageError as e:
            raise SourceError(f"{src.spec_path}.uri: {e}") from e
        units = [
            WorkUnit(src, f"s3://{store.bucket}/{o['Key']}", o["Key"], int(o["Size"]))
            for o in objects
            if _matches_format(o["Key"], src.format)
        ]
        if not units:
            exts = "/".join(FORMAT_EXTENSIONS[src.format])
            raise SourceError(
                f"{src.spec_path}.uri: no {exts}[.gz] objects under {src.uri} ({len(objects)} other "
                "objects); check the prefix and spec.data.sources[].s3.format"
            )
        return sorted(units, key=lambda u: u.ident)
    if src.kind == "huggingface":
        ds = _load_hf(src)
        n = len(ds)
        if n == 0:
            raise SourceError(f"{src.spec_path}.dataFiles: the dataset has no rows")
        step = 20_000
        return [
            WorkUnit(src, f"rows:{a}:{min(a + step, n)}", f"rows:{a}:{min(a + step, n)}", 0)
            for a in range(0, n, step)
        ]
    raise SourceError(f"spec.data.{src.field_name}[{src.index}]: unknown source kind {src.kind!r}")


def _load_hf(src: SourceConfig) -> Any:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    files: list[str] = []
    for pattern in src.data_files:
        matched = sorted(globlib.glob(os.path.expanduser(pattern), recursive=True))
        if not matched:
            raise SourceError(f"{src.spec_path}.dataFiles: {pattern!r} matches no files; fix the path")
        files.extend(matched)
    try:
        ds = datasets.load_dataset(src.builder, data_files=files, split=src.split)
    except (ValueError, KeyError) as e:
        raise SourceError(f"{src.spec_path}: load_dataset({src.builder!r}) failed: {e}") from e
    if src.task is not None:
        missing = [c for c in src.task.columns if c not in ds.column_names]
        if missing:
            raise SourceError(
                f"{src.spec_path}: columns {missing} not in {ds.column_names}; set "
                f"spec.data.{src.field_name}[{src.index}].task's field names to the record's columns"
            )
    elif src.field not in ds.column_names:
        raise SourceError(
            f"{src.spec_path}.field: column {src.field!r} not in {ds.column_names}; set field to the text column"
        )
    return ds


# ------------------------------------------------------------------------ reading


def _read_bytes(unit: WorkUnit, s3: S3Options | None) -> bytes:
    if unit.location.startswith("s3://"):
        bucket, key = split_s3_uri(unit.location)
        store = S3Store(f"s3://{bucket}", s3)
        data = store.get(key)
    else:
        try:
            data = Path(unit.location).read_bytes()
        except OSError as e:
            raise SourceError(f"{unit.source.spec_path}: cannot read {unit.location}: {e}") from e
    if unit.location.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise SourceError(f"{unit.source.spec_path}: {unit.location} is not valid gzip: {e}") from e
    return data


def split_text(text: str, unit: str) -> list[str]:
    """Plain text → documents. Paragraphs are separated by blank lines (the separator is dropped)."""
    if unit == "file":
        return [text]
    if unit == "line":
        return [line for line in text.splitlines() if line.strip()]
    parts = _PARAGRAPH_RE.split(text)
    return [p for p in parts if p.strip()]


def _records_text(unit: WorkUnit, data: bytes) -> list[str]:
    src = unit.source
    if src.format == "jsonl":
        out = []
        for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SourceError(f"{src.spec_path}: {unit.location} line {lineno} is not JSON: {e}") from e
            value = rec.get(src.field) if isinstance(rec, dict) else None
            if not isinstance(value, str):
                raise SourceError(
                    f"{src.spec_path}.field: {unit.location} line {lineno} has no string field "
                    f"{src.field!r}; set field to the key holding the text"
                )
            out.append(value)
        return out
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    if src.field not in table.column_names:
        raise SourceError(
            f"{src.spec_path}.field: {unit.location} has columns {table.column_names}, not {src.field!r}"
        )
    return [v for v in table.column(src.field).to_pylist() if isinstance(v, str)]


def read_unit(unit: WorkUnit, s3: S3Options | None = None) -> UnitDocs:
    """Documents of one work unit, keyed by (source, unit identity, index)."""
    src = unit.source
    if src.task is not None:
        return _read_task_unit(unit, s3)
    if src.kind == "huggingface":
        _, a, b = unit.location.split(":")
        texts = _load_hf(src).select(range(int(a), int(b)))[src.field]
        digest = hashlib.sha256("\0".join(t or "" for t in texts).encode()).hexdigest()
        return UnitDocs(
            [(doc_key(src.name, unit.ident, i), t) for i, t in enumerate(texts) if isinstance(t, str)],
            raw_sha256=digest,
        )
    data = _read_bytes(unit, s3)
    digest = hashlib.sha256(data).hexdigest()
    if src.format in ("jsonl", "parquet"):
        try:
            texts = _records_text(unit, data)
        except UnicodeDecodeError:
            return UnitDocs([], undecodable=1, raw_sha256=digest)
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return UnitDocs([], undecodable=1, raw_sha256=digest)
        texts = split_text(text, src.text_unit)
    return UnitDocs([(doc_key(src.name, unit.ident, i), t) for i, t in enumerate(texts)], raw_sha256=digest)


def _read_task_unit(unit: WorkUnit, s3: S3Options | None) -> UnitDocs:
    """Task records of one unit: one document per good record, the bad ones named."""
    src = unit.source
    task = src.task
    assert task is not None
    if src.kind == "huggingface":
        _, a, b = unit.location.split(":")
        rows = _load_hf(src).select(range(int(a), int(b))).to_list()
        digest = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()
        records: list[tuple[str, Any]] = [(f"{unit.ident} row {int(a) + i}", r) for i, r in enumerate(rows)]
    else:
        data = _read_bytes(unit, s3)
        digest = hashlib.sha256(data).hexdigest()
        try:
            records = list(task_mod.read_records(data, src.format, unit.ident))
        except UnicodeDecodeError:
            return UnitDocs([], undecodable=1, raw_sha256=digest)
    out = UnitDocs([], raw_sha256=digest)
    for i, (ref, record) in enumerate(records):
        try:
            if isinstance(record, task_mod.BadRecord):
                raise record
            msgs = task_mod.conversation(record, task)
        except task_mod.BadRecord as e:
            out.bad.append(task_mod.bad_entry(src.name, ref, e.reason, e.detail))
            continue
        out.docs.append((doc_key(src.name, unit.ident, i), task_mod.to_text(msgs)))
        out.refs.append(ref)
    return out
