"""prepare_data end to end on local files (in-process executor; Ray and S3 are integration tests)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import pytest
from llmtrain.runtime.data import collect
from llmtrain.runtime.data.clean import CleanConfig
from llmtrain.runtime.data.collect import SourceError
from llmtrain.runtime.data.loader import read_verified_shard
from llmtrain.runtime.data.mixture import mixture_copies
from llmtrain.runtime.data.prepare import PrepareError, prepare_data
from llmtrain.runtime.store import LocalStore
from tokenizers import Tokenizer

from llmtrain.api.shards import MANIFEST_NAME, TOKENIZER_NAME, Manifest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from datahelpers import AWKWARD_DOCS, make_spec, raw_clean, stdlib_sample, write_docs

DOCS = AWKWARD_DOCS + stdlib_sample(30)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    write_docs(folder, DOCS)
    return folder


def data_spec(src_glob: str, out: Path, **kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "sources": [{"name": "docs", "local": {"glob": src_glob, "textUnit": "file"}}],
        "preprocessing": raw_clean(),
        "tokenizer": {"train": {"vocabSize": 400}},
        "outputUri": str(out),
        "validationFraction": 0.2,
    }
    d.update(kw)
    return d


def decode_all(out: Path) -> tuple[list[str], Manifest]:
    """Every document in every shard, split at the end-of-text id and decoded."""
    store = LocalStore(out)
    m = Manifest.from_json(store.get(MANIFEST_NAME))
    tok = Tokenizer.from_file(str(out / TOKENIZER_NAME))
    docs: list[str] = []
    for info in m.shards:
        cur: list[int] = []
        for i in read_verified_shard(store, info, m).tolist():
            if i == m.tokenizer.eot_id:
                docs.append(tok.decode(cur))
                cur = []
            else:
                cur.append(i)
        assert not cur  # every shard of this corpus ends at a document boundary (one shard per split)
    return docs, m


def test_round_trip_is_byte_exact(corpus: Path, tmp_path: Path) -> None:
    res = prepare_data(make_spec(data_spec(str(corpus / "*.txt"), tmp_path / "out")))
    docs, m = decode_all(tmp_path / "out")
    assert sorted(docs) == sorted(DOCS)  # CJK, emoji, combining marks, CRLF, literal <|endoftext|>
    assert len(docs) == len(DOCS) == sum(s.documents for s in m.shards)  # EOT count = document count
    assert res.manifest_uri.endswith(MANIFEST_NAME) and not res.reused
    assert {s.split for s in m.shards} == {"train", "validation"}


def test_block_count_does_not_change_output(corpus: Path, tmp_path: Path) -> None:
    """Same manifest bytes and shard checksums for 1 and 8 blocks (in-process blocks here; the Ray
    Data version is tests/integration/test_data_ray.py)."""
    outs = []
    for blocks in (1, 8):
        out = tmp_path / f"b{blocks}"
        prepare_data(make_spec(data_spec(str(corpus / "*.txt"), out)), num_blocks=blocks, executor="local")
        outs.append(out)
    assert (outs[0] / MANIFEST_NAME).read_bytes() == (outs[1] / MANIFEST_NAME).read_bytes()
    for f in sorted(p.name for p in outs[0].iterdir()):
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f


def _dup_sources(tmp_path: Path) -> list[dict[str, Any]]:
    shared = "the same document, twice in each of two sources " * 3
    for src in ("a", "b"):
        write_docs(tmp_path / src, [shared, f"unique to {src} " * 5, shared, *stdlib_sample(6)], name=src)
    return [
        {"name": "a", "local": {"glob": str(tmp_path / "a" / "*.txt"), "textUnit": "file"}},
        {"name": "b", "local": {"glob": str(tmp_path / "b" / "*.txt"), "textUnit": "file"}},
    ]


def test_dedup_across_files_and_sources(tmp_path: Path) -> None:
    """spec.data.preprocessing.dedup"""
    sources = _dup_sources(tmp_path)
    d = data_spec("", tmp_path / "out", sources=sources, preprocessing={"dedup": "exact"})
    docs, m = decode_all(Path(prepare_data(make_spec(d)).manifest_uri).parent)
    assert sum(doc.startswith("the same document") for doc in docs) == 1
    # the stdlib files are in both sources too: each kept once
    assert m.dropped["duplicate"] == 3 + 6
    d2 = data_spec("", tmp_path / "out2", sources=sources, preprocessing={"dedup": "none"})
    docs2, m2 = decode_all(Path(prepare_data(make_spec(d2)).manifest_uri).parent)
    assert sum(doc.startswith("the same document") for doc in docs2) == 4 and m2.dropped["duplicate"] == 0


def test_min_and_max_chars_drop_documents(corpus: Path, tmp_path: Path) -> None:
    """spec.data.preprocessing.minChars / maxChars, counted in the manifest"""
    lengths = sorted(len(d) for d in DOCS)
    lo, hi = lengths[5], lengths[-3]
    d = data_spec(
        str(corpus / "*.txt"), tmp_path / "o", preprocessing={**raw_clean(), "minChars": lo, "maxChars": hi}
    )
    docs, m = decode_all(Path(prepare_data(make_spec(d)).manifest_uri).parent)
    assert all(lo <= len(x) <= hi for x in docs)
    assert m.dropped["min_chars"] == sum(len(x) < lo for x in DOCS)
    assert m.dropped["max_chars"] == sum(len(x) > hi for x in DOCS)


def test_cleaning_is_applied_before_tokenization(corpus: Path, tmp_path: Path) -> None:
    """spec.data.preprocessing.normalization / removeControlChars / normalizeWhitespace"""
    d = data_spec(
        str(corpus / "*.txt"),
        tmp_path / "o",
        preprocessing={"normalization": "NFC", "removeControlChars": True, "normalizeWhitespace": True},
    )
    docs, _ = decode_all(Path(prepare_data(make_spec(d)).manifest_uri).parent)
    assert "combining marks: é ä ñ (not NFC)" in docs
    assert not any("\r" in x for x in docs)
    assert "trailing spaces\n\n\nand blank lines" in docs


def test_clean_config_from_spec_maps_every_field() -> None:
    spec = make_spec(
        data_spec(
            "x",
            Path("/nonexistent"),
            preprocessing={
                "normalization": "NFKD",
                "removeControlChars": False,
                "normalizeWhitespace": False,
                "minChars": 7,
                "maxChars": 99,
                "dedup": "none",
            },
        )
    )
    assert CleanConfig.from_spec(spec.data.preprocessing) == CleanConfig("NFKD", False, False, 7, 99, "none")


def test_validation_fraction_and_seed(corpus: Path, tmp_path: Path) -> None:
    """spec.data.validationFraction / spec.data.seed"""

    def val_docs(fraction: float, seed: int, name: str) -> int:
        d = data_spec(str(corpus / "*.txt"), tmp_path / name, validationFraction=fraction, seed=seed)
        return int(prepare_data(make_spec(d)).manifest.extra["documents"]["validation"])

    small, large = val_docs(0.05, 0, "a"), val_docs(0.45, 0, "b")
    assert 1 <= small < large
    m0 = Manifest.from_json((tmp_path / "b" / MANIFEST_NAME).read_text())
    val_docs(0.45, 1, "c")
    m1 = Manifest.from_json((tmp_path / "c" / MANIFEST_NAME).read_text())
    assert m0.fingerprint != m1.fingerprint and m1.seed == 1
    assert [s.sha256 for s in m0.split_shards("validation")] != [
        s.sha256 for s in m1.split_shards("validation")
    ]


def test_shard_max_tokens(corpus: Path, tmp_path: Path) -> None:
    """spec.data.shardMaxTokens"""
    d = data_spec(str(corpus / "*.txt"), tmp_path / "o", shardMaxTokens=5000)
    m = prepare_data(make_spec(d)).manifest
    train = m.split_shards("train")
    assert len(train) > 3 and all(s.tokens <= 5000 for s in train)
    assert all(s.tokens == 5000 for s in train[:-1])
    one = prepare_data(make_spec(data_spec(str(corpus / "*.txt"), tmp_path / "p"))).manifest
    assert m.split_tokens("train") == one.split_tokens("train") and len(one.split_shards("train")) == 1


def test_mixture_weights_realised_within_two_percent(tmp_path: Path) -> None:
    """spec.data.sources[].weight"""
    texts = stdlib_sample(40)
    write_docs(tmp_path / "big", texts[:30], name="big")
    write_docs(tmp_path / "small", texts[30:], name="small")
    sources = [
        {"name": "big", "weight": 1, "local": {"glob": str(tmp_path / "big" / "*.txt"), "textUnit": "line"}},
        {
            "name": "small",
            "weight": 3,
            "local": {"glob": str(tmp_path / "small" / "*.txt"), "textUnit": "line"},
        },
    ]
    m = prepare_data(
        make_spec(data_spec("", tmp_path / "o", sources=sources, preprocessing={"dedup": "none"}))
    ).manifest
    got = {s.name: s for s in m.sources}
    assert got["big"].target_fraction == pytest.approx(0.25) and got[
        "small"
    ].target_fraction == pytest.approx(0.75)
    for s in got.values():
        assert abs(s.realised_fraction - (s.target_fraction or 0)) <= 0.02, s
    assert got["small"].extra["natural_train_tokens"] < got["big"].extra["natural_train_tokens"]
    assert m.split_tokens("train") == sum(s.tokens for s in m.sources)
    # no weights: natural proportions
    natural = [dict(s, weight=None) for s in sources]
    m2 = prepare_data(
        make_spec(data_spec("", tmp_path / "n", sources=natural, preprocessing={"dedup": "none"}))
    ).manifest
    assert all(s.target_fraction is None for s in m2.sources)
    assert {s.name: s.tokens for s in m2.sources} == {
        s.name: s.extra["natural_train_tokens"] for s in m2.sources
    }


def test_mixture_copies_is_deterministic_and_hits_targets() -> None:
    docs = {"a": [(f"a{i}", 10) for i in range(100)], "b": [(f"b{i}", 10) for i in range(300)]}
    out = mixture_copies(docs, {"a": 0.5, "b": 0.5}, seed=0)
    tokens = {s: sum(10 * n for _, n in lst) for s, lst in out.items()}
    assert tokens == {"a": 2000, "b": 2000}
    assert max(n for _, n in out["a"]) == 2  # upsampled
    assert out == mixture_copies(dict(reversed(list(docs.items()))), {"a": 0.5, "b": 0.5}, seed=0)


def test_reuse_mismatch_and_overwrite(corpus: Path, tmp_path: Path) -> None:
    """spec.data.outputUri: reused on the same fingerprint, error on another, --overwrite replaces"""
    out = tmp_path / "o"
    first = prepare_data(make_spec(data_spec(str(corpus / "*.txt"), out)))
    mtime = (out / MANIFEST_NAME).stat().st_mtime_ns
    again = prepare_data(make_spec(data_spec(str(corpus / "*.txt"), out)))
    assert again.reused and again.manifest == first.manifest
    assert (out / MANIFEST_NAME).stat().st_mtime_ns == mtime
    other = make_spec(data_spec(str(corpus / "*.txt"), out, seed=5))
    with pytest.raises(PrepareError, match=r"spec\.data\.outputUri.*--overwrite"):
        prepare_data(other)
    replaced = prepare_data(other, overwrite=True)
    assert not replaced.reused and replaced.manifest.fingerprint != first.manifest.fingerprint
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(PrepareError, match="not empty"):
        prepare_data(make_spec(data_spec(str(corpus / "*.txt"), foreign)))
    assert not (foreign / MANIFEST_NAME).exists()
    prepare_data(make_spec(data_spec(str(corpus / "*.txt"), foreign)), overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"  # --overwrite never deletes a user's files
    assert (foreign / MANIFEST_NAME).exists()


def test_validation_split_too_small_is_an_error(corpus: Path, tmp_path: Path) -> None:
    spec = make_spec(data_spec(str(corpus / "*.txt"), tmp_path / "o"), validation={"batches": 100_000})
    with pytest.raises(PrepareError, match=r"spec\.data\.validationFraction.*spec\.validation\.batches"):
        prepare_data(spec)
    assert not (tmp_path / "o" / MANIFEST_NAME).exists()


def test_source_emptied_by_cleaning_is_an_error(corpus: Path, tmp_path: Path) -> None:
    d = data_spec(str(corpus / "*.txt"), tmp_path / "o", preprocessing={"minChars": 10_000_000})
    with pytest.raises(PrepareError, match=r"spec\.data\.sources\[0\]\.local.*no documents"):
        prepare_data(make_spec(d))
    with pytest.raises(SourceError, match=r"sources\[0\]\.local\.glob"):
        prepare_data(make_spec(data_spec(str(tmp_path / "missing" / "*.txt"), tmp_path / "p")))
    assert not (tmp_path / "o" / MANIFEST_NAME).exists() and not (tmp_path / "p" / MANIFEST_NAME).exists()


def test_python_stdlib_source_records_version_and_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """spec.data.sources[].pythonStdlib (undecodable files counted, version + corpus hash recorded)"""
    root = tmp_path / "lib"
    for i, text in enumerate(stdlib_sample(12)):
        (root / f"m{i}.py").parent.mkdir(parents=True, exist_ok=True)
        (root / f"m{i}.py").write_text(text)
    (root / "test").mkdir()
    (root / "test" / "test_x.py").write_text("def test_x():\n    assert 1\n" * 20)
    (root / "bad.py").write_bytes(b"x = '\xff'\n")
    monkeypatch.setattr(collect, "stdlib_root", lambda: root)
    d = data_spec("", tmp_path / "o", sources=[{"name": "py", "pythonStdlib": {"includeTests": False}}])
    m = prepare_data(make_spec(d)).manifest
    (src,) = m.sources
    assert src.extra["python_version"] == collect.python_version()
    assert src.extra["files"] == 13 and len(src.extra["content_sha256"]) == 64
    assert m.dropped["undecodable"] == 1
    d["outputUri"] = str(tmp_path / "t")
    d["sources"] = [{"name": "py", "pythonStdlib": {"includeTests": True}}]
    assert prepare_data(make_spec(d)).manifest.sources[0].extra["files"] == 14


def test_load_tokenizer(corpus: Path, tmp_path: Path) -> None:
    """spec.data.tokenizer.load (uri, endOfText)"""
    first = prepare_data(make_spec(data_spec(str(corpus / "*.txt"), tmp_path / "a")))
    tok_path = tmp_path / "a" / TOKENIZER_NAME
    d = data_spec(str(corpus / "*.txt"), tmp_path / "b", tokenizer={"load": {"uri": str(tok_path)}})
    m = prepare_data(make_spec(d)).manifest
    assert (
        m.tokenizer.sha256
        == first.manifest.tokenizer.sha256
        == hashlib.sha256(tok_path.read_bytes()).hexdigest()
    )
    assert [s.sha256 for s in m.shards] == [s.sha256 for s in first.manifest.shards]
    d["tokenizer"] = {"load": {"uri": str(tok_path), "endOfText": "<|nope|>"}}
    d["outputUri"] = str(tmp_path / "c")
    with pytest.raises(ValueError, match=r"load\.endOfText"):
        prepare_data(make_spec(d))


def test_the_default_sample_prompt_is_the_start_of_a_validation_document(
    corpus: Path, tmp_path: Path
) -> None:
    from llmtrain.runtime.run import RunOptions, _sample_prompt, validation_prompt

    from llmtrain.api.job import LLMTrainingJob

    out = tmp_path / "out"
    res = prepare_data(make_spec(data_spec(str(corpus / "*.txt"), out)))
    prompt = validation_prompt(res.manifest_uri.rsplit("/", 1)[0])
    store = LocalStore(out)
    (val,) = res.manifest.split_shards("validation")
    tok = Tokenizer.from_file(str(out / TOKENIZER_NAME))
    ids = read_verified_shard(store, val, res.manifest).tolist()
    first = tok.decode(ids[: ids.index(res.manifest.tokenizer.eot_id)])
    assert prompt and first.lstrip().startswith(prompt) and len(prompt.split()) == min(5, len(first.split()))
    validation_docs = {tok.decode(d) for d in _split_docs(ids, res.manifest.tokenizer.eot_id)}
    assert first in validation_docs and prompt != "def "

    job = LLMTrainingJob.model_validate(
        {
            "apiVersion": "llmtrain.dev/v1alpha1",
            "kind": "LLMTrainingJob",
            "metadata": {"name": "p"},
            "spec": {
                "data": data_spec(str(corpus / "*.txt"), out),
                "model": {"architecture": {"layers": 1, "dModel": 32, "heads": 2, "contextLength": 32}},
                "training": {
                    "batch": {"globalBatchSize": 2, "microBatchSize": 2},
                    "duration": {"maxSteps": 2},
                },
                "export": {"uri": str(tmp_path / "m"), "samplePrompt": "Once upon"},
            },
        }
    )
    data = str(out)
    assert _sample_prompt(job, RunOptions(sample_prompt="--prompt wins"), data, None) == "--prompt wins"
    assert _sample_prompt(job, RunOptions(), data, None) == "Once upon"  # spec.export.samplePrompt
    job.spec.export.sample_prompt = None  # type: ignore[union-attr]
    assert _sample_prompt(job, RunOptions(), data, None) == prompt


def _split_docs(ids: list[int], eot: int) -> list[list[int]]:
    docs, cur = [], []
    for i in ids:
        if i == eot:
            docs.append(cur)
            cur = []
        else:
            cur.append(i)
    return docs


def test_validation_sources_are_the_validation_set_and_never_trained_on(corpus: Path, tmp_path: Path) -> None:
    held = stdlib_sample(40)[30:36]  # six documents the training corpus does not have
    shared = DOCS[:2]  # two that it does: removed from training, kept for validation
    write_docs(tmp_path / "held", held + shared)
    d = data_spec(str(corpus / "*.txt"), tmp_path / "out")
    d["validationSources"] = [
        {"name": "held", "local": {"glob": str(tmp_path / "held" / "*.txt"), "textUnit": "file"}}
    ]
    res = prepare_data(make_spec(d))
    _, m = decode_all(tmp_path / "out")
    store = LocalStore(tmp_path / "out")
    tok = Tokenizer.from_file(str(tmp_path / "out" / TOKENIZER_NAME))
    (val_shard,) = m.split_shards("validation")
    val_docs = {
        tok.decode(x)
        for x in _split_docs(read_verified_shard(store, val_shard, m).tolist(), m.tokenizer.eot_id)
    }
    train_docs = [
        tok.decode(x)
        for info in m.split_shards("train")
        for x in _split_docs(read_verified_shard(store, info, m).tolist(), m.tokenizer.eot_id)
    ]
    assert val_docs == set(held + shared)  # exactly the validation sources, no hash split
    assert not val_docs & set(train_docs)  # checked on the shard contents
    assert set(train_docs) == set(DOCS) - set(shared)  # every other training document kept
    assert m.extra["removed_from_training_in_validation"] == 2
    assert m.extra["validation_set"] == "validationSources: held"
    (held_stats,) = [s for s in m.sources if s.name == "held"]
    assert held_stats.extra["split"] == "validation" and held_stats.tokens == 0
    assert res.stats["validation_tokens"] == val_shard.tokens

    d["validationSources"][0]["local"]["glob"] = str(tmp_path / "none" / "*.txt")
    with pytest.raises(
        SourceError, match=r"spec\.data\.validationSources\[0\]\.local\.glob: .* matches no files"
    ):
        prepare_data(make_spec({**d, "outputUri": str(tmp_path / "out2")}))
