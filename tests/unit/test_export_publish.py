# ruff: noqa: F811  (the tokenizer fixture imported from test_export is redefined as an argument)
"""Exports are published whole (issue 26 item 3): a new version, verified, published last.

Pinned here: a single-file re-export over an older sharded one loads the new weights (ours and
transformers'); a failure mid-export leaves the previous export published and byte-identical; a
reader pins one version for a whole load; a corrupt or missing file is named, not loaded; a
failed write is retried in place. The S3 side (pointer, outage through the fault proxy) is in
tests/integration/test_s3_faults.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from llmtrain.runtime import publish
from llmtrain.runtime.export import TokenizerFiles, export_model
from llmtrain.runtime.hf_import import load_pretrained_model, read_pretrained
from llmtrain.runtime.publish import (
    MANIFEST_NAME,
    Backoff,
    ExportCorrupt,
    ExportError,
    ExportNotPublished,
    resolve_export,
)
from llmtrain.runtime.store import StorageError

from tests.unit.test_export import hf_logits, model_config, random_gpt, tokenizer, tokens  # noqa: F401

FAST = Backoff(first_s=0.01, max_s=0.02, budget_s=1.0)


def files_of(path: Path) -> dict[str, str]:
    """name → sha256 of every file in the directory ``path`` (through its symlink)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def logits_of(uri: str, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_pretrained_model(uri)(ids)


def test_single_file_reexport_over_a_sharded_one_loads_the_new_weights(
    tmp_path: Path, tokenizer: TokenizerFiles
) -> None:
    cfg = model_config(tokenizer, tied=True)
    old, new = random_gpt(cfg, seed=1), random_gpt(cfg, seed=2)
    out = tmp_path / "hf"
    export_model(old.state_dict(), cfg, str(out), tokenizer, max_shard_bytes=40_000)
    assert (out / "model.safetensors.index.json").exists() and not (out / "model.safetensors").exists()
    export_model(new.state_dict(), cfg, str(out), tokenizer)  # one file this time
    names = set(files_of(out))
    assert "model.safetensors" in names and not [n for n in names if n.startswith("model-")]
    assert "model.safetensors.index.json" not in names  # no stale index for anyone to follow
    ids = tokens(cfg)
    with torch.no_grad():
        want, stale = new.eval()(ids), old.eval()(ids)
    torch.testing.assert_close(logits_of(str(out), ids), want, atol=0, rtol=0)
    torch.testing.assert_close(hf_logits(out, ids), want, atol=1e-4, rtol=0)  # transformers too
    assert not torch.allclose(want, stale)  # the two exports differ: the check above can fail
    # And back: sharded over single-file.
    export_model(old.state_dict(), cfg, str(out), tokenizer, max_shard_bytes=40_000)
    torch.testing.assert_close(logits_of(str(out), ids), stale, atol=0, rtol=0)
    torch.testing.assert_close(hf_logits(out, ids), stale, atol=1e-4, rtol=0)
    versions = sorted(p.name for p in (tmp_path / ".hf.versions").iterdir())
    assert len(versions) == 2  # the published one and the one before it; older ones pruned


def test_a_failure_mid_export_leaves_the_previous_export_published(
    tmp_path: Path, tokenizer: TokenizerFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = model_config(tokenizer, tied=False)
    old = random_gpt(cfg, seed=1)
    out = tmp_path / "hf"
    export_model(old.state_dict(), cfg, str(out), tokenizer, max_shard_bytes=40_000)
    before, target = files_of(out), (out.resolve())
    put = publish.ExportWriter.put
    calls: list[str] = []

    def failing(self: publish.ExportWriter, name: str, data: bytes) -> None:
        calls.append(name)
        if len(calls) == 3:  # two shards of the new export written, then the process "dies"
            raise RuntimeError("injected failure mid-export")
        put(self, name, data)

    monkeypatch.setattr(publish.ExportWriter, "put", failing)
    with pytest.raises(RuntimeError, match="injected"):
        export_model(random_gpt(cfg, seed=2).state_dict(), cfg, str(out), tokenizer, max_shard_bytes=40_000)
    assert len(calls) == 3
    assert out.resolve() == target and files_of(out) == before  # same version, same bytes
    assert [p.name for p in (tmp_path / ".hf.versions").iterdir()] == [target.name]  # attempt gone
    ids = tokens(cfg)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(str(out), ids), old.eval()(ids), atol=0, rtol=0)


def test_a_reader_pins_one_version_for_the_whole_load(tmp_path: Path, tokenizer: TokenizerFiles) -> None:
    cfg = model_config(tokenizer, tied=True)
    a, b = random_gpt(cfg, seed=1), random_gpt(cfg, seed=2)
    out = tmp_path / "hf"
    export_model(a.state_dict(), cfg, str(out), tokenizer)
    pinned = resolve_export(str(out))
    assert pinned.manifest is not None and Path(pinned.uri) == out.resolve()
    export_model(b.state_dict(), cfg, str(out), tokenizer)  # published while "serve" loads
    ids = tokens(cfg)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(pinned.uri, ids), a.eval()(ids), atol=0, rtol=0)
        torch.testing.assert_close(logits_of(str(out), ids), b.eval()(ids), atol=0, rtol=0)
    assert resolve_export(pinned.uri).uri == pinned.uri  # a pinned URI resolves to itself


def test_unpublished_and_corrupt_exports_are_refused(tmp_path: Path, tokenizer: TokenizerFiles) -> None:
    cfg = model_config(tokenizer, tied=True)
    out = tmp_path / "hf"
    writer = publish.ExportWriter(str(out))
    writer.put("config.json", b"{}")  # an attempt that never published
    with pytest.raises(ExportNotPublished, match=r"no export has been published at .*hf yet"):
        read_pretrained(str(out))
    export_model(random_gpt(cfg).state_dict(), cfg, str(out), tokenizer)
    # The dead attempt (a process killed mid-export never cleans up) is pruned by this publish.
    assert [p.name for p in (tmp_path / ".hf.versions").iterdir()] == [out.resolve().name]
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ExportCorrupt, match=r"model\.safetensors: size or sha256 differs"):
        read_pretrained(str(out))
    (out / MANIFEST_NAME).unlink()  # negative control: without the manifest nothing checks
    assert read_pretrained(str(out)).tensors


def test_a_plain_directory_at_the_uri_is_kept_as_a_version(tmp_path: Path, tokenizer: TokenizerFiles) -> None:
    """An export an older llmtrain wrote (files at the path itself) is moved among the versions."""
    cfg = model_config(tokenizer, tied=True)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("{}")
    export_model(random_gpt(cfg).state_dict(), cfg, str(out), tokenizer)
    assert out.is_symlink() and MANIFEST_NAME in files_of(out)
    (legacy,) = (tmp_path / ".hf.versions").glob("legacy-*")
    assert (legacy / "config.json").read_text() == "{}"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not a model")
    with pytest.raises(ExportError, match=r"mine holds files that are not an exported model \(notes\.txt"):
        export_model(random_gpt(cfg).state_dict(), cfg, str(mine), tokenizer)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and not (tmp_path / ".mine.versions").exists()


def test_a_failed_write_is_retried_in_place(
    tmp_path: Path, tokenizer: TokenizerFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two writes of the weights fail (an outage): the same attempt retries them and publishes;
    with no time left for retries, the same outage fails the export."""
    from llmtrain.runtime.store import LocalStore

    cfg = model_config(tokenizer, tied=True)
    put = LocalStore.put
    failures = {"left": 2, "seen": 0}

    def flaky(self: LocalStore, key: str, data: bytes) -> str | None:
        if key == "model.safetensors" and failures["left"]:
            failures["left"] -= 1
            failures["seen"] += 1
            raise StorageError(f"cannot write {key}: connection refused")
        return put(self, key, data)

    monkeypatch.setattr(LocalStore, "put", flaky)
    out = tmp_path / "hf"
    export_model(random_gpt(cfg).state_dict(), cfg, str(out), tokenizer, backoff=FAST)
    assert failures["seen"] == 2 and "model.safetensors" in files_of(out)
    assert len(list((tmp_path / ".hf.versions").iterdir())) == 1  # one attempt, not three
    failures["left"] = 100
    with pytest.raises(StorageError, match="connection refused"):
        export_model(
            random_gpt(cfg, seed=3).state_dict(), cfg, str(out), tokenizer, backoff=Backoff(0.01, 0.01, 0)
        )
    assert len(list((tmp_path / ".hf.versions").iterdir())) == 1  # the published one, untouched


def test_a_file_stored_wrong_is_written_again(
    tmp_path: Path, tokenizer: TokenizerFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read-back check: a store that keeps a flipped byte the first time is caught (sha256)
    and the file written again before anything is published."""
    from llmtrain.runtime.store import LocalStore

    cfg = model_config(tokenizer, tied=True)
    put = LocalStore.put
    flipped: list[str] = []

    def lossy(self: LocalStore, key: str, data: bytes) -> str | None:
        if key == "config.json" and not flipped:
            flipped.append(key)
            return put(self, key, data[:-1] + bytes([data[-1] ^ 0xFF]))
        return put(self, key, data)

    monkeypatch.setattr(LocalStore, "put", lossy)
    out = tmp_path / "hf"
    export_model(random_gpt(cfg).state_dict(), cfg, str(out), tokenizer, backoff=FAST)
    assert flipped == ["config.json"]
    assert read_pretrained(str(out)).config["model_type"] == "llama"  # checked against the manifest
