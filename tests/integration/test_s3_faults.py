# ruff: noqa: F811  (pytest fixtures imported from other modules are redefined as arguments)
"""S3 that misbehaves, and a second S3 server (issue 13, items 3 and 4).

A fault-injecting proxy (tests/s3fault.py) on loopback in front of moto's server (and of
gofakes3) adds latency, answers 503 SlowDown, resets connections mid-body and truncates bodies,
on chosen requests of the data pipeline, the loader, checkpoint save/restore and export. Each
fault is counted, so the tests know it happened. Expected and checked here:

- transient faults are retried with backoff, and the whole flow (prepare → train with
  checkpoints → resume → export → generate) ends bit-identical to a clean run on moto — also
  on gofakes3, clean and under the same faults;
- a corrupted shard or checkpoint file on the server is detected by its checksum and named
  (file and URI), and never trained on;
- a checkpoint gets its COMPLETE marker only once every file is in the store at its size; a
  save that fails leaves the previous complete checkpoint as the one a resume takes;
- nothing a user wrote earlier (prepared data, earlier checkpoints) is deleted or changed by a
  failed run.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from llmtrain.runtime.checkpoint import CheckpointCorruptError, Lineage
from llmtrain.runtime.data.loader import ShardLoader
from llmtrain.runtime.data.prepare import prepare_data
from llmtrain.runtime.export import read_checkpoint_weights, resolve_checkpoint
from llmtrain.runtime.lora import export_for_job
from llmtrain.runtime.publish import MANIFEST_NAME
from llmtrain.runtime.store import S3Store, StorageError, s3_client
from llmtrain.runtime.train import RunContext, train
from typer.testing import CliRunner

from llmtrain.api.config import runtime_config_from_spec
from llmtrain.api.s3 import S3Options
from llmtrain.api.shards import ShardFormatError
from llmtrain.api.spec import LLMTrainingJobSpec
from tests.data.datahelpers import S3Server, make_spec, s3_server, stdlib_sample, write_docs  # noqa: F401
from tests.s3fault import FaultProxy, Rule, gofakes3_bin, gofakes3_server
from tests.unit.test_generate import cli

pytestmark = pytest.mark.timeout(600)

CLEAN = S3Options()


@dataclass
class Backend:
    name: str
    endpoint: str
    proxy: FaultProxy

    def client(self) -> Any:
        """A client straight to the server (no proxy): to look at and to tamper with objects."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def objects(self, bucket: str, prefix: str = "") -> dict[str, str]:
        """key → sha256 of every object under ``prefix`` (read directly, not through the proxy)."""
        c = self.client()
        keys = [o["Key"] for p in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                for o in p.get("Contents", [])]  # fmt: skip
        return {
            k: hashlib.sha256(c.get_object(Bucket=bucket, Key=k)["Body"].read()).hexdigest() for k in keys
        }

    def flip_byte(self, bucket: str, key: str, at: int = -1) -> None:
        """Corrupt an object on the server: same size, one byte changed."""
        c = self.client()
        data = bytearray(c.get_object(Bucket=bucket, Key=key)["Body"].read())
        data[at] ^= 0xFF
        c.put_object(Bucket=bucket, Key=key, Body=bytes(data))


def _proxied(endpoint: str) -> Iterator[FaultProxy]:
    host, port = endpoint.removeprefix("http://").split(":")
    proxy = FaultProxy(host, int(port)).start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def moto(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    for proxy in _proxied(s3_server.endpoint):
        # The checkpoint lineage and `llmtrain generate` take the endpoint as pods get it.
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        yield Backend("moto", s3_server.endpoint, proxy)


@pytest.fixture(scope="module")
def gofakes3() -> Iterator[str]:
    if not gofakes3_bin().exists():
        pytest.skip(f"{gofakes3_bin()} not built: bash tests/cluster/build.sh s3 (make cluster-tools does)")
    with gofakes3_server() as endpoint:
        yield endpoint


@pytest.fixture(params=["moto", "gofakes3"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    if request.param == "moto":
        yield request.getfixturevalue("moto")
        return
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    endpoint = request.getfixturevalue("gofakes3")
    for proxy in _proxied(endpoint):
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        yield Backend("gofakes3", endpoint, proxy)


# ------------------------------------------------------------------ each fault, one read


TRANSIENT = ["latency", "slowdown", "reset", "truncate"]


@pytest.mark.parametrize("fault", TRANSIENT)
def test_each_transient_fault_is_retried_and_the_bytes_are_exact(moto: Backend, fault: str) -> None:
    """One GET per fault kind through Storage (data pipeline, loader, export) and through the
    checkpoint store's get_bytes and download_file; each read returns the exact bytes."""
    bucket = moto.bucket(f"one-{fault}")
    data = bytes(range(256)) * 4096  # 1 MiB: the cut comes mid-body
    moto.client().put_object(Bucket=bucket, Key="obj", Body=data)
    proxied = S3Options(endpoint=moto.proxy.endpoint)
    store = S3Store(f"s3://{bucket}", proxied)
    rule = moto.proxy.add(Rule(fault, "GET", "/obj", times=3, delay=0.3))  # type: ignore[arg-type]
    assert store.get("obj") == data
    assert store.get_range("obj", 1000, 70_000) == data[1000:71_000]
    ckpt = S3Store(f"s3://{bucket}", proxied)
    assert ckpt.get_bytes("obj") == data
    assert rule.hits == 3, moto.proxy.served  # every read met its fault
    moto.proxy.add(Rule(fault, "GET", "/obj", times=1, delay=0.3))  # type: ignore[arg-type]
    local = moto.proxy  # download_file: s3transfer's own retries
    ckpt.get_file("obj", Path(f"/tmp/llmtrain-fault-{fault}-{local.port}"))
    assert Path(f"/tmp/llmtrain-fault-{fault}-{local.port}").read_bytes() == data
    Path(f"/tmp/llmtrain-fault-{fault}-{local.port}").unlink()
    assert moto.proxy.served[fault] == 4


@pytest.mark.parametrize("fault", ["slowdown", "reset", "truncate"])
def test_without_retries_the_same_fault_fails_the_read(moto: Backend, fault: str) -> None:
    """Negative control of the test above: with no retries, the fault is seen as an error,
    so the faults are real and the exact bytes above came from the retries."""
    bucket = moto.bucket(f"noretry-{fault}")
    moto.client().put_object(Bucket=bucket, Key="obj", Body=b"x" * 100_000)
    store = S3Store(f"s3://{bucket}", S3Options(endpoint=moto.proxy.endpoint, max_attempts=0))
    moto.proxy.add(Rule(fault, "GET", "/obj"))  # type: ignore[arg-type]
    with pytest.raises(StorageError, match=rf"s3://{bucket}/obj"):
        store.get("obj")


def test_retried_puts_land_once(moto: Backend) -> None:
    """A PUT answered 503 SlowDown, or reset after the server stored it, is retried by botocore;
    the object is there once, whole."""
    bucket = moto.bucket("puts")
    store = S3Store(f"s3://{bucket}", S3Options(endpoint=moto.proxy.endpoint))
    slow = moto.proxy.add(Rule("slowdown", "PUT", "/a$", times=2))
    reset = moto.proxy.add(Rule("reset", "PUT", "/b$"))
    store.put("a", b"a" * 5000)
    store.put("b", b"b" * 5000)
    assert (slow.hits, reset.hits) == (2, 1)
    assert moto.objects(bucket) == {
        "a": hashlib.sha256(b"a" * 5000).hexdigest(),
        "b": hashlib.sha256(b"b" * 5000).hexdigest(),
    }


# ------------------------------------------------------------------ the whole flow


def job_spec(src: Path, bucket: str, prefix: str, endpoint: str, max_steps: int) -> LLMTrainingJobSpec:
    return make_spec(
        {
            "sources": [{"name": "py", "local": {"glob": str(src / "*.txt"), "textUnit": "file"}}],
            "tokenizer": {"train": {"vocabSize": 320}},
            "outputUri": f"s3://{bucket}/{prefix}/data",
            "validationFraction": 0.2,
            "shardMaxTokens": 1000,  # several shards: 9 steps read across two of them
        },
        model={
            "architecture": {"layers": 2, "dModel": 32, "heads": 4, "contextLength": 32, "multipleOf": 16}
        },
        training={
            "optimizer": {"lr": 0.003},
            "batch": {"globalBatchSize": 4, "microBatchSize": 2},
            "duration": {"maxSteps": max_steps},
            "logEverySteps": 1,
        },
        validation={"everySteps": 3, "batches": 2},
        checkpoint={"uri": f"s3://{bucket}/{prefix}/ckpt", "everySteps": 3, "keepLast": 3},
        export={"uri": f"s3://{bucket}/{prefix}/model"},
        storage={"endpoint": endpoint, "region": "us-east-1"},
        metrics={"enabled": False},
    )


@dataclass
class FlowResult:
    shards: dict[str, str]  # name → sha256, as stored
    losses: list[float]
    resumed_from: int | None
    weights: dict[str, torch.Tensor]
    export: dict[str, str]  # file → sha256, as stored
    generated: str


def run_flow(b: Backend, src: Path, bucket: str, prefix: str) -> FlowResult:
    """prepare → train 6 steps (checkpoints at 3, 6) → resume to 9 → export → generate, with
    every S3 request through the proxy."""
    endpoint = b.proxy.endpoint
    s3 = S3Options(endpoint=endpoint)
    spec = job_spec(src, bucket, prefix, endpoint, max_steps=6)
    prepared = prepare_data(spec, executor="local")
    vocab = prepared.manifest.tokenizer.vocab_size
    loader = functools.partial(ShardLoader, f"s3://{bucket}/{prefix}/data", storage=s3)
    ctx = RunContext(metrics_addr="127.0.0.1", gather_weights=True)
    first = train(runtime_config_from_spec(spec, vocab_size=vocab), loader, ctx=ctx)
    spec = job_spec(src, bucket, prefix, endpoint, max_steps=9)
    again = train(runtime_config_from_spec(spec, vocab_size=vocab), loader, ctx=ctx)
    assert again.weights is not None
    assert export_for_job(spec, f"s3://{bucket}/{prefix}/ckpt", s3=s3) == f"s3://{bucket}/{prefix}/model"
    gen = CliRunner().invoke(
        cli(),
        ["generate", "--model", f"s3://{bucket}/{prefix}/model", "--prompt", "def ", "--temperature", "0",
         "--max-tokens", "8", "--ids"],
    )  # fmt: skip
    assert gen.exit_code == 0, gen.output
    stored = b.objects(bucket, f"{prefix}/")
    return FlowResult(
        shards={k.rsplit("/", 1)[1]: v for k, v in stored.items() if k.endswith(".bin")},
        losses=first.losses + again.losses,
        resumed_from=again.resumed_from,
        weights=again.weights,
        # The published version's files; its manifest and the pointer name a random version id.
        export={
            k.rsplit("/", 1)[1]: v
            for k, v in stored.items()
            if f"{prefix}/model/versions/" in k and not k.endswith(MANIFEST_NAME)
        },
        generated=json.loads(gen.output)["new"],
    )


FLOW_FAULTS = [
    # data pipeline: its first listing and shard uploads throttled, one reset after the server
    # stored it
    Rule("slowdown", "GET", r"list-type=2"),
    Rule("slowdown", "PUT", r"/data/train-\d+\.bin", times=2),
    Rule("reset", "PUT", r"/data/validation-00000\.bin"),
    # loader: the manifest truncated, shard downloads reset and truncated mid-body, one slow
    Rule("truncate", "GET", r"/data/manifest\.json"),
    Rule("reset", "GET", r"/data/train-\d+\.bin", times=2),
    Rule("truncate", "GET", r"/data/train-\d+\.bin"),
    Rule("latency", "GET", r"/data/validation-00000\.bin", delay=0.5),
    # checkpoint save: a file upload and the marker throttled, uploads slow
    Rule("slowdown", "PUT", r"/ckpt/step_00000003/__0_0\.distcp"),
    Rule("slowdown", "PUT", r"/ckpt/step_00000006/COMPLETE"),
    Rule("latency", "PUT", r"/ckpt/", times=2, delay=0.3),
    # checkpoint restore: the marker truncated, the shard file reset mid-body
    Rule("truncate", "GET", r"/ckpt/step_00000006/COMPLETE"),
    Rule("reset", "GET", r"/ckpt/step_00000006/__0_0\.distcp"),
    # export: weights upload throttled, its read-back check reset mid-body; generate: the
    # weights download reset mid-body
    Rule("slowdown", "PUT", r"/model/versions/[^/]+/model\.safetensors"),
    Rule("reset", "GET", r"/model/versions/[^/]+/model\.safetensors", times=2),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("corpus")
    write_docs(src, stdlib_sample(16))
    return src


@pytest.fixture(scope="module")
def reference(corpus: Path, s3_server: S3Server) -> Iterator[FlowResult]:
    """The clean run on moto that every other run must match bit for bit."""
    mp = pytest.MonkeyPatch()
    try:
        for proxy in _proxied(s3_server.endpoint):
            mp.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
            b = Backend("moto", s3_server.endpoint, proxy)
            yield run_flow(b, corpus, b.bucket("reference"), "clean")
    finally:
        mp.undo()


@pytest.mark.slow  # ~25 s a run on moto; the single-read tests above are the fast variant
@pytest.mark.parametrize(
    ("backend", "faults"),
    [("moto", True), ("gofakes3", True), ("gofakes3", False)],
    ids=["moto-faults", "gofakes3-faults", "gofakes3-clean"],
    indirect=["backend"],
)
def test_flow_is_bit_identical_to_a_clean_run_on_moto(
    backend: Backend, faults: bool, corpus: Path, reference: FlowResult
) -> None:
    """prepare → train with checkpoints → resume → export → generate, on moto and on gofakes3,
    clean and under every fault kind: shards, losses, weights, exported files and the generated
    ids are those of the clean moto run, and every fault asked for was given."""
    rules = (
        [backend.proxy.add(Rule(r.fault, r.method, r.key, r.times, r.delay)) for r in FLOW_FAULTS]
        if faults
        else []
    )
    got = run_flow(backend, corpus, backend.bucket(f"flow-{backend.name}-{faults}".lower()), "run")
    print(
        f"\n{backend.name} {'faults' if faults else 'clean'}: {dict(backend.proxy.served)}"
    )  # RESULTS figures
    missed = [(r.fault, r.method, r.key, r.hits) for r in rules if r.hits != r.times]
    assert not missed, (missed, backend.proxy.served)
    assert got.shards == reference.shards and len(got.shards) >= 3
    assert got.resumed_from == 6 and got.losses == reference.losses
    assert got.weights.keys() == reference.weights.keys()
    for k, v in reference.weights.items():
        assert torch.equal(got.weights[k], v), k
    assert got.export == reference.export and "model.safetensors" in got.export
    assert got.generated == reference.generated


# ------------------------------------------------------------------ corrupted objects


def test_corrupted_shard_is_named_and_never_trained_on(moto: Backend, corpus: Path) -> None:
    bucket = moto.bucket("corrupt-shard")
    spec = job_spec(corpus, bucket, "p", moto.proxy.endpoint, max_steps=3)
    prepared = prepare_data(spec, executor="local")
    cfg = runtime_config_from_spec(spec, vocab_size=prepared.manifest.tokenizer.vocab_size)
    data, direct = f"s3://{bucket}/p/data", S3Options(endpoint=moto.endpoint)
    probe = ShardLoader(data, "train", 0, 1, 2, 32, cfg.train.seed, direct)
    first = probe.epoch_order(0)[0][0].info.path  # the shard the run reads first
    moto.flip_byte(bucket, f"p/data/{first}")
    before = moto.objects(bucket)
    used: list[int] = []

    class Counting(ShardLoader):
        def __iter__(self) -> Iterator[torch.Tensor]:
            for batch in super().__iter__():
                used.append(1)
                yield batch

    counting = functools.partial(Counting, data, storage=S3Options(endpoint=moto.proxy.endpoint))
    with pytest.raises(ShardFormatError, match=rf"s3://{bucket}/p/data/{first}: sha256") as e:
        train(cfg, counting, ctx=RunContext(metrics_addr="127.0.0.1"))
    assert "corrupt" in str(e.value) and not used  # not one batch reached the model
    assert moto.objects(bucket) == before  # the failed run deleted or rewrote nothing


def _tiny_state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g)}}


def _empty_state() -> dict[str, Any]:
    return {"model": {"w": torch.empty(64, 64), "b": torch.empty(64)}}


@pytest.mark.parametrize("file", ["__0_0.distcp", ".metadata"])
def test_corrupted_checkpoint_file_is_named_and_not_loaded(moto: Backend, file: str) -> None:
    bucket = moto.bucket(f"corrupt-ckpt{file.replace('_', '-').replace('.', '-')}")
    uri = f"s3://{bucket}/run"
    lineage = Lineage(uri, keep_last=3)
    lineage.save(3, _tiny_state(3), {})
    moto.flip_byte(bucket, f"run/step_00000003/{file}", at=len(file) * 7)
    before = moto.objects(bucket)
    info = Lineage(uri, keep_last=3).latest()
    assert info is not None and info.step == 3
    state = _empty_state()
    with pytest.raises(CheckpointCorruptError, match=rf"{uri}/step_00000003/{file}: .* sha256"):
        Lineage(uri, keep_last=3).load(info, state)
    # Export reads through the same verified load: it refuses the file too.
    with pytest.raises(CheckpointCorruptError, match=rf"{uri}/step_00000003/{file}: .* sha256"):
        read_checkpoint_weights(resolve_checkpoint(uri))
    assert moto.objects(bucket) == before


def test_marker_only_after_every_file_is_stored_at_its_size(tmp_path: Path) -> None:
    """A store that loses a file on upload: the save fails and writes no marker."""
    lineage = Lineage(str(tmp_path), keep_last=3)
    put = lineage.store.put_file

    def lossy(local: Path, key: str) -> None:
        if not key.endswith(".distcp"):
            put(local, key)

    lineage.store.put_file = lossy  # type: ignore[method-assign]
    with pytest.raises(CheckpointCorruptError, match=r"step_00000003: after upload __0_0\.distcp is missing"):
        lineage.save(3, _tiny_state(3), {})
    assert not (tmp_path / "step_00000003" / "COMPLETE").exists()
    assert Lineage(str(tmp_path), keep_last=3).latest() is None


@pytest.mark.parametrize("file", ["__0_0.distcp", ".metadata", "COMPLETE"])
def test_failed_save_falls_back_to_the_previous_complete_checkpoint(moto: Backend, file: str) -> None:
    """Step 6's save meets a throttle that outlasts the retries on one of its files: the save
    raises, step 3 stays complete and untouched, and a resume takes step 3."""
    bucket = moto.bucket(f"failed-save{file.replace('_', '-').replace('.', '-').lower()}")
    uri = f"s3://{bucket}/run"
    lineage = Lineage(uri, keep_last=1)  # keepLast 1: a save of 6 would prune 3, had it finished
    lineage.save(3, _tiny_state(3), {"note": "three"})
    before = moto.objects(bucket)
    lineage.store = S3Store(uri, S3Options(max_attempts=1))  # quick to give up: 2 tries
    rule = moto.proxy.add(Rule("slowdown", "PUT", rf"/run/step_00000006/{file}$", times=100))
    with pytest.raises(Exception, match=r"SlowDown|503"):
        lineage.save(6, _tiny_state(6), {"note": "six"})
    assert rule.hits == 2
    moto.proxy.clear()
    resumed = Lineage(uri, keep_last=1)
    info = resumed.latest()  # also clears step 6's leftovers
    assert info is not None and info.step == 3 and info.meta["note"] == "three"
    state = _empty_state()
    resumed.load(info, state)
    torch.testing.assert_close(state, _tiny_state(3), rtol=0, atol=0)
    after = moto.objects(bucket)
    assert {k: v for k, v in after.items() if "step_00000003" in k} == before
    assert not [k for k in after if "step_00000006" in k]


def test_s3_client_cache_follows_the_endpoint_variable(
    moto: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint store takes its endpoint from AWS_ENDPOINT_URL: a changed variable is a
    new client, not the cached one pointing at the old server."""
    a = s3_client(S3Options())
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.endpoint)
    b = s3_client(S3Options())
    assert a is not b and b.meta.endpoint_url == moto.endpoint


def test_unreadable_manifest_is_not_reported_as_missing(moto: Backend) -> None:
    """Retries spent on a broken manifest read: the loader says it cannot read it (naming the
    URI and the cause), not "run prepare first"."""
    from llmtrain.runtime.data.loader import LoaderError

    bucket = moto.bucket("manifest-broken")
    moto.client().put_object(Bucket=bucket, Key="d/manifest.json", Body=b"{}" * 10_000)
    moto.proxy.add(Rule("reset", "GET", "/manifest.json", times=2))
    with pytest.raises(
        LoaderError, match=rf"cannot read the data manifest: .*s3://{bucket}/d/manifest\.json"
    ):
        ShardLoader(f"s3://{bucket}/d", storage=S3Options(endpoint=moto.proxy.endpoint, max_attempts=1))


@pytest.mark.parametrize("backend", ["gofakes3"], indirect=True)
def test_second_server_multipart_listing_and_errors(backend: Backend) -> None:
    """Where S3 servers differ (moto's side: tests/integration/test_data_s3.py): a multipart
    upload's bytes (and its ETag, which differs), a listing over 1000 keys (two pages), the missing-key and
    missing-bucket errors — on gofakes3, through the proxy."""
    bucket = backend.bucket("second")
    opts = S3Options(endpoint=backend.proxy.endpoint, multipart_threshold=5 << 20, multipart_chunk=5 << 20)
    store = S3Store(f"s3://{bucket}/p", opts)
    big = bytes(range(256)) * (11 << 12)  # 11 MiB: three parts
    etag = store.put("big.bin", big)
    # A difference found: gofakes3 gives a multipart object the MD5 of its bytes as ETag, where
    # AWS and moto give "<md5 of the parts' MD5s>-3". Nothing here trusts ETags for integrity
    # (shards and checkpoint files carry sha256), so both are fine.
    assert etag == hashlib.md5(big).hexdigest(), etag
    assert store.get("big.bin") == big and store.size("big.bin") == len(big)
    client = backend.client()
    for i in range(1005):
        client.put_object(Bucket=bucket, Key=f"p/many/{i:04d}", Body=b"")
    assert store.list_keys("many/") == [f"many/{i:04d}" for i in range(1005)]
    with pytest.raises(StorageError, match=rf"s3://{bucket}/p/nothing does not exist"):
        store.get("nothing")
    assert not store.exists("nothing")
    with pytest.raises(StorageError, match=r"bucket 'no-such-bucket' does not exist"):
        S3Store("s3://no-such-bucket/x", opts).get("y")
