# ruff: noqa: F811  (pytest fixtures imported from tests/data/datahelpers.py are redefined as arguments)
"""The data pipeline against moto's standalone S3 server on loopback (real HTTP S3 protocol),
with real text: Jane Austen's novels and the Python standard library."""

from __future__ import annotations

import gzip
import io
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from llmtrain.runtime.data import shard
from llmtrain.runtime.data.collect import SourceError, split_text
from llmtrain.runtime.data.loader import ShardLoader, read_verified_shard
from llmtrain.runtime.data.prepare import PrepareConfig, PrepareError, prepare_data
from llmtrain.runtime.store import S3Store
from tokenizers import Tokenizer

from llmtrain.api.s3 import S3Options
from llmtrain.api.shards import MANIFEST_NAME, TOKENIZER_NAME, Manifest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
import janeausten
from datahelpers import AWKWARD_DOCS, S3Server, make_spec, raw_clean, s3_server  # noqa: F401

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def austen() -> dict[str, str]:
    if not janeausten.available():
        pytest.skip("r-cran-janeaustenr cannot be fetched (apt-get download) and is not cached")
    return janeausten.austen_books()


def put(server: S3Server, bucket: str, key: str, data: bytes) -> None:
    server.client().put_object(Bucket=bucket, Key=key, Body=data)


def decode_docs(store: Any, m: Manifest) -> list[str]:
    tok = Tokenizer.from_str(store.get(TOKENIZER_NAME).decode())
    docs: list[str] = []
    cur: list[int] = []
    for info in m.shards:
        for i in read_verified_shard(store, info, m).tolist():
            if i == m.tokenizer.eot_id:
                docs.append(tok.decode(cur))
                cur = []
            else:
                cur.append(i)
    return docs


def test_austen_and_records_round_trip_through_s3(s3_server: S3Server, austen: dict[str, str]) -> None:
    """spec.data.sources[].s3 (uri, format text/jsonl/parquet, field, textUnit, .gz), spec.storage.endpoint,
    outputUri s3://: every document comes back byte-exact; EOT count = document count."""
    b = s3_server.bucket("corpus")
    s3_server.bucket("shards")
    books = dict(sorted(austen.items())[:2])
    for i, (name, text) in enumerate(books.items()):
        data = text.encode()
        put(s3_server, b, f"austen/{name}.txt" + (".gz" if i else ""), gzip.compress(data) if i else data)
    put(s3_server, b, "austen/README.md", b"not a .txt: skipped")
    put(s3_server, b, "rec/a.jsonl", "\n".join(json.dumps({"body": d}) for d in AWKWARD_DOCS).encode())
    buf = io.BytesIO()
    pq.write_table(pa.table({"content": [d + " (parquet)" for d in AWKWARD_DOCS]}), buf)
    put(s3_server, b, "pq/a.parquet", buf.getvalue())
    spec = make_spec(
        {
            "sources": [
                {"name": "austen", "s3": {"uri": "s3://corpus/austen/", "textUnit": "paragraph"}},
                {"name": "rec", "s3": {"uri": "s3://corpus/rec/", "format": "jsonl", "field": "body"}},
                {"name": "pq", "s3": {"uri": "s3://corpus/pq/", "format": "parquet", "field": "content"}},
            ],
            "preprocessing": raw_clean(),
            "tokenizer": {"train": {"vocabSize": 2048}},
            "outputUri": "s3://shards/run1",
            "validationFraction": 0.05,
        },
        storage={"endpoint": s3_server.endpoint, "region": "us-east-1"},
    )
    res = prepare_data(spec)
    store = S3Store("s3://shards/run1", S3Options(endpoint=s3_server.endpoint))
    m = Manifest.from_json(store.get(MANIFEST_NAME))
    expected = [p for t in books.values() for p in split_text(t, "paragraph")]
    expected += AWKWARD_DOCS + [d + " (parquet)" for d in AWKWARD_DOCS]
    docs = decode_docs(store, m)
    assert sorted(docs) == sorted(expected)
    assert sum(s.documents for s in m.shards) == len(expected)
    assert {s.name: s.extra["files"] for s in m.sources} == {"austen": 2, "rec": 1, "pq": 1}
    assert res.manifest_uri == "s3://shards/run1/manifest.json"
    # the loader streams the same shards back from S3
    ld = ShardLoader("s3://shards/run1", "train", 0, 1, 4, 64, 0, S3Options(endpoint=s3_server.endpoint))
    batch = next(iter(ld))
    assert batch.shape == (4, 65) and int(batch.max()) < m.tokenizer.vocab_size


def test_storage_region_and_endpoint_come_from_the_spec(s3_server: S3Server) -> None:
    """spec.storage.endpoint / spec.storage.region"""
    spec = make_spec(
        {
            "sources": [{"name": "s", "pythonStdlib": {}}],
            "tokenizer": {"train": {"vocabSize": 300}},
            "outputUri": "s3://x/y",
        },
        storage={"endpoint": s3_server.endpoint, "region": "eu-west-1"},
    )
    cfg = PrepareConfig.from_spec(spec)
    assert cfg.s3.endpoint == s3_server.endpoint and cfg.s3.region == "eu-west-1"
    assert S3Store("s3://x", cfg.s3).client.meta.region_name == "eu-west-1"


def test_multipart_shard_has_part_suffix_and_reads_back(s3_server: S3Server) -> None:
    s3_server.bucket("multipart")
    opts = S3Options(endpoint=s3_server.endpoint, multipart_threshold=5 * 2**20, multipart_chunk=5 * 2**20)
    store = S3Store("s3://multipart/big", opts)
    tokens = np.random.default_rng(0).integers(0, 50_000, size=3_200_000, dtype=np.uint32)  # 6.4 MB as uint16
    (w,) = shard.write_split(store, "train", [tokens], vocab_size=50_000, eot_id=1, max_tokens=10**8)
    assert w.etag is not None and w.etag.endswith("-2"), w.etag
    small = S3Store("s3://multipart/small", opts)
    (w2,) = shard.write_split(small, "train", [tokens[:1000]], vocab_size=50_000, eot_id=1, max_tokens=10**8)
    assert w2.etag is not None and "-" not in w2.etag
    m = Manifest("f", shard_tokenizer(), "uint16", [w.info], [], {}, 0)
    assert torch.equal(read_verified_shard(store, w.info, m), torch.from_numpy(tokens.astype(np.int32)))


def shard_tokenizer() -> Any:
    from llmtrain.api.shards import TokenizerInfo

    return TokenizerInfo("tokenizer.json", "0", 50_000, 1, "<eot>")


def test_prefix_with_more_than_1000_objects_is_read_completely(s3_server: S3Server) -> None:
    b = s3_server.bucket("many")
    client = s3_server.client()
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda i: client.put_object(Bucket=b, Key=f"p/{i:05d}.txt", Body=f"document number {i} " * 3),
                range(1100),
            )
        )
    spec = make_spec(
        {
            "sources": [{"name": "many", "s3": {"uri": "s3://many/p/", "textUnit": "file"}}],
            "tokenizer": {"train": {"vocabSize": 300}},
            "outputUri": "s3://many/out",
            "validationFraction": 0.2,
        },
        storage={"endpoint": s3_server.endpoint},
    )
    m = prepare_data(spec).manifest
    assert m.sources[0].extra["files"] == 1100 and m.sources[0].documents == 1100


def test_missing_bucket_and_missing_credentials(
    s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data: dict[str, Any] = {
        "sources": [{"name": "s", "s3": {"uri": "s3://no-such-bucket/x/"}}],
        "tokenizer": {"train": {"vocabSize": 300}},
        "outputUri": str(tmp_path / "out"),
    }
    spec = make_spec(data, storage={"endpoint": s3_server.endpoint})
    with pytest.raises(
        SourceError, match=r"spec\.data\.sources\[0\]\.s3\.uri.*no-such-bucket.*does not exist"
    ):
        prepare_data(spec)
    s3_server.bucket("emptyish")
    spec = make_spec(
        {**data, "sources": [{"name": "s", "s3": {"uri": "s3://emptyish/none/"}}]},
        storage={"endpoint": s3_server.endpoint},
    )
    with pytest.raises(SourceError, match=r"sources\[0\]\.s3\.uri: no \.txt\[\.gz\] objects"):
        prepare_data(spec)
    out_missing = make_spec({**data, "sources": [{"name": "s", "pythonStdlib": {}}], "outputUri": "s3://no-such-out/p"},
                            storage={"endpoint": s3_server.endpoint})  # fmt: skip
    with pytest.raises(PrepareError, match=r"spec\.data\.outputUri: bucket 'no-such-out' does not exist"):
        prepare_data(out_missing)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(SourceError, match=r"no S3 credentials.*spec\.storage\.secretRef"):
        prepare_data(make_spec({**data, "sources": [{"name": "s", "s3": {"uri": "s3://emptyish/none/"}}]},
                               storage={"endpoint": s3_server.endpoint}))  # fmt: skip
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()
